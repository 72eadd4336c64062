"""A checkpoint's `generation_config.json`, read as sampling defaults.

`read_json_object` is the one place this module reads JSON: it refuses anything but a regular file (a FIFO or a
device would block the reader), refuses files over `MAX_JSON_BYTES` before parsing, and turns every failure
(unreadable, not UTF-8, invalid, too deeply nested, not an object) into one `CheckpointError` line naming the file.

`sampling_defaults` maps the Hugging Face fields onto `SamplingParams` field names:

| generation_config.json            | SamplingParams      |
|-----------------------------------|---------------------|
| `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty` | same name |
| `do_sample: false`                | `temperature = 0` (greedy), whatever `temperature` says, as transformers does |
| `max_new_tokens`                  | `max_tokens`        |
| `eos_token_id` (int or list)      | `eos_token_ids`     |

Other keys (`bos_token_id`, `transformers_version`, `_from_model_config`, ...) are ignored.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from core.errors import CheckpointError

MAX_JSON_BYTES = 4 * 1024 * 1024  # a generation_config.json is a few hundred bytes; refuse anything absurd

# generation_config.json field -> SamplingParams field, for the fields copied as they are
_SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Parse a JSON file whose top level must be an object, with its size bounded before parsing.

    Raises CheckpointError (one line naming `path`) when the file is missing, not a regular file, larger than
    `max_bytes`, unreadable, not UTF-8, invalid or too deeply nested JSON, or not an object."""
    path = Path(path)
    where = repr(str(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: not found") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{where}: not a regular file")
    if st.st_size > max_bytes:
        raise CheckpointError(f"{where}: {st.st_size} bytes, more than the {max_bytes} a JSON file may have here")
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise CheckpointError(f"{where}: more than the {max_bytes} bytes a JSON file may have here")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise CheckpointError(f"{where}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def sampling_defaults(source: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The SamplingParams fields a generation config sets, and a name for it to use in messages.

    `source` is a path to a `generation_config.json`, a checkpoint directory holding one (a directory without one
    gives no defaults), or an already parsed dict. Values are not range-checked here (SamplingParams.validate does
    that, naming the source); the shape of `eos_token_id` is, since it is converted."""
    if isinstance(source, dict):
        data, name = source, "generation_config"
    else:
        path = Path(source)
        if path.is_dir():
            path = path / "generation_config.json"
            if not path.exists():
                return {}, repr(str(path))
        data, name = read_json_object(path), repr(str(path))
    out: dict[str, Any] = {k: data[k] for k in _SAME_NAME if k in data and data[k] is not None}
    if data.get("max_new_tokens") is not None:
        out["max_tokens"] = data["max_new_tokens"]
    if "do_sample" in data:
        if not isinstance(data["do_sample"], bool):
            raise CheckpointError(f"{name}: do_sample must be true or false, got {short_repr(data['do_sample'])}")
        if not data["do_sample"]:
            out["temperature"] = 0.0
    eos = data.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids):
            raise CheckpointError(f"{name}: eos_token_id must be a token id or a list of them, got {short_repr(eos)}")
        out["eos_token_ids"] = tuple(ids)
    return out, name


def short_repr(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: escaped, so a value from a file cannot add a line to a message."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."
