"""An MCP tool result as the text the model reads.

Text blocks are passed on as they are; images, audio and binary resources cannot reach a text
model, so each becomes a one-line note of what it was. A result with no content blocks falls
back to its structured content as JSON. The agent loop caps the text like any tool output.
"""

from __future__ import annotations

import json
from typing import Any

from glmcode.tools.base import ToolResult


def format_result(result: Any) -> ToolResult:
    parts = [describe_block(block) for block in result.content or []]
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False, indent=2))
    text = "\n".join(part for part in parts if part) or "(no output)"
    return ToolResult(text, is_error=bool(result.is_error))


def describe_block(block: Any) -> str:
    kind = getattr(block, "type", "")
    if kind == "text":
        return block.text
    if kind in ("image", "audio"):
        return f"[{kind} content ({block.mime_type}, {_decoded_size(block.data)}) not shown: text only here]"
    if kind == "resource":
        resource = block.resource
        text = getattr(resource, "text", None)
        if text is not None:
            return f"[resource {resource.uri}]\n{text}"
        mime = getattr(resource, "mime_type", None) or "binary"
        return f"[resource {resource.uri} ({mime}, {_decoded_size(resource.blob)}) not shown: text only here]"
    if kind == "resource_link":
        about = f": {block.description}" if getattr(block, "description", None) else ""
        return f"[resource link {block.name} <{block.uri}>{about}]"
    return f"[{kind or type(block).__name__} content not shown]"


def _decoded_size(base64_data: str) -> str:
    size = len(base64_data.strip().rstrip("=")) * 3 // 4
    return f"{size:,} bytes"
