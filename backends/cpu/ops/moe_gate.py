"""cpu: `moe_gate` (contract: core/ops.py; specification: backends/cpu_ref), cpu_ref's routing in fewer small ops:
the group limit is one boolean mask per group, broadcast over its experts (ones, scatter, masked_fill), where
cpu_ref builds it per expert (zeros, scatter, expand, reshape, invert, masked_fill); every value that reaches a topk
is the same float, so ids and weights equal cpu_ref's bit for bit (tests/test_cpu_backend.py). At batch 1 the
router is a dozen tiny ops per MoE layer: their dispatch, not arithmetic, is the cost (interleaved medians, 32
experts: 109 against 141 us at one token, 141 against 180 at 32)."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu_ref import OPS
from core.ops import GATE_GROUP_SCORE, GATE_SCORING


def moe_gate(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
             renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum") -> tuple[Tensor, Tensor]:
    """Routing (noaux_tc for V3, softmax greedy / group-limited for V2): logits [T, E] float32, bias [E] or None ->
    (weights [T, top_k] float32, ids [T, top_k] int64), sorted by selection score."""
    if logits.dtype != torch.float32 or scoring not in GATE_SCORING or group_score not in GATE_GROUP_SCORE:
        return OPS["moe_gate"](logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score)
    tokens, n_experts = logits.shape
    scores = torch.sigmoid(logits) if scoring == "sigmoid" else torch.softmax(logits, dim=-1)
    choice = scores + bias.float() if bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        per_group = n_experts // n_group
        grouped = choice.view(tokens, n_group, per_group)
        if group_score == "top2_sum":
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, n_group]
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(dropped[:, :, None], float("-inf")).view(tokens, n_experts)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renorm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights.mul_(scale), ids
