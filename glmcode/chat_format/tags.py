"""The GLM-4.7 special tokens that structure a prompt and a model output.

Each is one added token in the tokenizer; `render_ids` looks their ids up by these strings.
"""

GMASK = "[gMASK]"
SOP = "<sop>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
OBSERVATION = "<|observation|>"
END_OF_TEXT = "<|endoftext|>"
THINK = "<think>"
END_THINK = "</think>"
TOOL_CALL = "<tool_call>"
END_TOOL_CALL = "</tool_call>"
TOOL_RESPONSE = "<tool_response>"
END_TOOL_RESPONSE = "</tool_response>"
ARG_KEY = "<arg_key>"
END_ARG_KEY = "</arg_key>"
ARG_VALUE = "<arg_value>"
END_ARG_VALUE = "</arg_value>"

# Every special token the template writes (the tool instructions spell out the call tags too).
TEMPLATE_TOKENS = (
    GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION, THINK, END_THINK, TOOL_CALL, END_TOOL_CALL,
    TOOL_RESPONSE, END_TOOL_RESPONSE, ARG_KEY, END_ARG_KEY, ARG_VALUE, END_ARG_VALUE,
)

# The model stops generating at any of these; they end a turn and are never content.
STOP_TOKENS = (OBSERVATION, USER, END_OF_TEXT)
