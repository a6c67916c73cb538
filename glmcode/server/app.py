"""The HTTP application (FastAPI on uvicorn): /health, /v1/models, /v1/chat/completions.

Every error is answered in the OpenAI error shape: 400 for a body that does not validate, 401
for a missing or wrong key, 404 for an unknown model or path, 413 for a body over the limit,
429 with Retry-After when the queue is full, 503 while the model loads or the server stops.
A streamed answer starts at once (SSE comments keep an idle connection alive through a long
prefill); a client that goes away, mid-stream or while waiting, has its sequence freed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from glmcode.server.completions import sse
from glmcode.server.engine_bridge import KEEPALIVE
from glmcode.server.guards import LimitBody, RequireApiKey
from glmcode.server.protocol import ApiError, ChatCompletionRequest, error_body
from glmcode.server.service import Service, Turn

MAX_BODY_BYTES = 16 * 2**20  # a 200K-token conversation is about 1 MB of JSON
KEEPALIVE_SECONDS = 15.0
logger = logging.getLogger("glmcode.server")


def create_app(service: Service, *, api_key: str | None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.loop = asyncio.get_running_loop()  # where signal handlers schedule the shutdown
        yield

    app = FastAPI(title="glmcode", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(LimitBody, max_bytes=max_body_bytes)
    app.add_middleware(RequireApiKey, api_key=api_key)  # added last: runs first

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        message = f"{where}: {problem.get('msg')}" if where else str(problem.get("msg"))
        if not where:  # the body itself: not JSON, or not an object
            message = f"the body must be a JSON object ({problem.get('msg')})"
        return JSONResponse(error_body(message, "invalid_request_error", "invalid_request", where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else str(error.detail)
        return JSONResponse(error_body(message, "invalid_request_error", str(error.status_code)),
                            status_code=error.status_code, headers=error.headers)  # fmt: skip

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("glmcode serve: %s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {error!r}", "server_error", "internal_error"), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = service.health()
        return JSONResponse(body, status_code=status)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(service.models())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        turn = service.admit()
        try:
            await service.start(turn, body)
        except BaseException:
            turn.close()
            raise
        if body.stream:
            return EventStream(_events(turn, body.include_usage), turn)
        return await _whole_response(turn, request)

    return app


class EventStream(StreamingResponse):
    """An SSE response whose turn is closed however the response ends (done, cut, cancelled)."""

    def __init__(self, events: AsyncIterator[str], turn: Turn):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.turn.close()


async def _events(turn: Turn, include_usage: bool) -> AsyncIterator[str]:
    builder, engine = turn.builder, turn.engine
    yield sse(builder.chunk({"role": "assistant", "content": ""}))
    try:
        async for output in engine.outputs(keepalive=KEEPALIVE_SECONDS):
            if output is KEEPALIVE:
                yield ": keep-alive\n\n"
                continue
            for delta in builder.feed(output):
                yield sse(builder.chunk(delta))
            if builder.stopped_by_string:
                engine.cancel("stop")
                break
    except Exception as error:  # the engine gave up on this request
        yield sse(error_body(f"generation failed: {error}", "server_error", "generation_failed"))
        yield sse("[DONE]")
        return
    if engine.cancel_reason == "shutdown":
        yield sse(error_body("the server is shutting down; this answer was cut short", "server_error", "shutdown"))
        yield sse("[DONE]")
        return
    for delta in builder.finish():
        yield sse(builder.chunk(delta))
    yield sse(builder.chunk({}, builder.finish_reason))
    if include_usage:
        yield sse(builder.chunk(None) | {"usage": builder.usage()})
    yield sse("[DONE]")


async def _whole_response(turn: Turn, request: Request) -> JSONResponse:
    """Collect the whole answer, unless the client goes away first (then its sequence is freed)."""

    async def collect() -> list[dict]:
        deltas = []
        async for output in turn.engine.outputs():
            deltas += turn.builder.feed(output)
            if turn.builder.stopped_by_string:
                turn.engine.cancel("stop")
                break
        return deltas + turn.builder.finish()

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    answer, gone = asyncio.create_task(collect()), asyncio.create_task(disconnected())
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            answer.cancel()
        turn.close()
    if not answer.done() or answer.cancelled():
        raise ApiError(499, "the client closed the connection")
    if answer.exception() is not None:
        raise ApiError(500, f"generation failed: {answer.exception()}", type="server_error")
    if turn.engine.cancel_reason == "shutdown":
        raise ApiError(503, "the server is shutting down; retry on another", type="service_unavailable", code="shutdown")
    return JSONResponse(turn.builder.response(answer.result()))
