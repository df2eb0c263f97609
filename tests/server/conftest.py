import importlib.util

# The GPU image lacks the server stack (fastapi, uvicorn, openai); CI always has it. Every
# module here starts the real server or imports test_server's helpers.
_SERVER_STACK = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai"))
collect_ignore_glob = [] if _SERVER_STACK else ["test_*.py"]
