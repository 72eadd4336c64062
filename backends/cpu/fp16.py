"""Weights held as fbgemm's packed fp16, exactly: the fastest float GEMM torch has on an x86 CPU without native bf16.

torch's x86 builds carry FBGEMM, whose fp16-weight GEMM (`torch.fbgemm_linear_fp16_weight`, the kernel behind
dynamic fp16 quantisation) multiplies float32 activations by fp16 weights widened in registers, accumulating in
float32. Measured here (AVX2, one thread, 16M parameters read from DRAM), 1 / 4 / 32 tokens: 3.8 / 4.1 / 17.1 ms
against 8.1 / 16.7 / 29.3 for MKL's float32 GEMM and 5.9 for torch's one-token bf16 GEMV.

It changes no number: a weight is packed only when every element times one power of two 2^shift is exactly an fp16
value (bfloat16 and bf16-derived float32 weights are, for any dynamic range up to 2^31 below the largest element);
the GEMM then multiplies exactly the checkpoint's values scaled by 2^shift, and scaling the float32 output back by
2^-shift is exact (outside float32 overflow, |y| > 2^(127-shift), about 1e33 for weights of order one). A weight
with any element that has no exact fp16 form (FP8 dequantised with arbitrary scales, true float32, NaN or inf) is
not packed: the caller keeps its other path. FP16 packing saturates and rounds silently, hence the check."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# torch 2.13 marks the fbgemm_* functions deprecated in favour of torch.ops.quantized.linear_prepack_fp16 /
# linear_dynamic_fp16, the same kernel behind a TorchScript object; that path costs ~50 us more per call (512x512, one
# token: 74 against 24 us), more than the GEMM itself at decode. The fbgemm_* functions are used while torch has them.
LEGACY = hasattr(torch, "fbgemm_linear_fp16_weight") and hasattr(torch, "fbgemm_pack_gemm_matrix_fp16")
warnings.filterwarnings("ignore", message=r"fbgemm_\w+ is deprecated", category=UserWarning)
FP16_TOP = 14  # the largest element is scaled into [2^14, 2^15): fp16's largest finite value is 65504 < 2^16
MAX_SHIFT = 100  # 2^shift stays a finite float32 for the product wf * 2^shift


@dataclass(frozen=True)
class Fp16Weight:
    """packed: fbgemm's handle for W * 2^shift in fp16 (an opaque uint8 tensor or TorchScript object; the bytes live
    in fbgemm); zeros: the [N] float32 bias the legacy op requires (None otherwise); unscale: 2^-shift; shape: (N, K)
    of W."""

    packed: object
    zeros: Tensor | None
    unscale: float
    shape: tuple[int, int]


def pack_exact(weight: Tensor) -> Fp16Weight | None:
    """weight [N, K] float -> Fp16Weight, or None when some element has no exact fp16 form after the shift."""
    wf = weight.float()
    amax = float(wf.abs().max()) if wf.numel() else 0.0
    if not math.isfinite(amax):
        return None
    shift = 0 if amax == 0.0 else FP16_TOP - math.floor(math.log2(amax))
    if abs(shift) > MAX_SHIFT:
        return None
    scaled = (wf * 2.0 ** shift).contiguous()
    if not torch.equal(scaled.half().float(), scaled):
        return None
    n, k = scaled.shape
    if LEGACY:
        return Fp16Weight(torch.fbgemm_pack_gemm_matrix_fp16(scaled), torch.zeros(n), 2.0 ** -shift, (n, k))
    return Fp16Weight(torch.ops.quantized.linear_prepack_fp16(scaled, None), None, 2.0 ** -shift, (n, k))


def mm(x: Tensor, w: Fp16Weight) -> Tensor:
    """x [M, K] float32 (rows may be strided) -> x @ W.T [M, N] float32: float32 products and sums, one unscale."""
    if w.zeros is not None:
        y = torch.fbgemm_linear_fp16_weight(x, w.packed, w.zeros)
    else:
        y = torch.ops.quantized.linear_dynamic_fp16(x, w.packed)
    return y if w.unscale == 1.0 else y.mul_(w.unscale)


def present() -> bool:
    """Whether this torch build carries FBGEMM (x86 builds; not ARM)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def available() -> bool:
    """Whether this torch has fbgemm's fp16 GEMM and it computes a small product exactly (the backend's self-test at
    first use: a build whose kernel misbehaves falls back to the other paths)."""
    if not present():
        return False
    try:
        w = pack_exact(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        got = mm(torch.tensor([[1.0, 1.0]]), w) if w is not None else None
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return got is not None and torch.equal(got, torch.tensor([[3.0, 7.0]]))
