"""Model output that vLLM's and SGLang's GLM-4.5/4.7 parsers accept, and what glmcode makes of it.

Each case: (label, output, expected), expected = (reasoning, content, [(name, arguments)...],
[substring of each ToolCallError message...]). The tools below use the schema shapes that
generated schemas (pydantic, MCP servers) contain: `$ref` into `$defs` / `definitions`, unions,
`allOf` wrappers, nullable types.
"""

from __future__ import annotations


def call(name: str, *pairs: tuple[str, str], sep: str = "") -> str:
    """A GLM-4.7 tool call; sep goes between the tags (the template writes none)."""
    body = "".join(f"{sep}<arg_key>{key}</arg_key>{sep}<arg_value>{value}</arg_value>" for key, value in pairs)
    return f"<tool_call>{name}{body}{sep}</tool_call>"


def _tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": name, "parameters": parameters}}


SEARCH_ISSUES = _tool("search_issues", {  # as pydantic v2 writes a model with enums and Optionals
    "$defs": {
        "State": {"enum": ["open", "closed"], "title": "State", "type": "string"},
        "Paging": {"properties": {"page": {"type": "integer"}}, "title": "Paging", "type": "object"},
        "Path": {"type": "string", "title": "Path"},
    },
    "properties": {
        "query": {"title": "Query", "type": "string"},
        "state": {"anyOf": [{"$ref": "#/$defs/State"}, {"type": "null"}], "default": None},
        "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        "labels": {"anyOf": [{"items": {"type": "string"}, "type": "array"}, {"type": "null"}]},
        "paging": {"allOf": [{"$ref": "#/$defs/Paging"}], "description": "pydantic v1 wraps refs"},
        "path": {"$ref": "#/$defs/Path"},
    },
    "required": ["query"],
    "title": "SearchIssues",
    "type": "object",
})
MEASURE = _tool("measure", {  # OpenAPI-style nullable, draft-4 definitions, a top-level $ref
    "$ref": "#/definitions/Args",
    "definitions": {
        "Args": {
            "type": "object",
            "properties": {
                "count": {"type": "number"},
                "steps": {"type": "integer", "nullable": True},
                "scale": {"$ref": "#/definitions/Scale"},
                "label": {"type": ["string", "number"]},
                "ids": {"type": "array"},
                "options": {"type": "object"},
            },
            "required": ["count"],
            "additionalProperties": False,
        },
        "Scale": {"oneOf": [{"type": "number"}, {"const": "auto"}]},
    },
})
PICK = _tool("pick", {
    "type": "object",
    "properties": {
        "choice": {"enum": ["7", 8, None]},
        "size": {"type": "integer"},
        "anything": {},
    },
})
TOOLS = [SEARCH_ISSUES, MEASURE, PICK]

# A few outputs with nothing but separators in between, to name in the cases below.
_SEARCH = call("search_issues", ("query", "crash"))
_PICK = call("pick", ("choice", "8"))

CASES = [
    # text the servers keep as content: before, between and after calls
    ("text after the last call",
     "Look it up.</think>Searching." + _SEARCH + "\nI'll report what I find.<|observation|>",
     ("Look it up.", "Searching.\n\nI'll report what I find.", [("search_issues", {"query": "crash"})], [])),
    ("text between calls",
     "</think>" + _SEARCH + " then " + _PICK + "  and done  ",
     ("", "then\n\nand done", [("search_issues", {"query": "crash"}), ("pick", {"choice": 8})], [])),
    ("reasoning goes on after a call made before </think>",
     "First search." + _SEARCH + "Then pick." + _PICK + "</think>Both done.",
     ("First search.\n\nThen pick.", "Both done.", [("search_issues", {"query": "crash"}), ("pick", {"choice": 8})], [])),
    ("a stray </think> right after a call",
     "r</think>ok" + _PICK + "</think> after",
     ("r", "ok\n\nafter", [("pick", {"choice": 8})], [])),
    ("an unknown function between good calls is still refused, the rest runs",
     "</think>" + _SEARCH + "text" + call("delete_repo") + "more" + _PICK,
     ("", "text\n\nmore", [("search_issues", {"query": "crash"}), ("pick", {"choice": 8})],
      ["Unknown function 'delete_repo'. Available functions: search_issues, measure, pick"])),
    # the two characters \n between tags (SGLang reports GLM writing them)
    ("literal \\n after the name and between tags",
     "</think>" + call("search_issues", ("query", "crash"), ("limit", "5"), sep="\\n") + "\\n" + _PICK + "\\n",
     ("", "", [("search_issues", {"query": "crash", "limit": 5}), ("pick", {"choice": 8})], [])),
    ("literal \\n and real newlines mixed",
     "</think><tool_call>pick\n\\n<arg_key>size</arg_key>\\n\n<arg_value>3</arg_value>\n\\n</tool_call>",
     ("", "", [("pick", {"size": 3})], [])),
    # schemas read through $ref / $defs / definitions / anyOf / oneOf / allOf / nullable
    ("$ref enum inside a nullable union",
     "</think>" + call("search_issues", ("query", "q"), ("state", "closed"), ("limit", "null"), ("labels", '["bug"]')),
     ("", "", [("search_issues", {"query": "q", "state": "closed", "limit": None, "labels": ["bug"]})], [])),
    ("$ref enum refuses a value it does not list",
     "</think>" + call("search_issues", ("query", "q"), ("state", "merged")),
     ("", "", [], ['parameter \'state\' must be one of "open", "closed", null, got "merged"'])),
    ("a string behind a $ref stays a string, byte for byte",
     "</think>" + call("search_issues", ("query", " 42 "), ("path", "123")),
     ("", "", [("search_issues", {"query": " 42 ", "path": "123"})], [])),
    ("an allOf-wrapped $ref object",
     "</think>" + call("search_issues", ("query", "q"), ("paging", '{"page": 2}')),
     ("", "", [("search_issues", {"query": "q", "paging": {"page": 2}})], [])),
    ("an allOf-wrapped $ref object refuses a string",
     "</think>" + call("search_issues", ("query", "q"), ("paging", "page two")),
     ("", "", [], ["parameter 'paging' must be object, got 'page two'"])),
    ("top-level $ref, nullable: true, a oneOf of a number and a const",
     "</think>" + call("measure", ("count", "3"), ("steps", "null"), ("scale", "auto")),
     ("", "", [("measure", {"count": 3, "steps": None, "scale": "auto"})], [])),
    ("top-level $ref: required and additionalProperties come from the target",
     "</think>" + call("measure", ("steps", "2"), ("unit", "cm")),
     ("", "", [], ["unknown parameter 'unit' (parameters: count, steps, scale, label, ids, options)"])),
    # the enum is checked on each reading, not after typing
    ("7 for an enum [\"7\", 8, null] is the string",
     "</think>" + call("pick", ("choice", "7")) + call("pick", ("choice", "null")),
     ("", "", [("pick", {"choice": "7"}), ("pick", {"choice": None})], [])),
    ("a value the enum does not list",
     "</think>" + call("pick", ("choice", "9")),
     ("", "", [], ['parameter \'choice\' must be one of "7", 8, null, got 9'])),
    # Python-only number spellings are numbers only where a number is asked for
    ("0x10 and 123_456 stay text where no schema asks for a number",
     "</think>" + call("pick", ("anything", "0x10")) + call("pick", ("anything", "123_456")) + call("measure", ("count", "1"), ("label", "0x10")),
     ("", "", [("pick", {"anything": "0x10"}), ("pick", {"anything": "123_456"}), ("measure", {"count": 1, "label": "0x10"})], [])),
    ("0x10 where an integer is asked for",
     "</think>" + call("pick", ("size", "0x10")) + call("pick", ("size", "1_000")),
     ("", "", [("pick", {"size": 16}), ("pick", {"size": 1000})], [])),
    # quoted numbers and escaped JSON, as both servers coerce them
    ("a quoted number for number and integer parameters",
     "</think>" + call("measure", ("count", '"42"'), ("steps", '" 7 "')),
     ("", "", [("measure", {"count": 42, "steps": 7})], [])),
    ("a quoted fraction is still no integer",
     "</think>" + call("measure", ("count", "1"), ("steps", '"7.5"')),
     ("", "", [], ["parameter 'steps' must be one of integer, null, got '\"7.5\"'"])),
    ("a quoted number stays as written where a string is allowed too",
     "</think>" + call("measure", ("count", "1"), ("label", '"42"')),
     ("", "", [("measure", {"count": 1, "label": '"42"'})], [])),
    ("an array of objects written as backslash-escaped JSON",
     "</think>" + call("measure", ("count", "1"), ("ids", r'[{\"id\": \"1\", \"path\": \"C:\\\\tmp\"}, {\"id\": 2}]')),
     ("", "", [("measure", {"count": 1, "ids": [{"id": "1", "path": "C:\\tmp"}, {"id": 2}]})], [])),
    ("an object as a Python literal with a regex in it",
     "</think>" + call("measure", ("count", "1"), ("options", r"{'pattern': '\d+', 'strict': True}")),
     ("", "", [("measure", {"count": 1, "options": {"pattern": "\\d+", "strict": True}})], [])),
]
