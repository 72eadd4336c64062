"""`npu_rms_norm` and `npu_add_rms_norm` (torch_npu_ops.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import FLOAT_DTYPES, dtype_name, require

_RMS_DTYPE_PAIRS = {
    (torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
}


def _rms(xf: Tensor, gamma: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
    """float32 x -> (x * rstd * gamma in float32, rstd keepdim over gamma's dims)."""
    red = tuple(range(-gamma.dim(), 0))
    rstd = torch.rsqrt(xf.pow(2).mean(red, keepdim=True) + epsilon)
    return xf * rstd * gamma.float(), rstd


def _check_gamma(op: str, x: Tensor, gamma: Tensor) -> None:
    require(gamma.dim() >= 1 and tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim():]), op,
            f"gamma {tuple(gamma.shape)} must equal the trailing dims of x {tuple(x.shape)}")


def npu_rms_norm(self: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor]:
    """y = x * rsqrt(mean(x^2) + eps) * gamma over gamma's dims, in float32, y cast to x.dtype.

    self: 2-8 dims, ND, non-contiguous and empty allowed. gamma: x's trailing dims. Dtype pairs (x, gamma) on A2/A3:
    (fp16|bf16, fp32), (fp16, fp16), (bf16, bf16), (fp32, fp32).
    Returns (y: x.shape, x.dtype; rstd: float32, x.shape[:-g] + (1,)*g).
    """
    op = "npu_rms_norm"
    require(2 <= self.dim() <= 8, op, f"x must have 2 to 8 dims, got {self.dim()}")
    require((self.dtype, gamma.dtype) in _RMS_DTYPE_PAIRS, op,
            f"unsupported (x, gamma) dtypes ({dtype_name(self.dtype)}, {dtype_name(gamma.dtype)})")
    _check_gamma(op, self, gamma)
    y, rstd = _rms(self.float(), gamma, epsilon)
    return y.to(self.dtype), rstd


def npu_add_rms_norm(x1: Tensor, x2: Tensor, gamma: Tensor, epsilon: float = 1e-06) -> tuple[Tensor, Tensor, Tensor]:
    """s = x1 + x2 in float32; returns (rms_norm(s) cast to x1.dtype, rstd float32, s cast to x1.dtype).

    The output order is (normed, rstd, sum). The float32 sum is normalised, not the rounded one. x1, x2: same shape
    and dtype (fp32/fp16/bf16), non-empty; gamma has x1's dtype and equals its trailing dims.
    """
    op = "npu_add_rms_norm"
    require(x1.dtype in FLOAT_DTYPES, op, f"x1 dtype {dtype_name(x1.dtype)} is not float32/float16/bfloat16")
    require(x2.dtype == x1.dtype, op, f"x2 dtype {dtype_name(x2.dtype)} differs from x1 {dtype_name(x1.dtype)}")
    require(x1.shape == x2.shape, op, f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)} differ in shape")
    require(x1.numel() > 0, op, "empty tensors are not supported")
    require(gamma.dtype == x1.dtype, op, f"gamma dtype {dtype_name(gamma.dtype)} must equal x1's "
                                         f"{dtype_name(x1.dtype)}")
    _check_gamma(op, x1, gamma)
    s = x1.float() + x2.float()
    y, rstd = _rms(s, gamma, epsilon)
    return y.to(x1.dtype), rstd, s.to(x1.dtype)
