"""`npu_dynamic_quant` and `npu_quant_matmul` (torch_npu_ops.md §7.3, §7.4): the W8A8 int8 path of A2/A3."""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import HALF_DTYPES, dtype_name, not_emulated, reject, require

INT8_MAX = 127.0


def per_row_int8(xs: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8 of float32 rows: scale = amax/127 (0 for an all-zero row), y = round(x / scale)
    (half to even) clamped to [-128, 127]. Returns (y int8, scale float32 of shape x.shape[:-1])."""
    scale = xs.abs().amax(dim=-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xs / safe[..., None]).clamp(-128, 127).to(torch.int8)
    return y, scale


def npu_dynamic_quant(x: Tensor, *, smooth_scales: Tensor | None = None, group_index: Tensor | None = None,
                      dst_type: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Per-row (all leading dims) symmetric dynamic int8 quantisation.

    x: fp16/bf16, ndim >= 2. smooth_scales: (H,), or (G, H) with group_index int32 cumulative row ends (last = rows).
    Returns (y int8 x.shape, scale float32 x.shape[:-1]); an all-zero row gives scale 0 and y 0.
    """
    op = "npu_dynamic_quant"
    require(x.dtype in HALF_DTYPES, op, f"x dtype {dtype_name(x.dtype)} is not float16/bfloat16")
    require(x.dim() >= 2, op, f"x must have at least 2 dims, got {x.dim()}")
    if dst_type not in (None, torch.int8):
        if dst_type == torch.quint4x2:
            not_emulated(op, "int4 output (dst_type=torch.quint4x2)")
        reject(op, f"dst_type {dst_type} is not available on A2/A3 (int8 only; FP8 outputs are Ascend 950 only)")
    h = x.shape[-1]
    xs = x.float()
    if smooth_scales is not None:
        if group_index is None:
            require(tuple(smooth_scales.shape) == (h,), op, f"smooth_scales must be ({h},) without group_index")
            xs = xs * smooth_scales.float()
        else:
            require(group_index.dtype == torch.int32, op, "group_index must be int32")
            require(smooth_scales.dim() == 2 and smooth_scales.shape[1] == h, op, "smooth_scales must be (G, H)")
            ends = group_index.tolist()
            rows = xs.reshape(-1, h)
            require(len(ends) == smooth_scales.shape[0] and ends and ends[-1] == rows.shape[0]
                    and ends == sorted(ends), op, "group_index must hold G non-decreasing row ends, last = rows")
            group = torch.searchsorted(torch.tensor(ends), torch.arange(rows.shape[0]), right=True)
            xs = (rows * smooth_scales.float()[group]).view(xs.shape)
    elif group_index is not None:
        reject(op, "group_index needs smooth_scales")
    return per_row_int8(xs)


def _decode_scale(scale: Tensor) -> Tensor:
    """fp32/bf16 scales as they are; int64 scales from npu_trans_quant_param hold float32 bits in bits 0-31."""
    if scale.dtype == torch.int64:
        return (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return scale.float()


def npu_quant_matmul(x1: Tensor, x2: Tensor, scale: Tensor, *, offset: Tensor | None = None,
                     pertoken_scale: Tensor | None = None, bias: Tensor | None = None,
                     output_dtype: torch.dtype | None = None, group_sizes: list[int] | None = None) -> Tensor:
    """int8 x int8 -> exact int32 accumulation, then `acc * scale * pertoken_scale (+ bias)`.

    x1: (..., M, K) int8, 2-6 dims. x2: (K, N) int8 -- the weight TRANSPOSED relative to nn.Linear's (N, K).
    scale: (1,) or (N,) fp32/bf16 (or int64 from npu_trans_quant_param). pertoken_scale: (M,) fp32.
    bias: (N,) int32 (added to the accumulator) or bf16/fp16/fp32 (added after scaling).
    output_dtype: None -> int8 (saturated, + offset), or float16/bfloat16/int32. K and N <= 65535.
    """
    op = "npu_quant_matmul"
    if group_sizes is not None:
        not_emulated(op, "group_sizes (block-quantised FP8 on Ascend 950)")
    require(x1.dtype == torch.int8 and x2.dtype == torch.int8, op,
            f"x1/x2 must be int8 on A2/A3, got {dtype_name(x1.dtype)}/{dtype_name(x2.dtype)}")
    require(2 <= x1.dim() <= 6, op, f"x1 must have 2 to 6 dims, got {x1.dim()}")
    require(x2.dim() == 2, op, f"x2 must be 2-D (K, N), got {x2.dim()}-D")
    k, n = x2.shape
    require(x1.shape[-1] == k, op, f"x1's last dim {x1.shape[-1]} != x2's K {k} (x2 must be the transposed "
                                   f"weight, (K, N))")
    require(k <= 65535 and n <= 65535, op, f"K={k} and N={n} must be <= 65535")
    require(scale.dtype in (torch.float32, torch.bfloat16, torch.int64), op,
            f"scale dtype {dtype_name(scale.dtype)} is not float32/bfloat16/int64")
    require(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale must be (1,) or ({n},)")
    require(output_dtype in (None, torch.int8, torch.float16, torch.bfloat16, torch.int32), op,
            f"output_dtype {output_dtype} is not supported")
    m = x1.shape[-2]
    if pertoken_scale is not None:
        require(pertoken_scale.dtype == torch.float32, op, "pertoken_scale must be float32")
        require(pertoken_scale.numel() == x1[..., 0].numel() and pertoken_scale.shape[-1] == m, op,
                f"pertoken_scale must be ({m},) per row of x1")
    acc = torch.matmul(x1.to(torch.int64), x2.to(torch.int64))  # exact
    if bias is not None:
        require(tuple(bias.shape) == (n,), op, f"bias must be ({n},)")
        require(bias.dtype in (torch.int32, torch.bfloat16, torch.float16, torch.float32), op, "bad bias dtype")
        if bias.dtype == torch.int32:
            acc = acc + bias.to(torch.int64)
    if output_dtype == torch.int32:
        return acc.to(torch.int32)
    out = acc.float() * _decode_scale(scale)
    if pertoken_scale is not None:
        out = out * pertoken_scale.reshape(*x1.shape[:-1], 1)
    if bias is not None and bias.dtype != torch.int32:
        out = out + bias.float()
    if output_dtype in (None, torch.int8):
        if offset is not None:
            out = out + offset.float()
        return torch.round(out).clamp(-128, 127).to(torch.int8)
    return out.to(output_dtype)
