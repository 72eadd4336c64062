"""`npu_rotary_mul` (torch_npu_ops.md §4.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import FLOAT_DTYPES, dtype_name, require, strict_require

_MODES = ("half", "interleave")


def _allowed_cos_shapes(x: Tensor) -> dict[tuple[int, ...], int]:
    """cos/sin shapes the layouts accept for this input, each mapped to the size of its N axis.
    4-D BSND input: 1S1D, BS1D, BSND; 4-D BNSD input: 11SD, B1SD, BNSD; 3-D TND input: T1D."""
    if x.dim() == 3:
        t, n, d = x.shape
        return {(t, 1, d): n}
    b, a1, a2, d = x.shape
    bsnd = {(1, a1, 1, d): a2, (b, a1, 1, d): a2, (b, a1, a2, d): a2}
    bnsd = {(1, 1, a2, d): a1, (b, 1, a2, d): a1, (b, a1, a2, d): a1}
    return {**bnsd, **bsnd}


def npu_rotary_mul(input: Tensor, r1: Tensor, r2: Tensor, rotary_mode: str = "half",
                   rotate: Tensor | None = None) -> Tensor:
    """out = x * r1 + rot(x) * r2 in float32, cast to input.dtype.

    input: 3-D (TND) or 4-D (BSND/BNSD), fp16/bf16/fp32, D even and < 896, B and N < 1000.
    r1 = cos, r2 = sin: FULL-D tables (cat(c, c) for 'half'), in a broadcast shape the layout accepts.
    rotary_mode 'half': rot = cat(-x2, x1); 'interleave': rot pairs (x[2i], x[2i+1]) -> (-x[2i+1], x[2i]).
    rotate: optional (D, D) matrix, rot = x @ rotate.
    """
    op = "npu_rotary_mul"
    require(rotary_mode in _MODES, op, f"rotary_mode must be one of {_MODES}, got {rotary_mode!r}")
    require(input.dim() in (3, 4), op, f"input must be 3-D or 4-D, got {input.dim()}-D")
    require(input.dtype in FLOAT_DTYPES, op, f"input dtype {dtype_name(input.dtype)} is not supported")
    d = input.shape[-1]
    require(d % 2 == 0 and d < 896, op, f"the last dim D={d} must be even and < 896")
    require(r1.shape == r2.shape, op, f"r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} differ in shape")
    allowed = _allowed_cos_shapes(input)
    require(tuple(r1.shape) in allowed, op,
            f"cos/sin shape {tuple(r1.shape)} does not broadcast to input {tuple(input.shape)} in a supported layout "
            f"(expected one of {sorted(allowed)}; 'half' mode needs full-D tables, cat(cos, cos))")
    if input.dim() == 4:
        require(input.shape[0] < 1000 and allowed[tuple(r1.shape)] < 1000, op, "B and N must be < 1000")
    strict_require(r1.dtype == input.dtype and r2.dtype == input.dtype, op,
                   f"r1/r2 dtype ({dtype_name(r1.dtype)}) should equal input's ({dtype_name(input.dtype)})")
    x = input.float()
    if rotate is not None:
        require(tuple(rotate.shape) == (d, d), op, f"rotate must be ({d}, {d}), got {tuple(rotate.shape)}")
        rot = x @ rotate.float()
    elif rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rot = torch.cat((-x2, x1), dim=-1)
    else:
        rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return (x * r1.float() + rot * r2.float()).to(input.dtype)
