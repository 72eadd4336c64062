"""cpu: `linear` (contract: core/ops.py; specification: backends/cpu_ref) on torch's oneDNN GEMM."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu import fp16
from backends.cpu.weights import CpuLinear
from backends.cpu.widen import mm_widened
from backends.cpu_ref import OPS as REFERENCE


def linear(x: Tensor, w: CpuLinear) -> Tensor:
    """`x @ W.T`: x [T, K] working dtype (any strides), w as prepared (weights.py). Returns [T, N] in x.dtype.

    FP8 kept (w.fp8, tuning.yaml fp8_weights): cpu_ref's linear, which dequantises per call to the same float32
    values the load-time dequantisation gives. Packed fp16 weight (w.fp16, exact: fp16.py): x widened to float32,
    fbgemm's GEMM (float32 products and sums), the output unscaled exactly and rounded once. Same dtype: one oneDNN
    GEMM (float32 accumulation, bfloat16 output rounded once). A bfloat16 weight kept where bf16 is emulated
    (w.emulated_bf16): one bfloat16 row runs torch's bfloat16 GEMV (float32 accumulation, one rounding), reading half
    the bytes of float32 weights; more rows, or float32 rows, multiply the weight widened in cache-sized chunks
    (widen.py) in float32 and round once, exactly cpu_ref's numerics. Weight wider than x (float32 weights of a
    bfloat16 model): x is widened, the GEMM runs in float32 and the output is rounded once. Weight narrower than x
    otherwise: the weight is widened for that call."""
    if w.fp8 is not None:  # FP8 kept (memory): dequantised block-wise per call, as cpu_ref does
        return REFERENCE["linear"](x, w.fp8)
    if w.fp16 is not None and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        y = fp16.mm(x if x.dtype == torch.float32 else x.float(), w.fp16)
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    weight = w.weight
    if weight is None:  # packed fp16 and x of a dtype the manifest does not declare (float64)
        raise ValueError(f"cpu linear: a packed fp16 weight takes float32/bfloat16/float16 inputs, not {x.dtype}")
    if w.emulated_bf16 and x.dtype in (torch.bfloat16, torch.float32):
        if x.dtype == torch.bfloat16 and x.shape[0] == 1:
            return torch.nn.functional.linear(x, weight)
        return mm_widened(x.float(), weight).to(x.dtype)
    if x.dtype == weight.dtype:
        return torch.nn.functional.linear(x, weight)
    ct = torch.promote_types(x.dtype, weight.dtype)
    return torch.nn.functional.linear(x.to(ct), weight.to(ct)).to(x.dtype)
