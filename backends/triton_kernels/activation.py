"""SwiGLU: `silu(x[:, :I]) * x[:, I:]` (gate half first), float32 math, one rounding. Memory-bound elementwise."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_kernels.common import launch_options, next_pow2


@triton.jit
def _silu_and_mul_kernel(x_ptr, y_ptr, M, I, stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(M, BLOCK_M), cdiv(I, BLOCK_N))."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < I)[None, :]
    x = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :]
    gate = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + I, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: Tensor, cfg: Mapping[str, Any] | None = None) -> Tensor:
    """x: [..., 2I] float32/bfloat16/float16, any row stride. cfg: BLOCK_M, BLOCK_N, num_warps.
    Returns a new [..., I] tensor in x.dtype."""
    cfg = cfg or {}
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y2 = out.view(-1, inter)
    m = x2.shape[0]
    block_n = min(int(cfg.get("BLOCK_N", 1024)), next_pow2(inter))
    block_m = int(cfg.get("BLOCK_M", 1))
    _silu_and_mul_kernel[(triton.cdiv(m, block_m), triton.cdiv(inter, block_n))](
        x2, y2, m, inter, x2.stride(0), y2.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
        **launch_options(cfg, num_warps=4, num_stages=1),
    )
    return out
