"""cpu: `rms_norm` (contract: core/ops.py; specification: backends/cpu_ref) as one call of torch's rms_norm instead of
cpu_ref's seven Python-level ops (cast, pow, mean, rsqrt, two multiplies, cast); on the CPU in torch 2.13 it is still
a composite of a few kernels (mean, rsqrt, multiplies), dispatched from C++. For bfloat16 it accumulates and
multiplies in float32 and rounds once, as cpu_ref does (bit-identical on random inputs, tests/test_cpu_backend.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu_ref import OPS


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D] working dtype, weight [D] -> [..., D] in x.dtype; float32 statistics, one rounding. A weight of
    another dtype than x (torch's kernel wants them equal) takes cpu_ref's code."""
    if weight.dtype != x.dtype:
        return OPS["rms_norm"](x, weight, eps)
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
