"""The API key never shows up in anything glmcode prints or writes.

glmcode runs as a user would run it (the key in GLMCODE_API_KEY / ZHIPUAI_API_KEY), in every
output format, over runs that succeed and runs that fail in each way a server can fail: a 401
and a 500 whose messages echo the key back, a 500 retried then answered, a stream cut in the
middle of a tool call, an error inside the stream. One more run has the model go looking for
the key (a .env file in the repo, `printenv`, the config file). Then stdout, stderr and every file the runs left
(sessions, history, anything under HOME or the repository) are searched for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.fake_glm_server import FakeGlmServer, Turn, error, reply

from .conftest import API_KEY, BUG_LINE, BUGGY_PRICING, GlmcodeRunner, git
from .test_remote_fix import fix_over_remote

ECHO = f"invalid api key {API_KEY} for this request"
MODULE = "inventory/pricing.py"


def edit_call() -> dict:
    return {"name": "edit_file", "arguments": {"path": MODULE, "old_string": BUG_LINE,
                                               "new_string": "total += price * quantity"}}


def latest(paths: list[Path]) -> Path:
    return max(paths, key=lambda path: path.stat().st_mtime_ns)


def assistant_texts(session: Path) -> list[str]:
    records = [json.loads(line) for line in session.read_text().splitlines()]
    return [r["message"]["content"] for r in records if r["type"] == "message" and r["message"]["role"] == "assistant"]


def files_under(root: Path, skip: set[Path]) -> list[Path]:
    return [path for path in root.rglob("*")
            if path.is_file() and ".git" not in path.relative_to(root).parts and path not in skip]


def test_the_key_never_appears_in_any_output_or_file(glmcode: GlmcodeRunner, project: Path) -> None:
    servers: list[FakeGlmServer] = []

    # Successful fixes, one per output format and server style.
    for mode, output in (("openai-compatible", "stream-json"), ("hosted-style", "json"), ("raw-tags", "text")):
        git(project, "checkout", "-q", "--", ".")
        run, server, model = fix_over_remote(glmcode, project, mode, "-o", output)
        assert run.returncode == 0 and model.problems == [], (mode, run.stderr)
        servers.append(server)
    git(project, "checkout", "-q", "--", ".")

    def over(*turns: Turn, dialect: str = "openai") -> FakeGlmServer:
        server = FakeGlmServer(*turns, api_key=API_KEY, dialect=dialect)
        servers.append(server)
        return server

    # A 401 whose message echoes the key: exit 3, the variable to set is named, the key is not.
    for output in ("text", "json"):
        with over(error(401, ECHO, code="1001")) as server:
            run = glmcode("ask", "what does total_price do?", "--remote", server.base_url, "-o", output, cwd=project)
        assert run.returncode == 3 and "GLMCODE_API_KEY" in run.stdout + run.stderr, run.stderr

    # A 500 echoing the key, retried at once (Retry-After: 0), then answered.
    with over(error(500, ECHO, headers={"Retry-After": "0"}), reply("It multiplies.", reasoning="Easy.")) as server:
        run = glmcode("ask", "what does total_price do?", "--remote", server.base_url, "-o", "stream-json", cwd=project)
    assert run.returncode == 0 and "retrying" in run.stdout, run.stdout + run.stderr

    # A 500 that never goes away: the final error quotes the server, key masked.
    with over(*[error(500, ECHO, headers={"Retry-After": "0"})] * 5) as server:
        run = glmcode("ask", "hello", "--remote", server.base_url, cwd=project)
    assert run.returncode == 3 and "keeps failing" in run.stderr and "***" in run.stderr, run.stderr

    # A stream cut inside a tool call: the half-received edit is never executed.
    with over(reply("Fixing it now.", tool_calls=[edit_call()], fragment_arguments=5).cut(after=8)) as server:
        run = glmcode("fix", "total_price is wrong", "--remote", server.base_url, "--yes", cwd=project)
    assert run.returncode == 1 and "broke in the middle" in run.stderr, run.stderr
    assert (project / MODULE).read_text() == BUGGY_PRICING
    assert "Fixing it now." in assistant_texts(latest(glmcode.session_files())), "the partial text is kept"

    # The hosted API reporting an error inside the stream, echoing the key.
    mid_stream = Turn(deltas=({"content": "Partial answer"},), finish_reason=None, done=False,
                      payloads=(json.dumps({"error": {"code": "500", "message": ECHO}}),))
    with FakeGlmServer(mid_stream, api_key=API_KEY, dialect="hosted", base_path="/api/paas/v4") as server:
        servers.append(server)
        run = glmcode("ask", "hello", "--remote", server.base_url, "-o", "json", cwd=project, hosted=True)
    assert run.returncode == 1 and "in the middle of the response" in run.stdout, run.stdout + run.stderr

    # The model goes looking for the key: a .env file in the repository, and the environment.
    dotenv = project / ".env"
    dotenv.write_text(f"GLMCODE_API_KEY={API_KEY}\n")
    snoop = [reply(reasoning="Check the config.", tool_calls=[{"name": "read_file", "arguments": {"path": ".env"}}]),
             reply(tool_calls=[{"name": "run_command", "arguments": {"command": "printenv GLMCODE_API_KEY"}}]),
             reply("The key is set.")]
    with over(*snoop) as server:
        run = glmcode("fix", "is the key configured?", "--remote", server.base_url, "--yes", "-o", "stream-json",
                      cwd=project)
    results = [record for record in map(json.loads, run.stdout.splitlines()) if record["type"] == "tool_result"]
    assert results[0]["output"].count("[REDACTED]") == 1, results  # the file's copy, masked
    assert results[1]["output"] == "[exit code 1]", results  # commands do not get the variable at all

    # The key kept in the config file instead, and the model reading that file.
    config = glmcode.home / "config" / "glmcode" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'api_key = "{API_KEY}"\n')
    peek = [reply(tool_calls=[{"name": "run_command", "arguments": {"command": f"cut -d'\"' -f2 {config}"}}]),
            reply("Done.")]
    with over(*peek) as server:  # the sandbox hides glmcode's own config from commands
        run = glmcode("fix", "which key is configured?", "--remote", server.base_url, "--yes", cwd=project,
                      key_in_env=False)
    assert run.returncode == 5 and "error: cut:" in run.stderr, run.stderr  # it failed; the tests still fail: 5
    with over(*peek) as server:  # without it the command reads the file, and what it prints is masked
        run = glmcode("fix", "which key is configured?", "--remote", server.base_url, "--yes", "--sandbox", "off",
                      cwd=project, key_in_env=False)
    assert run.returncode == 5 and "[REDACTED]" in run.stderr, run.stderr

    for server in servers:
        assert server.violations == [], server.violations
        assert all(request.headers.get("authorization") == f"Bearer {API_KEY}" for request in server.requests)
        assert API_KEY not in json.dumps(server.bodies), "a request body carried the key back to the server"

    said = {f"{' '.join(run.args[:1])} #{number} {stream}": text
            for number, run in enumerate(glmcode.runs)
            for stream, text in (("stdout", run.stdout), ("stderr", run.stderr))}
    written = files_under(glmcode.home, {config}) + files_under(project, {dotenv})
    # A run saves its session from the model's first reply on; the ones refused outright (exit 3) save none.
    reached_a_model = [run for run in glmcode.runs if run.returncode != 3]
    assert len(glmcode.session_files()) == len(reached_a_model), "each run that got a reply saved a session, and none holds the key"
    assert [name for name, text in said.items() if API_KEY in text] == []
    assert [str(path) for path in written if API_KEY.encode() in path.read_bytes()] == []
