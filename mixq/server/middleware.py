"""What every request passes before a route sees it (plain ASGI, so streaming and client
disconnects reach the routes untouched): the API key, the body-size limit, and refusal of
new work while the server drains for shutdown.

With `--api-key`, every path but `/health` and `/metrics` needs `Authorization: Bearer KEY`
(the scheme in any case, RFC 7235; the key compared in constant time). Those two stay open,
as in SGLang, for load-balancer probes and Prometheus scrapers, which carry no key; they
expose liveness and aggregate counters, never request content.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from fastapi import HTTPException

from mixq.server.errors import error_body

OPEN_PATHS = frozenset({"/health", "/metrics"})


@dataclass
class ServerState:
    """Shared between the launcher and the app: set `draining` when shutdown begins."""

    draining: bool = False


def authorized(header: str | None, api_key: str) -> bool:
    """`Authorization: Bearer KEY` (scheme case-insensitive), key compared in constant time."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


class RequestGuard:
    """ASGI middleware: 503 while draining, 401 without the key, 413 past the body limit."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, state: ServerState):
        self.app, self.api_key, self.max_body, self.state = app, api_key, max_body_bytes, state

    async def _refuse(self, send, status: int, message: str, type_=None, code=None) -> None:
        body = json.dumps(error_body(status, message, type_, code=code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.state.draining:
            return await self._refuse(send, 503, "the server is shutting down", code="shutting_down")
        if self.api_key and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not authorized(auth, self.api_key):
                return await self._refuse(send, 401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                          "authentication_error", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._refuse(send, 400, "invalid Content-Length header")
            if int(length) > self.max_body:
                return await self._refuse(send, 413, self._too_large(), code="request_too_large")
        received = 0

        async def limited_receive():
            # a chunked body has no Content-Length: count what arrives
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, self._too_large())
            return msg

        await self.app(scope, limited_receive, send)

    def _too_large(self) -> str:
        return (f"the request body is larger than {self.max_body / 2**20:g} MiB (the server's "
                "--max-request-body-mb)")
