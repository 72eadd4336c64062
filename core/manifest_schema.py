"""The schema of a backend's manifest.yaml (documented in core/backend.py), checked before anything reads it: every
key known, every value of the right type, every tolerance override complete. Each problem is one ContractError line
naming the file and the key (e.g. `tolerances[0].rtol`)."""

from __future__ import annotations

import re
from typing import Any

from core.errors import ContractError
from core.ops import OPERATORS
from core.safe_files import quote_name, quote_value

TOP_KEYS = {"backend": "a string", "description": "a string", "operators": "a mapping", "limits": "a mapping",
            "nondeterministic": "a mapping", "tolerances": "a list", "toolchain": "a mapping", "cache": "a mapping"}
OPERATOR_KEYS = ("dtypes", "numerics", "weights", "scale_fmts")
BLOCKS = ("mla_block", "moe_block")  # block-level checks a tolerance override may name besides the operators
MODES = ("normal", "interpret", "simulate")
OVERRIDE_KEYS = {
    "op": "an operator (or mla_block, moe_block) or a list of them",
    "dtype": "a dtype name or a list of them",
    "numerics": "a numerics class or a list of them",
    "mode": "normal, interpret or simulate, or a list of them",
    "rtol": "a positive number: the limit on the norm-wise relative error ||got - golden|| / ||golden||",
    "multiple": "a positive number: the multiple of cpu_ref's own error allowed",
    "floor": "a non-negative number: the error always allowed where cpu_ref is near exact",
    "skip": "a string: why the check is skipped instead of judged",
    "rounded_once": "false: the operator does not round once where the contract says so (a declared deviation)",
    "reason": "a non-empty string: why this tolerance",
}
UNREAD = {"atol": "the verdict is the norm-wise relative error (rtol); there is no absolute tolerance, so atol would be "
                  "ignored: remove it"}


def _key(k: Any) -> str:
    """A key as shown in an error: bare when it is a plain identifier, else quoted and escaped."""
    return k if isinstance(k, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", k) else quote_name(k)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _names(v: Any, allowed: tuple[str, ...] | list[str]) -> bool:
    items = v if isinstance(v, list) else [v]
    return bool(items) and all(isinstance(x, str) and x in allowed for x in items)


def check_override(row: Any, key: str, where: str, dtypes: tuple[str, ...], numerics: tuple[str, ...]) -> None:
    """One entry of `tolerances`: known keys of the right types, op, dtype and reason present, rtol or skip."""
    def bad(what: str) -> ContractError:
        return ContractError(f"{where}: {what}")

    if not isinstance(row, dict):
        raise bad(f"{key} must be a mapping like {{op: linear, dtype: bfloat16, rtol: 0.02, reason: \"...\"}}, "
                  f"got {quote_value(row)}")
    for k in row:
        if k in UNREAD:
            raise bad(f"{key}.{k} is not read: {UNREAD[k]}")
        if k not in OVERRIDE_KEYS:
            raise bad(f"{key}.{_key(k)} is not a tolerance key (known: {', '.join(OVERRIDE_KEYS)})")
    for k in ("op", "dtype", "reason"):
        if k not in row:
            raise bad(f"{key} has no {k} ({OVERRIDE_KEYS[k]})")
    if "rtol" not in row and "skip" not in row:
        raise bad(f"{key} has no rtol ({OVERRIDE_KEYS['rtol']}); or give skip with the reason")
    if "rtol" in row and "skip" in row:
        raise bad(f"{key} has both rtol and skip: a check is judged or skipped, not both")
    checks = {"op": lambda v: _names(v, list(OPERATORS) + list(BLOCKS)), "dtype": lambda v: _names(v, dtypes),
              "numerics": lambda v: _names(v, numerics), "mode": lambda v: _names(v, MODES),
              "rtol": lambda v: _is_number(v) and v > 0, "multiple": lambda v: _is_number(v) and v > 0,
              "floor": lambda v: _is_number(v) and v >= 0, "rounded_once": lambda v: v is False,
              "skip": lambda v: isinstance(v, str) and v.strip() != "",
              "reason": lambda v: isinstance(v, str) and v.strip() != ""}
    for k, ok in checks.items():
        if k in row and not ok(row[k]):
            raise bad(f"{key}.{k} must be {OVERRIDE_KEYS[k]}, got {quote_value(row[k])}")


def check_manifest(data: Any, where: str, dtypes: tuple[str, ...], numerics: tuple[str, ...]) -> None:
    """Raise a one-line ContractError naming the first key of `data` (a parsed manifest.yaml) that breaks the
    schema; `dtypes` and `numerics` are the names core.backend knows."""
    if not isinstance(data, dict):
        raise ContractError(f"{where}: the manifest must be a mapping")
    for k, v in data.items():
        if k in UNREAD:
            raise ContractError(f"{where}: {k} is not read: {UNREAD[k]}")
        if k not in TOP_KEYS:
            raise ContractError(f"{where}: unknown manifest key {_key(k)} (known: {', '.join(TOP_KEYS)})")
        kind = {"a string": str, "a mapping": dict, "a list": list}[TOP_KEYS[k]]
        if v is not None and not isinstance(v, kind):
            raise ContractError(f"{where}: {k} must be {TOP_KEYS[k]}, got {quote_value(v)}")
    for name, entry in (data.get("operators") or {}).items():
        if isinstance(entry, dict):
            for k in entry:
                if k not in OPERATOR_KEYS:
                    raise ContractError(f"{where}: operators.{_key(name)}.{_key(k)} is not an operator "
                                        f"key (known: {', '.join(OPERATOR_KEYS)})")
    for section in ("limits", "nondeterministic"):
        for name, text in (data.get(section) or {}).items():
            if not isinstance(text, str) or not text.strip():
                raise ContractError(f"{where}: {section}.{_key(name)} must be a non-empty string saying why, "
                                    f"got {quote_value(text)}")
    for i, row in enumerate(data.get("tolerances") or []):
        check_override(row, f"tolerances[{i}]", where, dtypes, numerics)
