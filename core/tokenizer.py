"""Tokenizers for `core.run`: the embedded default's and a checkpoint's own, both through the `tokenizers` library
(`core.engine.tokenizer`). Token ids are always accepted directly (`--prompt-ids`).

`ByteTokenizer` is the id layout the embedded default has kept since its first version (0 BOS, 1 EOS, 2 pad,
3 + b = byte b); the default's real tokenizer (`core.engine.default_tokenizer`) encodes and decodes every byte string
exactly as it does, plus chat markers."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from core.engine.tokenizer import Tokenizer as EngineTokenizer
from core.engine.tokenizer import has_tokenizer, load_tokenizer


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """id 0 = begin of sequence, 1 = end of sequence, 2 = padding, 3 + b = byte b. Other ids decode to nothing."""

    OFFSET = 3

    def __init__(self, bos_id: int | None = 0):
        self.bos_id = bos_id

    def encode(self, text: str) -> list[int]:
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")


def for_checkpoint(directory: Path | None, bos_id: int | None = None) -> EngineTokenizer | None:
    """The tokenizer of a checkpoint directory (None if it has no tokenizer.json), or the embedded default's.
    `bos_id` is not used: whether and which BOS is added comes from the tokenizer files, as in transformers."""
    if directory is None:
        return load_tokenizer(None)
    if has_tokenizer(directory):
        return load_tokenizer(directory)
    return None
