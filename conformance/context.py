"""What every check needs: the backend under test, its device, the reference, the numerics class of each operator,
the tolerance table, the case set, and the result record each check produces."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from backends import cpu_ref
from conformance.inputs import Hooks
from conformance.tolerances import Relative, Tolerance, ToleranceTable
from core.backend import Availability, Backend, Manifest, RunMode
from core.dispatch import Dispatch

PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass
class CheckResult:
    level: str  # op | block | model
    name: str  # e.g. op/linear/v3-kv_a-576-edge-block/bfloat16
    op: str  # the operator (or block/model check) it judges
    verdict: str  # pass | fail | skip
    dtype: str = ""
    shape: str = ""
    rel_err: float | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    ref_rel_err: float | None = None  # what cpu_ref itself reaches in the same working dtype
    ref_multiple: float | None = None  # rel_err / cpu_ref's rel_err (floored: tolerances.yaml `relative`)
    ref_limit: float | None = None  # the multiple of cpu_ref's error allowed (None: no relative verdict)
    tolerance: float | None = None
    tolerance_reason: str = ""
    tolerance_source: str = ""
    seconds: float = 0.0
    detail: str = ""
    culprits: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def judge(self, err, ref_err, tol: Tolerance, rel: Relative | None, parts: list | None = None) -> CheckResult:
        """The numeric verdict from `err` and cpu_ref's `ref_err` (compare.Errors against the same golden): the
        absolute row (`err.rel <= tol.rtol`) and, where the table has one, the relative row (`err.rel` within
        `rel.multiple` times cpu_ref's error, floored). `parts`, a list of (err, ref_err) pairs (a block's steps),
        judges the relative row part by part: the worst part's ratio is the check's. A verdict already FAIL stays
        FAIL; reasons are prepended to the detail."""
        self.rel_err, self.max_abs, self.max_rel, self.ref_rel_err = err.rel, err.max_abs, err.max_rel, ref_err.rel
        problems = []
        if not err.rel <= tol.rtol:
            problems.append(f"error {err.rel:.3g} exceeds {tol.rtol:.3g} (cpu_ref in {self.dtype}: {ref_err.rel:.3g})")
        if rel is not None:
            worst, worst_ref = max(parts or [(err, ref_err)], key=lambda p: rel.ratio(p[0].rel, p[1].rel))
            self.ref_multiple, self.ref_limit = rel.ratio(worst.rel, worst_ref.rel), rel.multiple
            if not self.ref_multiple <= rel.multiple:
                where = f" (worst part: {worst.rel:.3g} vs {worst_ref.rel:.3g})" if parts else ""
                problems.append(f"error {err.rel:.3g} is {self.ref_multiple:.3g}x cpu_ref's own {ref_err.rel:.3g} "
                                f"in {self.dtype} on the same inputs{where} (allowed {rel.multiple:g}x, floor "
                                f"{rel.floor:.3g}; {rel.source} relative)")
        if problems:
            self.verdict = FAIL
            self.detail = "; ".join(problems + ([self.detail] if self.detail else []))
        elif self.verdict != FAIL:
            self.verdict = PASS
        return self


@dataclass
class Suite:
    backend: Backend
    availability: Availability
    mode: RunMode
    case_set: str
    seed: int
    reference: Backend = None
    tolerances: ToleranceTable = None
    dispatch: Dispatch = None

    def __post_init__(self):
        from core import registry

        self.reference = self.reference or registry.load(registry.REFERENCE)
        self.tolerances = self.tolerances or ToleranceTable(self.backend.manifest)
        self.dispatch = Dispatch(self.backend, self.reference, strict=False, numerics=self.availability.numerics)

    @property
    def device(self) -> torch.device:
        return self.availability.device

    @property
    def manifest(self) -> Manifest:
        return self.backend.manifest

    @property
    def mode_name(self) -> str:
        return "interpret" if self.mode.interpret else "simulate" if self.mode.simulate else "normal"

    def numerics(self, op: str) -> str:
        """The numerics class `op` is judged in: the probe's per-device class, else the manifest's."""
        return self.dispatch.routes[op].numerics if op in self.backend.ops else "reference"

    def reference_op(self, op: str, numerics: str | None = None):
        return cpu_ref.NUMERICS[numerics or self.numerics(op)][op]

    def golden_dispatch(self) -> Dispatch:
        """cpu_ref with, for each operator, the numerics class the backend declares for it."""
        ref = self.reference
        variant = Backend(name=ref.name, device_type="cpu", dist_backend=ref.dist_backend, probe=ref.probe,
                          ops={op: self.reference_op(op) for op in ref.ops},
                          prepare_linear=ref.prepare_linear, prepare_experts=ref.prepare_experts, manifest=ref.manifest)
        return Dispatch(variant, ref)

    def backend_hooks(self) -> Hooks:
        return Hooks(self.dispatch.prepare_linear, self.dispatch.prepare_experts)

    def reference_hooks(self) -> Hooks:
        return Hooks(self.reference.prepare_linear, self.reference.prepare_experts)

    def sync(self) -> None:
        if self.device.type != "cpu" and hasattr(torch, "accelerator") and torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def timed(self, fn, *args):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        return out, time.perf_counter() - t0

    def working_dtypes(self, ops: list[str]) -> list[torch.dtype]:
        """Dtypes every one of `ops` declares (the golden dtype float64 excluded), bfloat16 first."""
        from core.backend import DTYPE_NAMES

        common = None
        for op in ops:
            entry = self.manifest.operators.get(op)
            declared = set(entry.dtypes) if entry else set(self.reference.manifest.operators[op].dtypes)
            common = declared if common is None else common & declared
        names = [d for d in ("bfloat16", "float32") if d in (common or set())]
        return [DTYPE_NAMES[d] for d in names]
