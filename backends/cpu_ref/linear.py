"""Linear layers: exact dequantisation of FP8 block weights (numerics class `reference`) and the W8A8 emulation
(classes `w8a8` and `w8a8_fnuz`, and their DeepSeek-V3.1 variants `w8a8_ue8m0` and `w8a8_fnuz_ue8m0` with
power-of-two activation scales) that activation-quantising backends are judged against."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from core.fp8 import E4M3_MAX, dequantize_blocks, expand_scales, quantize_activation
from core.ops import FP8_BLOCK, LinearWeight, compute_dtype

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> LinearWeight:
    """Keep the checkpoint tensors as they are (FP8 codes and their block scales, or a float weight)."""
    return LinearWeight(weight, scale_inv)


def linear(x: Tensor, w: LinearWeight) -> Tensor:
    """`x @ dequant(W).T` in float32 (float64 for float64 x), one rounding to x.dtype.

    x [T, K] any float dtype (any strides); w: LinearWeight with weight [N, K] (FP8 + scale_inv, or float).
    Returns [T, N] in x.dtype."""
    ct = compute_dtype(x.dtype)
    weight = dequantize_blocks(w.weight, w.scale_inv, ct)
    return (x.to(ct) @ weight.T).to(x.dtype)


def dequantize_activation(q: Tensor, s: Tensor, dtype: torch.dtype) -> Tensor:
    """Inverse of core.fp8.quantize_activation: q [T, K] fp8 times s [T, ceil(K/128)] per 128-channel group."""
    return q.to(dtype) * s.to(dtype).repeat_interleave(FP8_BLOCK, dim=-1)[:, : q.shape[-1]]


def w8a8_roundtrip(x: Tensor, fp8_dtype: torch.dtype, fp8_max: float, ue8m0: bool = False) -> Tensor:
    """What a W8A8 kernel actually multiplies: x quantised per token per 128 channels, in the compute dtype
    (`ue8m0`: with power-of-two scales, core.fp8.quantize_activation)."""
    q, s = quantize_activation(x.reshape(-1, x.shape[-1]), fp8_dtype=fp8_dtype, fp8_max=fp8_max, ue8m0=ue8m0)
    return dequantize_activation(q, s, compute_dtype(x.dtype)).reshape(x.shape)


def linear_w8a8(x: Tensor, w: LinearWeight, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                fp8_max: float = E4M3_MAX, ue8m0: bool = False) -> Tensor:
    """W8A8 emulation: activations quantised per token per 128 channels (s = max(amax, 1e-4)/fp8_max, rounded up
    to a power of two with `ue8m0`), then `sum_kb (qa . qw)[kb] * s_a[kb] * S_w[n//128, kb]`, i.e. the dequantised
    product, accumulated in float32. Weight scales are used as published in either case.
    Weights that are not FP8 (the router, eh_proj, lm_head) take the `reference` path."""
    if w.weight.dtype not in FP8_DTYPES:
        return linear(x, w)
    ct = compute_dtype(x.dtype)
    a = w8a8_roundtrip(x, fp8_dtype, fp8_max, ue8m0)
    n, k = w.weight.shape
    weight = w.weight.to(ct) * expand_scales(w.scale_inv.to(ct), n, k)
    return (a @ weight.T).to(x.dtype)


linear_w8a8_fnuz = partial(linear_w8a8, fp8_dtype=torch.float8_e4m3fnuz, fp8_max=240.0)
linear_w8a8_ue8m0 = partial(linear_w8a8, ue8m0=True)
linear_w8a8_fnuz_ue8m0 = partial(linear_w8a8, fp8_dtype=torch.float8_e4m3fnuz, fp8_max=240.0, ue8m0=True)
