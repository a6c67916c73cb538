"""Text files as the model sees them: decoded, with "\\n" newlines, remembering how to write back.

A file keeps its encoding (utf-8, utf-8 with a BOM, or latin-1 for bytes that are not utf-8)
and its newline style (a file that is mostly CRLF stays CRLF) across an edit.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from glmcode.tools.workspace import ToolError

_UTF8_BOM = b"\xef\xbb\xbf"
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class TextFile:
    text: str  # newlines normalized to "\n"
    encoding: str = "utf-8"  # "utf-8", "utf-8-sig" or "latin-1"
    newline: str = "\n"  # "\n" or "\r\n"

    def encode(self, text: str) -> bytes:
        """`text` (with "\\n" newlines) in this file's encoding and newline style."""
        text = text.replace("\r\n", "\n")
        if self.newline != "\n":
            text = text.replace("\n", self.newline)
        try:
            return text.encode(self.encoding)
        except UnicodeEncodeError as error:
            raise ToolError(
                f"the file is {self.encoding}-encoded and cannot hold {text[error.start:error.end]!r}"
            ) from None


def is_binary(data: bytes) -> bool:
    return b"\0" in data[:_SNIFF_BYTES]


def decode(data: bytes) -> TextFile:
    if data.startswith(_UTF8_BOM):
        encoding = "utf-8-sig"
    else:
        try:
            data.decode("utf-8")
            encoding = "utf-8"
        except UnicodeDecodeError:
            encoding = "latin-1"
    text = data.decode(encoding)
    crlf = text.count("\r\n")
    newline = "\r\n" if crlf and crlf * 2 >= text.count("\n") else "\n"
    return TextFile(text.replace("\r\n", "\n"), encoding, newline)


def unified_diff(old: str | None, new: str | None, name: str) -> str:
    """A git-style unified diff of two "\\n"-newline texts of `name`; None = the file is absent."""
    lines = difflib.unified_diff(
        (old or "").splitlines(keepends=True),
        (new or "").splitlines(keepends=True),
        "/dev/null" if old is None else f"a/{name}",
        "/dev/null" if new is None else f"b/{name}",
        n=3,
    )
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)
