"""The one place that opens a checkpoint's tokenizer files (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`).

Every read is size-checked before anything is parsed, only regular files are opened (a FIFO or device would block
the loader), the text must be UTF-8, and every failure is one `CheckpointError` line naming the file. A hardening
change that confines checkpoint files to their directory routes `tokenizer_file_path` through its containment check;
nothing else in the project opens these files.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from core.errors import CheckpointError

MiB = 1 << 20
# DeepSeek-V3's tokenizer.json is ~7.8 MB (128k BPE entries); 64 MiB leaves room for 256k-entry vocabularies.
SIZE_LIMITS = {"tokenizer.json": 64 * MiB, "tokenizer_config.json": 8 * MiB, "chat_template.jinja": 1 * MiB}
DEFAULT_LIMIT = 8 * MiB


def tokenizer_file_path(directory: Path, name: str) -> Path | None:
    """The path of tokenizer file `name` inside `directory`, or None when the checkpoint has no such file."""
    path = directory / name
    if not os.path.lexists(path):
        return None
    return path


def read_tokenizer_text(directory: Path, name: str) -> str | None:
    """The UTF-8 text of tokenizer file `name` in `directory` (None if absent); at most SIZE_LIMITS[name] bytes."""
    path = tokenizer_file_path(directory, name)
    if path is None:
        return None
    limit = SIZE_LIMITS.get(name, DEFAULT_LIMIT)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: not a regular file; refusing to read it")
        if info.st_size > limit:
            raise CheckpointError(f"{path}: {info.st_size} bytes is larger than the {limit}-byte limit for {name}")
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # the file may grow between stat and read
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than the {limit}-byte limit for {name}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_tokenizer_json(directory: Path, name: str) -> dict[str, Any] | None:
    """Tokenizer file `name` parsed as a JSON object (None if absent); one-line errors for anything else."""
    text = read_tokenizer_text(directory, name)
    if text is None:
        return None
    path = directory / name
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
