"""The one place that opens a checkpoint's tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`), through `core.safe_files`: each name is resolved inside the checkpoint directory (no `..`,
no symlink leaving it), only regular files are opened (a FIFO or device would block the loader), sizes are checked
before anything is read or parsed, JSON nesting is bounded, and every failure is one `CheckpointError` line naming
the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.errors import CheckpointError
from core.safe_files import containment_root, parse_json, quote_name, read_bytes, resolve_inside

MiB = 1 << 20
# DeepSeek-V3's tokenizer.json is ~7.8 MB (128k BPE entries); 64 MiB leaves room for 256k-entry vocabularies.
SIZE_LIMITS = {"tokenizer.json": 64 * MiB, "tokenizer_config.json": 8 * MiB, "chat_template.jinja": 1 * MiB}
DEFAULT_LIMIT = 8 * MiB


def tokenizer_file_path(directory: Path, name: str) -> Path | None:
    """The path of tokenizer file `name` inside `directory` (contained: see core.safe_files.resolve_inside), or
    None when the checkpoint has no such file."""
    if not os.path.lexists(directory / name):
        return None
    return resolve_inside(containment_root(directory), directory, name, quote_name(str(directory)))


def read_tokenizer_text(directory: Path, name: str) -> str | None:
    """The UTF-8 text of tokenizer file `name` in `directory` (None if absent); at most SIZE_LIMITS[name] bytes."""
    path = tokenizer_file_path(directory, name)
    if path is None:
        return None
    data = read_bytes(path, SIZE_LIMITS.get(name, DEFAULT_LIMIT))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{quote_name(str(path))}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_tokenizer_json(directory: Path, name: str) -> dict[str, Any] | None:
    """Tokenizer file `name` parsed as a JSON object (None if absent); one-line errors for anything else."""
    path = tokenizer_file_path(directory, name)
    if path is None:
        return None
    shown = quote_name(str(path))
    data = parse_json(read_bytes(path, SIZE_LIMITS.get(name, DEFAULT_LIMIT)), shown)
    if not isinstance(data, dict):
        raise CheckpointError(f"{shown}: expected a JSON object, got {type(data).__name__}")
    return data
