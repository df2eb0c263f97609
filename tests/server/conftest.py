import importlib.util

# The GPU image lacks the server stack (fastapi, uvicorn, openai); CI always has it. Every
# module here starts the real server or imports test_server's helpers.
_SERVER_STACK = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai"))
collect_ignore_glob = [] if _SERVER_STACK else ["test_*.py"]

if _SERVER_STACK:
    import pytest

    from tests.server.launch_utils import start_server, stop_server

    LIMITED_ARGS = ("--api-key", "k", "--max-total-tokens", "2048", "--page-size", "8", "--max-running-requests",
                    "4", "--max-queued-requests", "4", "--max-n", "4", "--max-request-body-mb", "1",
                    "--log-level", "warning")

    @pytest.fixture(scope="session")
    def limited_server():
        """The tiny model behind small limits (1 MiB bodies, n <= 4, 4 running + 4 queued
        requests) and an API key 'k': shared by the robustness and fuzz tests. Yields
        (url, headers); at the end it must still shut down cleanly."""
        from tests.server.test_server import MODEL

        proc, url = start_server("--model-path", str(MODEL), *LIMITED_ARGS)
        yield url, {"Authorization": "Bearer k"}
        out = stop_server(proc)
        assert "mixq: shut down cleanly" in out and "Traceback" not in out, out[-3000:]
