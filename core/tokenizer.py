"""Tokenizers: byte-level for the embedded default; a checkpoint's own `tokenizer.json` when the optional
`tokenizers` package is installed. Token ids are always accepted directly (`--prompt-ids`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from core.errors import UserError
from core.safe_files import (MAX_TOKENIZER_BYTES, MAX_TOKENIZER_CONFIG_BYTES, containment_root, read_bytes,
                             read_json_file, resolve_inside)


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


class HFTokenizer:
    """A checkpoint's tokenizer.json through the `tokenizers` package; adds BOS as tokenizer_config.json says."""

    def __init__(self, directory: Path, bos_id: int | None):
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError:
            raise UserError(f"{directory}/tokenizer.json needs the 'tokenizers' package (pip install tokenizers); "
                            "or pass --prompt-ids") from None
        root = containment_root(directory)  # files resolved inside the checkpoint; regular files only, bounded
        data = read_bytes(resolve_inside(root, directory, "tokenizer.json", str(directory), UserError),
                          MAX_TOKENIZER_BYTES, error=UserError)
        try:
            self.tok = _Tok.from_str(data.decode("utf-8"))
        except Exception as e:  # the tokenizers library raises its own exception type
            raise UserError(f"{directory}/tokenizer.json: cannot load ({str(e).splitlines()[0] if str(e) else e!r})"
                            ) from None
        add_bos = True
        cfg_file = directory / "tokenizer_config.json"
        if os.path.lexists(cfg_file):
            data = read_json_file(resolve_inside(root, directory, cfg_file.name, str(directory), UserError),
                                  MAX_TOKENIZER_CONFIG_BYTES, error=UserError)
            if not isinstance(data, dict):
                raise UserError(f"{cfg_file}: expected a JSON object")
            add_bos = bool(data.get("add_bos_token", True))
        self.bos_id = bos_id if add_bos else None

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def for_checkpoint(directory: Path | None, bos_id: int | None) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory (None if it has none), or the byte tokenizer for the default."""
    if directory is None:
        return ByteTokenizer(bos_id)
    if (directory / "tokenizer.json").is_file():
        return HFTokenizer(directory, bos_id)
    return None
