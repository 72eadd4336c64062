"""cpu: `silu_and_mul` (contract: core/ops.py; specification: backends/cpu_ref).

cpu_ref's vectorised PyTorch code serves here as is: elementwise work and the router are not where the time goes
(see the profile printed by bench/bench_cpu_peers.py)."""

from __future__ import annotations

from torch import Tensor

from backends.cpu_ref import OPS


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] working dtype -> silu(x[:, :I]) * x[:, I:] [T, I] in x.dtype, computed in float32."""
    return OPS["silu_and_mul"](x)
