"""MoE token routing: `npu_moe_init_routing_v2` and `npu_moe_finalize_routing` (torch_npu_ops.md §6.4, §6.6)."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import (CONFIG, FLOAT_DTYPES, dtype_name, not_emulated, omitted_int, reject,
                                          require, strict_require, was_omitted)
from emulation.torch_npu.quant import per_row_int8

_SORT_LAST = 2 ** 31 - 1


def _undefined_rows(t: Tensor, n_out: int) -> Tensor:
    """Rows past n_out are undefined on hardware: sentinels in strict mode (NaN, or -128 for int8), else zeros."""
    if n_out < t.shape[0]:
        fill = (-128 if t.dtype == torch.int8 else float("nan")) if CONFIG.strict else 0
        t[n_out:] = fill
    return t


def npu_moe_init_routing_v2(x: Tensor, expert_idx: Tensor, *, scale: Tensor | None = None,
                            offset: Tensor | None = None, active_num: int = -1, expert_capacity: int = -1,
                            expert_num: int = -1, drop_pad_mode: int = 0, expert_tokens_num_type: int = 0,
                            expert_tokens_num_flag: bool = False, quant_mode: int = omitted_int(-1),
                            active_expert_range: list[int] = [],  # noqa: B006 (the documented default; never mutated)
                            row_idx_type: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the N*K (token, expert) pairs by expert, stably, and gather the token rows in that order.

    x: (N, H) fp16/bf16/fp32/int8. expert_idx: (N, K) int32; flat pair r = t*K + j (TOKEN-major), source token r // K.
    Experts outside active_expert_range [s, e) (default [0, expert_num)), including -1 padding, are dropped and sort
    last. Returns:
      expanded_x (N*K, H): x[order[:n_out] // K] (quantised per quant_mode); rows past n_out undefined.
      expanded_row_idx (N*K,) int32: row_idx_type 0 = GATHER index, expanded_row_idx[r] = destination row of pair r
        (-1 when dropped); row_idx_type 1 = scatter index, expanded_row_idx[dst] = r.
      expert_tokens (int64, if expert_tokens_num_flag): type 0 cumsum (E_local,), 1 counts (E_local,),
        2 (expert_num, 2) [expert id, count] pairs of non-empty experts packed first.
      expanded_scale (N*K,) float32: quant_mode 1 per-row scales, or a given (N,) `scale` permuted; else empty.
    quant_mode: -1 none, 0 static int8 round(x*scale + offset), 1 dynamic per-row int8 (optional smooth `scale`).
    """
    op = "npu_moe_init_routing_v2"
    strict_require(not was_omitted(quant_mode), op, "quant_mode was not passed; its default changed between "
                   "releases (0 = static int8 up to op-plugin 7.3.0, -1 from 26.0.0): pass it explicitly")
    require(x.dim() == 2, op, f"x must be 2-D (N, H), got {x.dim()}-D")
    require(x.dtype in FLOAT_DTYPES + (torch.int8,), op, f"x dtype {dtype_name(x.dtype)} is not supported")
    require(expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0], op,
            f"expert_idx must be (N, K) with N = {x.shape[0]}, got {tuple(expert_idx.shape)}")
    require(expert_idx.dtype == torch.int32, op, f"expert_idx must be int32, got {dtype_name(expert_idx.dtype)}")
    require(drop_pad_mode in (0, 1), op, f"drop_pad_mode={drop_pad_mode} must be 0 (dropless) or 1 (capacity)")
    if drop_pad_mode == 1:
        not_emulated(op, "drop_pad_mode=1 (expert capacity)")
    require(expert_tokens_num_type in (0, 1, 2), op, f"expert_tokens_num_type={expert_tokens_num_type} not in 0/1/2")
    require(row_idx_type in (0, 1), op, f"row_idx_type={row_idx_type} must be 0 (gather) or 1 (scatter)")
    if quant_mode not in (-1, 0, 1):
        reject(op, f"quant_mode={quant_mode}: FP8 quantisation modes exist only on Ascend 950; A2/A3 take -1/0/1")
    if active_expert_range:
        require(len(active_expert_range) == 2 and 0 <= active_expert_range[0] < active_expert_range[1], op,
                f"active_expert_range must be [start, end) with 0 <= start < end, got {active_expert_range}")
        start, end = int(active_expert_range[0]), int(active_expert_range[1])
    else:
        require(expert_num > 0, op, "expert_num must be given when active_expert_range is empty")
        start, end = 0, int(expert_num)
    if expert_num > 0:
        require(end <= expert_num, op, f"active_expert_range end {end} exceeds expert_num {expert_num}")

    n, k = expert_idx.shape
    flat = expert_idx.reshape(-1).to(torch.int64)
    valid = (flat >= start) & (flat < end)
    order = torch.sort(torch.where(flat < start, _SORT_LAST, flat), stable=True).indices
    n_av = int(valid.sum())
    n_out = n_av if active_num in (-1, 0) else min(int(active_num), n_av)
    rows = order[:n_out] // k

    expanded_scale = torch.empty(0, dtype=torch.float32, device=x.device)
    if quant_mode == -1:
        expanded_x = x.new_zeros(n * k, x.shape[1])
        expanded_x[:n_out] = x[rows]
        if scale is not None:
            require(tuple(scale.shape) == (n,), op, f"without quantisation, scale must be ({n},)")
            expanded_scale = torch.zeros(n * k, dtype=torch.float32, device=x.device)
            expanded_scale[:n_out] = scale.float()[rows]
            expanded_scale = _undefined_rows(expanded_scale, n_out)
    else:
        require(x.dtype in FLOAT_DTYPES, op, "quantisation needs a float x")
        expanded_x = torch.zeros(n * k, x.shape[1], dtype=torch.int8, device=x.device)
        src = x[rows].float()
        if quant_mode == 0:
            require(scale is not None and offset is not None and scale.numel() == 1 and offset.numel() == 1, op,
                    "quant_mode 0 needs scale (1,) and offset (1,)")
            expanded_x[:n_out] = torch.round(src * scale.float() + offset.float()).clamp(-128, 127).to(torch.int8)
        else:
            if scale is not None:
                local = end - start
                require(scale.dim() == 2 and scale.shape[1] == x.shape[1] and scale.shape[0] in (1, local), op,
                        f"quant_mode 1 smooth scale must be (1, H) or ({local}, H)")
                smooth = scale.float()[0 if scale.shape[0] == 1 else flat[order[:n_out]] - start]
                src = src * smooth
            q, s = per_row_int8(src)
            expanded_x[:n_out] = q
            expanded_scale = torch.zeros(n * k, dtype=torch.float32, device=x.device)
            expanded_scale[:n_out] = s
            expanded_scale = _undefined_rows(expanded_scale, n_out)
    expanded_x = _undefined_rows(expanded_x, n_out)

    if row_idx_type == 0:
        row_idx = torch.full((n * k,), -1, dtype=torch.int32, device=x.device)
        row_idx[order[:n_av]] = torch.arange(n_av, dtype=torch.int32, device=x.device)
    else:
        row_idx = order.to(torch.int32)

    counts = torch.bincount(flat[valid] - start, minlength=end - start)
    if not expert_tokens_num_flag:
        tokens = torch.empty(0, dtype=torch.int64, device=x.device)
    elif expert_tokens_num_type == 0:
        tokens = counts.cumsum(0)
    elif expert_tokens_num_type == 1:
        tokens = counts
    else:
        nz = torch.nonzero(counts).flatten()
        tokens = torch.zeros(max(expert_num, end), 2, dtype=torch.int64, device=x.device)
        tokens[: nz.numel(), 0] = nz + start
        tokens[: nz.numel(), 1] = counts[nz]
    return expanded_x, row_idx, tokens.to(torch.int64), expanded_scale


def npu_moe_finalize_routing(expanded_permuted_rows: Tensor, skip1: Tensor | None, skip2: Tensor | None,
                             bias: Tensor | None, scales: Tensor | None, expanded_src_to_dst_row: Tensor,
                             export_for_source_row: Tensor | None, drop_pad_mode: int = 0,
                             k: int | None = 1) -> Tensor:
    """out[i] = skip1[i] (+ skip2[i]) + sum_k scales[i, k] * (rows[r(i, k)] + bias[expert[i, k]]), in float32.

    The index form depends on drop_pad_mode: 0/1 read expanded_src_to_dst_row COLUMN-major (k-major, what v1
    init_routing produces): r(i, k) = src2dst[k*N + i]; 2/3 read it ROW-major (token-major, what init_routing_v2
    with row_idx_type 0 produces): r(i, k) = src2dst[i*K + k]. r = -1 contributes nothing. K = scales.shape[1]
    (or `k` when scales is None). rows: (N*K, H). Returns (N, H) in the rows' dtype.
    """
    op = "npu_moe_finalize_routing"
    rows = expanded_permuted_rows
    require(drop_pad_mode in (0, 1, 2, 3), op, f"drop_pad_mode={drop_pad_mode} must be in 0..3")
    if drop_pad_mode in (1, 3):
        not_emulated(op, "drop/pad layouts (E, C, H)")
    require(rows.dim() == 2, op, f"expanded_permuted_rows must be 2-D (N*K, H), got {rows.dim()}-D")
    require(rows.dtype in FLOAT_DTYPES, op, f"rows dtype {dtype_name(rows.dtype)} is not supported")
    require(skip2 is None or skip1 is not None, op, "skip2 needs skip1")
    src2dst = expanded_src_to_dst_row
    require(src2dst.dim() == 1 and src2dst.dtype == torch.int32, op, "expanded_src_to_dst_row must be 1-D int32")
    if scales is not None:
        require(scales.dim() == 2, op, "scales must be (N, K)")
        kk = scales.shape[1]
    else:
        kk = int(k or 1)
    require(kk > 0 and src2dst.numel() % kk == 0, op, f"{src2dst.numel()} indices are not N*K with K={kk}")
    n, h = src2dst.numel() // kk, rows.shape[1]
    require(scales is None or scales.shape[0] == n, op, f"scales must be ({n}, {kk})")
    for name, skip in (("skip1", skip1), ("skip2", skip2)):
        require(skip is None or tuple(skip.shape) == (n, h), op, f"{name} must be ({n}, {h})")
    idx = src2dst.to(torch.int64)
    idx = idx.view(kk, n).t() if drop_pad_mode == 0 else idx.view(n, kk)
    require(bool((idx < rows.shape[0]).all()) and bool((idx >= -1).all()), op, "row index out of range")
    live = idx >= 0
    gathered = torch.where(live[..., None], rows.float()[idx.clamp(min=0)], 0.0)  # -1: nothing, even over NaN
    if bias is not None:
        require(export_for_source_row is not None and tuple(export_for_source_row.shape) == (n, kk), op,
                "bias needs export_for_source_row (N, K)")
        require(bias.dim() == 2 and bias.shape[1] == h, op, "bias must be (E, H)")
        gathered = gathered + torch.where(live[..., None], bias.float()[export_for_source_row.long()], 0.0)
    weights = scales.float()[..., None] if scales is not None else 1.0
    out = torch.where(live[..., None], gathered * weights, 0.0).sum(dim=1)  # -1: nothing, whatever its scale
    if skip1 is not None:
        out = out + skip1.float() + (skip2.float() if skip2 is not None else 0)
    return out.to(rows.dtype)
