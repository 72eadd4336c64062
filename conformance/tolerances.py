"""The tolerance table (tolerances.yaml) and a backend's overrides of it (its manifest's `tolerances`, each with a
reason). Lookup picks the most specific matching row.

Two verdicts read it. The absolute one: a check's norm-wise relative error against the float64 golden must stay
within the row's `rtol`. The relative one (section `relative`): the error must also stay within `multiple` times
what cpu_ref itself reaches in the same working dtype on the same inputs, or within `floor` where cpu_ref is (near)
exact. A manifest override that sets `rtol` declares numerics of its own (e.g. weights dequantised to bfloat16), so
it replaces the relative row too: by its own `multiple` (and `floor`) when it gives one, else by none; and with
`rounded_once: false` it declares that the operator does not round once where the contract says so (the rounded-once
invariant of conformance/invariants.py is then reported, not judged)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.backend import Manifest

TABLE = Path(__file__).resolve().parent / "tolerances.yaml"


@dataclass(frozen=True)
class Tolerance:
    rtol: float | None
    reason: str
    skip: bool = False
    source: str = "conformance/tolerances.yaml"


@dataclass(frozen=True)
class Relative:
    """The relative verdict: error <= max(multiple * cpu_ref's error, floor)."""

    multiple: float
    floor: float
    reason: str
    source: str = "conformance/tolerances.yaml"

    def reference_scale(self, ref_err: float) -> float:
        """The reference error a check's error is divided by: cpu_ref's, or the floor's equivalent where larger."""
        return max(ref_err, self.floor / self.multiple)

    def ratio(self, err: float, ref_err: float) -> float:
        """The error as a multiple of cpu_ref's (floored); the check fails when it exceeds `multiple`."""
        scale = self.reference_scale(ref_err)
        return err / scale if scale > 0 else (0.0 if err == 0 else math.inf)

    def limit(self, ref_err: float) -> float:
        return self.multiple * self.reference_scale(ref_err)


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def _matches(row: dict, op: str, dtype: str, numerics: str, mode: str) -> int | None:
    """Specificity of a matching row (higher wins), or None when it does not match."""
    if op not in _as_list(row["op"]) or dtype not in _as_list(row["dtype"]):
        return None
    score = 0
    if "numerics" in row:
        if numerics not in _as_list(row["numerics"]):
            return None
        score += 1
    elif numerics != "reference" and op in ("linear", "moe_experts"):
        score -= 1  # a reference-class row still applies to other classes, but loses to a class row
    if "mode" in row:
        if mode not in _as_list(row["mode"]):
            return None
        score += 2
    return score


def _best(rows: list[tuple[dict, str]], op: str, dtype: str, numerics: str, mode: str):
    best, best_score = None, None
    for row, source in rows:
        score = _matches(row, op, dtype, numerics, mode)
        if score is None:
            continue
        score += 10 if row.get("_override") else 0
        if best_score is None or score >= best_score:
            best, best_score = (row, source), score
    return best


class ToleranceTable:
    def __init__(self, manifest: Manifest | None = None, path: Path = TABLE):
        data = yaml.safe_load(path.read_text())
        where = str(path.relative_to(path.parent.parent))
        self.rows: list[tuple[dict, str]] = [(r, where) for r in data["rows"]]
        self.relative_rows: list[tuple[dict, str]] = [(r, where) for r in data.get("relative", [])]
        self.rounding = data.get("rounded_once", {})
        self.model = data["model"]
        if manifest is not None:
            for r in manifest.tolerances:
                self.rows.append(({**r, "_override": True}, f"{manifest.path.parent.name}/manifest.yaml"))

    def lookup(self, op: str, dtype: str, numerics: str = "reference", mode: str = "normal") -> Tolerance:
        best = _best(self.rows, op, dtype, numerics, mode)
        if best is None:
            return Tolerance(None, f"no tolerance row for {op} in {dtype}", skip=True)
        row, source = best
        if "skip" in row:
            return Tolerance(None, str(row["skip"]), skip=True, source=source)
        return Tolerance(float(row["rtol"]), str(row["reason"]), source=source)

    def rounding_fraction(self, op: str, dtype: str, numerics: str = "reference", mode: str = "normal"
                          ) -> float | None:
        """The share of output elements that may differ from golden rounded once (section `rounded_once`), or None
        where a manifest override of the absolute row declares `rounded_once: false` (with its reason)."""
        absolute = _best(self.rows, op, dtype, numerics, mode)
        if absolute is not None and absolute[0].get("_override") and absolute[0].get("rounded_once") is False:
            return None
        row = self.rounding.get(dtype) or {}
        return float(row.get("max_fraction", 1.0))

    def rounding_chance(self, dtype: str) -> tuple[float, float]:
        """(element_rate, false_alarm) of section `rounded_once`: the per-element chance that a correct kernel's
        float32 result straddles a rounding boundary of `dtype`, and the per-check false-alarm rate allowed; the
        invariant allows the mismatch count that Binomial(n, element_rate) exceeds with at most that probability."""
        row = self.rounding.get(dtype) or {}
        return float(row.get("element_rate", 0.0)), float(self.rounding.get("false_alarm", 1.0))

    def relative(self, op: str, dtype: str, numerics: str = "reference", mode: str = "normal") -> Relative | None:
        """The relative verdict for `op` in `dtype`, or None where none applies (no row, or a manifest override of
        the absolute row that states no multiple of its own)."""
        absolute = _best(self.rows, op, dtype, numerics, mode)
        if absolute is not None and absolute[0].get("_override"):
            row, source = absolute
            if "multiple" not in row:
                return None
            return Relative(float(row["multiple"]), float(row.get("floor", 0.0)), str(row["reason"]), source)
        best = _best(self.relative_rows, op, dtype, numerics, mode)
        if best is None or "multiple" not in best[0]:
            return None
        row, source = best
        return Relative(float(row["multiple"]), float(row["floor"]), str(row["reason"]), source)
