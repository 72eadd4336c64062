"""`npu_swiglu` (torch_npu_ops.md §7.2)."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import FLOAT_DTYPES, dtype_name, require


def npu_swiglu(input: Tensor, dim: int = -1) -> Tensor:
    """A, B = input.chunk(2, dim); silu(A) * B in float32, cast to input.dtype. The FIRST half is the gate.

    input: fp32/fp16/bf16, contiguous, non-empty, even size along `dim`.
    """
    op = "npu_swiglu"
    require(input.dtype in FLOAT_DTYPES, op, f"dtype {dtype_name(input.dtype)} is not supported")
    require(input.numel() > 0, op, "empty input is not supported")
    require(input.is_contiguous(), op, "input must be contiguous")
    require(input.shape[dim] % 2 == 0, op, f"size {input.shape[dim]} along dim {dim} must be even")
    a, b = input.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(input.dtype)
