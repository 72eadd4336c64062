"""cpu: `rms_norm` (contract: core/ops.py; specification: backends/cpu_ref).

cpu_ref's vectorised PyTorch code serves here as is: elementwise work and the router are not where the time goes
(see the profile printed by bench/bench_cpu_peers.py)."""

from __future__ import annotations

from torch import Tensor

from backends.cpu_ref import OPS


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D] working dtype, weight [D] -> [..., D] in x.dtype; float32 statistics, one rounding."""
    return OPS["rms_norm"](x, weight, eps)
