"""DeepSeekMoE routing in one kernel (deepseek_v3_semantics.md §6, cpu_ref.moe_gate): V3's noaux_tc and V2's
greedy / group_limited_greedy.

    s = sigmoid(logits) or softmax(logits) over all E;  c = s + bias          (bias only selects)
    group score = sum of the top-2 c of each group (top2_sum) or its best c (max);  keep the topk_group best
    groups;  others -> -inf
    ids = top_k experts by c;  weights = s[ids] / (sum + 1e-20) (renorm) * scale

Each program routes BLOCK_T tokens. Experts are laid out as a [G_PAD, S_PAD] tile (group, member), so group
reductions are row reductions and padding (a group size or group count that is not a power of two) is masked.
Top-k is k rounds of argmax-and-remove, which also yields the top-2 of each group; ties go to the lower index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_kernels.common import launch_options, next_pow2


@triton.jit
def _moe_gate_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr,
    T, stride_lt, scale,
    N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, RENORM: tl.constexpr, SOFTMAX: tl.constexpr,
    GROUP_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, S_PAD: tl.constexpr, K_PAD: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < T
    g = tl.arange(0, G_PAD)
    j = tl.arange(0, S_PAD)
    expert = g[:, None] * GROUP_SIZE + j[None, :]  # [G_PAD, S_PAD]
    real = (g[:, None] < N_GROUP) & (j[None, :] < GROUP_SIZE)
    neg_inf = float("-inf")

    ptrs = logits_ptr + tokens.to(tl.int64)[:, None, None] * stride_lt + expert[None, :, :]
    logit = tl.load(ptrs, mask=t_ok[:, None, None] & real[None, :, :], other=0.0).to(tl.float32)
    if SOFTMAX:  # over the real experts of each token; padding contributes exp(-inf) = 0
        logit = tl.where(real[None, :, :], logit, neg_inf)
        row_max = tl.max(tl.max(logit, axis=2), axis=1)  # [BLOCK_T]
        e = tl.exp(logit - row_max[:, None, None])
        s = e / tl.sum(tl.sum(e, axis=2), axis=1)[:, None, None]
    else:
        s = tl.sigmoid(logit)  # [BLOCK_T, G_PAD, S_PAD]
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + expert, mask=real, other=0.0).to(tl.float32)[None, :, :]
    choice = tl.where(real[None, :, :], choice, neg_inf)

    if GROUPED:
        best = tl.max(choice, axis=2)  # [BLOCK_T, G_PAD]
        first = tl.argmax(choice, axis=2)
        group_score = best
        if GROUP_SIZE > 1 and not GROUP_MAX:
            rest = tl.where(j[None, None, :] == first[:, :, None], neg_inf, choice)
            group_score = best + tl.max(rest, axis=2)
        group_score = tl.where(g[None, :] < N_GROUP, group_score, neg_inf)
        keep = tl.zeros((BLOCK_T, G_PAD), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            pick = g[None, :] == tl.argmax(group_score, axis=1)[:, None]
            keep = keep | pick
            group_score = tl.where(pick, neg_inf, group_score)
        choice = tl.where(keep[:, :, None], choice, neg_inf)

    flat_choice = tl.reshape(choice, (BLOCK_T, G_PAD * S_PAD))
    flat_s = tl.reshape(s, (BLOCK_T, G_PAD * S_PAD))
    f = tl.arange(0, G_PAD * S_PAD)
    slot = tl.arange(0, K_PAD)
    weights = tl.zeros((BLOCK_T, K_PAD), dtype=tl.float32)
    ids = tl.zeros((BLOCK_T, K_PAD), dtype=tl.int64)
    for k in tl.static_range(TOP_K):
        pick = f[None, :] == tl.argmax(flat_choice, axis=1)[:, None]  # [BLOCK_T, G_PAD * S_PAD]
        w_k = tl.sum(tl.where(pick, flat_s, 0.0), axis=1)
        f_k = tl.sum(tl.where(pick, f[None, :], 0), axis=1)
        e_k = (f_k // S_PAD) * GROUP_SIZE + f_k % S_PAD
        weights = tl.where(slot[None, :] == k, w_k[:, None], weights)
        ids = tl.where(slot[None, :] == k, e_k.to(tl.int64)[:, None], ids)
        flat_choice = tl.where(pick, neg_inf, flat_choice)
    if RENORM:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * scale

    out_mask = t_ok[:, None] & (slot[None, :] < TOP_K)
    out_offs = tokens.to(tl.int64)[:, None] * TOP_K + slot[None, :]
    tl.store(w_ptr + out_offs, weights, mask=out_mask)
    tl.store(ids_ptr + out_offs, ids, mask=out_mask)


def moe_gate(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
             renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum",
             cfg: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """core.ops.moe_gate. logits: [T, E] float32 (any row stride); bias: [E] float32 or None; E % n_group == 0;
    scoring "sigmoid" | "softmax"; group_score "top2_sum" | "max".
    cfg: BLOCK_T (tokens per program), num_warps. Returns new (weights [T, top_k] float32, ids [T, top_k] int64);
    order inside a row: descending biased score."""
    cfg = cfg or {}
    tokens, experts = logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    if scoring not in ("sigmoid", "softmax") or group_score not in ("top2_sum", "max"):
        raise ValueError(f"moe_gate: scoring {scoring!r} / group_score {group_score!r} is not supported")
    if experts % n_group:
        raise ValueError(f"moe_gate: {experts} experts do not split into {n_group} groups")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    group_size = experts // n_group
    grouped = n_group > 1 and topk_group < n_group
    block_t = int(cfg.get("BLOCK_T", 4))
    _moe_gate_kernel[(triton.cdiv(tokens, block_t),)](
        logits, bias if bias is not None else logits, weights, ids, tokens, logits.stride(0), float(scale),
        N_GROUP=n_group, GROUP_SIZE=group_size, TOPK_GROUP=topk_group, TOP_K=top_k,
        HAS_BIAS=bias is not None, GROUPED=grouped, RENORM=bool(renorm), SOFTMAX=scoring == "softmax",
        GROUP_MAX=group_score == "max",
        BLOCK_T=block_t, G_PAD=next_pow2(n_group), S_PAD=next_pow2(group_size), K_PAD=next_pow2(top_k),
        **launch_options(cfg, num_warps=4, num_stages=1),
    )
    return weights, ids
