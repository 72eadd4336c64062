"""rms_norm and add_rms_norm through npu_rms_norm / npu_add_rms_norm."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.ascend.runtime import torch_npu

_GAMMA_OK = {(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
             (torch.float16, torch.float32), (torch.bfloat16, torch.float32)}


def _gamma(x: Tensor, weight: Tensor) -> Tensor:
    """npu_rms_norm takes (x, gamma) in fp16/bf16 with gamma in its dtype or fp32, or both fp32: keep the weight
    when the pair is supported, otherwise hand it over in float32 (the reference's compute dtype)."""
    return weight if (x.dtype, weight.dtype) in _GAMMA_OK else weight.float()


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., D] (any leading dims, zero tokens allowed), weight [D] -> [..., D] in x.dtype.
    npu_rms_norm returns (y, rstd); only y is used. It takes 2-8 dims, so other ranks are viewed as [-1, D]."""
    if 2 <= x.dim() <= 8:
        return torch_npu.npu_rms_norm(x, _gamma(x, weight), epsilon=eps)[0]
    y = torch_npu.npu_rms_norm(x.reshape(-1, x.shape[-1]), _gamma(x, weight), epsilon=eps)[0]
    return y.view(x.shape)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """h = x + residual; returns (rms_norm(h), h), both [..., D] in x.dtype.

    npu_add_rms_norm returns (normed, rstd, sum) -- the sum is the THIRD output -- and needs gamma in x's dtype and
    non-empty inputs. It normalises the float32 sum, the reference the rounded one: identical in float32, within one
    rounding in bf16/fp16."""
    if x.numel() == 0:
        h = x + residual
        return h.clone(), h
    normed, _rstd, h = torch_npu.npu_add_rms_norm(x, residual, weight.to(x.dtype), epsilon=eps)
    return normed, h
