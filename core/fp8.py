"""FP8 block formats of DeepSeek-V3 checkpoints: exact block dequantisation, the block quantiser used to write
test and default checkpoints, and the per-token, per-128-channel activation quantiser of the W8A8 numerics class.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.ops import FP8_BLOCK

E4M3_MAX = 448.0  # float8_e4m3fn; e4m3fnuz (AMD MI300) saturates at 240
ACT_SCALE_FLOOR = 1e-4


def scale_grid(rows: int, cols: int, block: int = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the weight_scale_inv tensor for a [rows, cols] weight: ceil division, edge blocks partial."""
    return (-(-rows // block), -(-cols // block))


def expand_scales(scale_inv: Tensor, rows: int, cols: int, block: int = FP8_BLOCK) -> Tensor:
    """[ceil(rows/128), ceil(cols/128)] block scales -> [rows, cols] per element (the edge blocks cropped)."""
    s = scale_inv.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return s[..., :rows, :cols]


def dequantize_blocks(weight: Tensor, scale_inv: Tensor | None, dtype: torch.dtype, block: int = FP8_BLOCK) -> Tensor:
    """`float(weight[i, j]) * scale_inv[i // 128, j // 128]`, computed in float32 (float64 when asked for float64)
    and rounded once to `dtype`. Works on [.., N, K] stacks. A weight without scales is just cast."""
    if scale_inv is None:
        return weight.to(dtype)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    rows, cols = weight.shape[-2:]
    if rows % block == 0 and cols % block == 0:  # one broadcast multiply over [.., gr, 128, gc, 128] views
        lead, (gr, gc) = weight.shape[:-2], scale_inv.shape[-2:]
        blocks = weight.to(ct).view(*lead, gr, block, gc, block) * scale_inv.to(ct)[..., :, None, :, None]
        return blocks.view(*lead, rows, cols).to(dtype)
    return (weight.to(ct) * expand_scales(scale_inv.to(ct), rows, cols, block)).to(dtype)


def quantize_blocks(weight: Tensor, block: int = FP8_BLOCK, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                    fp8_max: float = E4M3_MAX) -> tuple[Tensor, Tensor]:
    """Block-quantise a float weight [.., N, K] the way DeepSeek's checkpoints are made: per 128x128 block
    (zero-padded at the edges before the amax), scale = amax / fp8_max, codes = round-to-nearest-even(w / scale).
    Returns (codes [.., N, K] fp8, scale_inv [.., ceil(N/128), ceil(K/128)] float32)."""
    rows, cols = weight.shape[-2:]
    gr, gc = scale_grid(rows, cols, block)
    lead = weight.shape[:-2]
    padded = weight.new_zeros(*lead, gr * block, gc * block, dtype=torch.float32)
    padded[..., :rows, :cols] = weight.float()
    blocks = padded.view(*lead, gr, block, gc, block)
    amax = blocks.abs().amax(dim=(-3, -1))  # [.., gr, gc]
    scale = torch.where(amax > 0, amax / fp8_max, torch.ones_like(amax))
    q = (blocks / scale[..., :, None, :, None]).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return q.view(*lead, gr * block, gc * block)[..., :rows, :cols].contiguous(), scale.float()


def round_up_to_power_of_two(s: Tensor) -> Tensor:
    """UE8M0 scales (DeepSeek-V3.1's `scale_fmt: "ue8m0"`): each positive finite s rounded UP to the nearest power
    of two, 2^ceil(log2 s), exactly (s unchanged when it already is one). Computed from the exponent and mantissa
    (frexp), not from a float32 log2: float32 log2(2^k (1 + 2^-23)) rounds to k for |k| >= 2, which would round
    such an s DOWN (DeepSeek's Triton kernel computes exp2(ceil(log2 s)) in float32 and does so in that case).
    Same shape and dtype as s."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(s), exponent)


def quantize_activation(x: Tensor, block: int = FP8_BLOCK, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                        fp8_max: float = E4M3_MAX, ue8m0: bool = False) -> tuple[Tensor, Tensor]:
    """Per token, per 128 channels: s = max(amax, 1e-4) / fp8_max; q = (x / s) rounded to nearest even.
    With `ue8m0` (DeepSeek-V3.1) s is then rounded up to a power of two (`round_up_to_power_of_two`), as
    DeepSeek's act_quant does for `scale_fmt: "ue8m0"`: |x / s| stays <= fp8_max, and x / s is an exact scaling.

    x: [T, K] with K % 128 == 0 (true of every DeepSeek-V3 GEMM); a ragged last group is padded with zeros.
    Returns (q [T, K] fp8, s [T, ceil(K/128)] float32). Division, not multiplication by 1/s, as DeepSeek's kernel."""
    t, k = x.shape
    g = -(-k // block)
    xf = x.float()
    if g * block != k:
        xf = torch.nn.functional.pad(xf, (0, g * block - k))
    blocks = xf.view(t, g, block)
    s = blocks.abs().amax(dim=-1).clamp_min(ACT_SCALE_FLOOR) / fp8_max
    if ue8m0:
        s = round_up_to_power_of_two(s)
    q = (blocks / s[..., None]).to(fp8_dtype).view(t, g * block)[:, :k]
    return q, s
