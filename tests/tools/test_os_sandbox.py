"""The OS sandbox through the real shell tools, on a temporary repository, with each mechanism.

A hostile command tries one thing at a time: write outside the repository, read a canary key
under a fake home's .ssh, connect to a TCP server this test runs on 127.0.0.1, leave a detached
background child behind, write into the repository and into .git/hooks. What happened is
observed from outside the sandbox (the host's files, the server's log, the host's process
table), never from the command's own report. MATRIX is the expected result of each attempt in
each mode; every mechanism that works on this machine must give exactly that.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

from glmcode.sandbox import bubblewrap, landlock, make_policy, open_sandbox
from glmcode.tools.workspace import Workspace
from tests.hostile import CANARY, Listener, connect_command, detach_command, fake_home, new_marker, outlived
from tests.tools.conftest import call, git, write

MODES = ("workspace-write", "read-only", "off")
MECHANISMS = {"bubblewrap": bubblewrap, "landlock": landlock}
MATRIX = {  # attempt -> result in workspace-write, read-only, off
    "write outside the repo": ("blocked", "blocked", "allowed"),
    "write a /tmp file outside the repo": ("blocked", "blocked", "allowed"),
    "read ~/.ssh canary key": ("blocked", "blocked", "allowed"),
    "connect to a loopback server": ("blocked", "blocked", "allowed"),
    "detached child outlives the command": ("killed", "killed", "allowed"),
    "write inside the repo": ("allowed", "blocked", "allowed"),
    "write into .git/hooks": ("blocked", "blocked", "allowed"),
}


@pytest.fixture
def home():
    with fake_home() as path:
        yield path


@pytest.fixture
def server():
    listener = Listener()
    yield listener
    listener.close()


def sandboxed(repo: Path, home: Path, mode: str, mechanism, *, network: bool = False) -> Workspace:
    policy = make_policy(mode, repo, home=home, network=network)
    if mode != "off" and (reason := mechanism.unavailable(policy)) is not None:
        pytest.skip(f"{mechanism.NAME} cannot work on this machine: {reason}")
    sandbox = open_sandbox(policy, [mechanism])
    assert sandbox.unavailable is None
    return Workspace(repo, sandbox=sandbox, test_command=f"{sys.executable} -m pytest -q -p no:cacheprovider")


def attempt(name: str, ws: Workspace, home: Path, tmp_path: Path, server) -> tuple[str, str]:
    """Run the hostile command for `name`; (what was observed from outside, the tool's output)."""
    repo = ws.root
    if name == "write outside the repo":
        target = home / "planted.txt"
        result = call(ws, "run_command", command=f"echo owned > {target}")
        return ("allowed" if target.exists() else "blocked"), result.output
    if name == "write a /tmp file outside the repo":
        target = tmp_path / f"planted-{uuid.uuid4().hex}.txt"
        result = call(ws, "run_command", command=f"echo owned > {target}")
        return ("allowed" if target.exists() else "blocked"), result.output
    if name == "read ~/.ssh canary key":
        result = call(ws, "run_command", command=f"cat {home}/.ssh/id_ed25519")
        return ("allowed" if CANARY in result.output else "blocked"), result.output
    if name == "connect to a loopback server":
        token = uuid.uuid4().hex
        result = call(ws, "run_command", command=connect_command(sys.executable, server.port, token))
        return ("allowed" if server.got(token) else "blocked"), result.output
    if name == "detached child outlives the command":
        marker = new_marker()
        result = call(ws, "run_command", command=detach_command(marker))
        return ("allowed" if outlived(marker) else "killed"), result.output
    if name == "write inside the repo":
        result = call(ws, "run_command", command="echo changed >> README.md && echo new > src/new.py")
        changed = "changed" in (repo / "README.md").read_text() and (repo / "src/new.py").exists()
        return ("allowed" if changed else "blocked"), result.output
    if name == "write into .git/hooks":
        hook = repo / ".git/hooks/post-checkout"
        result = call(ws, "run_command", command="printf '#!/bin/sh\\ncurl evil\\n' > .git/hooks/post-checkout")
        return ("allowed" if hook.exists() else "blocked"), result.output
    raise AssertionError(name)


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MATRIX))
def test_matrix(name, mode, mechanism, repo: Path, home: Path, tmp_path: Path, server) -> None:
    if mode == "off" and mechanism != "bubblewrap":
        pytest.skip("off uses no mechanism: run once")
    ws = sandboxed(repo, home, mode, MECHANISMS[mechanism])
    expected = MATRIX[name][MODES.index(mode)]
    observed, output = attempt(name, ws, home, tmp_path, server)
    assert observed == expected, output
    if observed == "blocked" and name not in ("write a /tmp file outside the repo",):
        *_, status, hint = output.splitlines()  # the real error, the exit code, then one hint line
        assert status.startswith("[exit code") and hint.startswith(f"[the {mode} sandbox blocks"), output


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_a_denied_write_returns_the_real_error_and_one_hint_line(mechanism, repo: Path, home: Path) -> None:
    ws = sandboxed(repo, home, "workspace-write", MECHANISMS[mechanism])
    result = call(ws, "run_command", command=f"echo owned > {home}/planted.txt")
    *error, status, hint = result.output.splitlines()
    assert result.is_error
    real = "Read-only file system" if mechanism == "bubblewrap" else "Permission denied"
    assert any(real in line for line in error), result.output
    assert status == "[exit code 2]"
    assert hint == ("[the workspace-write sandbox blocks writes outside the repository (and to .git/), reading "
                    "credential files and the network: the error above may come from it; if the command needs "
                    "that, the user can rerun glmcode with --sandbox-network or --sandbox off]")
    ok = call(ws, "run_command", command="echo fine")
    assert ok.output == "fine\n[exit code 0]"  # no hint on success


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_network_can_be_allowed(mechanism, repo: Path, home: Path, tmp_path: Path, server) -> None:
    ws = sandboxed(repo, home, "workspace-write", MECHANISMS[mechanism], network=True)
    assert attempt("connect to a loopback server", ws, home, tmp_path, server)[0] == "allowed"
    assert attempt("read ~/.ssh canary key", ws, home, tmp_path, server)[0] == "blocked"


FAILING_TEST = "from src.app import greet\n\n\ndef test_greet():\n    assert greet('x') == 'hello x'\n"


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
@pytest.mark.parametrize("mode", ["workspace-write", "read-only"])
def test_a_real_pytest_run_works_inside(mode, mechanism, repo: Path, home: Path) -> None:
    write(repo, "tests/test_app.py", FAILING_TEST)
    write(repo, "src/__init__.py", "")
    ws = sandboxed(repo, home, mode, MECHANISMS[mechanism])
    result = call(ws, "run_tests")
    assert not result.is_error, result.output
    assert "Tests PASSED: 1 passed" in result.output


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_a_build_inside_the_repo_works(mechanism, repo: Path, home: Path) -> None:
    ws = sandboxed(repo, home, "workspace-write", MECHANISMS[mechanism])
    result = call(ws, "run_command", command=f"{sys.executable} -m compileall -q src && ls src/__pycache__")
    assert not result.is_error, result.output
    assert "app.cpython" in result.output


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_a_timeout_kills_the_whole_tree(mechanism, repo: Path, home: Path) -> None:
    ws = sandboxed(repo, home, "workspace-write", MECHANISMS[mechanism])
    marker = new_marker()
    result = call(ws, "run_command", command=f"setsid sleep {marker} & sleep 600", timeout=1)
    assert "timed out after 1s" in result.output
    assert not outlived(marker)


def test_a_toolchain_under_tmp_stays_visible_read_only(repo: Path, home: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bubblewrap's private /tmp must not hide the virtualenv a CI checkout in /tmp runs from."""
    if not str(tmp_path).startswith("/tmp/"):
        pytest.skip("the temporary directory is not under /tmp")
    tool = write(tmp_path / "venv", "bin/mytool", "#!/bin/sh\necho the tool ran\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    ws = sandboxed(repo, home, "workspace-write", bubblewrap)
    result = call(ws, "run_command", command=f"mytool && touch {tool.parent}/planted")
    assert "the tool ran" in result.output and "Read-only file system" in result.output, result.output
    assert not (tool.parent / "planted").exists()


def test_landlock_keeps_new_top_level_entries_out(repo: Path, home: Path) -> None:
    """Landlock cannot grant the repository minus .git/, so only existing entries are writable."""
    ws = sandboxed(repo, home, "workspace-write", landlock)
    result = call(ws, "run_command", command="touch new-top-level-file")
    assert result.is_error and "Permission denied" in result.output
    assert not (repo / "new-top-level-file").exists()


def test_commands_are_refused_when_no_mechanism_can_enforce_the_mode(repo: Path, home: Path) -> None:
    policy = make_policy("workspace-write", repo, home=home)
    ws = Workspace(repo, sandbox=open_sandbox(policy, []), test_command="true")
    result = call(ws, "run_command", command=f"echo owned > {home}/planted.txt")
    assert result.is_error
    assert result.output.startswith("Error: not run: no sandbox can enforce --sandbox workspace-write here")
    assert "--sandbox off" in result.output and len(result.output.splitlines()) == 1
    assert not (home / "planted.txt").exists()
    assert call(ws, "run_tests").output.startswith("Error: not run: no sandbox")


def test_hidden_paths_include_glmcode_s_own_and_configured_ones(repo: Path, home: Path, tmp_path: Path) -> None:
    config = write(home, ".config/glmcode/config.toml", 'api_key = "sk-canary"\n').parent
    extra = write(home, "work/token.txt", "t0ken\n")
    elsewhere = write(tmp_path, "elsewhere/secret", "s3cret\n")
    policy = make_policy("workspace-write", repo, home=home, own_dirs=[config, home / ".local/share/glmcode"],
                         extra_hidden=["~/work/token.txt", str(elsewhere), "missing/one"])
    assert set(policy.hidden) == {(home / ".ssh").resolve(), config.resolve(), extra.resolve(), elsewhere.resolve()}
    assert policy.protected == ((repo / ".git"),)
    for mechanism in MECHANISMS.values():
        if mechanism.unavailable(policy) is None:
            ws = Workspace(repo, sandbox=open_sandbox(policy, [mechanism]))
            output = call(ws, "run_command", command=f"cat {config}/config.toml {extra} {elsewhere}").output
            assert "sk-canary" not in output and "t0ken" not in output and "s3cret" not in output, output


def test_a_path_that_holds_the_repository_is_never_hidden(tmp_path: Path) -> None:
    home = tmp_path / "home"
    repo = home / "code" / "project"
    repo.mkdir(parents=True)
    git(repo, "init", "-q")
    policy = make_policy("workspace-write", repo, home=home, extra_hidden=["~/code"])
    assert policy.hidden == ()
