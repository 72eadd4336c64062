"""DeepSeekMoE: the gate (V3 noaux_tc, V2 greedy / group_limited_greedy) and the routed-expert sum (reference and
W8A8 numerics)."""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor

from backends.cpu_ref.linear import w8a8_roundtrip
from core.fp8 import E4M3_MAX, dequantize_blocks
from core.ops import GATE_GROUP_SCORE, GATE_SCORING, ExpertWeights, compute_dtype


def moe_gate(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
             renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum") -> tuple[Tensor, Tensor]:
    """DeepSeekMoE routing (core.ops.moe_gate). logits [T, E] float32 (float64 for golden), bias [E] or None.

    `scoring` sigmoid or softmax (over all E); selection scores c = s + bias pick groups (each scored by the sum of
    its top-2 c, group_score "top2_sum", or its best c, "max") and then experts; the unbiased scores of the chosen
    experts, renormalised (when `renorm`) and multiplied by `scale`, are the weights. Returns
    (weights [T, top_k] float32 (float64 for float64 logits), ids [T, top_k] int64), sorted by selection score."""
    if scoring not in GATE_SCORING or group_score not in GATE_GROUP_SCORE:
        raise ValueError(f"moe_gate: scoring {scoring!r} / group_score {group_score!r} is not one of "
                         f"{GATE_SCORING} / {GATE_GROUP_SCORE}")
    ct = compute_dtype(logits.dtype)
    tokens, n_experts = logits.shape
    scores = torch.sigmoid(logits.to(ct)) if scoring == "sigmoid" else torch.softmax(logits.to(ct), dim=-1)
    choice = scores + bias.to(ct) if bias is not None else scores
    if n_group > 1 and topk_group < n_group:
        per_group = n_experts // n_group
        grouped = choice.view(tokens, n_group, per_group)
        if group_score == "top2_sum":
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)  # [T, n_group]
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)  # [T, n_group]
        choice = grouped.masked_fill(dropped[:, :, None], float("-inf")).view(tokens, n_experts)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renorm:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return (weights * scale).to(torch.float64 if ct == torch.float64 else torch.float32), ids.long()


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> ExpertWeights:
    """Keep the stacked checkpoint tensors as they are: gate, up [E, I, D], down [E, D, I] (FP8 or float), scales
    [E, ceil(rows/128), ceil(cols/128)] float32 or None. Returns core.ops.ExpertWeights."""
    return ExpertWeights(gate, up, down, gate_scale, up_scale, down_scale)


def _moe_experts(x: Tensor, experts: ExpertWeights, weights: Tensor, ids: Tensor,
                 act: Callable[[Tensor], Tensor]) -> Tensor:
    """Loop over the experts that received tokens; `act` maps a GEMM input to what the GEMM multiplies (identity
    for the reference class, the activation quantise-dequantise round trip for W8A8)."""
    ct = compute_dtype(x.dtype)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=ct, device=x.device)
    for e in torch.unique(ids).tolist():
        if e < 0:  # an expert held by another process (expert parallelism): contributes nothing
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = act(x[token].to(ct))
        w_gate = dequantize_blocks(experts.gate[e], _at(experts.gate_scale, e), ct)
        w_up = dequantize_blocks(experts.up[e], _at(experts.up_scale, e), ct)
        w_down = dequantize_blocks(experts.down[e], _at(experts.down_scale, e), ct)
        h = torch.nn.functional.silu(xe @ w_gate.T) * (xe @ w_up.T)
        y = act(h) @ w_down.T
        out.index_add_(0, token, y * weights[token, slot, None].to(ct))
    return out.to(x.dtype)


def _at(scale: Tensor | None, e: int) -> Tensor | None:
    return None if scale is None else scale[e]


def moe_experts(x: Tensor, experts: ExpertWeights, weights: Tensor, ids: Tensor) -> Tensor:
    """`sum_j weights[t,j] * down(silu(gate(x)) * up(x))` over the chosen experts; float32 intermediates and
    combine, one rounding to x.dtype. ids of -1 (experts held by another process) contribute nothing."""
    return _moe_experts(x, experts, weights, ids, lambda a: a)


def moe_experts_w8a8(x: Tensor, experts: ExpertWeights, weights: Tensor, ids: Tensor,
                     fp8_dtype: torch.dtype = torch.float8_e4m3fn, fp8_max: float = E4M3_MAX,
                     ue8m0: bool = False) -> Tensor:
    """The W8A8 class: the expert input and the SwiGLU output are quantised per token per 128 channels before their
    GEMMs (FP8 experts only; float experts take the reference path). `ue8m0` (classes w8a8_ue8m0,
    w8a8_fnuz_ue8m0): both activation scales rounded up to powers of two (DeepSeek-V3.1's experts are plain
    `Linear`s, which pass scale_fmt to act_quant)."""
    if experts.gate_scale is None:
        return moe_experts(x, experts, weights, ids)
    return _moe_experts(x, experts, weights, ids, lambda a: w8a8_roundtrip(a, fp8_dtype, fp8_max, ue8m0))


moe_experts_w8a8_fnuz = partial(moe_experts_w8a8, fp8_dtype=torch.float8_e4m3fnuz, fp8_max=240.0)
moe_experts_w8a8_ue8m0 = partial(moe_experts_w8a8, ue8m0=True)
moe_experts_w8a8_fnuz_ue8m0 = partial(moe_experts_w8a8, fp8_dtype=torch.float8_e4m3fnuz, fp8_max=240.0, ue8m0=True)
