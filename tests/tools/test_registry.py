"""The registry: every tool well described, and run_tool never raising."""

from __future__ import annotations

from pathlib import Path

from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.registry import all_tools, get_tool, read_only_tools, run_tool
from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call

EXPECTED = {
    "read_file", "write_file", "edit_file", "list_files", "glob", "grep", "run_command", "run_tests",
    "git_status", "git_diff", "git_log", "repo_map",
}


def test_every_tool_is_registered_once_with_a_complete_schema() -> None:
    tools = all_tools()
    assert {tool.name for tool in tools} == EXPECTED and len(tools) == len(EXPECTED)
    for tool in tools:
        assert len(tool.description) > 40, tool.name
        schema = tool.parameters
        assert schema["type"] == "object" and isinstance(schema["required"], list)
        assert set(schema["required"]) <= set(schema["properties"])
        for name, prop in schema["properties"].items():
            assert prop["type"] in {"string", "integer", "number", "boolean"}, (tool.name, name)
            assert prop["description"], (tool.name, name)
        spec = tool.spec()
        assert spec["function"]["name"] == tool.name and spec["function"]["parameters"] is schema


def test_read_only_tools_are_exactly_the_read_kind() -> None:
    names = {tool.name for tool in read_only_tools()}
    assert names == {"read_file", "list_files", "glob", "grep", "repo_map", "git_status", "git_diff", "git_log"}
    assert get_tool("edit_file").kind == "edit" and get_tool("run_tests").kind == "command"
    assert get_tool("no_such_tool") is None


def test_bad_arguments_become_error_results(repo: Path) -> None:
    ws = Workspace(repo)
    unknown = call(ws, "read_file", file_path="README.md")
    assert unknown.is_error and "no argument 'file_path'" in unknown.output and "path" in unknown.output
    missing = call(ws, "grep")
    assert missing.is_error and "needs the argument 'pattern'" in missing.output
    wrong = call(ws, "read_file", path="README.md", start_line="first")
    assert wrong.is_error and "must be of type integer" in wrong.output
    not_a_dict = run_tool(get_tool("read_file"), ws, ["README.md"])
    assert not_a_dict.is_error


def test_text_values_are_coerced_to_the_schema_types(repo: Path) -> None:
    ws = Workspace(repo)
    assert call(ws, "read_file", path="README.md", start_line="1", end_line=1.0).output.startswith("     1\t# demo")
    assert not call(ws, "grep", pattern="DEMO", ignore_case="true").is_error


def test_a_crashing_tool_becomes_an_error_result(repo: Path) -> None:
    def explode(workspace: Workspace, arguments: dict) -> ToolResult:
        raise ZeroDivisionError("division by zero")

    broken = Tool("broken", "A tool that fails.", {"type": "object", "properties": {}, "required": []}, "read", explode)
    result = run_tool(broken, Workspace(repo), {})
    assert result.is_error and "ZeroDivisionError" in result.output
