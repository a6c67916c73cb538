"""The checkpoint's tokenizer.json through the `tokenizers` library, plus streaming decode.

No BOS is ever added: the chat template writes `[gMASK]<sop>` itself. Special tokens are kept
when decoding, because tool-call and thinking tags are special tokens the client must see.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from glmcode.errors import CheckpointError

# The strings that end an assistant turn; their ids are looked up, never hard-coded.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: the checkpoint has no tokenizer")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for malformed files
            raise CheckpointError(f"{path} is not a valid tokenizer.json: {exc}") from None

    @property
    def vocab_size(self) -> int:
        """Number of real token ids (including added tokens); ids at or above it are padding."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def stop_token_ids(self) -> list[int]:
        """Ids of the turn-ending special tokens this tokenizer has."""
        ids = (self.token_to_id(t) for t in STOP_TOKENS)
        return [i for i in ids if i is not None]


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character.

    A byte-level BPE token can hold part of a multi-byte character; such a token decodes to a
    replacement character until the rest arrives, so text is held back while the decoded tail
    ends in U+FFFD. Decoding restarts from the previous emission point, so merges that span the
    boundary are handled by the tokenizer's own decoder.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window that is decoded again for context
        self._read_offset = 0  # ids before this have been emitted

    def add(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        decode = self._tokenizer.decode
        seen = decode(self._ids[self._prefix_offset : self._read_offset])
        full = decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(seen) :]
