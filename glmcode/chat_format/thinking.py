"""GLM-4.7 thinking modes, and the template flags that select them.

The agent picks a `glmcode.backends.base.Thinking` per request:

- interleaved thinking: always on. The model reasons before every step; the reasoning of every
  assistant message after the last user message is rendered back (send each message's
  `reasoning_content`), which is what the model was trained on inside a tool loop.
- preserved thinking: `Thinking(clear_thinking=False)`, the agent's default. Reasoning of
  earlier user turns is rendered back too, so each new prompt only appends to the previous one
  and the engine's prefix cache keeps every block. `clear_thinking=True` or None (template
  default) drops it at each new user message instead.
- turn-level thinking: `Thinking(enabled=False)` ends the generation prompt with `</think>`
  instead of `<think>`, so the model answers at once; parse that output with
  `StreamParser(tools, thinking=False)`.
"""

from __future__ import annotations

from glmcode.backends.base import Thinking


def template_flags(thinking: Thinking) -> dict[str, bool | None]:
    """Keyword arguments for `render` / `render_ids` that select the given modes."""
    return {"enable_thinking": thinking.enabled, "clear_thinking": thinking.clear_thinking}
