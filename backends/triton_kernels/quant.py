"""Per-token, per-128-channel FP8 activation quantisation: the A side of W8A8 (deepseek_v3_semantics.md §7).

    s = max(amax(|x[t, 128g : 128g+128]|), 1e-4) / fp8_max        (float32, IEEE division)
    s = 2^ceil(log2 s)                                               (UE8M0 only: DeepSeek-V3.1's scale_fmt)
    q = round_to_nearest_even(x / s)  as e4m3fn (max 448) or e4m3fnuz (max 240)

The UE8M0 rounding is done on the bits (`round_scale_up_to_power_of_two`), exactly as core.fp8 defines it.

Rounding is done explicitly on the float32 value (`round_to_fp8_grid`) and the code is assembled from its bits
(`fp8_grid_to_bits`), so no FP8 conversion instruction is involved: the kernel is bit-faithful on every target,
including GPUs whose compiler lacks e4m3 conversions (Ampere, MI200) and the Triton interpreter, whose own
fp32 -> fp8 conversion mis-rounds (7.85 -> 4.0) and flushes subnormals. `fp8_bits_to_fp16` is the exact inverse
used by GEMMs that multiply FP8 operands in float16.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_kernels.common import FP8_FORMATS, launch_options

GROUP = 128  # DeepSeek-V3 quantisation group (activations) and weight block edge


@triton.jit
def round_to_fp8_grid(v, FP8_MAX: tl.constexpr, EXP_BIAS: tl.constexpr):
    """float32 -> the nearest e4m3 value (ties to even), still as float32, saturated to +-FP8_MAX.

    An e4m3 number in the binade [2^e, 2^(e+1)) is a multiple of 2^(e-3); subnormals share the spacing of the
    smallest normal binade (e = 1 - EXP_BIAS: -6 for e4m3fn, -7 for e4m3fnuz). Scaling by powers of two is exact,
    and adding then subtracting 2^23 rounds a float32 in [0, 2^22) to an integer, ties to even.
    """
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 1 - EXP_BIAS)
    to_units = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3-e)
    unit = ((127 - 3 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e-3)
    r = a * to_units
    r = (r + 8388608.0) - 8388608.0
    r = tl.minimum(r * unit, FP8_MAX)
    return tl.where(v < 0, -r, r)


@triton.jit
def fp8_grid_to_bits(v, EXP_BIAS: tl.constexpr):
    """float32 values on the e4m3 grid (round_to_fp8_grid's output) -> their 8-bit codes as uint8, exactly.

    With e the binade (clamped to the smallest normal one) and r = |v| / 2^(e-3) (an integer: 8..15 for normals,
    0..7 for subnormals), the code is ((e + bias) << 3) + r - 8, plus the sign bit. Zero has code 0 (never 0x80,
    which e4m3fnuz reads as NaN)."""
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, 1 - EXP_BIAS)
    r = (a * ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)).to(tl.int32)
    code = ((e + EXP_BIAS) << 3) + r - 8
    return tl.where(v < 0, code | 0x80, code).to(tl.uint8)


@triton.jit
def fp8_bits_to_fp16(bits, EXP_BIAS: tl.constexpr):
    """uint8 e4m3 codes -> their values as float16, exactly: the 7 exponent-mantissa bits are shifted into float16's
    layout (which reads them with bias 15) and the result is rescaled by 2^(15 - bias). Subnormals map to float16
    subnormals the same way."""
    b = bits.to(tl.uint16)
    x = (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.float16, bitcast=True)
    if EXP_BIAS == 7:
        return x * 256.0  # e4m3fn
    return x * 128.0  # e4m3fnuz


@triton.jit
def dot_operand(x, DOT_DTYPE: tl.constexpr, FP8_BIAS: tl.constexpr):
    """A loaded GEMM tile as tl.dot takes it: FP8 bits decoded to float16 first when FP8_BIAS != 0."""
    if FP8_BIAS:
        x = fp8_bits_to_fp16(x, FP8_BIAS)
    return x.to(DOT_DTYPE)


@triton.jit
def round_scale_up_to_power_of_two(s):
    """Positive normal float32 scales -> 2^ceil(log2 s), exactly: adding 2^23 - 1 to the bits carries into the
    exponent unless the mantissa is already zero; masking the mantissa then leaves the power of two."""
    bits = s.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)


@triton.jit
def quantize_tile(x, FP8_MAX: tl.constexpr, EXP_BIAS: tl.constexpr, UE8M0: tl.constexpr = False):
    """A [ROWS, 128] float32 tile (masked entries 0) -> (uint8 e4m3 codes, float32 scales [ROWS]); UE8M0: scales
    rounded up to powers of two."""
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.div_rn(tl.maximum(amax, 1e-4), tl.full(amax.shape, FP8_MAX, tl.float32))
    if UE8M0:
        s = round_scale_up_to_power_of_two(s)
    q = round_to_fp8_grid(tl.div_rn(x, s[:, None]), FP8_MAX, EXP_BIAS)
    return fp8_grid_to_bits(q, EXP_BIAS), s


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_qm, stride_sm,
    FP8_MAX: tl.constexpr, EXP_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_K: tl.constexpr,
    UE8M0: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(K, 128)): one 128-channel group of BLOCK_M rows per program; q_ptr: uint8."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * GROUP_K + tl.arange(0, GROUP_K)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < K)
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, s = quantize_tile(x, FP8_MAX, EXP_BIAS, UE8M0)
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=mask)
    tl.store(s_ptr + rows64 * stride_sm + group, s, mask=row_ok)


def quantize_activation(x: Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                        cfg: Mapping[str, Any] | None = None, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Quantise activations per token per 128 channels (core.fp8.quantize_activation, on the device).

    x: [M, K] float32/bfloat16/float16, any row stride (unit stride along K is made if missing).
    fp8_dtype: torch.float8_e4m3fn (max 448) or torch.float8_e4m3fnuz (max 240).
    cfg: BLOCK_M (rows per program), num_warps. ue8m0: scales rounded up to powers of two. Returns (q [M, K] fp8_dtype, s [M, ceil(K/128)] float32), new
    contiguous tensors; a ragged last group is quantised over its real channels only.
    """
    cfg = cfg or {}
    fmt = FP8_FORMATS[fp8_dtype]
    m, k = x.shape
    groups = triton.cdiv(k, GROUP)
    q = torch.empty(m, k, dtype=fp8_dtype, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, s
    if x.stride(1) != 1:
        x = x.contiguous()
    block_m = int(cfg.get("BLOCK_M", 16))
    _act_quant_kernel[(triton.cdiv(m, block_m), groups)](
        x, q.view(torch.uint8), s, m, k, x.stride(0), q.stride(0), s.stride(0),
        FP8_MAX=fmt.max, EXP_BIAS=fmt.exponent_bias, BLOCK_M=block_m, GROUP_K=GROUP, UE8M0=bool(ue8m0),
        **launch_options(cfg, num_warps=4, num_stages=1),
    )
    return q, s
