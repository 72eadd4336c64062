"""cpu: `silu_and_mul` (contract: core/ops.py; specification: backends/cpu_ref): one widening of the whole input
(none in float32), silu, an in-place multiply, one rounding."""

from __future__ import annotations

import torch
from torch import Tensor

from core.ops import compute_dtype


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] working dtype -> silu(x[:, :I]) * x[:, I:] [T, I] in x.dtype, computed in float32."""
    xf = x.to(compute_dtype(x.dtype))
    inter = x.shape[-1] // 2
    return torch.nn.functional.silu(xf[..., :inter]).mul_(xf[..., inter:]).to(x.dtype)
