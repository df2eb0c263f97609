"""Starting and stopping the real server (`python -m mixq.launch_server`) in a subprocess
on a free loopback port, shared by the server test modules."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, env: dict | None = None, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """Launch on the CPU with `args`; return (process, base URL) once /health answers.
    A server that exits or never answers raises with its output."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mixq.launch_server", "--port", str(port), "--device", "cpu",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")


def stop_server(proc: subprocess.Popen) -> str:
    """SIGTERM (graceful shutdown); the server must exit 0. Returns its output."""
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0
        return proc.stdout.read()
    finally:
        proc.kill()
