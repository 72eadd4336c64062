"""Host-side helpers shared by the kernel wrappers: launch options, dtype mapping, FP8 formats, config buckets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import triton.language as tl

LAUNCH_KNOBS = ("num_warps", "num_stages", "waves_per_eu", "matrix_instr_nonkdim", "kpack")
"""Config keys passed to a kernel launch as compile options (the AMD ones only appear in the rocm tables)."""

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float8_e4m3fn: tl.float8e4nv,
    torch.float8_e4m3fnuz: tl.float8e4b8,
}


@dataclass(frozen=True)
class Fp8Format:
    """An e4m3 flavour: its largest finite value and exponent bias (the smallest normal binade is 2^(1 - bias))."""

    dtype: torch.dtype
    max: float
    exponent_bias: int


FP8_FORMATS = {
    torch.float8_e4m3fn: Fp8Format(torch.float8_e4m3fn, 448.0, 7),  # OCP: NVIDIA, MI350
    torch.float8_e4m3fnuz: Fp8Format(torch.float8_e4m3fnuz, 240.0, 8),  # AMD MI300
}


def launch_options(cfg: Mapping[str, Any], **defaults: int) -> dict[str, Any]:
    """The compile/launch options of a kernel call: `defaults` overridden by the knobs present in `cfg`."""
    opts = dict(defaults)
    opts.update({k: cfg[k] for k in LAUNCH_KNOBS if k in cfg})
    return opts


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def pick_bucket(buckets: list[Mapping[str, Any]] | Mapping[str, Any] | None, size: int,
                key: str = "max_m") -> dict[str, Any]:
    """The first config of `buckets` whose `key` bound admits `size` (a bucket without the key admits all)."""
    if buckets is None:
        return {}
    if isinstance(buckets, Mapping):
        return dict(buckets)
    for bucket in buckets:
        bound = bucket.get(key)
        if bound is None or size <= int(bound):
            return dict(bucket)
    return dict(buckets[-1]) if buckets else {}


@dataclass(frozen=True)
class DotPlan:
    """How a GEMM multiplies its operand tiles: `dtype` they are converted to for tl.dot, `ieee` for IEEE float32
    products (never TF32), and `fp8_bias` != 0 when FP8 operands are passed as raw uint8 bits and decoded in
    registers (quant.fp8_bits_to_fp16, exponent bias 7 for e4m3fn, 8 for e4m3fnuz)."""

    dtype: Any
    ieee: bool
    fp8_bias: int = 0

    def operand(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor to pass to the kernel: the raw bits of FP8 operands that are decoded in registers."""
        return t.view(torch.uint8) if self.fp8_bias else t


def dot_plan(a: torch.dtype, b: torch.dtype, cfg: Mapping[str, Any]) -> DotPlan:
    """How to multiply operands stored as `a` and `b`.

    FP8 operands (both of one flavour) are multiplied as FP8 on a GPU with FP8 matrix units (`fp8_dot: native`).
    Otherwise (`fp8_dot: upcast`: Ampere, MI200) their bits are decoded to float16 in registers by integer shifts,
    exact for every e4m3 value and independent of the compiler's FP8 support, and multiplied in float16 with
    float32 accumulation: the same W8A8 arithmetic. Float operands are multiplied as stored when both are 16-bit of
    one kind, else in IEEE float32.
    `dot_fp32: true` multiplies every operand kind in IEEE float32 (exact conversions and products, float32
    accumulation: same numerics); the interpreter tables set it, because the Triton 3.9 interpreter's tl.dot
    multiplies bfloat16 operands as raw 16-bit integers and float16 ones with numpy's slow non-BLAS loop.
    """
    fp8 = a in FP8_FORMATS or b in FP8_FORMATS
    if fp8 and a != b:
        raise TypeError(f"FP8 GEMM operands of different formats: {a} and {b}")
    if fp8:
        bias = FP8_FORMATS[a].exponent_bias
        if cfg.get("dot_fp32", False):
            return DotPlan(tl.float32, True, bias)
        if cfg.get("fp8_dot", "native") == "upcast":
            return DotPlan(tl.float16, False, bias)
        return DotPlan(TL_DTYPES[a], False)
    if cfg.get("dot_fp32", False) or a != b or a not in (torch.bfloat16, torch.float16):
        return DotPlan(tl.float32, True)
    return DotPlan(TL_DTYPES[a], False)
