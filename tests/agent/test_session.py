import json
import os
import stat

import pytest

from glmcode.agent.session import REDACTED, SessionStore, default_sessions_dir, scrub
from glmcode.errors import UsageError

ZHIPU_KEY = "0123456789abcdef0123456789abcdef.AbCdEfGhIjKlMnOp"


def test_default_dir_follows_xdg(tmp_path):
    assert default_sessions_dir({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "glmcode" / "sessions"
    assert str(default_sessions_dir({})).endswith(".local/share/glmcode/sessions")


def test_append_writes_one_json_line_per_record(tmp_path):
    log = SessionStore(tmp_path).create({"repo": "/r"})
    log.append({"type": "message", "message": {"role": "user", "content": "hi\nthere"}})
    lines = log.path.read_text().splitlines()
    assert len(lines) == 2
    meta, record = map(json.loads, lines)
    assert meta["type"] == "meta" and meta["id"] == log.id and meta["repo"] == "/r"
    assert record["message"] == {"role": "user", "content": "hi\nthere"} and record["time"]
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600


def test_messages_are_rebuilt_through_replacements(tmp_path):
    log = SessionStore(tmp_path).create()
    for text in ("a", "b"):
        log.append({"type": "message", "message": {"role": "user", "content": text}})
    log.append({"type": "replace", "reason": "compaction", "messages": [{"role": "user", "content": "summary"}]})
    log.append({"type": "message", "message": {"role": "user", "content": "c"}})
    assert [m["content"] for m in log.messages()] == ["summary", "c"]


def test_a_torn_last_line_is_skipped(tmp_path):
    log = SessionStore(tmp_path).create()
    log.append({"type": "message", "message": {"role": "user", "content": "kept"}})
    with open(log.path, "a") as file:
        file.write('{"type": "message", "message": {"role": "us')
    assert log.messages() == [{"role": "user", "content": "kept"}]


def test_open_by_id_prefix_and_last_per_repo(tmp_path):
    store = SessionStore(tmp_path)
    first = store.create({"repo": "/one"})
    second = store.create({"repo": "/two"})
    first.append({"type": "message", "message": {"role": "user", "content": "latest activity"}})
    os.utime(second.path, ns=(1, 1))  # make the order independent of the clock's resolution
    assert store.open(first.id).path == first.path
    with pytest.raises(UsageError, match="more than one session"):
        store.open(first.id[:2])  # both ids start with the year
    assert store.open("last").path == first.path
    assert store.open("last", repo="/two").path == second.path
    with pytest.raises(UsageError, match="no session matches 'nope'"):
        store.open("nope")
    with pytest.raises(UsageError, match="no saved session"):
        SessionStore(tmp_path / "empty").open("last")


def test_list_shows_first_user_message_newest_first(tmp_path):
    store = SessionStore(tmp_path)
    old = store.create({"repo": "/r"})
    old.append({"type": "message", "message": {"role": "system", "content": "sys"}})
    old.append({"type": "message", "message": {"role": "user", "content": "fix the tests"}})
    new = store.create({"repo": "/other"})
    os.utime(old.path, ns=(1, 1))
    infos = store.list()
    assert [i.id for i in infos] == [new.id, old.id]
    assert (infos[1].first_user_message, infos[1].repo) == ("fix the tests", "/r")
    assert [i.id for i in store.list(repo="/r")] == [old.id]


def test_scrub_removes_env_keys_and_key_shapes():
    env = {"ZAI_API_KEY": "my-private-zai-key-value"}
    record = {
        "content": f"token my-private-zai-key-value and {ZHIPU_KEY} and sk-abcdefghijklmnopqrstuvwx",
        "arguments": {
            "command": "export GLMCODE_API_KEY=supersecretvalue123 && "
            "curl -H 'Authorization: Bearer abcdefghijklmnop1234'"
        },
        "api_key": "short",
        "max_tokens": 5,
    }
    clean = json.dumps(scrub(record, env))
    leaked = ["my-private-zai-key-value", ZHIPU_KEY, "sk-abcdef", "supersecretvalue123"]
    for secret in leaked + ["abcdefghijklmnop1234", "short"]:
        assert secret not in clean
    assert clean.count(REDACTED) == 6
    assert scrub(record, env)["max_tokens"] == 5


def test_appended_records_are_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("ZHIPUAI_API_KEY", "zhipu-secret-from-env")
    log = SessionStore(tmp_path).create()
    log.append({"type": "message", "message": {"role": "tool", "content": "env: zhipu-secret-from-env"}})
    assert "zhipu-secret-from-env" not in log.path.read_text()
    assert log.messages()[0]["content"] == f"env: {REDACTED}"


def test_a_deferred_session_is_written_from_the_first_reply_on(tmp_path):
    store = SessionStore(tmp_path)
    log = store.create({"repo": "/r"}, deferred=True)
    log.append({"type": "message", "message": {"role": "system", "content": "be brief"}})
    log.append({"type": "message", "message": {"role": "user", "content": "hello"}})
    assert not log.saved and not log.path.exists() and store.list() == []
    assert [m["content"] for m in log.messages()] == ["be brief", "hello"], "held records still read back"
    log.append({"type": "message", "message": {"role": "assistant", "content": "hi"}})
    assert log.saved
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["type"] for r in records] == ["meta", "message", "message", "message"]
    assert store.list()[0].first_user_message == "hello"
