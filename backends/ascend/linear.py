"""linear: FP8 block weights dequantised to bfloat16 once at load time, then a plain matmul on the NPU (what
Ascend deployments of DeepSeek do on A2/A3, which have no FP8)."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.ascend.weights import to_device_dtype
from core.ops import LinearWeight


class AscendLinear(LinearWeight):
    """core.ops.LinearWeight without scales: weight [N, K], bfloat16 for FP8 checkpoint weights (dequantised at
    load), else the float dtype the loader handed over (the working dtype, or float32 for the MoE router)."""


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> AscendLinear:
    """weight [N, K] (FP8 with scale_inv [ceil(N/128), ceil(K/128)], or float) -> AscendLinear."""
    return AscendLinear(to_device_dtype(weight, scale_inv).contiguous())


def linear(x: Tensor, w: AscendLinear) -> Tensor:
    """x [T, K] (any strides) @ W.T -> [T, N] in x.dtype. A float32 x multiplies the bf16 weight upcast exactly."""
    weight = w.weight if w.weight.dtype == x.dtype else w.weight.to(x.dtype)
    return torch.nn.functional.linear(x, weight)
