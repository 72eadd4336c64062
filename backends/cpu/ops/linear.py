"""cpu: `linear` (contract: core/ops.py; specification: backends/cpu_ref) on torch's oneDNN GEMM."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu.weights import CpuLinear


def linear(x: Tensor, w: CpuLinear) -> Tensor:
    """`x @ W.T`: x [T, K] working dtype (any strides), w.weight [N, K] as prepared. Returns [T, N] in x.dtype.

    Same dtype: one oneDNN GEMM (float32 accumulation, bfloat16 output rounded once). Weight wider than x (float32
    weights of a bfloat16 model on a CPU without native bf16): x is widened, the GEMM runs in float32 and the output
    is rounded once, exactly cpu_ref's numerics. Weight narrower than x (a bfloat16 weight fed float32): the weight
    is widened for that call."""
    weight = w.weight
    if x.dtype == weight.dtype:
        return torch.nn.functional.linear(x, weight)
    ct = torch.promote_types(x.dtype, weight.dtype)
    return torch.nn.functional.linear(x.to(ct), weight.to(ct)).to(x.dtype)
