"""Tuning tables: per-device block sizes, warps, stages and vendor knobs for the shared kernels, read from a YAML
file that each Triton backend keeps in its own directory. Imports neither triton nor a vendor package.

File layout (one mapping per entry, one sub-mapping per operator):

    default:                      # used for every device not listed, and the base every other entry overrides
      rms_norm: {ROWS: 1, num_warps: 8}
      linear: {quant: {...}, gemm: [{max_m: 16, BLOCK_M: 16, ...}, ...]}
    "H100":                       # a case-insensitive substring of the device description ("NVIDIA H100 80GB HBM3")
      linear: {...}               # replaces default's `linear` key by key (a list replaces the whole list)
    interpreter: {...}            # the Triton interpreter on the CPU (TRITON_INTERPRET=1)

The first listed entry whose key is contained in the device description wins; `interpreter` is chosen only by name.
Operator wrappers receive their sub-mapping as `cfg`, plus the `extras` the backend measured on the device (for
example `num_sms`, `fp8_dot`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

import yaml

RESERVED = ("default", "interpreter")


class TuningTable:
    """A backend's tuning file. `select(description)` picks the entry once the device is known; until then the
    first read of any operator's view asks `resolver()` for the description (lazy selection)."""

    def __init__(self, path: Path, resolver: Callable[[], tuple[str, dict[str, Any]]] | None = None):
        self.path = Path(path)
        data = yaml.safe_load(self.path.read_text()) or {}
        if not isinstance(data, dict) or "default" not in data:
            raise ValueError(f"{self.path}: a tuning table is a mapping with at least a 'default' entry")
        self.entries: dict[str, dict[str, Any]] = {str(k): dict(v or {}) for k, v in data.items()}
        self.resolver = resolver
        self.selected: str | None = None
        self._ops: dict[str, dict[str, Any]] | None = None
        self._extras: dict[str, Any] = {}

    def entry_for(self, description: str) -> str:
        """The entry a device description selects: 'interpreter', the first matching device key, or 'default'."""
        if description == "interpreter":
            return "interpreter" if "interpreter" in self.entries else "default"
        text = description.lower()
        for key in self.entries:
            if key not in RESERVED and key.lower() in text:
                return key
        return "default"

    def select(self, description: str, extras: dict[str, Any] | None = None) -> str:
        """Bind the table to a device: merge its entry over `default`, add `extras` to every operator's config."""
        name = self.entry_for(description)
        merged: dict[str, dict[str, Any]] = {op: dict(cfg or {}) for op, cfg in self.entries["default"].items()}
        if name != "default":
            for op, cfg in self.entries[name].items():
                merged[op] = {**merged.get(op, {}), **(cfg or {})}
        for op in merged:
            merged[op] = {**(extras or {}), **merged[op]}
        self._ops, self.selected, self._extras = merged, name, dict(extras or {})
        return name

    def config(self, op: str) -> dict[str, Any]:
        """The selected configuration of one operator (selecting lazily through the resolver if need be)."""
        if self._ops is None:
            if self.resolver is None:
                self.select("default")
            else:
                self.select(*self.resolver())
        assert self._ops is not None
        return self._ops.get(op, dict(self._extras))

    def view(self, op: str) -> "OpTuning":
        """A live, read-only view of `op`'s configuration, to bind with functools.partial at import time."""
        return OpTuning(self, op)


class OpTuning(Mapping):
    """One operator's configuration as a Mapping that always reflects the table's current selection."""

    def __init__(self, table: TuningTable, op: str):
        self.table, self.op = table, op

    def __getitem__(self, key: str) -> Any:
        return self.table.config(self.op)[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table.config(self.op))

    def __len__(self) -> int:
        return len(self.table.config(self.op))

    def __repr__(self) -> str:
        return f"OpTuning({self.op}: {self.table.selected or 'unselected'})"
