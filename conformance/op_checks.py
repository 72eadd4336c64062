"""Operator level: every operator of the contract, every working dtype the manifest declares, every case of the
selected case set. Numerics against the float64 golden of cpu_ref (in the backend's numerics class), plus the
contract beyond numerics: output shape, dtype and device; inputs not modified; two runs give the same result."""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
import yaml
from torch import Tensor

from conformance import invariants
from conformance.compare import Errors, errors, routing_margins
from conformance.context import FAIL, SKIP, CheckResult, Suite
from conformance.inputs import build, fixed_dtype
from core.backend import DTYPE_NAMES, SCALE_FORMAT_CLASSES
from core.errors import UserError
from core.ops import OPERATORS

CASES = Path(__file__).resolve().parent / "cases" / "ops.yaml"
NEAR_TIE = 1e-5


def load_cases() -> dict[str, list[dict]]:
    return yaml.safe_load(CASES.read_text())


def _flat(out) -> list[Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _tensors(args: tuple):
    """(label, tensor) for every tensor argument and every tensor field of a prepared-weight argument."""
    for i, a in enumerate(args):
        if isinstance(a, Tensor):
            yield f"argument {i}", a
        elif hasattr(a, "__dict__"):
            for key, value in vars(a).items():
                if isinstance(value, Tensor):
                    yield f"argument {i}.{key}", value


def _snapshot(args: tuple) -> list[tuple[str, Tensor]]:
    return [(label, t.detach().clone()) for label, t in _tensors(args)]


def _current(args: tuple, label: str) -> Tensor:
    return dict(_tensors(args))[label]


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality, NaN equal to NaN (poisoned inputs stay poisoned)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    a, b = a.cpu(), b.cpu()
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    return torch.equal(a, b)


def _structure(outs: list[Tensor], gold: list[Tensor], dtype: torch.dtype, op: str, device: torch.device) -> str:
    if len(outs) != len(gold):
        return f"returned {len(outs)} tensors, the contract says {len(gold)}"
    for i, (o, g) in enumerate(zip(outs, gold)):
        if not isinstance(o, Tensor):
            return f"output {i} is {type(o).__name__}, not a tensor"
        if tuple(o.shape) != tuple(g.shape):
            return f"output {i} has shape {list(o.shape)}, expected {list(g.shape)}"
        want = g.dtype if op == "moe_gate" else dtype
        if op == "moe_gate":
            want = torch.int64 if i == 1 else torch.float32
        if o.dtype != want:
            return f"output {i} has dtype {o.dtype}, expected {want}"
        if o.device.type != device.type:
            return f"output {i} is on {o.device}, expected {device}"
    return ""


def gate_errors(out, golden, logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int,
                scoring: str = "sigmoid", group_score: str = "top2_sum"):
    """(weight errors on rows whose expert sets agree, rows that differ with a real margin, near-tie rows)."""
    w, ids = out[0].cpu(), out[1].cpu()
    gw, gids = golden[0].cpu(), golden[1].cpu()
    margins = routing_margins(logits, bias, top_k, n_group, topk_group, scoring, group_score)
    t = margins.shape[0]
    err, mismatched, near = Errors.zero(), [], []
    agree_rows = []
    for r in range(t):
        if set(ids[r].tolist()) == set(gids[r].tolist()):
            agree_rows.append(r)
        elif margins[r] < NEAR_TIE:
            near.append(r)
        else:
            mismatched.append(r)
    if agree_rows:
        rows = torch.tensor(agree_rows)
        order, gorder = ids[rows].argsort(dim=1), gids[rows].argsort(dim=1)
        err = errors(w[rows].gather(1, order), gw[rows].gather(1, gorder))
    return err, mismatched, near


def case_inputs(suite: Suite, op: str, case: dict):
    seed = suite.seed ^ zlib.crc32(f"{op}/{case['name']}".encode())
    return build(op, case, torch.Generator().manual_seed(seed))


def scaled_class(suite: Suite, op: str, case: dict) -> tuple[str, str | None]:
    """(numerics class, activation scale format) of a case: a case with `scale_fmt` (DeepSeek-V3.1's "ue8m0"
    layers) runs the operator core.dispatch.Dispatch.scaled gives and is judged in the class that format turns the
    backend's into (unchanged for a class without FP8 activation scales: reference, w8a8_int8)."""
    numerics, fmt = suite.numerics(op), case.get("scale_fmt")
    return (SCALE_FORMAT_CLASSES[fmt].get(numerics, numerics) if fmt else numerics), fmt


def check_case(suite: Suite, op: str, case: dict, dtype: torch.dtype, inputs=None) -> CheckResult:
    """One operator on one case in one working dtype. The backend always runs and meets the structural contract
    (shape, dtype, device, inputs untouched, repeatable); its numbers are judged unless the tolerance table skips
    this dtype in this mode (with the reason), and a call the backend hands to cpu_ref under its declared limits
    is reported as skipped: cpu_ref's numbers say nothing about the backend."""
    name = f"op/{op}/{case['name']}/{str(dtype).replace('torch.', '')}"
    dname = str(dtype).replace("torch.", "")
    numerics, scaled = scaled_class(suite, op, case)
    tol = suite.tolerances.lookup(op, dname, numerics, suite.mode_name)
    result = CheckResult("op", name, op, SKIP, dname, tolerance=tol.rtol, tolerance_reason=tol.reason,
                         tolerance_source=tol.source)
    inputs = inputs or case_inputs(suite, op, case)
    result.shape = inputs.shape
    block_size = inputs.extra.get("block_size")
    if block_size is not None and not suite.manifest.cache.takes(block_size):
        result.detail = (f"block size {block_size} is not one {suite.backend.name} declares (cache.block_sizes: "
                         f"{suite.manifest.cache.describe()}): not run")
        return result
    try:
        impl = getattr(suite.dispatch.scaled(scaled), op)
    except UserError as e:  # a backend refused for a scale format it does not declare: a failed check
        result.verdict, result.detail = FAIL, str(e).splitlines()[0]
        return result
    if scaled and numerics == suite.numerics(op):
        result.detail = f"scale_fmt {scaled} does not apply to numerics class {numerics}: judged in it unchanged"
    ref_op = suite.reference_op(op, numerics)
    cpu = torch.device("cpu")
    ref_out = _flat(ref_op(*inputs.make(dtype, dtype, cpu, suite.reference_hooks())))
    args = inputs.make(dtype, dtype, suite.device, suite.backend_hooks())
    before = _snapshot(args)
    route = suite.dispatch.routes[op]
    route.limited_calls.clear()
    try:
        out, seconds = suite.timed(impl, *args)
        again = impl(*args)
    except Exception as e:  # a backend's exception is a failed check, never a fallback
        result.verdict, result.detail = FAIL, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return result
    result.seconds = seconds
    if route.limited_calls:
        result.detail = (f"outside {suite.backend.name}'s declared limits ({', '.join(route.limited_calls)}): "
                         f"served by cpu_ref, not judged")
        route.limited_calls.clear()
        return result
    outs, outs2 = _flat(out), _flat(again)
    problem = _structure(outs, ref_out, dtype, op, suite.device)
    if not problem:
        changed = [label for label, t in before if not _same(t, _current(args, label))]
        if changed:
            problem = f"modified its input(s) {', '.join(changed)}"
    if not problem and not all(_same(a, b) for a, b in zip(outs, outs2)) and op not in suite.manifest.nondeterministic:
        problem = "two runs on the same input gave different results (and the manifest declares no reason)"
    if not problem:
        problem = invariants.structural(op, outs, args)
    if problem:
        result.verdict, result.detail = FAIL, problem
        return result
    if tol.skip:
        result.detail = f"structure checked; numbers not judged: {tol.reason}"
        return result
    golden_args = inputs.make(dtype, torch.float64, cpu, suite.reference_hooks())
    golden = _flat(ref_op(*golden_args))
    rounding, fraction = invariants.rounded_once(op, dtype, outs, golden, golden_args,
                                                 suite.tolerances.rounding_fraction(op, dname, numerics,
                                                                                    suite.mode_name),
                                                 suite.tolerances.rounding_chance(dname))
    if rounding:
        result.verdict, result.detail = FAIL, f"rounding: {rounding}"
    elif fraction:
        result.detail = f"rounded once: {fraction:.3%} of elements not golden rounded once to {dname}"
    if op == "moe_gate":
        logits, bias, top_k, n_group, topk_group = args[0], args[1], args[2], args[3], args[4]
        rule = tuple(args[7:9])  # scoring, group_score (absent: the contract's defaults)
        err, mismatched, near = gate_errors(outs, golden, logits, bias, top_k, n_group, topk_group, *rule)
        ref_err, _, _ = gate_errors(ref_out, golden, logits, bias, top_k, n_group, topk_group, *rule)
        notes = []
        if near:
            notes.append(f"{len(near)} near-tie row(s) (margin < {NEAR_TIE}) chose another expert set: reported, not failed")
        if mismatched:
            result.verdict = FAIL
            notes.insert(0, f"expert sets differ from golden in {len(mismatched)} of {logits.shape[0]} rows "
                            f"with a clear margin (first: row {mismatched[0]})")
        result.detail = "; ".join(notes)
    else:
        err = Errors.zero()
        ref_err = Errors.zero()
        for o, g, r in zip(outs, golden, ref_out):
            err, ref_err = err.worst(errors(o, g)), ref_err.worst(errors(r, g))
            if o.is_floating_point() and bool(o.isnan().any()) and not bool(g.isnan().any()):
                result.verdict = FAIL
                result.detail = "NaN in the output where golden has none (a poisoned input row or block was read)"
    return result.judge(err, ref_err, tol, suite.tolerances.relative(op, dname, numerics, suite.mode_name))

def run(suite: Suite, ops: list[str] | None = None) -> list[CheckResult]:
    cases = load_cases()
    results = []
    for op in ops or list(OPERATORS):
        if op not in suite.backend.ops:
            results.append(CheckResult("op", f"op/{op}", op, FAIL,
                                       detail=f"not implemented by {suite.backend.name} (conformance forbids fallback)"))
            continue
        entry = suite.manifest.operators[op]
        declared = [DTYPE_NAMES[d] for d in entry.dtypes if d != "float64"]
        for case in cases.get(op, []):
            if suite.case_set not in case["sets"]:
                continue
            fixed = fixed_dtype(op, case)
            if fixed is not None and fixed not in declared:
                continue
            dtypes = [fixed] if fixed is not None else declared
            inputs = case_inputs(suite, op, case)
            for dtype in dtypes:
                results.append(check_case(suite, op, case, dtype, inputs))
    return results
