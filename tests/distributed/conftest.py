import importlib.util

# The GPU image lacks the server stack (fastapi, uvicorn, httpx); CI always has it.
_SERVER = ("fastapi", "uvicorn", "httpx")
collect_ignore = [] if all(importlib.util.find_spec(m) for m in _SERVER) else ["test_launch.py"]
