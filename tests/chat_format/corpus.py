"""Model outputs for the parser tests: well-formed ones, and malformed ones with the error expected."""

from __future__ import annotations

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "offset": {"type": "integer"}},
                "required": ["path"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "run",
            "description": "Run a command",
            "parameters": {
                "type": "object",
                "properties": {"cmd": {"type": "string"}, "mode": {"enum": ["fast", "safe"]}},
                "required": ["cmd"],
                "additionalProperties": False,
            },
        },
    },
]

READ_A = "<tool_call>read_file<arg_key>path</arg_key><arg_value>a.py</arg_value></tool_call>"

WELL_FORMED = [
    "",
    "Just thinking, never closed",
    "Plan: read a.py.</think>Reading it now." + READ_A + "<|observation|>",
    "\n\nLet me   look\n\n at a.py 🙂 中文.\n</think>\n\nDone:\n\n- a\n- b\n\n<|user|>",
    "Two calls.</think>" + READ_A + "\n" + READ_A.replace("a.py", "  b c.py\n") + "<|observation|>",
    "x < y and a<b> </thin k> <tool_ call></think>1 < 2 <tool_cal <|obs <|user",
    "<think>reopened</think>answer<|endoftext|>",
    "r</think><tool_call>run<arg_key>cmd</arg_key><arg_value>echo '</tool_call>' <tool_call> </arg_key></arg_value></tool_call>",
    "multi-byte é\u0301🙂👩‍💻 split points</think>𝔘𝔫𝔦𝔠𝔬𝔡𝔢" + READ_A,
    # text after and between calls is kept (reasoning until </think>, then content)
    "</think>" + READ_A + "and then" + READ_A,
    "</think>Before." + READ_A + "\nSo that was it.<|observation|>",
    "Thinking..." + READ_A + "</think>oops",
    "Plan." + READ_A + " still thinking \\n" + READ_A + "\\n</think> \\nAnswer \\ done\\n",
    # the two characters \n where a separator belongs
    "</think><tool_call>read_file\\n<arg_key>path</arg_key>\\n<arg_value>a.py</arg_value>\\n</tool_call>\\n" + READ_A + "\\n",
    "</think>" + READ_A + "\\" + READ_A + "\\",
]

# (output, [(name or None, substring of the message), ...] for the ToolCallErrors, in order)
MALFORMED = [
    ("</think><tool_call>write_file<arg_key>path</arg_key><arg_value>a</arg_value></tool_call>",
     [("write_file", "Unknown function 'write_file'. Available functions: read_file, run")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a.py</arg_value>",
     [("read_file", "ended before the call was closed with </tool_call>")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a.py",
     [("read_file", "ended inside an argument value: close it with </arg_value>")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a</arg_value><arg_key>path</arg_key><arg_value>b</arg_value></tool_call>",
     [("read_file", "argument 'path' is given twice")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a</arg_value> junk <arg_key>offset</arg_key><arg_value>1</arg_value></tool_call>",
     [("read_file", "unexpected text 'junk' where <arg_key> or </tool_call> belongs")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key>=<arg_value>a</arg_value></tool_call>",
     [("read_file", "<arg_value> must follow </arg_key> of 'path'")]),
    ("</think><tool_call>read_file<arg_key>offset</arg_key><arg_value>3</arg_value></tool_call>",
     [("read_file", "missing required parameter 'path'. Expected read_file(path: string, offset?: integer)")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a</arg_value><arg_key>offset</arg_key><arg_value>ten</arg_value></tool_call>",
     [("read_file", "parameter 'offset' must be integer, got 'ten'")]),
    ("</think><tool_call>run<arg_key>cmd</arg_key><arg_value>ls</arg_value><arg_key>mode</arg_key><arg_value>slow</arg_value></tool_call>",
     [("run", 'parameter \'mode\' must be one of "fast", "safe", got "slow"')]),
    ("</think><tool_call>run<arg_key>cmd</arg_key><arg_value>ls</arg_value><arg_key>cwd</arg_key><arg_value>/</arg_value></tool_call>",
     [("run", "unknown parameter 'cwd' (parameters: cmd, mode)")]),
    ("</think><tool_call><arg_key>path</arg_key><arg_value>a</arg_value></tool_call>",
     [(None, "the function name is missing; write the name right after <tool_call>")]),
    ("</think><tool_call>read file<arg_key>path</arg_key><arg_value>a</arg_value></tool_call>",
     [(None, "invalid function name 'read file'")]),
    ("</think><tool_call>read_file<arg_value>a.py</arg_value></tool_call>",
     [("read_file", "unexpected text '<arg_value>a.py' where <arg_key> or </tool_call> belongs")]),
    ("</think><tool_call>read_file<arg_key>path<arg_value>a</arg_value></tool_call>",
     [("read_file", "an <arg_key> is not closed with </arg_key>")]),
    ("</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a</arg_value>" + READ_A,
     [("read_file", "a new <tool_call> began before this call was closed with </tool_call>")]),
    ("</think><tool_call>read_file<arg_key></arg_key><arg_value>a</arg_value></tool_call>",
     [("read_file", "invalid argument name ''")]),
]
