"""A checkpoint's `generation_config.json`, read as sampling defaults.

`read_json_object` is the one place this module reads JSON, through `core.safe_files` (contained, regular files
only, size and depth bounded before parsing, one `CheckpointError` line naming the file for every failure).

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

import os
from pathlib import Path
from typing import Any

from core.errors import CheckpointError
from core.safe_files import containment_root, quote_name, read_json_file, resolve_inside

MAX_JSON_BYTES = 4 * 1024 * 1024  # a generation_config.json is a few hundred bytes; refuse anything absurd

# generation_config.json field -> SamplingParams field, for the fields copied as they are
_SAME_NAME = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_json_object(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Parse a JSON file whose top level must be an object, through `core.safe_files` (contained in its
    directory, regular files only, size and nesting bounded before parsing). Raises CheckpointError, one line
    naming `path`, for anything else."""
    path = Path(path)
    where = quote_name(str(path))
    if not os.path.lexists(path):
        raise CheckpointError(f"{where}: not found")
    inside = resolve_inside(containment_root(path.parent), path.parent, path.name, quote_name(str(path.parent)))
    data = read_json_file(inside, max_bytes, what=where)
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
