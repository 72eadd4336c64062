"""moe_gate through npu_moe_gating_top_k, DeepSeek-V3's noaux_tc call (cann-recipes / vllm-ascend):
sigmoid scores (norm_type=1), group score = sum of the top-2 biased scores (group_select_mode=1, NOT the default 0
= max), renorm=0 (the only supported value: norm first, then top-k), the correction bias in the logits' dtype
(float32 here: the op demands bias.dtype == x.dtype), routed_scaling_factor applied by the op and nowhere else.
The op's y is the UNBIASED sigmoid of the chosen experts divided by (sum + eps); the bias only selects.

DeepSeek-V2's greedy / group_limited_greedy is the same op with softmax scores (norm_type=0) and groups scored by
their best expert (group_select_mode=0); with softmax the op never renormalises, so norm_topk_prob must be false
(as in every V2 config). Both modes take only the expert counts the A2/A3 kernel takes (256, 384)."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.ascend.runtime import torch_npu

KERNEL_EXPERT_COUNTS = (256, 384)
"""Expert counts the A2/A3 kernels accept (older CANN: 256 only); Huawei's DeepSeek recipe checks the same."""
MAX_EXPERTS = 2048
EPS = 1e-20


NORM_TYPE = {"softmax": 0, "sigmoid": 1}
GROUP_SELECT_MODE = {"max": 0, "top2_sum": 1}


def gate_supports(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
                  renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum") -> str | None:
    """None when npu_moe_gating_top_k computes this call exactly, else why it goes to cpu_ref."""
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{str(logits.dtype).replace('torch.', '')} logits"
    experts = logits.shape[1]
    if experts not in KERNEL_EXPERT_COUNTS:
        return f"{experts} experts (the kernel takes {' or '.join(map(str, KERNEL_EXPERT_COUNTS))})"
    if scoring not in NORM_TYPE or group_score not in GROUP_SELECT_MODE:
        return f"scoring {scoring} / group score {group_score}"
    if scoring == "sigmoid" and not renorm:
        return "norm_topk_prob=false (with sigmoid scores the op always renormalises)"
    if scoring == "softmax" and renorm:
        return "norm_topk_prob=true with softmax scores (the op never renormalises softmax)"
    if n_group < 1 or experts % n_group or experts // n_group <= 2:
        return "E/n_group must be an integer > 2"
    per_group = experts // n_group
    if -(-per_group // 32) * 32 * n_group > MAX_EXPERTS:
        return "align32(E/n_group) * n_group > 2048"
    if not 1 <= topk_group <= n_group or not 1 <= top_k <= topk_group * per_group:
        return "top_k/topk_group outside the kernel's range"
    return None


def moe_gate(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
             renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum") -> tuple[Tensor, Tensor]:
    """logits [T, E] float32, bias [E] or None -> (weights [T, top_k] float32, ids [T, top_k] int64); scoring
    sigmoid (norm_type 1) or softmax (0), group_score top2_sum (group_select_mode 1) or max (0)."""
    tokens = logits.shape[0]
    if tokens == 0:
        return (torch.empty(0, top_k, dtype=torch.float32, device=logits.device),
                torch.empty(0, top_k, dtype=torch.int64, device=logits.device))
    weights, ids, _norm_out = torch_npu.npu_moe_gating_top_k(
        logits, top_k, bias=None if bias is None else bias.to(logits.dtype), k_group=topk_group,
        group_count=n_group, group_select_mode=GROUP_SELECT_MODE[group_score], renorm=0,
        norm_type=NORM_TYPE[scoring], out_flag=False,
        routed_scaling_factor=scale, eps=EPS)
    return weights.float(), ids.long()
