"""The tolerance table (tolerances.yaml) and a backend's overrides of it (its manifest's `tolerances`, each with a
reason). Lookup picks the most specific matching row."""

from __future__ import annotations

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


class ToleranceTable:
    def __init__(self, manifest: Manifest | None = None, path: Path = TABLE):
        data = yaml.safe_load(path.read_text())
        self.rows: list[tuple[dict, str]] = [(r, str(path.relative_to(path.parent.parent))) for r in data["rows"]]
        self.model = data["model"]
        if manifest is not None:
            for r in manifest.tolerances:
                self.rows.append(({**r, "_override": True}, f"{manifest.path.parent.name}/manifest.yaml"))

    def lookup(self, op: str, dtype: str, numerics: str = "reference", mode: str = "normal") -> Tolerance:
        best, best_score = None, None
        for row, source in self.rows:
            score = _matches(row, op, dtype, numerics, mode)
            if score is None:
                continue
            score += 10 if row.get("_override") else 0
            if best_score is None or score >= best_score:
                best, best_score = (row, source), score
        if best is None:
            return Tolerance(None, f"no tolerance row for {op} in {dtype}", skip=True)
        row, source = best
        if "skip" in row:
            return Tolerance(None, str(row["skip"]), skip=True, source=source)
        return Tolerance(float(row["rtol"]), str(row["reason"]), source=source)
