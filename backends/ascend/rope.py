"""apply_rope through npu_rotary_mul in 'half' mode (the contract's layout: pair i is (x[i], x[i + P/2]))."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.ascend.runtime import torch_npu


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, ..., P] (e.g. [T, H, P] query slices, [T, 1, P] the shared rope key), cos/sin [T, P/2] float32.

    Called the way vllm-ascend calls it: x viewed as BSND (1, T, N, P) with B = 1 (the op wants B and N < 1000, and
    T can be large), cos/sin expanded to the FULL width P as cat(c, c) -- 'half' mode rotates with
    out = x * cos_full + cat(-x2, x1) * sin_full -- shaped 1S1D (1, T, 1, P) in x's dtype."""
    tokens, p = x.shape[0], x.shape[-1]
    if tokens == 0:
        return x.clone()
    x4 = x.reshape(1, tokens, -1, p).contiguous()
    cos_full = torch.cat((cos, cos), dim=-1).to(x.dtype).view(1, tokens, 1, p)
    sin_full = torch.cat((sin, sin), dim=-1).to(x.dtype).view(1, tokens, 1, p)
    return torch_npu.npu_rotary_mul(x4, cos_full, sin_full, rotary_mode="half").view(x.shape)
