"""[mcp_servers.NAME] tables: validation, layering of the user and repo files, what is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmcode.errors import UsageError
from glmcode.mcp.config import parse_server
from glmcode.settings import load_settings


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config")}


def test_the_repo_table_overrides_the_user_table_key_by_key(tmp_path, env):
    user = write(tmp_path / "config" / "glmcode" / "config.toml", """
        [mcp_servers.git]
        command = "mcp-server-git"
        args = ["--repository", "."]
        [mcp_servers.docs]
        url = "https://docs.example.com/mcp"
        headers = { Authorization = "Bearer ${DOCS_TOKEN}" }
    """.replace("\n        ", "\n"))
    repo = tmp_path / "repo"
    write(repo / ".glmcode.toml", "[mcp_servers.docs]\nenabled = false\n"
                                  "[mcp_servers.time]\ncommand = \"mcp-server-time\"\ntool_timeout_sec = 5\n"
                                  "trust_read_only = true\n")
    settings = load_settings(repo, env=env)
    servers = settings.mcp_servers
    assert list(servers) == ["git", "docs", "time"]
    assert servers["git"].args == ("--repository", ".") and servers["git"].sources == (str(user),)
    assert servers["docs"].enabled is False and servers["docs"].url == "https://docs.example.com/mcp"
    assert servers["docs"].sources == (str(user), str(repo / ".glmcode.toml"))
    assert servers["time"].tool_timeout_sec == 5.0 and servers["time"].trust_read_only
    row = next(row for row in settings.shown() if row[0] == "mcp_servers")
    assert row[1] == "git, docs (disabled), time"


@pytest.mark.parametrize("table, problem", [
    ({}, "needs command (a stdio server) or url (an HTTP server)"),
    ({"command": "x", "url": "http://h/mcp"}, "give either command (stdio) or url (HTTP), not both"),
    ({"url": "ftp://h"}, "url must be an http:// or https:// address"),
    ({"command": "x", "args": "--flag"}, "args must be a list of strings"),
    ({"command": "x", "env": {"A": 1}}, "env must be a table of strings"),
    ({"command": "x", "headers": {"A": "b"}}, "headers are for HTTP servers; a stdio server takes env"),
    ({"url": "http://h/mcp", "args": ["a"]}, "args, env and cwd are for stdio servers"),
    ({"command": "x", "tool_timeout_sec": 0}, "tool_timeout_sec must be a number of seconds above zero"),
    ({"command": "x", "enabled": "yes"}, "enabled must be true or false"),
    ({"command": "x", "timeout": 3}, "unknown key 'timeout'"),
])
def test_a_bad_table_is_one_clear_usage_error(table, problem):
    with pytest.raises(UsageError) as raised:
        parse_server("srv", {**table, "_sources": ["/home/me/.config/glmcode/config.toml"]})
    message = str(raised.value)
    assert message.startswith("mcp_servers.srv in /home/me/.config/glmcode/config.toml: ") and problem in message
    assert raised.value.exit_code == 2


def test_a_bad_name_or_a_non_table_is_refused(tmp_path, env):
    with pytest.raises(UsageError, match="letters, digits"):
        parse_server("my server", {"command": "x"})
    write(tmp_path / "repo" / ".glmcode.toml", "mcp_servers = 3\n")
    with pytest.raises(UsageError, match="must be a table of"):
        load_settings(tmp_path / "repo", env=env)


def test_listings_show_no_credentials():
    config = parse_server("s", {"command": "srv", "args": ["--fast"],
                                "env": {"API_KEY": "k-1234567890", "LEVEL": "debug", "TOKEN": "${MY_TOKEN}"}})
    assert config.target() == "srv --fast"
    assert config.shown_env() == {"API_KEY": "(set)", "LEVEL": "debug", "TOKEN": "${MY_TOKEN}"}
    http = parse_server("h", {"url": "https://h/mcp", "headers": {"Authorization": "Bearer abcdefgh12345678"}})
    assert http.secret_values() == ["Bearer abcdefgh12345678", "abcdefgh12345678"]
