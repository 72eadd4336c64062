"""`npu_grouped_matmul` (torch_npu_ops.md §7.1): per-group GEMMs, in the MoE form that groups rows of one x."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import CONFIG, dtype_name, not_emulated, reject, require

MAX_LIST = 128
MAX_GROUPS = 1024
_FLOAT_PAIRS = {torch.bfloat16: torch.float32, torch.float16: torch.float16, torch.float32: torch.float32}  # x: bias


def _group_ends(op: str, group_list: Tensor, group_list_type: int, groups: int) -> tuple[list[int], list[int]]:
    """(weight index of each group, end row of each group) from a Tensor group_list."""
    require(group_list.dtype == torch.int64, op, f"group_list must be int64, got {dtype_name(group_list.dtype)}")
    if group_list_type == 2:
        require(group_list.dim() == 2 and group_list.shape[1] == 2, op, "group_list_type 2 needs (E, 2) pairs")
        ids, counts = group_list[:, 0].tolist(), group_list[:, 1].tolist()
        require(all(c >= 0 for c in counts) and all(0 <= i < groups for i, c in zip(ids, counts) if c), op,
                "group_list pairs must be [expert id in range, count >= 0]")
        ends, total = [], 0
        for c in counts:
            total += c
            ends.append(total)
        return ids, ends
    require(group_list.dim() == 1 and group_list.shape[0] == groups, op,
            f"group_list must be ({groups},) for {groups} weights, got {tuple(group_list.shape)}")
    values = group_list.tolist()
    if group_list_type == 1:
        require(all(v >= 0 for v in values), op, "group counts must be >= 0")
        ends, total = [], 0
        for v in values:
            total += v
            ends.append(total)
    else:
        require(all(v >= 0 for v in values) and values == sorted(values), op,
                "group_list_type 0 needs non-decreasing end offsets (a cumsum)")
        ends = values
    return list(range(groups)), ends


def npu_grouped_matmul(x: list[Tensor], weight: list[Tensor], *, bias: list[Tensor] | None = None,
                       scale: list[Tensor] | None = None, offset: list[Tensor] | None = None,
                       antiquant_scale: list[Tensor] | None = None, antiquant_offset: list[Tensor] | None = None,
                       per_token_scale: list[Tensor] | None = None, group_list: Tensor | list[int] | None = None,
                       activation_input: list[Tensor] | None = None,
                       activation_quant_scale: list[Tensor] | None = None,
                       activation_quant_offset: list[Tensor] | None = None, split_item: int = 0,
                       group_type: int | None = None, group_list_type: int = 0, act_type: int = 0,
                       output_dtype: torch.dtype | None = None, tuning_config: list[int] | None = None) -> list[Tensor]:
    """MoE form (group_type=0): x=[(M, K)], weight=[(E, K, N)] (K x N: TRANSPOSED relative to nn.Linear; a
    transposed view is fine) or E tensors (K, N); group_list int64 Tensor: type 0 = cumsum of group sizes (end
    offsets, last == M), type 1 = per-group counts (sum == M), type 2 = (E, 2) [group id, count] (int8 only).
    Rows [end_{g-1}, end_g) are multiplied by weight g; rows past the covered total (the pairs init_routing_v2
    dropped: expert-parallel ids outside active_expert_range, -1 padding) are undefined: zero, NaN in strict mode.
    Plain form (group_type None/-1, no group_list): x[i] @ weight[i] for each pair.
    dtypes: bf16 x bf16 (bias fp32), fp16 x fp16 (bias fp16), fp32 x fp32; int8 x int8 with scale [(E, N)]
    fp32/bf16 and per_token_scale [(M,)] fp32, output_dtype bf16/fp16, or int32 for the raw accumulator.
    split_item 0/1: one output per group; 2/3: a single output tensor, returned as a 1-element list.
    """
    op = "npu_grouped_matmul"
    require(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), op, "x and weight must be lists")
    require(0 < len(x) <= MAX_LIST and 0 < len(weight) <= MAX_LIST, op, f"x/weight lists hold 1..{MAX_LIST} tensors")
    for name, arg in (("offset", offset), ("antiquant_scale", antiquant_scale),
                      ("antiquant_offset", antiquant_offset), ("activation_input", activation_input),
                      ("activation_quant_scale", activation_quant_scale),
                      ("activation_quant_offset", activation_quant_offset)):
        if arg is not None:
            not_emulated(op, name)
    if act_type != 0:
        not_emulated(op, f"act_type={act_type}")
    require(split_item in (0, 1, 2, 3), op, f"split_item={split_item} must be in 0..3")
    require(group_list_type in (0, 1, 2), op, f"group_list_type={group_list_type} must be 0, 1 or 2")
    if isinstance(group_list, (list, tuple)):
        require(group_type is None, op, "group_type must be None when group_list is a List[int]")
        not_emulated(op, "List[int] group_list")
    require(group_type in (None, -1, 0, 2), op, f"group_type={group_type} must be -1, 0 or 2")
    if group_type == 2:
        not_emulated(op, "group_type=2 (grouping along K)")

    if group_type in (None, -1):
        require(group_list is None, op, "group_list needs group_type=0")
        require(len(x) == len(weight), op, "without grouping, x and weight lists pair up")
        outs = [_gemm(op, xi, wi, _nth(bias, i), _nth(scale, i), _nth(per_token_scale, i), output_dtype)
                for i, (xi, wi) in enumerate(zip(x, weight))]
        return [torch.cat(outs)] if split_item in (2, 3) else outs

    require(len(x) == 1, op, "the grouped-M (MoE) form takes a single x")
    require(group_list is not None, op, "group_type=0 needs group_list")
    xm = x[0]
    require(xm.dim() == 2, op, f"x[0] must be 2-D (M, K), got {tuple(xm.shape)}")
    if len(weight) == 1 and weight[0].dim() == 3:
        stacked = weight[0]
        weights = [stacked[g] for g in range(stacked.shape[0])]
    else:
        require(all(w.dim() == 2 for w in weight), op, "weight must be [(E, K, N)] or E tensors (K, N)")
        weights = list(weight)
    groups = len(weights)
    require(groups <= MAX_GROUPS, op, f"{groups} groups exceed {MAX_GROUPS}")
    require(group_list_type != 2 or xm.dtype == torch.int8, op, "group_list_type 2 needs int8 x and weight")
    ids, ends = _group_ends(op, group_list, group_list_type, groups)
    m = xm.shape[0]
    total = ends[-1] if ends else 0
    require(total <= m, op, f"group_list covers {total} rows but x has {m}")
    k = xm.shape[1]
    require(all(w.shape[0] == k for w in weights), op,
            f"x has K={k} but weight is {tuple(weights[0].shape)}: weights must be (K, N) per group, i.e. [E, K, N]")
    n = weights[0].shape[1]
    out_dtype = _out_dtype(op, xm, weights[0], output_dtype)
    full = torch.zeros(m, n, dtype=out_dtype, device=xm.device)
    pieces, start = [], 0
    for g, end in zip(ids, ends):
        pts = per_token_scale[0][start:end] if per_token_scale is not None else None
        y = _gemm(op, xm[start:end], weights[g], _nth(bias, g, stacked=True), _nth(scale, g, stacked=True), pts,
                  output_dtype)
        full[start:end] = y
        pieces.append(y)
        start = end
    if CONFIG.strict and total < m and full.is_floating_point():
        full[total:] = float("nan")  # rows past the group list (experts dropped by init_routing): undefined
    return [full] if split_item in (2, 3) else pieces


def _nth(args: list[Tensor] | None, i: int, stacked: bool = False) -> Tensor | None:
    """The i-th tensor of an optional list argument; a single stacked (E, ...) tensor is indexed by group."""
    if args is None:
        return None
    if stacked and len(args) == 1:
        return args[0][i] if args[0].dim() >= 2 else args[0]
    return args[i]


def _out_dtype(op: str, x: Tensor, w: Tensor, output_dtype: torch.dtype | None) -> torch.dtype:
    if x.dtype == torch.int8:
        require(w.dtype == torch.int8, op, f"int8 x needs int8 weights, got {dtype_name(w.dtype)}")
        require(output_dtype in (torch.bfloat16, torch.float16, torch.int32), op,
                "int8 inputs need output_dtype bfloat16, float16 or int32")
        return output_dtype
    if x.dtype not in _FLOAT_PAIRS or w.dtype != x.dtype:
        reject(op, f"unsupported x/weight dtypes {dtype_name(x.dtype)}/{dtype_name(w.dtype)} "
                   f"(bf16/bf16, fp16/fp16, fp32/fp32, int8/int8)")
    require(output_dtype in (None, x.dtype), op, f"output_dtype {output_dtype} must be None or x's dtype")
    return x.dtype


def _gemm(op: str, x: Tensor, w: Tensor, bias: Tensor | None, scale: Tensor | None, per_token: Tensor | None,
          output_dtype: torch.dtype | None) -> Tensor:
    out_dtype = _out_dtype(op, x, w, output_dtype)
    require(x.shape[-1] == w.shape[0], op, f"x K={x.shape[-1]} != weight K={w.shape[0]}")
    if x.dtype == torch.int8:
        acc = torch.matmul(x.to(torch.int64), w.to(torch.int64))  # exact int32 accumulation
        if out_dtype == torch.int32:
            return acc.to(torch.int32)
        require(scale is not None and scale.dtype in (torch.float32, torch.bfloat16), op,
                "int8 inputs with a float output need scale (float32/bfloat16)")
        out = acc.float() * scale.float()
        if per_token is not None:
            require(per_token.dtype == torch.float32, op, "per_token_scale must be float32")
            out = out * per_token[:, None]
    else:
        require(scale is None and per_token is None, op, "scale/per_token_scale apply to int8 inputs only")
        out = x.float() @ w.float()
    if bias is not None:
        if x.dtype in _FLOAT_PAIRS:
            require(bias.dtype == _FLOAT_PAIRS[x.dtype], op, f"bias must be {dtype_name(_FLOAT_PAIRS[x.dtype])} for "
                                                            f"{dtype_name(x.dtype)} inputs")
        out = out + bias.float()
    return out.to(out_dtype)
