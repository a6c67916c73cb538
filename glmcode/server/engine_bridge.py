"""One engine request consumed on its own thread and read from asyncio.

The engine's threading model lets any thread consume a stream (taking the engine lock and
running steps for every request until its own tokens arrive), so each HTTP request gets a
worker thread that does exactly that and hands the outputs to the event loop. Several such
threads at once are several sequences in the scheduler, decoded together in one batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from glmcode.engine.llm import RequestStream, StreamOutput

_END = object()
KEEPALIVE = object()  # what `outputs` yields when nothing came for `keepalive` seconds


class EngineRequest:
    def __init__(self, stream: RequestStream, loop: asyncio.AbstractEventLoop):
        self.stream = stream
        self.cancel_reason: str | None = None  # "client", "stop" or "shutdown" once cancelled
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._consume, name="glmcode-serve-request", daemon=True)

    def start(self) -> EngineRequest:
        self._thread.start()
        return self

    def cancel(self, reason: str) -> None:
        """Frees the sequence after the step in flight; callable from any thread."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self.stream.cancel()

    async def outputs(self, keepalive: float | None = None) -> AsyncIterator[StreamOutput | object]:
        """The engine's outputs; KEEPALIVE after `keepalive` idle seconds; an engine error is raised."""
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), keepalive)
            except TimeoutError:
                yield KEEPALIVE
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _consume(self) -> None:
        try:
            for output in self.stream:
                self._hand_over(output)
        except BaseException as error:  # noqa: BLE001 - every failure goes to the HTTP side
            self._hand_over(error)
        finally:
            self.stream.close()
            self._hand_over(_END)

    def _hand_over(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server has stopped
            pass
