"""Load-time weight conversion for Ascend A2/A3, which have no FP8: FP8 block weights become bfloat16
(DeepSeek's fp8_cast_bf16 semantics), and optionally per-output-channel int8 for the W8A8 path."""

from __future__ import annotations

import torch
from torch import Tensor

from core.fp8 import dequantize_blocks

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
STORAGE_DTYPE = torch.bfloat16
INT8_MAX = 127.0


def is_fp8(weight: Tensor) -> bool:
    """True for FP8 checkpoint codes (which A2/A3 cannot compute with)."""
    return weight.dtype in FP8_DTYPES


def to_device_dtype(weight: Tensor, scale_inv: Tensor | None) -> Tensor:
    """[.., N, K] FP8 codes with [.., ceil(N/128), ceil(K/128)] block scales -> bfloat16, computed in float32 as
    `w * scale_inv[i // 128, j // 128]` and rounded once; float weights are kept in their dtype."""
    if scale_inv is None:
        if is_fp8(weight):
            raise ValueError("an FP8 weight needs its weight_scale_inv block scales")
        return weight
    return dequantize_blocks(weight, scale_inv, STORAGE_DTYPE)


def int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 of a [.., N, K] float weight (cann-recipes `int_weight_quant`):
    scale[n] = max_k |w[n, k]| / 127 (float32; 0 for an all-zero row), q = clamp(round(w / scale), -127, 127).
    Returns (q int8 [.., N, K], scale float32 [.., N])."""
    w = weight.float()
    scale = w.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale
