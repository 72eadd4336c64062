"""SwiGLU activation."""

from __future__ import annotations

import torch
from torch import Tensor

from core.ops import compute_dtype


def silu_and_mul(x: Tensor) -> Tensor:
    """`silu(gate) * up` with gate = x[..., :I], up = x[..., I:], in float32, one rounding."""
    ct = compute_dtype(x.dtype)
    inter = x.shape[-1] // 2
    gate, up = x[..., :inter].to(ct), x[..., inter:].to(ct)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)
