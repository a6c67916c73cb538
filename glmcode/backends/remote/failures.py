"""What an HTTP failure or a broken connection means, as one clear line.

The hosted API answers `{"error": {"code": "1302", "message": "..."}}` (the code is a business
code, a string); vLLM and SGLang answer `{"message": ...}` or `{"error": {"message": ...}}`.
Every message passes through `redact` so an API key a server echoes back never reaches the user.
"""

from __future__ import annotations

import email.utils
import json
import re
import socket
import time
from dataclasses import dataclass
from typing import Mapping

import httpx

from glmcode.backends.remote.endpoint import RemoteEndpoint
from glmcode.errors import AuthError, ContextOverflow, GlmcodeError, ServerError

AUTH_CODES = {"1000", "1001", "1002", "1003", "1004", "1005"}
BALANCE_CODE = "1113"
RATE_LIMIT_CODES = {"1302", "1303", "1305", "1312"}
PROMPT_TOO_LONG_CODE = "1261"
MODEL_NOT_FOUND_CODE = "1211"
_CONTEXT_MESSAGE = re.compile(
    r"context length|context window|context size|maximum context|prompt is too long|too many tokens|input is too long|"
    r"exceeds the (?:model'?s )?(?:maximum|max)",
    re.IGNORECASE,
)
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class HttpFailure:
    """A non-200 answer: status, business code (hosted API), the server's message, Retry-After."""

    status: int
    code: str | None
    message: str
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        return self.rate_limited or self.status >= 500

    @property
    def rate_limited(self) -> bool:
        # A 429 without a business code is a plain rate limit (vLLM, proxies); the hosted API's
        # other 429 codes are quotas and arrears that waiting seconds will not fix.
        return self.code in RATE_LIMIT_CODES or (self.status == 429 and self.code is None)

    def describe(self) -> str:
        code = f", code {self.code}" if self.code and self.code != str(self.status) else ""
        message = f": {self.message}" if self.message else ""
        return f"HTTP {self.status}{code}{message}"


def parse_failure(status: int, headers: Mapping[str, str], body: str, secret: str | None) -> HttpFailure:
    code, message = _code_and_message(body)
    return HttpFailure(status, code, redact(message, secret), _retry_after(headers.get("retry-after")))


def failure_error(failure: HttpFailure, endpoint: RemoteEndpoint, model: str, attempts: int) -> GlmcodeError:
    """The error a failure becomes once it will not be retried (any more)."""
    host, what = endpoint.label, failure.describe()
    if failure.status == 401 or failure.code in AUTH_CODES:
        if endpoint.api_key is None:
            return AuthError(f"{host} requires an API key ({what}): set {endpoint.key_variable}")
        return AuthError(f"{host} rejected the API key ({what}): set {endpoint.key_variable} to a valid key for {endpoint.base_url}")
    if failure.code == BALANCE_CODE:
        return AuthError(
            f"{host} refused the request ({what}): the account has no balance, or the key belongs to "
            f"another endpoint (a Coding Plan key needs the coding base URL; z.ai keys need --remote zai, "
            f"bigmodel.cn keys --remote zhipu)"
        )
    if failure.code == PROMPT_TOO_LONG_CODE or (400 <= failure.status < 500 and _CONTEXT_MESSAGE.search(failure.message)):
        return ContextOverflow(f"the prompt is too long for {model} at {host} ({what})")
    if failure.rate_limited:
        return ServerError(f"{host} is still rate limiting after {attempts} attempts ({what}): lower the concurrency or try again later")
    if failure.status >= 500:
        return ServerError(f"{host} keeps failing ({what}) after {attempts} attempts: try again later")
    if failure.status == 404 or failure.code == MODEL_NOT_FOUND_CODE:
        return ServerError(
            f"{endpoint.chat_url} answered {what}: check the base URL (it usually ends in /v1) "
            f"and the model name '{model}' (--model)"
        )
    return ServerError(f"{host} rejected the request ({what})")


def transport_error(exc: httpx.RequestError, endpoint: RemoteEndpoint, *, connect_timeout: float, read_timeout: float) -> ServerError:
    """One line for a request that got no HTTP answer at all."""
    host = endpoint.label
    if isinstance(exc, httpx.ConnectTimeout):
        return ServerError(f"timed out connecting to {host} after {connect_timeout:g}s: check the URL and your network")
    if isinstance(exc, httpx.ReadTimeout):
        return ServerError(f"{host} sent nothing for {read_timeout:g}s (read timeout): the server may be overloaded; try again or raise the timeout")
    if isinstance(exc, httpx.TimeoutException):
        return ServerError(f"timed out talking to {host}: try again later")
    if isinstance(exc, httpx.ConnectError):
        if _caused_by(exc, socket.gaierror) or _mentions(exc, "name or service not known", "nodename nor servname", "name resolution", "getaddrinfo"):
            return ServerError(f"cannot resolve host '{endpoint.label}' of {endpoint.base_url}: check the URL and your network")
        if _caused_by(exc, ConnectionRefusedError) or _mentions(exc, "connection refused", "errno 111", "errno 61"):
            return ServerError(f"connection refused by {host}: is the server running at {endpoint.base_url}?")
        return ServerError(f"cannot connect to {host} ({exception_summary(exc, endpoint.api_key)}): check the URL and your network")
    return ServerError(f"the connection to {host} failed ({exception_summary(exc, endpoint.api_key)}): try again")


def exception_summary(exc: BaseException, secret: str | None) -> str:
    """The first line of an exception's message, key masked."""
    lines = str(exc).strip().splitlines()
    return redact(lines[0] if lines else type(exc).__name__, secret)


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4 and secret in text:  # a 1-letter test key would shred words
        text = text.replace(secret, "***")
    return text


def _code_and_message(body: str) -> tuple[str | None, str]:
    try:
        payload = json.loads(body)
    except ValueError:
        return None, _shorten(body)
    if not isinstance(payload, dict):
        return None, _shorten(body)
    error = payload.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message") or ""
        return _business_code(code), _shorten(str(message))
    message = payload.get("message") or payload.get("detail") or error or body
    return None, _shorten(message if isinstance(message, str) else json.dumps(message, ensure_ascii=False))


def _business_code(code: object) -> str | None:
    """The hosted API's codes are strings like "1302"; vLLM puts the HTTP status (an int) there."""
    if isinstance(code, str) and code.isdigit():
        return code
    if isinstance(code, int) and code >= 1000:
        return str(code)
    return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _mentions(exc: BaseException, *phrases: str) -> bool:
    text = str(exc).lower()
    return any(phrase in text for phrase in phrases)
