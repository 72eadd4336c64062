"""cpu: `apply_rope` (contract: core/ops.py; specification: backends/cpu_ref).

cpu_ref's vectorised PyTorch code serves here as is: elementwise work and the router are not where the time goes
(see the profile printed by bench/bench_cpu_peers.py)."""

from __future__ import annotations

from torch import Tensor

from backends.cpu_ref import OPS


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, ..., P] working dtype, cos/sin [T, P/2] float32 -> [T, ..., P] in x.dtype (half layout, float32)."""
    return OPS["apply_rope"](x, cos, sin)
