"""A real HTTP server on 127.0.0.1 that plays the GLM chat-completions API, for tests.

It speaks the hosted (Zhipu / Z.ai) SSE format, or the vLLM / SGLang flavour with
dialect="openai"; checks every request body against what that server accepts (problems are
recorded in `violations` and answered with a 400); and plays a script of turns, one per
request:

    with FakeGlmServer(reply("Hi", reasoning="The user greets me."), api_key="sk-test") as server:
        backend = RemoteBackend(resolve_endpoint(server.base_url, {"GLMCODE_API_KEY": "sk-test"}))
        ...
        assert server.violations == []
        assert server.requests[0].body["messages"][0]["content"] == "hello"

Turns come from `reply` (reasoning, content, tool calls whole or in fragments), `raw_reply`
(the model's raw GLM text as content, like a server without parsers), `error` / `openai_error`
(an HTTP failure), and can be cut (`.cut(after=n)`) or stalled (`.stall(after=n)`). A turn may
also be a function of the request body that returns a Turn.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

DEFAULT_USAGE = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}
HOSTED_FORBIDDEN_FIELDS = (
    "chat_template_kwargs", "stream_options", "frequency_penalty", "presence_penalty",
    "thinking_budget", "max_completion_tokens", "top_k", "min_p", "seed",
)
OPENAI_FORBIDDEN_FIELDS = ("thinking", "tool_stream", "do_sample")


@dataclass(frozen=True)
class Turn:
    """One scripted answer.

    deltas: the `choices[0].delta` objects to stream, one per chunk (reasoning under
    "reasoning_content"; a server with reasoning_field="reasoning" renames it). finish_reason
    and usage go in the final chunk (finish_reason None: no final chunk). payloads: raw `data:`
    strings sent after the deltas, e.g. an error object. body: answer this JSON with `status`
    instead of a stream (an error, or a whole completion).
    cut_after: drop the connection after that many events. stall_after: go silent after that
    many events for stall_seconds, or until `release` is set (`.hold`). chunk_delay: seconds
    between events.
    """

    deltas: tuple[dict[str, Any], ...] = ()
    finish_reason: str | None = "stop"
    usage: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    done: bool = True
    payloads: tuple[str, ...] = ()
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 30.0
    release: threading.Event | None = field(default=None, compare=False)
    chunk_delay: float = 0.0

    def cut(self, after: int) -> Turn:
        return replace(self, cut_after=after)

    def stall(self, after: int, seconds: float = 30.0) -> Turn:
        return replace(self, stall_after=after, stall_seconds=seconds)

    def hold(self, after: int, until: threading.Event, seconds: float = 30.0) -> Turn:
        """Go silent after `after` events until the test sets `until` (at most `seconds`)."""
        return replace(self, stall_after=after, stall_seconds=seconds, release=until)

    def slowly(self, chunk_delay: float) -> Turn:
        return replace(self, chunk_delay=chunk_delay)


Script = Union[Turn, Callable[[dict[str, Any]], Turn]]


def reply(
    content: str = "",
    *,
    reasoning: str = "",
    tool_calls: list[dict[str, Any]] = (),  # type: ignore[assignment]
    chunk_size: int = 4,
    fragment_arguments: int | None = None,
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = DEFAULT_USAGE,
) -> Turn:
    """A structured answer: reasoning, then content, then tool calls.

    tool_calls: {"name", "arguments" (dict, or a str sent verbatim), "id" (optional)}. Whole calls
    arrive in one delta together; fragment_arguments=n streams each call as its name, then its
    arguments n characters at a time (tool_stream).
    """
    deltas = [{"role": "assistant", "reasoning_content": piece} for piece in _pieces(reasoning, chunk_size)]
    deltas += [{"role": "assistant", "content": piece} for piece in _pieces(content, chunk_size)]
    wire_calls = [_wire_call(i, call) for i, call in enumerate(tool_calls)]
    if wire_calls and fragment_arguments is None:
        deltas.append({"role": "assistant", "tool_calls": wire_calls})
    for call in wire_calls if fragment_arguments is not None else ():
        arguments = call["function"]["arguments"]
        deltas.append({"tool_calls": [{**call, "function": {"name": call["function"]["name"], "arguments": ""}}]})
        for piece in _pieces(arguments, fragment_arguments):
            deltas.append({"tool_calls": [{"index": call["index"], "function": {"arguments": piece}}]})
    reason = finish_reason or ("tool_calls" if wire_calls else "stop")
    return Turn(deltas=tuple(deltas), finish_reason=reason, usage=dict(usage) if usage else None)


def raw_reply(text: str, *, chunk_size: int = 5, finish_reason: str = "stop") -> Turn:
    """The model's raw output as content, as a server without reasoning/tool parsers sends it."""
    deltas = tuple({"role": "assistant", "content": piece} for piece in _pieces(text, chunk_size))
    return Turn(deltas=deltas, finish_reason=finish_reason)


def error(status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None) -> Turn:
    """A failure in the hosted API's shape: {"error": {"code": "1302", "message": ...}}."""
    detail: dict[str, Any] = {"message": message}
    if code is not None:
        detail["code"] = code
    return Turn(status=status, body={"error": detail}, headers=dict(headers or {}))


def openai_error(status: int, message: str, *, headers: dict[str, str] | None = None) -> Turn:
    """A failure in vLLM's shape."""
    body = {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": status}
    return Turn(status=status, body=body, headers=dict(headers or {}))


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


class FakeGlmServer:
    """The server. dialect: "hosted" (Zhipu / Z.ai rules and format) or "openai" (vLLM / SGLang).

    api_key: when set, requests must carry `Authorization: Bearer <api_key>` (else 401, code
    1001). base_path: where the API lives ("/v1"; "/api/paas/v4" looks like the hosted one).
    """

    def __init__(
        self,
        *turns: Script,
        dialect: str = "hosted",
        api_key: str | None = None,
        base_path: str = "/v1",
        model: str = "glm-4.7-flash",
        max_model_len: int | None = None,
        reasoning_field: str = "reasoning_content",
    ) -> None:
        assert dialect in ("hosted", "openai")
        self.dialect = dialect
        self.api_key = api_key
        self.base_path = base_path.rstrip("/")
        self.model = model
        self.max_model_len = max_model_len
        self.reasoning_field = reasoning_field
        self.requests: list[RecordedRequest] = []
        self.violations: list[str] = []
        self.max_in_flight = 0
        self._script: list[Script] = list(turns)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeGlmServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeGlmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    # --- script ----------------------------------------------------------------------------

    def play(self, *turns: Script) -> None:
        with self._lock:
            self._script.extend(turns)

    @property
    def remaining(self) -> int:
        return len(self._script)

    @property
    def bodies(self) -> list[Any]:
        return [request.body for request in self.requests if request.method == "POST"]

    def _next_turn(self, body: dict[str, Any]) -> Turn | None:
        with self._lock:
            script = self._script.pop(0) if self._script else None
        if script is None:
            return None
        return script if isinstance(script, Turn) else script(body)

    # --- handling --------------------------------------------------------------------------

    def _handle_post(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        headers = {key.lower(): value for key, value in handler.headers.items()}
        with self._lock:
            self.requests.append(RecordedRequest("POST", handler.path, headers, body))
        if handler.path != f"{self.base_path}/chat/completions":
            return _send_json(handler, 404, {"error": {"code": "404", "message": f"no route {handler.path}"}})
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _send_json(handler, 401, {"error": {"code": "1001", "message": "Authentication failed: invalid token"}})
        problems = check_request(body, hosted=self.dialect == "hosted")
        if problems:
            with self._lock:
                self.violations.extend(problems)
            return _send_json(handler, 400, {"error": {"code": "1214", "message": "; ".join(problems)}})
        turn = self._next_turn(body)
        if turn is None:
            with self._lock:
                self.violations.append("a request arrived after the script ended")
            return _send_json(handler, 500, {"error": {"code": "500", "message": "fake server: script exhausted"}})
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            if turn.body is not None:
                return _send_json(handler, turn.status, turn.body, turn.headers)
            self._stream(handler, turn, body)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _handle_get(self, handler: _Handler) -> None:
        with self._lock:
            self.requests.append(RecordedRequest("GET", handler.path, {k.lower(): v for k, v in handler.headers.items()}, None))
        if handler.path != f"{self.base_path}/models":
            return _send_json(handler, 404, {"error": {"message": "not found"}})
        entry: dict[str, Any] = {"id": self.model, "object": "model", "owned_by": "fake"}
        if self.max_model_len is not None:
            entry["max_model_len"] = self.max_model_len
        _send_json(handler, 200, {"object": "list", "data": [entry]})

    def _stream(self, handler: _Handler, turn: Turn, body: dict[str, Any]) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            for number, payload in enumerate(self._payloads(turn, body)):
                if number == turn.cut_after:
                    return  # no terminating chunk: the client sees the connection drop mid-body
                if number == turn.stall_after:
                    (turn.release or self._closing).wait(turn.stall_seconds)
                if turn.chunk_delay:
                    time.sleep(turn.chunk_delay)
                _write_chunk(handler, f"data: {payload}\n\n".encode())
            if turn.cut_after is None:
                _write_chunk(handler, b"")
        except OSError:
            pass  # the client went away (a timeout or a cancel on its side)

    def _payloads(self, turn: Turn, body: dict[str, Any]) -> list[str]:
        envelope = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body.get("model", self.model)}
        if self.dialect == "openai":
            envelope["object"] = "chat.completion.chunk"
        payloads = [json.dumps({**envelope, "choices": [{"index": 0, "delta": self._rename(delta)}]}, ensure_ascii=False)
                    for delta in turn.deltas]
        payloads += list(turn.payloads)
        if turn.finish_reason is not None:
            final: dict[str, Any] = {**envelope, "choices": [{"index": 0, "finish_reason": turn.finish_reason,
                                                             "delta": {"role": "assistant", "content": ""}}]}
            separate_usage = self.dialect == "openai"
            if turn.usage and not separate_usage:
                final["usage"] = turn.usage
            payloads.append(json.dumps(final))
            include_usage = (body.get("stream_options") or {}).get("include_usage")
            if turn.usage and separate_usage and include_usage:
                payloads.append(json.dumps({**envelope, "choices": [], "usage": turn.usage}))
        if turn.done:
            payloads.append("[DONE]")
        return payloads

    def _rename(self, delta: dict[str, Any]) -> dict[str, Any]:
        if self.reasoning_field == "reasoning_content" or "reasoning_content" not in delta:
            return delta
        renamed = dict(delta)
        renamed[self.reasoning_field] = renamed.pop("reasoning_content")
        return renamed


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.fake._handle_post(self)  # type: ignore[attr-defined]

    def do_GET(self) -> None:  # noqa: N802
        self.server.fake._handle_get(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass


def check_request(body: Any, *, hosted: bool) -> list[str]:
    """What is wrong with a chat-completions request body for this kind of server."""
    if not isinstance(body, dict):
        return ["the body is not a JSON object"]
    problems: list[str] = []
    if not isinstance(body.get("model"), str) or not body["model"]:
        problems.append("model must be a non-empty string")
    if body.get("stream") is not True:
        problems.append("stream must be true")
    problems += _check_messages(body.get("messages"), hosted=hosted)
    problems += _check_tools(body, hosted=hosted)
    forbidden = HOSTED_FORBIDDEN_FIELDS if hosted else OPENAI_FORBIDDEN_FIELDS
    problems += [f"unsupported field {name}" for name in forbidden if name in body]
    if hosted:
        problems += _check_hosted_options(body)
    else:
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not (isinstance(kwargs, dict) and isinstance(kwargs.get("enable_thinking"), bool)):
            problems.append("chat_template_kwargs must carry enable_thinking (a bool)")
    return problems


def _check_messages(messages: Any, *, hosted: bool) -> list[str]:
    if not isinstance(messages, list) or not messages:
        return ["messages must be a non-empty list"]
    problems: list[str] = []
    call_ids: set[str] = set()
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if all(role in ("system", "assistant") for role in roles):
        problems.append("messages must not consist only of system and assistant messages")
    for number, message in enumerate(messages):
        where = f"messages[{number}]"
        role = roles[number]
        if role not in ("system", "user", "assistant", "tool"):
            problems.append(f"{where}: unknown role {role!r}")
            continue
        if hosted and "name" in message:
            problems.append(f"{where}: the hosted API does not accept 'name'")
        content = message.get("content")
        if role == "assistant":
            if content is not None and not isinstance(content, str):
                problems.append(f"{where}: assistant content must be a string or null")
            if "reasoning_content" in message and not isinstance(message["reasoning_content"], str):
                problems.append(f"{where}: reasoning_content must be a string")
            for call in message.get("tool_calls") or []:
                problems += _check_call(call, where)
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    call_ids.add(call["id"])
        elif role == "tool":
            if not isinstance(content, str):
                problems.append(f"{where}: tool content must be a string")
            if message.get("tool_call_id") not in call_ids:
                problems.append(f"{where}: tool_call_id {message.get('tool_call_id')!r} answers no earlier tool call")
        elif not isinstance(content, (str, list)):
            problems.append(f"{where}: {role} content must be a string or a list")
    return problems


def _check_call(call: Any, where: str) -> list[str]:
    if not isinstance(call, dict):
        return [f"{where}: a tool call must be an object"]
    problems = []
    if not isinstance(call.get("id"), str) or not call["id"]:
        problems.append(f"{where}: a tool call needs an id")
    if call.get("type") != "function":
        problems.append(f"{where}: tool call type must be 'function'")
    function = call.get("function") or {}
    if not isinstance(function.get("name"), str) or not function["name"]:
        problems.append(f"{where}: a tool call needs function.name")
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        problems.append(f"{where}: function.arguments must be a JSON string")
    else:
        try:
            if not isinstance(json.loads(arguments), dict):
                problems.append(f"{where}: function.arguments must encode an object")
        except ValueError:
            problems.append(f"{where}: function.arguments is not valid JSON")
    return problems


def _check_tools(body: dict[str, Any], *, hosted: bool) -> list[str]:
    tools = body.get("tools")
    problems: list[str] = []
    if tools is None:
        if body.get("tool_stream"):
            problems.append("tool_stream without tools")
        return problems
    if not isinstance(tools, list) or not tools:
        return ["tools must be a non-empty list"]
    if hosted and len(tools) > 128:
        problems.append("at most 128 tools")
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            problems.append("each tool must be {'type': 'function', 'function': {...}}")
            continue
        if not isinstance(function.get("name"), str):
            problems.append("each tool needs function.name")
        if hosted and "strict" in function:
            problems.append("the hosted API does not accept 'strict'")
    if body.get("tool_choice", "auto") != "auto" and hosted:
        problems.append("the hosted API only accepts tool_choice 'auto'")
    return problems


def _check_hosted_options(body: dict[str, Any]) -> list[str]:
    problems = []
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            problems.append("thinking.type must be 'enabled' or 'disabled'")
        elif "clear_thinking" in thinking and not isinstance(thinking["clear_thinking"], bool):
            problems.append("thinking.clear_thinking must be a bool")
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0 < temperature <= 1):
        problems.append("temperature must be in (0, 1]")
    top_p = body.get("top_p")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.01 <= top_p <= 1):
        problems.append("top_p must be in [0.01, 1]")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and not (isinstance(max_tokens, int) and 1 <= max_tokens <= 131072):
        problems.append("max_tokens must be an int in [1, 131072]")
    if "tool_stream" in body and not isinstance(body["tool_stream"], bool):
        problems.append("tool_stream must be a bool")
    return problems


def _wire_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    arguments = call.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {"index": index, "id": call.get("id", f"call_fake_{index}"), "type": "function",
            "function": {"name": call["name"], "arguments": arguments}}


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] if text else []


def _send_json(handler: BaseHTTPRequestHandler, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = (body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.send_header("Connection", "close")
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.close_connection = True
    try:
        handler.wfile.write(data)
    except OSError:
        pass


def _write_chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()
