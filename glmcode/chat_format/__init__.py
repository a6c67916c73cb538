"""The one place that knows GLM-4.7's wire format.

- `render` / `render_ids`: a conversation to the prompt text / token ids, exactly as the
  official chat template renders it (render.py).
- `parse` / `StreamParser`: model output to reasoning, content and tool calls (stream.py,
  tool_calls.py, arguments.py, schema.py).
- `template_flags`: the thinking modes as template flags (thinking.py).
"""

from glmcode.chat_format.render import render, render_ids
from glmcode.chat_format.stream import ParsedMessage, StreamParser, parse
from glmcode.chat_format.thinking import template_flags

__all__ = ["ParsedMessage", "StreamParser", "parse", "render", "render_ids", "template_flags"]
