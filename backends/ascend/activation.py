"""silu_and_mul through npu_swiglu (first half = gate, as the contract's [gate | up])."""

from __future__ import annotations

from torch import Tensor

from backends.ascend.runtime import torch_npu


def silu_and_mul(x: Tensor) -> Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I] in x.dtype. npu_swiglu needs a contiguous, non-empty input."""
    if x.numel() == 0:
        return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)
    return torch_npu.npu_swiglu(x.contiguous(), dim=-1)
