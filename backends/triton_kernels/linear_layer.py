"""`linear`: x @ W.T with float weights, or W8A8 with FP8 block-scaled weights (numerics class w8a8 / w8a8_fnuz).

W8A8 = `quantize_activation` (per token per 128 channels, in the weight's FP8 flavour) followed by the block-scaled
FP8 GEMM of gemm.py; cpu_ref.NUMERICS['w8a8'] (or 'w8a8_fnuz') is its specification.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from backends.triton_kernels.common import FP8_FORMATS
from backends.triton_kernels.gemm import gemm
from backends.triton_kernels.quant import quantize_activation
from core.ops import LinearWeight


class PreparedLinear(LinearWeight):
    """core.ops.LinearWeight with contiguous tensors, as the Triton kernels take it: weight [N, K] FP8 codes
    (e4m3fn, or e4m3fnuz after the rocm re-encoding) or float; scale_inv [ceil(N/128), ceil(K/128)] float32 for FP8
    weights, else None."""

    @property
    def fp8(self) -> bool:
        return self.weight.dtype in FP8_FORMATS


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> PreparedLinear:
    """Checkpoint weight [N, K] (FP8 with scale_inv [ceil(N/128), ceil(K/128)] float32, or float) -> PreparedLinear
    with contiguous tensors on the weight's device. FP8 codes are kept as they are (re-encode before calling
    this for another FP8 flavour)."""
    if weight.dtype in FP8_FORMATS:
        if scale_inv is None:
            raise ValueError("prepare_linear: an FP8 weight needs its scale_inv block scales")
        return PreparedLinear(weight.contiguous(), scale_inv.to(torch.float32).contiguous())
    return PreparedLinear(weight.contiguous(), None)


def linear(x: Tensor, w: PreparedLinear, cfg: Mapping[str, Any] | None = None, ue8m0: bool = False) -> Tensor:
    """`x @ W.T` with float32 accumulation; returns a new [T, N] tensor in x.dtype.

    x: [T, K] float32/bfloat16/float16, any strides (e.g. a column slice); T may be 0.
    FP8 weights: x is quantised per token per 128 channels to the weight's FP8 flavour, then the block-scaled FP8
    GEMM runs (W8A8). Float weights: a float GEMM (IEEE float32 when either operand is float32, e.g. the router).
    cfg: `quant` (quantize_activation's config), `gemm` (gemm.gemm's buckets), `fp8_dot`, `dot_fp32`, `num_sms`.
    ue8m0: activation scales rounded up to powers of two (classes w8a8_ue8m0 / w8a8_fnuz_ue8m0).
    """
    cfg = cfg or {}
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"linear: x {tuple(x.shape)} does not match a weight of {w.in_features} input features")
    if x.shape[0] == 0:
        return x.new_empty(0, w.out_features)
    if not w.fp8:
        return gemm(x, w.weight, x.dtype, cfg=cfg)
    q, s = quantize_activation(x, w.weight.dtype, cfg.get("quant"), ue8m0)
    return gemm(q, w.weight, x.dtype, a_scale=s, b_scale=w.scale_inv, cfg=cfg)
