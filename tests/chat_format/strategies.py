"""Hypothesis strategies: OpenAI-style conversations covering every message kind the template knows."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from glmcode.chat_format import tags

_FRAGMENTS = [
    "", " ", "\n", "\n\n", "  padded  ", "é", "中文", "🙂", "\u00a0", "\t", "x", "None", "{}",
    tags.THINK, tags.END_THINK, "<tools>", "'quoted'", '"double"', "\\", "a\u0301",
]

_BLANKS = ["", " ", "\n", " \n ", "\t", "\n\n"]  # blank text decides several template branches
text = st.one_of(
    st.sampled_from(_BLANKS),
    st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=8)), max_size=5).map("".join),
)

json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-10**12, 10**12),
        st.floats(allow_nan=False, allow_infinity=False), text,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(text, children, max_size=3)
    ),
    max_leaves=8,
)

_parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    text,
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}),
    st.just({"type": "text"}),
    st.integers(0, 9),
)
content = st.one_of(
    text, st.lists(_parts, max_size=4), st.none(), st.dictionaries(st.sampled_from(["type", "text"]), text, max_size=2)
)

_inline_think = st.builds(
    lambda lead, reasoning, middle, answer: f"{lead}{tags.THINK}{reasoning}{tags.END_THINK}{middle}{answer}",
    st.sampled_from(["", "\n", " "]), text, st.sampled_from(["", "\n", "\n\n"]), text,
)

_names = st.sampled_from(["read_file", "edit_file", "run_tests", "get_weather", "搜索"])
arguments = st.dictionaries(text, json_values, max_size=4)


@st.composite
def tool_calls(draw):
    name = draw(_names)
    args = draw(arguments)
    form = draw(st.sampled_from(["openai", "openai_json", "bare", "bare_json"]))
    wire_args = json.dumps(args, ensure_ascii=draw(st.booleans())) if form.endswith("json") else args
    function = {"name": name, "arguments": wire_args}
    if form.startswith("openai"):
        return {"id": "call_1", "type": "function", "function": function}
    return function


def _message(role: str, **fields):
    return {"role": role, **{key: value for key, value in fields.items() if value is not _ABSENT}}


_ABSENT = object()
_maybe = lambda strategy: st.one_of(st.just(_ABSENT), strategy)  # noqa: E731

system_messages = st.builds(lambda c: _message("system", content=c), content)
user_messages = st.builds(lambda c: _message("user", content=c), content)
assistant_messages = st.builds(
    lambda c, r, calls: _message("assistant", content=c, reasoning_content=r, tool_calls=calls),
    st.one_of(content, _inline_think),
    _maybe(st.one_of(text, st.none())),
    _maybe(st.one_of(st.none(), st.lists(tool_calls(), max_size=3))),
)
_tool_results = st.one_of(
    st.builds(lambda o: {"output": o}, st.one_of(text, st.integers(), st.none(), st.dictionaries(text, text, max_size=2))),
    text,
    st.dictionaries(st.sampled_from(["type", "text"]), text, max_size=2),
)
tool_messages = st.builds(
    lambda c, call_id: _message("tool", content=c, tool_call_id=call_id),
    st.one_of(text, st.lists(_tool_results, max_size=3), st.none()),
    _maybe(st.just("call_1")),
)
other_messages = st.builds(lambda c: _message("developer", content=c), text)

messages = st.lists(
    st.one_of(system_messages, user_messages, assistant_messages, tool_messages, tool_messages, other_messages),
    max_size=8,
)

_schemas = st.sampled_from([
    {"type": "object", "properties": {}},
    {"type": "object", "properties": {"path": {"type": "string", "description": "Fichier à lire"}}, "required": ["path"]},
    {"type": "object", "properties": {"n": {"type": ["integer", "null"]}, "tags": {"type": "array", "items": {"type": "string"}}}},
])
tool_specs = st.builds(
    lambda name, description, parameters, wrapped: (
        {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}
        if wrapped else {"name": name, "description": description, "parameters": parameters}
    ),
    _names, text, _schemas, st.booleans(),
)
tools = st.one_of(st.none(), st.just([]), st.lists(tool_specs, min_size=1, max_size=3))

flags = st.fixed_dictionaries({
    "add_generation_prompt": st.booleans(),
    "enable_thinking": st.booleans(),
    "clear_thinking": st.sampled_from([None, True, False]),
})

# Model output assembled from tags, their halves and text: well-formed or not.
_OUTPUT_PIECES = st.sampled_from([
    *tags.TEMPLATE_TOKENS, *tags.STOP_TOKENS, "<tool_", "</arg_", "<|obs", "</thi", "read_file", "run", "path",
    "cmd", "a.py", "1", " ", "\n", "x", "é", "🙂", "<", ">", "/",
])
model_output = st.lists(_OUTPUT_PIECES, max_size=30).map("".join)
