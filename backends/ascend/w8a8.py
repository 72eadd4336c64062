"""The optional W8A8 int8 path of Ascend A2/A3 (numerics class `w8a8_int8`; see backends/cpu_ref/linear_int8.py for its meaning):
FP8 weights dequantised to bfloat16 at load and requantised per output channel to int8 (cann-recipes
`int_weight_quant`), activations quantised per token at run time with npu_dynamic_quant, GEMMs in npu_quant_matmul
(dense) and int8 npu_grouped_matmul (experts). Float weights (router, lm_head, eh_proj) stay unquantised."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from backends.ascend.experts import AscendExperts, combine, grouped, moe_experts, prepare_experts, route
from backends.ascend.linear import AscendLinear, linear, prepare_linear
from backends.ascend.runtime import torch_npu
from backends.ascend.weights import int8_per_channel, to_device_dtype

QUANT_MATMUL_MAX = 65535  # npu_quant_matmul: K and N <= 65535
HALF = (torch.float16, torch.bfloat16)


def sixteen_bit(dtype: torch.dtype) -> torch.dtype:
    """npu_dynamic_quant takes fp16/bf16: float32 activations are rounded to bfloat16 before quantisation."""
    return dtype if dtype in HALF else torch.bfloat16


@dataclass(frozen=True)
class Int8Linear:
    """weight_t: [K, N] int8 -- transposed, as npu_quant_matmul's x2 wants; scale: [N] float32 per output channel."""

    weight_t: Tensor
    scale: Tensor

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]


@dataclass(frozen=True)
class Int8Experts:
    """w13: [E, D, 2I] int8 ([gate | up] transposed), w13_scale: [E, 2I]; w2: [E, I, D] int8, w2_scale: [E, D]."""

    w13: Tensor
    w13_scale: Tensor
    w2: Tensor
    w2_scale: Tensor

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]


def prepare_linear_w8a8(weight: Tensor, scale_inv: Tensor | None) -> AscendLinear | Int8Linear:
    """FP8 [N, K] -> bf16 -> int8 per output channel, stored [K, N]; float weights -> AscendLinear."""
    if scale_inv is None:
        return prepare_linear(weight, None)
    if weight.shape[1] > QUANT_MATMUL_MAX:
        raise ValueError(f"npu_quant_matmul takes K <= {QUANT_MATMUL_MAX}; this weight has K = {weight.shape[1]}")
    codes, scale = int8_per_channel(to_device_dtype(weight, scale_inv))
    return Int8Linear(codes.t().contiguous(), scale)


def linear_w8a8(x: Tensor, w: AscendLinear | Int8Linear) -> Tensor:
    """x [T, K] -> [T, N] in x.dtype: per-token int8 x (npu_dynamic_quant) times the int8 weight
    (npu_quant_matmul, int32 accumulation, scaled per channel and per token, output in the 16-bit dtype).
    N above 65535 is split into column blocks."""
    if isinstance(w, AscendLinear):
        return linear(x, w)
    n = w.out_features
    if x.shape[0] == 0:
        return x.new_zeros(0, n)
    half = sixteen_bit(x.dtype)
    x_q, x_scale = torch_npu.npu_dynamic_quant(x.to(half).contiguous())
    parts = [torch_npu.npu_quant_matmul(x_q, w.weight_t[:, c:c + QUANT_MATMUL_MAX],
                                        w.scale[c:c + QUANT_MATMUL_MAX], pertoken_scale=x_scale, output_dtype=half)
             for c in range(0, n, QUANT_MATMUL_MAX)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


def prepare_experts_w8a8(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                         down_scale: Tensor | None) -> AscendExperts | Int8Experts:
    """FP8 experts -> bf16 -> int8 per output channel in grouped_matmul's [E, K, N] layout; float experts stay
    unquantised (AscendExperts)."""
    if gate_scale is None:
        return prepare_experts(gate, gate_scale, up, up_scale, down, down_scale)
    gate_up = torch.cat((to_device_dtype(gate, gate_scale), to_device_dtype(up, up_scale)), dim=1)  # [E, 2I, D]
    c13, s13 = int8_per_channel(gate_up)
    c2, s2 = int8_per_channel(to_device_dtype(down, down_scale))  # [E, D, I] -> scales [E, D]
    return Int8Experts(c13.transpose(1, 2).contiguous(), s13, c2.transpose(1, 2).contiguous(), s2)


def moe_experts_w8a8(x: Tensor, experts: AscendExperts | Int8Experts, weights: Tensor, ids: Tensor) -> Tensor:
    """As moe_experts, with both grouped GEMMs in int8: rows quantised per token after routing and after SwiGLU."""
    if isinstance(experts, AscendExperts):
        return moe_experts(x, experts, weights, ids)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    half = sixteen_bit(x.dtype)
    expanded_x, row_idx, counts = route(x.to(half), ids, experts.num_experts)
    x_q, x_scale = torch_npu.npu_dynamic_quant(expanded_x)
    gate_up = grouped(x_q, experts.w13, counts, scale=[experts.w13_scale], per_token_scale=[x_scale],
                      output_dtype=half)
    h = torch_npu.npu_swiglu(gate_up, dim=-1)
    h_q, h_scale = torch_npu.npu_dynamic_quant(h)
    out = grouped(h_q, experts.w2, counts, scale=[experts.w2_scale], per_token_scale=[h_scale], output_dtype=half)
    return combine(out, weights, ids, row_idx).to(x.dtype)
