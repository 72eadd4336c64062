"""Weight preparation for the cpu backend: every weight dequantised ONCE at load into the dtype its GEMM runs in.

FP8 weights (e4m3fn codes with 128x128 block scales) are dequantised to float32 exactly as cpu_ref's `linear`
does on every call (code times scale, one float32 rounding), so the numerics class `reference` holds bit for bit.
Float weights keep their dtype, except bfloat16 experts and absorbed kv_b halves on a CPU without a bf16 dot product,
which are widened to float32 (machine.weight_dtype): lossless, and faster there; `linear` keeps bfloat16 there too
and widens per call in cache-sized chunks (widen.py, tuning.yaml emulated_bf16_linear). Experts are stacked with gate and up fused, so one GEMM per
expert computes both. MLA decode's absorbed kv_b halves (prepare_mla) follow the same rule: on a CPU without a bf16
dot product torch's bfloat16 bmm is 20-80x slower than float32 (AVX2, 8 heads, 32 tokens: 86 ms against 1.2 ms)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from backends.cpu.machine import linear_keeps_bf16, native_bf16, weight_dtype
from core.fp8 import dequantize_blocks

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class CpuLinear:
    """weight: [N, K] contiguous, float32 / bfloat16 / float64. emulated_bf16: a bfloat16 weight kept as bfloat16 on
    a CPU without a bf16 dot product (ops/linear.py then multiplies one row by torch's GEMV, more rows through
    widen.py); otherwise the weight is what the GEMM multiplies, with no per-call cast."""

    weight: Tensor
    emulated_bf16: bool = False

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True)
class CpuExperts:
    """w13: [E, 2I, D] (gate rows first, then up); w2: [E, D, I]; both contiguous, in one GEMM dtype. w13_t, w2_t:
    per expert the transposed view each GEMM multiplies ([D, 2I] and [I, D], no copy), built once so that a call
    pays no per-expert select and transpose."""

    w13: Tensor
    w2: Tensor
    w13_t: tuple[Tensor, ...] = field(init=False, repr=False, compare=False)
    w2_t: tuple[Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "w13_t", tuple(w.t() for w in self.w13.unbind(0)))
        object.__setattr__(self, "w2_t", tuple(w.t() for w in self.w2.unbind(0)))

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w13.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w2.shape[2]


def _dense(weight: Tensor, scale_inv: Tensor | None) -> Tensor:
    """A checkpoint weight [..., N, K] (FP8 + scales [..., ceil(N/128), ceil(K/128)], or float) as a dense tensor."""
    if weight.dtype in FP8_DTYPES:
        if scale_inv is None:
            raise ValueError(f"cpu: an FP8 weight of shape {tuple(weight.shape)} came without its scale_inv")
        if weight.dim() == 2:
            return dequantize_blocks(weight, scale_inv, torch.float32)
        return torch.stack([dequantize_blocks(w, s, torch.float32) for w, s in zip(weight, scale_inv)])
    return weight.to(weight_dtype(weight.dtype))


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> CpuLinear:
    """weight [N, K] FP8 (+ scale_inv [ceil(N/128), ceil(K/128)] float32) or float -> CpuLinear, dequantised once.
    A bfloat16 weight stays bfloat16 where bf16 is native, and where it is emulated unless tuning.yaml's
    emulated_bf16_linear says float32."""
    if weight.dtype == torch.bfloat16 and (native_bf16() or linear_keeps_bf16()):
        return CpuLinear(weight.contiguous(), emulated_bf16=not native_bf16())
    return CpuLinear(_dense(weight, scale_inv).contiguous())


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> CpuExperts:
    """gate, up [E, I, D], down [E, D, I] (FP8 + scales [E, rows/128, cols/128], or float) -> CpuExperts."""
    g, u, d = _dense(gate, gate_scale), _dense(up, up_scale), _dense(down, down_scale)
    dtype = torch.promote_types(torch.promote_types(g.dtype, u.dtype), d.dtype)
    return CpuExperts(torch.cat((g, u), dim=1).to(dtype).contiguous(), d.to(dtype).contiguous())


def prepare_mla(w_uk: Tensor, w_uv: Tensor) -> tuple[Tensor, Tensor]:
    """w_uk [H, R, qk_nope], w_uv [H, v_head, R] in the working dtype -> the same, widened to float32 where bfloat16
    is not native here (machine.weight_dtype): lossless, and the graph's bmm then rounds once as before."""
    dtype = weight_dtype(w_uk.dtype)
    return w_uk.to(dtype).contiguous(), w_uv.to(dtype).contiguous()
