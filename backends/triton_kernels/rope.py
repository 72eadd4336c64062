"""Rotary embedding in half layout: pair i is (x[i], x[i + P/2]), rotated by the token's (cos[i], sin[i]).

    out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)      in float32, one rounding

Rows are the flattened (token, head) pairs, BLOCK_R per program; each row gathers its token's cos/sin (shared by
the token's heads through the cache). Inputs may be strided views (the rope slice of q, `[T, H, 192][..., 128:]`,
or the shared key `kv[:, None, 512:]`).
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
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, R, H, HALF,
                 stride_xt, stride_xh, stride_xp, stride_ct, stride_cp, stride_st, stride_sp, stride_yt, stride_yh,
                 BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Grid (cdiv(T * H, BLOCK_R),): row r is head r % H of token r // H."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t = (rows // H).to(tl.int64)[:, None]
    h = (rows % H)[:, None]
    i = tl.arange(0, BLOCK_P)[None, :]
    mask = (rows < R)[:, None] & (i < HALF)
    c = tl.load(cos_ptr + t * stride_ct + i * stride_cp, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_st + i * stride_sp, mask=mask, other=0.0).to(tl.float32)
    x = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(x + i * stride_xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + (i + HALF) * stride_xp, mask=mask, other=0.0).to(tl.float32)
    y = y_ptr + t * stride_yt + h * stride_yh + i
    tl.store(y, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y + HALF, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=mask)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, cfg: Mapping[str, Any] | None = None) -> Tensor:
    """Half-layout rotary embedding on the last dim.

    x: [T, ..., P] float32/bfloat16/float16 (P even), any strides; cos, sin: [T, P/2] float32 (any strides).
    cfg: BLOCK_R ((token, head) rows per program), num_warps. Returns a new contiguous tensor of x's shape and dtype.
    """
    cfg = cfg or {}
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    t, p = x.shape[0], x.shape[-1]
    x3 = x.reshape(t, -1, p) if x.dim() != 3 else x  # [T, heads, P]; a view for the graph's slices
    heads, half = x3.shape[1], p // 2
    y3 = out.view(t, heads, p)
    rows = t * heads
    block_r = min(int(cfg.get("BLOCK_R", 32)), next_pow2(rows))
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x3, cos, sin, y3, rows, heads, half,
        x3.stride(0), x3.stride(1), x3.stride(2), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        y3.stride(0), y3.stride(1),
        BLOCK_R=block_r, BLOCK_P=next_pow2(half), **launch_options(cfg, num_warps=4, num_stages=1),
    )
    return out
