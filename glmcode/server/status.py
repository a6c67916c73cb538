"""What runs: the `glmcode serve` processes of this user, each checked over HTTP."""

from __future__ import annotations

import httpx

from glmcode.server.state import ServerRecord, running_servers

PROBE_SECONDS = 2.0


def probe(record: ServerRecord) -> str:
    """"ready", "loading", "stopping", or why it does not answer."""
    try:
        response = httpx.get(f"{record.url}/health", timeout=PROBE_SECONDS)
    except httpx.HTTPError as error:
        return f"not answering ({type(error).__name__})"
    try:
        return str(response.json().get("status", response.status_code))
    except ValueError:
        return f"HTTP {response.status_code}"


def server_lines() -> list[str]:
    lines = []
    for record in running_servers():
        record.status = probe(record)
        lines.append(record.describe())
    return lines


def print_status() -> int:
    """Prints one line per running server; exit code 0 if any runs, 3 if none."""
    lines = server_lines()
    for line in lines:
        print(line)
    if not lines:
        print("no glmcode server is running (start one with `glmcode serve`)")
    return 0 if lines else 3
