"""moe_experts through npu_moe_init_routing_v2 -> npu_grouped_matmul -> npu_swiglu -> npu_grouped_matmul ->
npu_moe_finalize_routing (the bf16 MoE path of Huawei's DeepSeek recipe).

Index conventions, which are where such glue goes wrong:
  * init_routing_v2 takes int32 ids and numbers the N*K (token, slot) pairs TOKEN-major (r = t*K + j); with
    row_idx_type=0 it returns a GATHER index: expanded_row_idx[r] = the expanded row holding pair r.
  * expert_tokens_num_type=1 returns per-expert COUNTS (int64), so grouped_matmul gets group_list_type=1
    (type 0 would read them as cumulative ends).
  * finalize_routing must read that index token-major too: drop_pad_mode=2 (0/1 read it k-major, v1's layout),
    and it applies scales[t, j] to the row of pair (t, j) and sums over j.
  * grouped_matmul wants weights [E, K, N]: the transposes of the checkpoint's [E, N, K], made once at load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backends.ascend.runtime import torch_npu
from backends.ascend.weights import to_device_dtype


@dataclass(frozen=True)
class AscendExperts:
    """w13: [E, D, 2I] = [gate | up] transposed; w2: [E, I, D] = down transposed. bfloat16 for FP8 checkpoints,
    else the loader's float dtype."""

    w13: Tensor
    w2: Tensor

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> AscendExperts:
    """gate, up [E, I, D], down [E, D, I] (+ FP8 block scales) -> AscendExperts in grouped_matmul's layout."""
    gate_up = torch.cat((to_device_dtype(gate, gate_scale), to_device_dtype(up, up_scale)), dim=1)  # [E, 2I, D]
    w2 = to_device_dtype(down, down_scale)  # [E, D, I]
    return AscendExperts(gate_up.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous())


def route(x: Tensor, ids: Tensor, experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """(expanded_x [T*K, D] sorted by expert, expanded_row_idx [T*K] int32 gather index, counts [E] int64).

    Expert parallelism is Ascend's own mechanism: `active_expert_range=[0, E)` over this rank's local ids, so a -1
    id (an expert held by another rank) sorts last, is counted nowhere (the group list covers fewer than T*K
    rows; the grouped GEMMs leave the rest undefined) and gets expanded_row_idx -1, which finalize_routing skips."""
    tokens, k = ids.shape
    expanded_x, row_idx, counts, _scale = torch_npu.npu_moe_init_routing_v2(
        x.contiguous(), ids.to(torch.int32), active_num=tokens * k, expert_num=experts, expert_tokens_num_type=1,
        expert_tokens_num_flag=True, quant_mode=-1, active_expert_range=[0, experts], row_idx_type=0)
    return expanded_x, row_idx, counts.to(torch.int64)


def combine(rows: Tensor, weights: Tensor, ids: Tensor, row_idx: Tensor) -> Tensor:
    """y[t] = sum_j weights[t, j] * rows[row_idx[t*K + j]] (finalize_routing, token-major index). A -1 slot's
    weight is zeroed first: the contract ignores it even when NaN, and whether finalize_routing multiplies the
    scale of a skipped row is not documented."""
    scales = weights.masked_fill(ids < 0, 0.0).to(rows.dtype)
    return torch_npu.npu_moe_finalize_routing(rows, skip1=None, skip2=None, bias=None, scales=scales,
                                              expanded_src_to_dst_row=row_idx, export_for_source_row=None,
                                              drop_pad_mode=2)


def grouped(x: Tensor, weight: Tensor, counts: Tensor, **quant: object) -> Tensor:
    """Rows of x grouped by expert (counts per expert) times weight[e] ([E, K, N]) -> [rows, N]."""
    return torch_npu.npu_grouped_matmul([x], [weight], group_list=counts, split_item=2, group_type=0,
                                        group_list_type=1, **quant)[0]


def moe_experts(x: Tensor, experts: AscendExperts, weights: Tensor, ids: Tensor) -> Tensor:
    """x [T, D], weights [T, k] float32, ids [T, k] int64 in [0, E) or -1 (held by another rank: skipped)
    -> sum_j weights[:, j] * Expert_ids[:, j](x), [T, D] in x.dtype."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    w13 = experts.w13 if experts.w13.dtype == x.dtype else experts.w13.to(x.dtype)
    w2 = experts.w2 if experts.w2.dtype == x.dtype else experts.w2.to(x.dtype)
    expanded_x, row_idx, counts = route(x, ids, experts.num_experts)
    h = torch_npu.npu_swiglu(grouped(expanded_x, w13, counts), dim=-1)
    return combine(grouped(h, w2, counts), weights, ids, row_idx).to(x.dtype)
