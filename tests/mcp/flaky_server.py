"""A stdio MCP server (official SDK) that misbehaves on request, for the failure tests.

    python flaky_server.py [crash|hang|noisy]   crash: exits at once; hang: never answers;
                                                 noisy: complains on stderr, then exits
Its tools: echo, getenv, sleep (for timeouts), huge (a big result), picture (image content), die
(the process exits mid-call), spawn (starts a long-lived grandchild, for the orphan checks).
"""

import os
import subprocess
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode == "crash":
    sys.exit(3)
if mode == "noisy":
    print("flaky: cannot open the database /nonexistent.db", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "hang":
    time.sleep(600)

from mcp.server.mcpserver import Image, MCPServer  # noqa: E402

server = MCPServer("flaky")


@server.tool()
def echo(text: str, times: int = 1) -> str:
    """Repeat the text."""
    return " ".join([text] * times)


@server.tool()
def getenv(name: str) -> str:
    """A variable of the server's environment (a careless server that prints its own keys)."""
    return f"{name}={os.environ.get(name, '')}"


@server.tool()
def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    time.sleep(seconds)
    return f"slept {seconds}s"


@server.tool()
def huge(characters: int) -> str:
    """Return that many characters."""
    return "".join(chr(ord("a") + i % 26) for i in range(characters))


@server.tool()
def picture() -> Image:
    """A tiny PNG."""
    return Image(data=bytes.fromhex("89504e470d0a1a0a") + b"\0" * 92, format="png")


@server.tool()
def die() -> str:
    """The server process exits in the middle of the call."""
    os._exit(1)


@server.tool()
def spawn() -> str:
    """Start a grandchild process that would run for ten minutes."""
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return "started"


server.run()
