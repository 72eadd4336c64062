"""Fused routed experts: `y[t] = sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`, e = ids[t, j].

Pipeline (vLLM/SGLang fused_moe, made deterministic):
  1. align_block_size: (token, slot) pairs sorted by expert, each expert's run padded to BLOCK_M rows, one expert
     per block; blocks past the last used one exit at once (the grid is a host-known upper bound, no sync).
  2. FP8 experts: x is quantised per token per 128 channels once (W8A8), and the GEMMs gather code rows.
  3. gate_up kernel: for each block, gate and up tiles of the same BLOCK_N columns are multiplied together and
     SiLU-and-mul is applied in the epilogue; with FP8 experts and BLOCK_N = 128 the epilogue also quantises h per
     128 channels (one group per tile) and writes FP8 codes + scales, so h never round-trips through memory
     in float. (Another BLOCK_N writes float32 h, quantised by the activation-quant kernel.)
  4. down kernel: h rows x the expert's down weight; the epilogue multiplies by the routing weight and writes each
     pair's float32 row.
     Pairs with id -1 (expert parallelism: held by another process) are in no block; their rows are zeroed.
  5. moe_sum: the k rows of each token are summed in slot order in float32 and rounded once to x.dtype.
FP8 GEMM steps are gemm.scaled_dot (per-128-K promotion with both block scales): cpu_ref.NUMERICS['w8a8'] is the
specification; float experts follow cpu_ref.moe_experts (h is rounded to x.dtype between the GEMMs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_kernels.common import FP8_FORMATS, dot_plan, launch_options, pick_bucket
from backends.triton_kernels.gemm import SCALE_BLOCK, float_dot, scaled_dot
from backends.triton_kernels.moe_align import Alignment, align_block_size
from backends.triton_kernels.quant import dot_operand, quantize_activation, quantize_tile
from core.ops import ExpertWeights

DEFAULT_BUCKET = {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
                  "down": {"BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}}


class PreparedExperts(ExpertWeights):
    """core.ops.ExpertWeights as the kernels take them (unit stride along the reduction dim): gate, up [E, I, D] are
    views of one fused [E, 2I, D] tensor (gate rows first) when the FP8 row blocks allow it; down [E, D, I];
    *_scale [E, ceil(rows/128), ceil(cols/128)] float32 for FP8 experts, else None."""

    @property
    def fp8(self) -> bool:
        return self.gate.dtype in FP8_FORMATS


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> PreparedExperts:
    """Stacked checkpoint experts (core.ops.ExpertWeights layout) -> PreparedExperts. gate and up are fused into
    one [E, 2I, D] tensor (and their scales into [E, 2*ceil(I/128), .]) when I is a multiple of 128 or the weights
    are float, so the gate_up kernel streams one allocation; FP8 codes are kept as they are."""
    fp8 = gate.dtype in FP8_FORMATS
    if fp8 and (gate_scale is None or up_scale is None or down_scale is None):
        raise ValueError("prepare_experts: FP8 experts need gate, up and down block scales")
    inter = gate.shape[1]
    down = down.contiguous()
    if not fp8:
        fused = torch.cat([gate, up], dim=1)
        return PreparedExperts(fused[:, :inter], fused[:, inter:], down)
    gs, us, ds = (s.to(torch.float32) for s in (gate_scale, up_scale, down_scale))
    if inter % SCALE_BLOCK == 0:
        fused, fused_s = torch.cat([gate, up], dim=1), torch.cat([gs, us], dim=1)
        ib = gs.shape[1]
        return PreparedExperts(fused[:, :inter], fused[:, inter:], down, fused_s[:, :ib], fused_s[:, ib:],
                               ds.contiguous())
    return PreparedExperts(gate.contiguous(), up.contiguous(), down, gs.contiguous(), us.contiguous(),
                           ds.contiguous())


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, xs_ptr, wg_ptr, wu_ptr, wgs_ptr, wus_ptr, h_ptr, hs_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, I, D,
    stride_xm, stride_xsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_hm, stride_hsm,
    TOP_K: tl.constexpr, HAS_SCALES: tl.constexpr, QUANT_OUT: tl.constexpr, DOT_DTYPE: tl.constexpr,
    IEEE: tl.constexpr, FP8_BIAS: tl.constexpr, FP8_MAX: tl.constexpr, OUT_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr,
):
    """Grid (num_blocks * cdiv(I, BLOCK_N),): h[pair, n] = silu(x[tok] . gate_e[n]) * (x[tok] . up_e[n]).
    With QUANT_OUT, h_ptr is uint8 and receives e4m3 codes (exponent bias OUT_BIAS, max FP8_MAX; UE8M0:
    power-of-two scales)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(I, BLOCK_N)
    block = pid // num_pid_n
    pid_n = pid % num_pid_n
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    tokens = pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    e = expert.to(tl.int64)
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_xm
    wg_cols = wg_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    wu_cols = wu_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    if HAS_SCALES:
        xs_rows = xs_ptr + tokens * stride_xsm
        wgs_cols = wgs_ptr + e * stride_wse + (offs_n // 128) * stride_wsn
        wus_cols = wus_ptr + e * stride_wse + (offs_n // 128) * stride_wsn

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(D, BLOCK_K)):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = dot_operand(tl.load(x_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0),
                        DOT_DTYPE, FP8_BIAS)
        w_mask = k_ok[:, None] & n_ok[None, :]
        bg = dot_operand(tl.load(wg_cols + offs_k[:, None], mask=w_mask, other=0.0), DOT_DTYPE, FP8_BIAS)
        bu = dot_operand(tl.load(wu_cols + offs_k[:, None], mask=w_mask, other=0.0), DOT_DTYPE, FP8_BIAS)
        if HAS_SCALES:
            a_s = tl.load(xs_rows + kt, mask=row_ok, other=0.0)
            acc_g = scaled_dot(acc_g, a, bg, a_s, tl.load(wgs_cols + kt, mask=n_ok, other=0.0), IEEE)
            acc_u = scaled_dot(acc_u, a, bu, a_s, tl.load(wus_cols + kt, mask=n_ok, other=0.0), IEEE)
        else:
            acc_g = float_dot(acc_g, a, bg, IEEE)
            acc_u = float_dot(acc_u, a, bu, IEEE)

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # masked rows and columns are exactly 0
    h_ptrs = h_ptr + pairs.to(tl.int64)[:, None] * stride_hm + offs_n[None, :]
    mask = row_ok[:, None] & n_ok[None, :]
    if QUANT_OUT:  # BLOCK_N == 128: this tile is one quantisation group of h
        q, s = quantize_tile(h, FP8_MAX, OUT_BIAS, UE8M0)
        tl.store(h_ptrs, q, mask=mask)
        tl.store(hs_ptr + pairs.to(tl.int64) * stride_hsm + pid_n, s, mask=row_ok)
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _moe_down_kernel(
    h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, topw_ptr, sorted_ptr, block_expert_ptr,
    num_pairs, D, I,
    stride_hm, stride_hsm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
    HAS_SCALES: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FP8_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (num_blocks * cdiv(D, BLOCK_N),): y[pair, n] = weight[pair] * (h[pair] . down_e[n]), float32."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(D, BLOCK_N)
    block = pid // num_pid_n
    pid_n = pid % num_pid_n
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    e = expert.to(tl.int64)
    h_rows = h_ptr + pairs.to(tl.int64)[:, None] * stride_hm
    w_cols = w_ptr + e * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
    if HAS_SCALES:
        hs_rows = hs_ptr + pairs.to(tl.int64) * stride_hsm
        ws_cols = ws_ptr + e * stride_wse + (offs_n // 128) * stride_wsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(I, BLOCK_K)):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < I
        a = dot_operand(tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0),
                        DOT_DTYPE, FP8_BIAS)
        b = dot_operand(tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0),
                        DOT_DTYPE, FP8_BIAS)
        if HAS_SCALES:
            a_s = tl.load(hs_rows + kt, mask=row_ok, other=0.0)
            acc = scaled_dot(acc, a, b, a_s, tl.load(ws_cols + kt, mask=n_ok, other=0.0), IEEE)
        else:
            acc = float_dot(acc, a, b, IEEE)

    acc = acc * tl.load(topw_ptr + pairs, mask=row_ok, other=0.0)[:, None]
    y_ptrs = y_ptr + pairs.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, out_ptr, T, D, stride_ym, stride_om,
                    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j y[t * TOP_K + j] in slot order, float32, one rounding.
    Grid (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D))."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (tokens < T)[:, None] & (cols < D)[None, :]
    rows = tokens.to(tl.int64) * TOP_K
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (rows + j)[:, None] * stride_ym + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


def _gemm_tile(bucket: Mapping[str, Any], which: str, fp8: bool) -> dict[str, Any]:
    tile = {**DEFAULT_BUCKET[which], **bucket.get(which, {})}
    if fp8:
        tile["BLOCK_K"] = SCALE_BLOCK
    return tile


def _gate_up(xa: Tensor, xs: Tensor, experts: PreparedExperts, align: Alignment, top_k: int,
             tile: Mapping[str, Any], cfg: Mapping[str, Any], ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """h = silu(x W_gate^T) * (x W_up^T) per (token, slot) pair: [T*k, I]. FP8 experts: (codes, scales [T*k,
    ceil(I/128)]) when BLOCK_N = 128 (quantised in the epilogue), else float32 h quantised by the act-quant kernel."""
    pairs, inter, fp8 = xa.shape[0] * top_k, experts.intermediate_size, experts.fp8
    fmt = FP8_FORMATS.get(experts.gate.dtype)
    block_n = int(tile["BLOCK_N"])
    quant_out = fp8 and block_n == SCALE_BLOCK
    h_dtype = fmt.dtype if quant_out else (torch.float32 if fp8 else xa.dtype)
    h = torch.empty(pairs, inter, dtype=h_dtype, device=xa.device)
    hs = torch.empty(pairs, triton.cdiv(inter, SCALE_BLOCK), dtype=torch.float32, device=xa.device) if quant_out else h
    gs, us = (experts.gate_scale, experts.up_scale) if fp8 else (experts.gate, experts.up)  # dummies: never read
    plan = dot_plan(xa.dtype, experts.gate.dtype, cfg)
    _moe_gate_up_kernel[(align.num_blocks * triton.cdiv(inter, block_n),)](
        plan.operand(xa), xs, plan.operand(experts.gate), plan.operand(experts.up), gs, us,
        h.view(torch.uint8) if quant_out else h, hs, align.sorted_pairs, align.block_expert,
        pairs, inter, xa.shape[1],
        xa.stride(0), xs.stride(0), experts.gate.stride(0), experts.gate.stride(1), gs.stride(0), gs.stride(1),
        h.stride(0), hs.stride(0),
        TOP_K=top_k, HAS_SCALES=fp8, QUANT_OUT=quant_out, DOT_DTYPE=plan.dtype, IEEE=plan.ieee,
        FP8_BIAS=plan.fp8_bias, FP8_MAX=fmt.max if fp8 else 0.0, OUT_BIAS=fmt.exponent_bias if fp8 else 0,
        BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=int(tile["BLOCK_K"]), UE8M0=bool(ue8m0),
        **launch_options(tile, num_warps=4, num_stages=3),
    )
    if fp8 and not quant_out:
        return quantize_activation(h, fmt.dtype, cfg.get("quant"), ue8m0)
    return h, hs


def _down(h: Tensor, hs: Tensor, experts: PreparedExperts, weights: Tensor, align: Alignment,
          tile: Mapping[str, Any], cfg: Mapping[str, Any]) -> Tensor:
    """y[pair] = weight[pair] * (h[pair] W_down^T): [T*k, D] float32."""
    pairs, hidden, fp8 = h.shape[0], experts.hidden_size, experts.fp8
    y = torch.empty(pairs, hidden, dtype=torch.float32, device=h.device)
    ds = experts.down_scale if fp8 else experts.down
    plan = dot_plan(h.dtype, experts.down.dtype, cfg)
    block_n = int(tile["BLOCK_N"])
    _moe_down_kernel[(align.num_blocks * triton.cdiv(hidden, block_n),)](
        plan.operand(h), hs, plan.operand(experts.down), ds, y, weights.to(torch.float32).contiguous(),
        align.sorted_pairs, align.block_expert,
        pairs, hidden, experts.intermediate_size,
        h.stride(0), hs.stride(0), experts.down.stride(0), experts.down.stride(1), ds.stride(0), ds.stride(1),
        y.stride(0),
        HAS_SCALES=fp8, DOT_DTYPE=plan.dtype, IEEE=plan.ieee, FP8_BIAS=plan.fp8_bias,
        BLOCK_M=align.block_m, BLOCK_N=block_n, BLOCK_K=int(tile["BLOCK_K"]),
        **launch_options(tile, num_warps=4, num_stages=3),
    )
    return y


def _combine(y: Tensor, top_k: int, out: Tensor, cfg: Mapping[str, Any]) -> None:
    """out[t] = sum_j y[t*k + j] in float32, rounded once to out.dtype."""
    tokens, hidden = out.shape
    block_t, block_d = int(cfg.get("BLOCK_T", 1)), int(cfg.get("BLOCK_D", 1024))
    _moe_sum_kernel[(triton.cdiv(tokens, block_t), triton.cdiv(hidden, block_d))](
        y, out, tokens, hidden, y.stride(0), out.stride(0), TOP_K=top_k, BLOCK_T=block_t, BLOCK_D=block_d,
        **launch_options(cfg, num_warps=4, num_stages=1),
    )


def moe_experts(x: Tensor, experts: PreparedExperts, weights: Tensor, ids: Tensor,
                cfg: Mapping[str, Any] | None = None, ue8m0: bool = False) -> Tensor:
    """The routed-expert sum (core.ops.moe_experts). x: [T, D] float32/bfloat16/float16 (any row stride);
    experts: PreparedExperts (FP8 -> W8A8 numerics); weights: [T, k] float32; ids: [T, k] int in [0, E), or -1
    for an expert held by another process (no block computes it; its row of the combine is zero).

    cfg: `buckets`, a list of {max_tokens, BLOCK_M, gate_up: {BLOCK_N, BLOCK_K, num_warps, num_stages, ...},
    down: {...}} (the first whose max_tokens >= T is used); `quant` (activation-quant config); `sum` (combine:
    BLOCK_T, BLOCK_D); `fp8_dot`, `dot_fp32`. ue8m0: both activation quantisations (the expert input and the
    SwiGLU output) with power-of-two scales (classes w8a8_ue8m0 / w8a8_fnuz_ue8m0). Returns a new [T, D] tensor in x.dtype; the combine over the k
    experts is float32.
    """
    cfg = cfg or {}
    tokens, hidden = x.shape
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    top_k = ids.shape[1]
    bucket = {**DEFAULT_BUCKET, **pick_bucket(cfg.get("buckets"), tokens, key="max_tokens")}
    align = align_block_size(ids, experts.num_experts, int(bucket["BLOCK_M"]))
    if x.stride(1) != 1:
        x = x.contiguous()
    if experts.fp8:
        xa, xs = quantize_activation(x, experts.gate.dtype, cfg.get("quant"), ue8m0)
    else:
        xa, xs = x, x  # xs: a dummy, never read
    h, hs = _gate_up(xa, xs, experts, align, top_k, _gemm_tile(bucket, "gate_up", experts.fp8), cfg, ue8m0)
    y = _down(h, hs, experts, weights, align, _gemm_tile(bucket, "down", experts.fp8), cfg)
    y.masked_fill_(ids.reshape(-1, 1) < 0, 0.0)  # pairs of experts held by another process: never written
    _combine(y, top_k, out, cfg.get("sum", {}))
    return out
