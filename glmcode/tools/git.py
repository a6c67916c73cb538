"""Read-only git tools: git_status, git_diff, git_log (through gitpython)."""

from __future__ import annotations

from typing import Any

import git

from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.workspace import ToolError, Workspace

MAX_DIFF_CHARS = 40_000
DEFAULT_LOG_COUNT = 10
MAX_LOG_COUNT = 100


def _repo(workspace: Workspace) -> git.Repo:
    try:
        repo = git.Repo(workspace.root, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise ToolError(f"{workspace.root} is not a git repository") from None
    repo.git.update_environment(GIT_OPTIONAL_LOCKS="0")  # looking must not rewrite the user's index
    return repo


def _pathspec(workspace: Workspace, arguments: dict[str, Any]) -> list[str]:
    path = arguments.get("path")
    return ["--", workspace.relative(workspace.resolve(path))] if path else []


def git_status(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    with _repo(workspace) as repo:
        status = repo.git.status("--short", "--branch", "--untracked-files=all")
    return ToolResult(status or "(clean)")


def git_diff(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    options = ["--no-color", "--no-ext-diff"]
    if arguments.get("staged"):
        options.append("--cached")
    if arguments.get("ref"):
        ref = str(arguments["ref"])
        if ref.startswith("-"):
            raise ToolError(f"ref {ref!r} is not a revision")
        options.append(ref)
    try:
        with _repo(workspace) as repo:
            diff = repo.git.diff(*options, *_pathspec(workspace, arguments))
    except git.GitCommandError as error:
        raise ToolError(f"git diff failed: {error.stderr.strip()}") from None
    if not diff:
        return ToolResult("(no differences)")
    if len(diff) > MAX_DIFF_CHARS:
        diff = diff[:MAX_DIFF_CHARS] + f"\n[... diff cut at {MAX_DIFF_CHARS:,} characters; pass a path to see one file]"
    return ToolResult(diff)


def git_log(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    count = min(int(arguments.get("max_count") or DEFAULT_LOG_COUNT), MAX_LOG_COUNT)
    path = arguments.get("path")
    paths = workspace.relative(workspace.resolve(path)) if path else ""
    with _repo(workspace) as repo:
        try:
            lines = [
                f"{c.hexsha[:10]} {c.committed_datetime:%Y-%m-%d} {c.author.name}: {c.summary}"
                for c in repo.iter_commits(max_count=count, paths=paths)
            ]
        except (git.GitCommandError, ValueError):
            return ToolResult("(no commits yet)")
    return ToolResult("\n".join(lines) or "(no commits)")


GIT_STATUS = Tool(
    name="git_status",
    description="Show the current branch and the changed, staged and untracked files (git status --short).",
    parameters={"type": "object", "properties": {}, "required": []},
    kind="read",
    run=git_status,
)

GIT_DIFF = Tool(
    name="git_diff",
    description=(
        "Show uncommitted changes as a unified diff: working tree against the index by default, "
        "the index against HEAD with staged=true, or the working tree against a commit with ref."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Limit the diff to this file or directory."},
            "staged": {"type": "boolean", "description": "Show staged changes (git diff --cached)."},
            "ref": {"type": "string", "description": "Compare against this commit, branch or tag, e.g. `HEAD~1`."},
        },
        "required": [],
    },
    kind="read",
    run=git_diff,
)

GIT_LOG = Tool(
    name="git_log",
    description="List recent commits, newest first: short hash, date, author and subject.",
    parameters={
        "type": "object",
        "properties": {
            "max_count": {"type": "integer", "description": f"How many commits (default {DEFAULT_LOG_COUNT})."},
            "path": {"type": "string", "description": "Only commits that touched this file or directory."},
        },
        "required": [],
    },
    kind="read",
    run=git_log,
)
