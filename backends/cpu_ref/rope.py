"""Rotary embedding in half layout."""

from __future__ import annotations

import torch
from torch import Tensor

from core.ops import compute_dtype


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Pair i is (x[i], x[i + P/2]); out = cat(x1*cos - x2*sin, x2*cos + x1*sin), float32, one rounding.

    x: [T, ..., P]; cos, sin: [T, P/2] broadcast over the middle dims."""
    ct = compute_dtype(x.dtype)
    half = x.shape[-1] // 2
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (half,)
    c, s = cos.to(ct).reshape(shape), sin.to(ct).reshape(shape)
    x1, x2 = x[..., :half].to(ct), x[..., half:].to(ct)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
