"""One streamed POST, read on a background thread.

A blocked socket read cannot be interrupted from another thread, so the HTTP exchange runs on a
daemon thread that hands over what it reads through a queue. The consumer polls the queue and
its cancel event, and can walk away at once: the thread notices at its next line or when the
read times out, and closes the response.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Union

import httpx

POLL_SECONDS = 0.05  # how often a waiting consumer looks at its cancel event


@dataclass(frozen=True)
class Opened:
    """The status line arrived. `body` is read whole when the answer is not an event stream
    (an error, or a server that ignored `stream: true`); otherwise lines follow."""

    status: int
    headers: dict[str, str]
    body: str = ""


class _End:
    """The response body ended."""


END = _End()
CANCELLED = object()
Item = Union[Opened, str, _End, Exception]


class StreamingPost:
    def __init__(self, client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self._items: queue.Queue[Item] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(client, url, body, headers), daemon=True)
        self._thread.start()

    def next(self, cancel: threading.Event) -> Item | object:
        """The next item: Opened first, then body lines, then END; an exception in their place
        (httpx.RequestError for a network failure); CANCELLED as soon as `cancel` is set."""
        while not cancel.is_set():
            try:
                return self._items.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
        return CANCELLED

    def close(self) -> None:
        self._stop.set()

    def _run(self, client: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        try:
            with client.stream("POST", url, json=body, headers=headers) as response:
                is_json = "json" in response.headers.get("content-type", "")
                if response.status_code != 200 or is_json:
                    response.read()
                    self._items.put(Opened(response.status_code, dict(response.headers), response.text))
                    return
                self._items.put(Opened(200, dict(response.headers)))
                for line in response.iter_lines():
                    if self._stop.is_set():
                        return
                    self._items.put(line)
            self._items.put(END)
        except Exception as exc:  # the consumer raises it or turns it into one clear line
            if not self._stop.is_set():
                self._items.put(exc)
