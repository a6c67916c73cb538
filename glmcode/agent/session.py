"""Sessions: one JSONL file per conversation, appended one record at a time.

Records (one JSON object per line, each with "type" and "time"):
  meta     the first line: id, created, repo and whatever the caller adds
  message  one message appended to the conversation
  replace  the whole message list after a compaction or a /clear

Each record is one `write` of one line to a file opened with O_APPEND, then fsync: a crash
leaves at most a torn last line, which reading skips. Secrets are scrubbed before writing.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from glmcode.errors import UsageError
from glmcode.settings import SECRET_ENV_VARS, data_home

REDACTED = "[REDACTED]"

# Shapes of credentials worth catching wherever they appear in text.
_SECRET_PATTERNS = [
    re.compile(r"\b[0-9a-f]{32}\.[A-Za-z0-9]{16}\b"),  # Zhipu / Z.ai API key
    re.compile(r"\bsk-[A-Za-z0-9_\-]{20,}"),  # OpenAI-style keys
    re.compile(r"\b(?:ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)(?<=bearer )[A-Za-z0-9._\-]{16,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
]
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([A-Z0-9_]*(?:API_KEY|APIKEY|SECRET|PASSWORD|ACCESS_TOKEN|AUTH_TOKEN)[A-Z0-9_]*"
    r"\s*[=:]\s*[\"']?)([^\s\"']{8,})"
)
_SECRET_KEYS = re.compile(r"(?i)^(api[_-]?key|secret|password|passwd|access[_-]?token|auth[_-]?token|authorization)$")


def default_sessions_dir(env: Mapping[str, str] = os.environ) -> Path:
    return data_home(env) / "sessions"


def known_secrets(env: Mapping[str, str] = os.environ) -> list[str]:
    """The API keys set in the environment (long enough that masking them cannot shred words)."""
    return [env[name] for name in SECRET_ENV_VARS if len(env.get(name, "")) >= 8]


def mask_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with each of these exact values replaced by [REDACTED]."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


def scrub(value: Any, env: Mapping[str, str] = os.environ) -> Any:
    """A copy of `value` with anything that looks like a credential replaced by [REDACTED]."""
    return _scrub(value, known_secrets(env))


def _scrub(value: Any, known: list[str]) -> Any:
    if isinstance(value, str):
        value = mask_secrets(value, known)
        for pattern in _SECRET_PATTERNS:
            value = pattern.sub(REDACTED, value)
        return _SECRET_ASSIGNMENT.sub(lambda m: m.group(1) + REDACTED, value)
    if isinstance(value, dict):
        return {
            key: REDACTED if isinstance(item, str) and _SECRET_KEYS.match(str(key)) else _scrub(item, known)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_scrub(item, known) for item in value]
    return value


@dataclass(frozen=True)
class SessionInfo:
    id: str
    created: str
    repo: str | None
    first_user_message: str
    path: Path


class SessionLog:
    """One session file. `append` is the only way anything gets into it.

    A deferred log (`SessionStore.create(deferred=True)`) holds its records back until the first
    reply from the model, then writes them all: a run that never reached a model saves nothing.
    """

    def __init__(self, path: Path, *, deferred: bool = False):
        self.path = path
        self.id = path.stem
        self._held: list[dict[str, Any]] | None = [] if deferred else None

    @property
    def saved(self) -> bool:
        """Whether the session is on disk (a deferred one is once the model has replied)."""
        return self._held is None

    def append(self, record: dict[str, Any]) -> None:
        record = scrub({"time": _now(), **record})
        if self._held is not None:
            self._held.append(record)
            if not _is_reply(record):
                return
            records, self._held = self._held, None
        else:
            records = [record]
        for each in records:
            self._write(each)

    def _write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            written = os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write to session file {self.path}: {written} of {len(data)} bytes")

    def records(self) -> list[dict[str, Any]]:
        if self._held is not None:
            return list(self._held)
        records = []
        with open(self.path, encoding="utf-8") as file:
            for line in file:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash mid-write
        return records

    @property
    def meta(self) -> dict[str, Any]:
        records = self.records()
        return records[0] if records and records[0].get("type") == "meta" else {}

    def messages(self) -> list[dict[str, Any]]:
        """The conversation as it stood after the last record."""
        messages: list[dict[str, Any]] = []
        for record in self.records():
            if record.get("type") == "message":
                messages.append(record["message"])
            elif record.get("type") == "replace":
                messages = list(record["messages"])
        return messages

    def info(self) -> SessionInfo:
        meta = self.meta
        appended = (r["message"] for r in self.records() if r.get("type") == "message")
        first_user = next((m["content"] for m in appended if m.get("role") == "user"), "")
        return SessionInfo(self.id, meta.get("created", ""), meta.get("repo"), str(first_user), self.path)


class SessionStore:
    """The directory of session files."""

    def __init__(self, directory: Path | str | None = None):
        self.dir = Path(directory) if directory is not None else default_sessions_dir()

    def create(self, meta: dict[str, Any] | None = None, *, deferred: bool = False) -> SessionLog:
        """A new session; `deferred`: written only once the model replies (see SessionLog)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        session_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        log = SessionLog(self.dir / f"{session_id}.jsonl", deferred=deferred)
        log.append({"type": "meta", "id": session_id, "created": _now(), **(meta or {})})
        return log

    def open(self, session_id: str, *, repo: str | None = None) -> SessionLog:
        """A session by id (or a unique prefix of one), or "last": the latest one used (in `repo`)."""
        if session_id == "last":
            sessions = self._paths()
            if repo is not None:
                sessions = [p for p in sessions if SessionLog(p).meta.get("repo") == repo]
            if not sessions:
                raise UsageError(f"no saved session to resume{f' for {repo}' if repo else ''}; start a new one")
            return SessionLog(max(sessions, key=lambda p: (p.stat().st_mtime_ns, p.name)))
        matches = [p for p in self._paths() if p.stem.startswith(session_id)]
        if len(matches) != 1:
            problem = "no session" if not matches else "more than one session"
            raise UsageError(f"{problem} matches '{session_id}' in {self.dir}; `glmcode sessions` lists them")
        return SessionLog(matches[0])

    def list(self, *, repo: str | None = None) -> list[SessionInfo]:
        """Sessions, most recently used first."""
        paths = sorted(self._paths(), key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)
        infos = [SessionLog(p).info() for p in paths]
        return [i for i in infos if repo is None or i.repo == repo]

    def _paths(self) -> list[Path]:
        return list(self.dir.glob("*.jsonl")) if self.dir.is_dir() else []


def _is_reply(record: dict[str, Any]) -> bool:
    """A record only the model's answer makes: its message, or a conversation it compacted."""
    if record.get("type") == "replace":
        return True
    return record.get("type") == "message" and record["message"].get("role") == "assistant"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
