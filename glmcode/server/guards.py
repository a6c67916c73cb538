"""ASGI middleware that answers before the application sees a request: API key, body size."""

from __future__ import annotations

import json
import secrets
from typing import Any, Awaitable, Callable

from glmcode.server.protocol import error_body

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_error(send: Send, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    raw = json.dumps(body).encode()
    header_list = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    header_list += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": header_list})
    await send({"type": "http.response.body", "body": raw})


class RequireApiKey:
    """Every /v1 request carries `Authorization: Bearer KEY` (compared in constant time)."""

    def __init__(self, app: App, api_key: str | None):
        self.app, self._expected = app, f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._expected is None or scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if secrets.compare_digest(given, self._expected):
            return await self.app(scope, receive, send)
        message = "missing API key: send Authorization: Bearer KEY" if not given else "incorrect API key"
        await send_error(send, 401, error_body(message, "invalid_request_error", "invalid_api_key"),
                         {"www-authenticate": "Bearer"})  # fmt: skip


class LimitBody:
    """Reads a request's body up to `max_bytes` before the application runs; more is a 413."""

    def __init__(self, app: App, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only the disconnect is left to wait for

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes // 2**20} MiB"
        await send_error(send, 413, error_body(message, "invalid_request_error", "request_too_large"))
