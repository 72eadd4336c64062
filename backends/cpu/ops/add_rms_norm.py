"""cpu: `add_rms_norm` (contract: core/ops.py; specification: backends/cpu_ref).

cpu_ref's vectorised PyTorch code serves here as is: elementwise work and the router are not where the time goes
(see the profile printed by bench/bench_cpu_peers.py)."""

from __future__ import annotations

from torch import Tensor

from backends.cpu_ref import OPS


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """x, residual [..., D] same dtype, weight [D] -> (rms_norm(h) [..., D], h = x + residual [..., D]), x.dtype."""
    return OPS["add_rms_norm"](x, residual, weight, eps)
