import importlib.util

# The GPU image lacks the server stack (fastapi, uvicorn, openai); CI always has it.
_SERVER_STACK = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai"))
collect_ignore = [] if _SERVER_STACK else ["test_server.py", "test_lifecycle.py"]
