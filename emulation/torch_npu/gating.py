"""`npu_moe_gating_top_k` (torch_npu_ops.md §6.1): grouped top-k expert selection with softmax or sigmoid scores."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import CONFIG, FLOAT_DTYPES, dtype_name, reject, require, strict_require

MAX_EXPERTS = 2048


def _stable_desc(scores: Tensor) -> Tensor:
    """Indices sorting each row descending; ties go to the lower index."""
    return torch.sort(-scores, dim=-1, stable=True).indices


def npu_moe_gating_top_k(x: Tensor, k: int, *, bias: Tensor | None = None, input_ids: Tensor | None = None,
                         tid2eid: Tensor | None = None, k_group: int = 1, group_count: int = 1,
                         group_select_mode: int = 0, renorm: int = 0, norm_type: int = 0, out_flag: bool = False,
                         routed_scaling_factor: float = 1.0, eps: float = 1e-20) -> tuple[Tensor, Tensor, Tensor]:
    """Scores s = softmax(x) (norm_type 0) or sigmoid(x) (norm_type 1), in float32. Selection uses s + bias only:
    groups of E/group_count contiguous experts are ranked by their max (group_select_mode 0) or the sum of their
    top-2 (mode 1); the best k_group groups are kept; the top k experts among them are chosen (ties -> lower id).
    Weights y = s (UNBIASED) gathered at the chosen ids; with sigmoid always divided by (sum + eps); then
    * routed_scaling_factor; cast to x.dtype.

    x: (T, E) fp16/bf16/fp32, E <= 2048. bias: (E,) with x's dtype.
    Returns (y (T, k) x.dtype, expert_idx (T, k) int32, norm_out (T, E) float32 if out_flag else an empty tensor).
    """
    op = "npu_moe_gating_top_k"
    require(x.dim() == 2, op, f"x must be 2-D (T, E), got {x.dim()}-D")
    require(x.dtype in FLOAT_DTYPES, op, f"x dtype {dtype_name(x.dtype)} is not float16/bfloat16/float32")
    tokens, experts = x.shape
    require(experts <= MAX_EXPERTS, op, f"E={experts} experts exceeds {MAX_EXPERTS}")
    if CONFIG.gating_expert_counts is not None:
        require(experts in CONFIG.gating_expert_counts, op,
                f"E={experts}: the A2/A3 kernel handles only {list(CONFIG.gating_expert_counts)} experts")
    if input_ids is not None or tid2eid is not None:
        reject(op, "input_ids/tid2eid (hash routing) exist only in the master schema, not in released branches")
    require(group_count > 0 and experts % group_count == 0, op,
            f"E={experts} must be divisible by group_count={group_count} > 0")
    per_group = experts // group_count
    require(per_group > 2, op, f"E/group_count = {per_group} must be > 2")
    require(-(-per_group // 32) * 32 * group_count <= MAX_EXPERTS, op,
            f"align32(E/group_count) * group_count must be <= {MAX_EXPERTS}")
    require(1 <= k_group <= group_count, op, f"k_group={k_group} must be in [1, group_count={group_count}]")
    require(1 <= k <= k_group * per_group, op, f"k={k} must be in [1, k_group * E / group_count = "
                                               f"{k_group * per_group}]")
    require(renorm == 0, op, f"renorm={renorm}: only 0 (norm, then top-k) is supported")
    require(norm_type in (0, 1), op, f"norm_type={norm_type} must be 0 (softmax) or 1 (sigmoid)")
    require(group_select_mode in (0, 1), op, f"group_select_mode={group_select_mode} must be 0 (max) or 1 (top-2 sum)")
    if bias is not None:
        require(bias.dtype == x.dtype, op, f"bias dtype {dtype_name(bias.dtype)} must equal x's {dtype_name(x.dtype)}")
        require(tuple(bias.shape) == (experts,), op, f"bias must be ({experts},), got {tuple(bias.shape)}")
    strict_require(not bool(torch.isnan(x).any()), op, "NaN logits give undefined routing")

    xf = x.float()
    scores = xf.softmax(dim=-1) if norm_type == 0 else xf.sigmoid()
    choice = scores + bias.float() if bias is not None else scores
    if group_count > 1 and k_group < group_count:
        grouped = choice.view(tokens, group_count, per_group)
        group_score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
        keep = _stable_desc(group_score)[:, :k_group]
        dropped = torch.ones(tokens, group_count, dtype=torch.bool, device=x.device).scatter_(1, keep, False)
        choice = choice.masked_fill(dropped.repeat_interleave(per_group, dim=1), float("-inf"))
    idx = _stable_desc(choice)[:, :k]
    y = scores.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
    y = (y * routed_scaling_factor).to(x.dtype)
    norm_out = scores if out_flag else torch.empty(0, dtype=torch.float32, device=x.device)
    return y, idx.to(torch.int32), norm_out
