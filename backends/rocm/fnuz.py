"""e4m3fn -> e4m3fnuz re-encoding of FP8 weights for AMD MI300-class GPUs (gfx942), in plain torch (CPU-checkable).

e4m3fnuz has exponent bias 8 where e4m3fn has 7, so the same bit pattern is worth exactly half (subnormals too);
doubling the block scale keeps every weight's value. The one code that cannot be reinterpreted is 0x80: -0.0 in
e4m3fn but NaN in e4m3fnuz, so it becomes 0x00. (0x7F / 0xFF are NaN in e4m3fn and never appear in a checkpoint.)
deepseek_v3_semantics.md §7 and trap 17; vLLM/SGLang `normalize_e4m3fn_to_e4m3fnuz` do the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_ZERO_FN = -128  # 0x80 as int8


def e4m3fn_to_fnuz(weight: Tensor, scale_inv: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """weight: [..., N, K] float8_e4m3fn; scale_inv: its block scales (any shape) or None.
    Returns (new float8_e4m3fnuz codes with the same bits except 0x80 -> 0x00, scale_inv * 2 in float32), so
    that value_fnuz(codes) * (2 * scale) == value_fn(weight) * scale for every finite code."""
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"e4m3fn_to_fnuz: expected float8_e4m3fn codes, got {weight.dtype}")
    bits = weight.view(torch.int8)
    bits = torch.where(bits == NEG_ZERO_FN, torch.zeros_like(bits), bits)
    scale = None if scale_inv is None else scale_inv.to(torch.float32) * 2.0
    return bits.view(torch.float8_e4m3fnuz), scale
