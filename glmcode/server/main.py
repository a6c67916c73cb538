"""`glmcode serve`: bind, announce, load the engine once, serve until Ctrl-C or SIGTERM.

The socket is bound first (a busy port is one clear line), the state file is written at once
(status "loading", so a `glmcode ask` started meanwhile waits for this server instead of loading
a second copy), and the model loads on a thread while /health answers 503. The first Ctrl-C or
SIGTERM stops taking requests and ends those in flight cleanly (a stream gets a last error
event and [DONE]); then the disk tier is flushed, the state file removed, and the process exits
0. A second Ctrl-C quits without waiting for connections to close.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from glmcode import __version__
from glmcode.errors import GlmcodeError, UsageError
from glmcode.server.app import create_app
from glmcode.server.service import FAILED, Service
from glmcode.server.state import API_KEY_VARIABLE, READY, ServerRecord, remove_record, write_record
from glmcode.settings import Settings

DEFAULT_PORT = 8321
DEFAULT_MODEL_NAME = "glm-4.7-flash"  # what glmcode's own --remote asks for by default
GRACEFUL_SECONDS = 10  # after the streams were ended, the longest wait for connections to close


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    served_model_name: str = DEFAULT_MODEL_NAME
    max_num_seqs: int = 8
    max_queue: int = 64


def say(line: str) -> None:
    print(line, flush=True)


def serve(settings: Settings, options: ServeOptions, *, show_progress: bool) -> int:
    """Serve until stopped; returns the exit code."""
    from glmcode.launch import resolve_device
    from glmcode.weights import require_checkpoint

    check_exposure(options.host, options.api_key)
    model_dir = require_checkpoint(settings).resolve()
    listener = bind(options.host, options.port)
    service = Service(model_names=list(dict.fromkeys([options.served_model_name, model_dir.name])),
                      model_dir=str(model_dir), max_queue=options.max_queue, max_num_seqs=options.max_num_seqs)  # fmt: skip
    record = ServerRecord(
        pid=os.getpid(), host=options.host, port=listener.getsockname()[1], model_dir=str(model_dir),
        quantization=settings.quantization, dtype=settings.dtype, device=resolve_device(settings.device),
        served_model_name=options.served_model_name, api_key_required=bool(options.api_key), version=__version__,
    )  # fmt: skip
    config = uvicorn.Config(create_app(service, api_key=options.api_key), log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_SECONDS)  # fmt: skip
    server = _Server(config, service)
    write_record(record)
    try:
        say(f"glmcode serve: listening on {record.url} (OpenAI base URL {record.base_url}); loading {model_dir}…")
        loader = threading.Thread(target=_load, args=(settings, options, service, record, server, show_progress),
                                  name="glmcode-serve-load", daemon=True)  # fmt: skip
        loader.start()
        server.run(sockets=[listener])
    finally:
        remove_record(record.pid)
        listener.close()
        service.close()  # the disk tier writes what it still holds
    if service.status == FAILED:
        return service.failure.exit_code if isinstance(service.failure, GlmcodeError) else 1
    say("glmcode serve: stopped")
    return 0


def _load(settings: Settings, options: ServeOptions, service: Service, record: ServerRecord, server: _Server,
          show_progress: bool) -> None:  # fmt: skip
    from glmcode.launch import load_engine

    try:
        llm = load_engine(settings, show_progress, max_num_seqs=options.max_num_seqs)
    except BaseException as error:  # noqa: BLE001 - reported, then the server stops
        service.status, service.failure = FAILED, error
        print(f"glmcode: {error}" if isinstance(error, GlmcodeError) else f"glmcode: the model failed to load: {error!r}",
              file=sys.stderr, flush=True)  # fmt: skip
        server.should_exit = True
        return
    if server.should_exit:  # stopped while loading
        return
    service.ready(llm)
    record.status, record.max_context = READY, llm.max_context
    write_record(record)
    say(f"glmcode serve: ready: '{options.served_model_name}', {llm.max_context} tokens of context, up to "
        f"{options.max_num_seqs} requests decoded together; try `glmcode ask --remote {record.base_url} \"hi\"`")


class _Server(uvicorn.Server):
    """uvicorn's server with glmcode's signal handling: the first signal ends the requests in flight
    cleanly and exits 0 (uvicorn's own would re-raise the signal once it is done)."""

    def __init__(self, config: uvicorn.Config, service: Service):
        super().__init__(config)
        self.service = service

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self._on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.should_exit:
            self.force_exit = signum == signal.SIGINT or self.force_exit
            return
        self.should_exit = True
        if self.service.loop is not None:  # begin_shutdown takes locks: not inside a signal handler
            self.service.loop.call_soon_threadsafe(self._end_requests)

    def _end_requests(self) -> None:
        ended = self.service.begin_shutdown()
        say(f"glmcode serve: stopping{f' ({ended} requests in flight end now)' if ended else ''}…")


def check_exposure(host: str, api_key: str | None) -> None:
    """Anything beyond loopback needs an API key."""
    if api_key:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise UsageError(f"--host {host} would expose the model beyond this machine without a key: "
                         f"pass --api-key KEY (or set {API_KEY_VARIABLE}), or bind 127.0.0.1")  # fmt: skip


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as error:
        raise UsageError(f"cannot listen on {host!r}: {error.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        listener.listen(1024)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise GlmcodeError(f"port {port} on {host} is in use (another glmcode serve? `glmcode serve --status` "
                               "lists them); pass --port N") from None  # fmt: skip
        raise GlmcodeError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return listener
