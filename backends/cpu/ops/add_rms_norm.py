"""cpu: `add_rms_norm` (contract: core/ops.py; specification: backends/cpu_ref): one add (torch rounds a bfloat16
sum once from float32, as cpu_ref's explicit casts do) and the fused RMSNorm of ops/rms_norm.py."""

from __future__ import annotations

from torch import Tensor

from .rms_norm import rms_norm


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual [..., D] same dtype, weight [D] -> (rms_norm(h) [..., D], h = x + residual [..., D]), x.dtype."""
    h = x + residual
    return rms_norm(h, weight, eps), h
