"""Contract invariants beyond closeness to golden (core/ops.py's docstrings, each made a check).

Golden values computed in float64 cannot see where a kernel rounds: a statistic kept in bfloat16 or a residual
normalised before it is rounded lands close to golden. These checks can:

  rounded once   rms_norm, add_rms_norm, apply_rope and silu_and_mul compute in float32 and round ONCE to a 16-bit
                 working dtype, so almost every output element equals the float64 golden value correctly rounded
                 to that dtype; the few others (float32 reordering near a rounding boundary) are one ulp away,
                 past the float32 error of a cancelling difference (apply_rope: float32_slack).
  add_rms_norm   h == round(x + residual) exactly, and normed == rms_norm(h) of the h it returned (rounded once).
  moe_gate       ids int64 in [0, E), distinct within a row, from at most topk_group groups; weights finite and
                 >= 0, summing to `scale` per row when `renorm`.
  moe_experts    a -1 slot contributes nothing whatever its weight (the inputs give -1 slots NaN, inf or 1e4), and
                 a row of only -1 is exactly 0.
Shape, dtype and device of every output, inputs untouched and determinism are checked by op_checks itself; reads
past `lens` are caught by the NaN-poisoned cache rows and blocks (conformance/inputs.py)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from backends import cpu_ref

ROUNDED_ONCE = ("rms_norm", "add_rms_norm", "apply_rope", "silu_and_mul")
MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def ulp(t: Tensor, dtype: torch.dtype) -> Tensor:
    """float64 spacing of `dtype` at the values of `t` (normal range; the smallest normal's below it)."""
    tiny = torch.finfo(dtype).tiny
    exponent = torch.floor(torch.log2(t.abs().double().clamp_min(tiny)))
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def rounding_mismatch(got: Tensor, golden: Tensor, dtype: torch.dtype,
                      slack: Tensor | float = 0.0) -> tuple[float, float]:
    """(fraction of elements that are not golden correctly rounded to `dtype`, worst distance in ulps) once `slack`,
    the float32 evaluation error the contract allows before the one rounding, is allowed: an element passes when it
    is the correct rounding of some value within `slack` of golden."""
    if got.numel() == 0:
        return 0.0, 0.0
    g = golden.detach().cpu().double()
    o = got.detach().cpu().double()
    # correctly rounded from some value within slack of golden: rounding is monotone, so between these two
    differ = (o < (g - slack).to(dtype).double()) | (o > (g + slack).to(dtype).double())
    worst = float(((o - g).abs() - slack).clamp_min(0).div(ulp(g, dtype)).max())
    return float(differ.double().mean()), worst


def chance_mismatches(n: int, element_rate: float, false_alarm: float) -> int:
    """The most elements of `n` that a correct kernel leaves one ulp off, but for a chance below `false_alarm`: the
    smallest k with P(Binomial(n, element_rate) > k) <= false_alarm. `element_rate` bounds the share of elements
    whose golden value lies within float32's evaluation error of a rounding boundary (each such element may round
    either way). A fixed fraction alone fails correct kernels on small outputs: one straddling element of 64 is
    1.6%, which cpu_ref's own silu_and_mul single-token case in float16 reached on 4 of 1500 seeds."""
    if n <= 0 or element_rate <= 0:
        return 0
    j = torch.arange(n + 1, dtype=torch.float64)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1) + j * math.log(element_rate)
               + (n - j) * math.log1p(-element_rate))
    above = log_pmf.exp().flip(0).cumsum(0).flip(0)  # above[k] = P(X >= k)
    within = (above[1:] <= false_alarm).nonzero()  # above[1:][k] = P(X > k)
    return int(within[0]) if within.numel() else n


def float32_slack(op: str, golden_args: tuple) -> Tensor | float:
    """What float32 evaluation may add before the one rounding, where an operator cancels. apply_rope's
    x1*cos - x2*sin can cancel to far below |x|: its float32 products and difference are then off by a few 2^-24 of
    |x| (2^-21 of the row's largest |x| bounds it), which is many ulps of the tiny result (seen: 12 ulp on 1 in 10 of
    random [16, 128, 64] cases). rms_norm, silu_and_mul and the norm of add_rms_norm are products: no slack."""
    if op == "apply_rope":
        return 2.0 ** -21 * golden_args[0].detach().cpu().double().abs().amax(-1, keepdim=True)
    return 0.0


def rounded_once(op: str, dtype: torch.dtype, outs: list[Tensor], golden: list[Tensor], golden_args: tuple,
                 max_fraction: float | None, chance: tuple[float, float] = (0.0, 1.0)) -> tuple[str, float]:
    """The rounded-once invariant for `op` in a 16-bit `dtype`: (problem or "", worst mismatch fraction).
    `golden_args` are the operator's float64 inputs (the same rounded values the backend got). `max_fraction` None:
    the backend's manifest declares it does not round once (only add_rms_norm's h is then checked). An output fails
    when more of its elements are off than both `max_fraction` of them and what chance allows a correct kernel:
    `chance` = (element_rate, false_alarm), see chance_mismatches."""
    if op not in ROUNDED_ONCE or dtype not in MANTISSA_BITS:
        return "", 0.0
    pairs = [("output", outs[0], golden[0])]
    slack = float32_slack(op, golden_args)
    if op == "add_rms_norm":
        x, residual, weight, eps = golden_args
        h = outs[1]
        exact = (x.to(torch.float32) + residual.to(torch.float32)).to(dtype)
        bad = h.cpu() != exact
        if bool(bad.any()):
            return (f"h differs from round(x + residual) in {int(bad.sum())} of {h.numel()} elements (the contract: "
                    f"h is x + residual in float32, rounded once to {dtype})"), 1.0
        # normed must be rms_norm of the h it returned (rounded to the working dtype before it is normalised)
        pairs = [("normed vs rms_norm(returned h)", outs[0], cpu_ref.rms_norm(h.cpu().double(), weight, eps))]
    worst_fraction = 0.0
    if max_fraction is None:
        return "", max(rounding_mismatch(o, g, dtype)[0] for _, o, g in pairs)
    for label, o, g in pairs:
        fraction, ulps = rounding_mismatch(o, g, dtype, slack)
        worst_fraction = max(worst_fraction, fraction)
        n = o.numel()
        allowed = max(math.floor(max_fraction * n), chance_mismatches(n, *chance))
        if round(fraction * n) > allowed or ulps > 1.0 + 1e-9:
            return (f"{label}: {round(fraction * n)} of {n} elements ({fraction:.2%}) are not golden rounded once to "
                    f"{dtype} (allowed {allowed}: {max_fraction:.2%}, or what float32 straddling a rounding boundary "
                    f"leaves by chance), worst {ulps:.2f} ulp (allowed 1): an intermediate rounded to {dtype} or a "
                    f"statistic computed outside float32"), fraction
    return "", worst_fraction


def gate_invariants(outs: list[Tensor], args: tuple) -> str:
    weights, ids = outs[0].cpu(), outs[1].cpu()
    logits, _, _, n_group, topk_group, scale, renorm = args[:7]
    t, e = logits.shape
    if t == 0:
        return ""
    if bool(((ids < 0) | (ids >= e)).any()):
        return f"ids outside [0, {e})"
    if bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
        return "an expert id repeats within a row"
    if n_group > 1 and topk_group < n_group:
        groups = ids // (e // n_group)
        used = max(len(set(row)) for row in groups.tolist())
        if used > topk_group:
            return f"a row chose experts from {used} groups; topk_group is {topk_group}"
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        return "weights not finite and non-negative"
    if renorm:
        sums = weights.double().sum(-1)
        worst = float(((sums - scale).abs() / scale).max())
        if worst > 1e-5:
            return f"renormalised weights sum to {float(sums[(sums - scale).abs().argmax()]):.7g}, not scale {scale}"
    return ""


def experts_invariants(outs: list[Tensor], args: tuple) -> str:
    ids = args[3].cpu()
    if ids.numel() == 0:
        return ""
    remote_rows = (ids < 0).all(dim=1)
    if bool(remote_rows.any()):
        rows = outs[0].cpu()[remote_rows]
        if not bool((rows == 0).all()):
            return (f"{int(remote_rows.sum())} row(s) whose ids are all -1 are not exactly 0 (a -1 slot must "
                    f"contribute nothing; its weight is NaN, inf or 1e4 here)")
    return ""


def structural(op: str, outs: list[Tensor], args: tuple) -> str:
    """Invariants every backend meets in every mode (no numerics involved): a problem, or ""."""
    if op == "moe_gate":
        return gate_invariants(outs, args)
    if op == "moe_experts":
        return experts_invariants(outs, args)
    return ""
