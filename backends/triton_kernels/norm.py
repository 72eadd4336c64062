"""RMSNorm and the fused residual-add RMSNorm: one pass over ROWS rows per program, statistics in float32.

    y = w * (x * 1/sqrt(mean(x^2) + eps))        (the multiply order of cpu_ref; one rounding at the store)
    add_rms_norm: h = round(x + residual); y = rms_norm(h)     (h is rounded before it is normalised)

Memory-bound: a row is read once and written once (add_rms_norm: two reads, two writes). The whole row lives in
registers (BLOCK_D = next power of two >= D), so D is limited to 65536.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_kernels.common import launch_options, next_pow2

MAX_D = 65536


@triton.jit
def _normalize(x, w, eps, D):
    """x [ROWS, BLOCK_D] float32 (masked columns 0), w [BLOCK_D] float32 -> w * x / sqrt(mean(x^2) + eps)."""
    mean_sq = tl.sum(x * x, axis=1) / D
    inv = tl.div_rn(tl.full(mean_sq.shape, 1.0, tl.float32), tl.sqrt_rn(mean_sq + eps))
    return w[None, :] * (x * inv[:, None])


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, M, D, eps, stride_xm, stride_ym,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = _normalize(x, w, eps, D)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, M, D, eps, stride_xm, stride_rm, stride_ym, stride_hm,
                         ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < M)[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (x + r).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows64 * stride_hm + cols[None, :], h, mask=mask)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = _normalize(h.to(tl.float32), w, eps, D)
    tl.store(y_ptr + rows64 * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: Tensor) -> Tensor:
    """x [..., D] as a 2-D [M, D] tensor with unit stride along D (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] <= 1 else x2.contiguous()


def _grid_and_launch(m: int, d: int, cfg: Mapping[str, Any]) -> tuple[tuple[int], int, int, dict[str, Any]]:
    if d > MAX_D:
        raise ValueError(f"rms_norm: hidden size {d} exceeds the single-pass limit {MAX_D}")
    block_d = next_pow2(d)
    rows = int(cfg.get("ROWS", 1))
    warps = 8 if block_d >= 4096 else 4
    return (triton.cdiv(m, rows),), rows, block_d, launch_options(cfg, num_warps=warps, num_stages=1)


def rms_norm(x: Tensor, weight: Tensor, eps: float, cfg: Mapping[str, Any] | None = None) -> Tensor:
    """RMSNorm over the last dim. x: [..., D] float32/bfloat16/float16, any leading shape (possibly 0 rows), any
    row stride; weight: [D] any float dtype. cfg: ROWS (rows per program), num_warps. Returns a new tensor of
    x's shape and dtype."""
    cfg = cfg or {}
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2, y2 = _rows(x), out.view(-1, d)
    grid, rows, block_d, opts = _grid_and_launch(x2.shape[0], d, cfg)
    _rms_norm_kernel[grid](x2, weight.contiguous(), y2, x2.shape[0], d, float(eps), x2.stride(0), y2.stride(0),
                           ROWS=rows, BLOCK_D=block_d, **opts)
    return out


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float,
                 cfg: Mapping[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """h = x + residual (rounded to x.dtype); returns (rms_norm(h), h) as new tensors.

    x, residual: [..., D] same shape and dtype (float32/bfloat16/float16), any row strides; weight: [D].
    cfg: ROWS, num_warps. Neither input is modified."""
    cfg = cfg or {}
    if residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    d = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out, h
    x2, r2 = _rows(x), _rows(residual)
    y2, h2 = out.view(-1, d), h.view(-1, d)
    grid, rows, block_d, opts = _grid_and_launch(x2.shape[0], d, cfg)
    _add_rms_norm_kernel[grid](x2, r2, weight.contiguous(), y2, h2, x2.shape[0], d, float(eps),
                               x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
                               ROWS=rows, BLOCK_D=block_d, **opts)
    return out, h
