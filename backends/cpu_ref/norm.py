"""RMSNorm and the fused residual-add RMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor

from core.ops import compute_dtype


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`weight * x * rsqrt(mean(x**2) + eps)` over the last dim.

    x [..., D] any float dtype (any strides), weight [D]; returns [..., D] in x.dtype. Statistics and the weight
    multiply in float32 (float64 for float64 x), one rounding at the end."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.to(ct) * y).to(x.dtype)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`h = x + residual` rounded once to x.dtype, then `(rms_norm(h, weight, eps), h)`.

    x, residual [..., D] same dtype; weight [D]; returns (normed [..., D], h [..., D]) in x.dtype."""
    ct = compute_dtype(x.dtype)
    h = (x.to(ct) + residual.to(ct)).to(x.dtype)
    return rms_norm(h, weight, eps), h
