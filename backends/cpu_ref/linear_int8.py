"""The reference of the `w8a8_int8` numerics class (Ascend A2/A3 W8A8: int8 weights per output channel, int8
activations per token, exact int32 accumulation), in plain PyTorch on the reference weight formats.

Conformance judges backends that declare `numerics: w8a8_int8` against these functions. Its meaning, step by step:
  weights   FP8 blocks dequantised exactly and rounded to bfloat16 (how A2/A3 checkpoints are converted), then
            s_w[n] = max_k |W[n, k]| / 127 and q_w = clamp(round(W / s_w), -127, 127). Float (non-FP8) weights --
            the router, lm_head, eh_proj -- are not quantised and take the reference path.
  inputs    the GEMM input in its 16-bit dtype (float32 activations are rounded to bfloat16 first: the int8
            quantiser takes 16-bit inputs), s_x[t] = max |x[t, :]| / 127, q_x = round(x / s_x) (half to even);
            an all-zero row has scale 0.
  GEMM      (q_x . q_w^T) exactly, times s_w[n] * s_x[t] in float32, rounded to the 16-bit dtype.
  experts   the same for gate|up and down, SwiGLU of the 16-bit gate|up in float32 rounded to 16 bits, and the
            weighted combine sum_j w[t, j] * y_j in float32 with w rounded to 16 bits; one rounding at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.fp8 import dequantize_blocks
from core.ops import ExpertWeights, LinearWeight, compute_dtype

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
HALF = (torch.float16, torch.bfloat16)
INT8_MAX = 127.0


def sixteen_bit(dtype: torch.dtype) -> torch.dtype:
    """The dtype the int8 path's activations and GEMM outputs live in for a working dtype."""
    return dtype if dtype in HALF else torch.bfloat16


def int8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of float values: (codes as float64, scales float32); zero rows get scale 0."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe[..., None]).clamp(-128, 127).double(), scale


def int8_weight(weight: Tensor, scale_inv: Tensor | None) -> tuple[Tensor, Tensor]:
    """[.., N, K] checkpoint weight -> (codes [.., N, K] as float64, per-output-channel scales [.., N] float32)."""
    w = dequantize_blocks(weight, scale_inv, torch.bfloat16).float()
    scale = w.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(w / safe[..., None]).clamp(-INT8_MAX, INT8_MAX).double(), scale


def int8_gemm(x16: Tensor, codes: Tensor, scale: Tensor) -> Tensor:
    """16-bit x [T, K] against int8 codes [N, K] with scales [N] -> float32 [T, N] (not yet rounded)."""
    qx, sx = int8_rows(x16)
    acc = (qx @ codes.T).float()  # integer products summed exactly in float64, then float32 as the hardware does
    return acc * scale[None, :] * sx[:, None]


def linear_w8a8_int8(x: Tensor, w: LinearWeight) -> Tensor:
    """x [T, K] @ W.T under the w8a8_int8 class -> [T, N] in x.dtype (float weights: the reference product)."""
    if w.weight.dtype not in FP8_DTYPES:
        ct = compute_dtype(x.dtype)
        return (x.to(ct) @ dequantize_blocks(w.weight, w.scale_inv, ct).T).to(x.dtype)
    half = sixteen_bit(x.dtype)
    codes, scale = int8_weight(w.weight, w.scale_inv)
    return int8_gemm(x.to(half), codes, scale).to(half).to(x.dtype)


def moe_experts_w8a8_int8(x: Tensor, experts: ExpertWeights, weights: Tensor, ids: Tensor) -> Tensor:
    """sum_j weights[t, j] * Expert_{ids[t, j]}(x[t]) under the w8a8_int8 class -> [T, D] in x.dtype."""
    if experts.gate_scale is None:
        from_float = ExpertWeights(experts.gate, experts.up, experts.down)
        return _float_experts(x, from_float, weights, ids)
    half = sixteen_bit(x.dtype)
    x16 = x.to(half)
    w16 = weights.to(half).float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        if e < 0:  # held by another process (expert parallelism)
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        c13, s13 = _stack_codes((experts.gate[e], experts.gate_scale[e]), (experts.up[e], experts.up_scale[e]))
        gu = int8_gemm(x16[token], c13, s13).to(half).float()
        inter = gu.shape[-1] // 2
        h = (torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:]).to(half)
        c2, s2 = int8_weight(experts.down[e], experts.down_scale[e])
        y = int8_gemm(h, c2, s2).to(half).float()
        out.index_add_(0, token, y * w16[token, slot, None])
    return out.to(half).to(x.dtype)


def _stack_codes(*parts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Quantise [gate; up] per output channel: each part dequantised with its own block scales, then stacked."""
    quantised = [int8_weight(w, s) for w, s in parts]
    return torch.cat([c for c, _ in quantised]), torch.cat([s for _, s in quantised])


def _float_experts(x: Tensor, experts: ExpertWeights, weights: Tensor, ids: Tensor) -> Tensor:
    ct = compute_dtype(x.dtype)
    out = torch.zeros(x.shape, dtype=ct, device=x.device)
    for e in torch.unique(ids).tolist():
        if e < 0:  # held by another process (expert parallelism)
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[token].to(ct)
        h = torch.nn.functional.silu(xe @ experts.gate[e].to(ct).T) * (xe @ experts.up[e].to(ct).T)
        out.index_add_(0, token, (h @ experts.down[e].to(ct).T) * weights[token, slot, None].to(ct))
    return out.to(x.dtype)
