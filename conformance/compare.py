"""Error metrics against a float64 golden value."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Errors:
    rel: float  # ||got - golden|| / ||golden||
    max_abs: float
    max_rel: float  # max |got - golden| / max(|golden|, 1e-3 * max|golden|)

    @staticmethod
    def zero() -> "Errors":
        return Errors(0.0, 0.0, 0.0)

    def worst(self, other: "Errors") -> "Errors":
        return Errors(max(self.rel, other.rel), max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel))


def errors(got: Tensor, golden: Tensor) -> Errors:
    """Norm-wise and element-wise errors; a NaN or inf anywhere in `got` is an infinite error."""
    if got.numel() == 0:
        return Errors.zero()
    g, ref = got.detach().to("cpu", torch.float64), golden.detach().to("cpu", torch.float64)
    if not torch.isfinite(g).all():
        return Errors(math.inf, math.inf, math.inf)
    diff = (g - ref).abs()
    norm = float(ref.norm())
    floor = max(1e-3 * float(ref.abs().max()), 1e-300)
    rel = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    return Errors(rel, float(diff.max()), float((diff / ref.abs().clamp_min(floor)).max()))


def kl_divergence(golden_logits: Tensor, logits: Tensor) -> float:
    """Mean over positions of KL(softmax(golden) || softmax(logits)), in float64."""
    p = torch.log_softmax(golden_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double().to(p.device), dim=-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def routing_margins(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int,
                    scoring: str = "sigmoid", group_score: str = "top2_sum") -> Tensor:
    """[T] float64: per token, the smaller of (a) the gap between the last kept and the best dropped group score and
    (b) the gap between the top_k-th and (top_k+1)-th biased expert score among the kept groups (inf where a gap
    does not exist). Below ~1e-5, float32 rounding may legitimately pick another expert set. `scoring` and
    `group_score` as in core.ops.moe_gate."""
    x = logits.detach().cpu().double()
    s = torch.sigmoid(x) if scoring == "sigmoid" else torch.softmax(x, dim=-1)
    if bias is not None:
        s = s + bias.detach().cpu().double()
    t, e = s.shape
    per = e // n_group
    grouped = s.view(t, n_group, per)
    groups = grouped.topk(min(2, per), dim=-1).values.sum(-1) if group_score == "top2_sum" else grouped.amax(-1)
    margins = torch.full((t,), math.inf, dtype=torch.float64)
    if topk_group < n_group:
        top = groups.topk(topk_group + 1, dim=-1).values
        margins = torch.minimum(margins, top[:, -2] - top[:, -1])
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(topk_group, dim=-1).indices, True)
    masked = s.masked_fill(~kept.repeat_interleave(per, dim=1), -math.inf)
    if top_k < e:
        top = masked.topk(top_k + 1, dim=-1).values
        gap = top[:, -2] - top[:, -1]
        margins = torch.minimum(margins, torch.where(torch.isfinite(gap), gap, torch.full_like(gap, math.inf)))
    return margins
