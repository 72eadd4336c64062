"""Weight preparation for the cpu backend: every weight prepared ONCE at load into the form its GEMM runs on.

FP8 weights (e4m3fn codes with 128x128 block scales) are dequantised to float32 exactly as cpu_ref's `linear` does
on every call (code times scale, one float32 rounding), so the numerics class `reference` holds bit for bit. Float
weights that are exactly fp16 after a power-of-two shift (every bfloat16 weight) are held as fbgemm's packed fp16
where tuning.yaml's fp16_weight_gemm says so (fp16.py: same values, float32 GEMM, 2-4x faster than MKL's float32
GEMM on AVX2). Otherwise float weights keep their dtype, except bfloat16 experts and absorbed kv_b halves on a CPU
without a bf16 dot product, which are widened to float32 (machine.weight_dtype): lossless, and faster there;
`linear` keeps bfloat16 there too and widens per call in cache-sized chunks (widen.py, tuning.yaml
emulated_bf16_linear). FP8 weights stay FP8 where memory is short (tuning.yaml fp8_weights). Experts are stacked
with gate and up fused, so one GEMM per expert computes both. MLA decode's absorbed kv_b halves (prepare_mla) are
multiplied by the graph's own bmm, so they follow the dtype rule only: on a CPU without a bf16 dot product torch's
bfloat16 bmm is 20-80x slower than float32 (AVX2, 8 heads, 32 tokens: 86 ms against 1.2 ms)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from backends.cpu.fp16 import Fp16Weight, pack_exact
from backends.cpu.machine import fp8_dequantise, fp16_gemm, linear_keeps_bf16, native_bf16, weight_dtype
from core.fp8 import dequantize_blocks
from core.ops import ExpertWeights, LinearWeight

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class CpuLinear:
    """One of: fp8, an FP8 weight kept as codes and scales (dequantised per call by cpu_ref's code); fp16, the weight
    held as fbgemm's packed fp16 (exact, fp16.py); or weight [N, K] contiguous, float32 / bfloat16 / float64, with
    emulated_bf16 for a bfloat16 weight kept as bfloat16 on a CPU without a bf16 dot product (ops/linear.py then
    multiplies one row by torch's GEMV, more rows through widen.py); otherwise the weight is what the GEMM
    multiplies, with no per-call cast."""

    weight: Tensor | None
    emulated_bf16: bool = False
    fp16: Fp16Weight | None = None
    fp8: LinearWeight | None = None  # FP8 codes and block scales kept (tuning.yaml fp8_weights): cpu_ref's linear

    @property
    def shape(self) -> tuple[int, int]:
        if self.fp8 is not None:
            return tuple(self.fp8.weight.shape)
        return self.fp16.shape if self.fp16 is not None else tuple(self.weight.shape)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


@dataclass(frozen=True)
class CpuExperts:
    """One of: fp8, an FP8 layer kept as codes and scales (ops/moe_experts.py hands it to cpu_ref's loop); packed,
    per expert (gate+up [2I, D], down [D, I]) as fbgemm's packed fp16 (exact, fp16.py); or w13 [E, 2I, D] (gate
    rows first, then up) and w2 [E, D, I], contiguous, in one GEMM dtype, with w13_t, w2_t: per expert the
    transposed view each GEMM multiplies ([D, 2I] and [I, D], no copy), built once so that a call pays no
    per-expert select and transpose."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    w13: Tensor | None = None
    w2: Tensor | None = None
    packed: tuple[tuple[Fp16Weight, Fp16Weight], ...] | None = None
    fp8: ExpertWeights | None = None  # FP8 kept (tuning.yaml fp8_weights): cpu_ref's expert loop, per-call dequant
    w13_t: tuple[Tensor, ...] = field(init=False, repr=False, compare=False)
    w2_t: tuple[Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "w13_t", () if self.w13 is None else tuple(w.t() for w in self.w13.unbind(0)))
        object.__setattr__(self, "w2_t", () if self.w2 is None else tuple(w.t() for w in self.w2.unbind(0)))

    @property
    def gemm_dtype(self) -> torch.dtype:
        """What the GEMMs multiply: float32 activations for packed fp16 weights, else the weights' dtype."""
        return torch.float32 if self.w13 is None else self.w13.dtype


def _dense(weight: Tensor, scale_inv: Tensor | None) -> Tensor:
    """A checkpoint weight [..., N, K] (FP8 + scales [..., ceil(N/128), ceil(K/128)], or float) as a dense tensor."""
    if weight.dtype in FP8_DTYPES:
        if scale_inv is None:
            raise ValueError(f"cpu: an FP8 weight of shape {tuple(weight.shape)} came without its scale_inv")
        if weight.dim() == 2:
            return dequantize_blocks(weight, scale_inv, torch.float32)
        return torch.stack([dequantize_blocks(w, s, torch.float32) for w, s in zip(weight, scale_inv)])
    return weight.to(weight_dtype(weight.dtype))


def _packed(weight: Tensor) -> Fp16Weight | None:
    """weight as fbgemm's packed fp16 where the machine and tuning.yaml say so and it is exact; else None."""
    if weight.dtype not in (torch.bfloat16, torch.float32) or weight.dim() != 2 or not fp16_gemm():
        return None
    return pack_exact(weight)


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> CpuLinear:
    """weight [N, K] FP8 (+ scale_inv [ceil(N/128), ceil(K/128)] float32) or float -> CpuLinear, dequantised once.
    FP8 is kept as FP8 where tuning.yaml's fp8_weights says so (or memory does, "auto"). Packed fp16 where exact and
    enabled (FP8 dequantised is tried too: exact when its scales are powers of two); a bfloat16 weight otherwise
    stays bfloat16 where bf16 is native, and where it is emulated unless tuning.yaml's emulated_bf16_linear says
    float32."""
    if weight.dtype in FP8_DTYPES:
        if scale_inv is not None and not fp8_dequantise(4 * weight.numel()):
            return CpuLinear(None, fp8=LinearWeight(weight, scale_inv))
        dense = _dense(weight, scale_inv)
        packed = _packed(dense)
        return CpuLinear(None, fp16=packed) if packed is not None else CpuLinear(dense.contiguous())
    packed = _packed(weight)
    if packed is not None:
        return CpuLinear(None, fp16=packed)
    if weight.dtype == torch.bfloat16 and (native_bf16() or linear_keeps_bf16()):
        return CpuLinear(weight.contiguous(), emulated_bf16=not native_bf16())
    return CpuLinear(_dense(weight, scale_inv).contiguous())


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> CpuExperts:
    """gate, up [E, I, D], down [E, D, I] (FP8 + scales [E, rows/128, cols/128], or float) -> CpuExperts: packed
    fp16 when every expert's weights are exact (and enabled), FP8 kept where fp8_weights says so (or memory does),
    else stacked dense tensors."""
    if gate.dtype in FP8_DTYPES and gate_scale is not None and up_scale is not None and down_scale is not None \
            and not fp8_dequantise(4 * (gate.numel() + up.numel() + down.numel())):
        return CpuExperts(gate.shape[0], gate.shape[2], down.shape[2],
                          fp8=ExpertWeights(gate, up, down, gate_scale, up_scale, down_scale))
    g, u, d = _dense(gate, gate_scale), _dense(up, up_scale), _dense(down, down_scale)
    dtype = torch.promote_types(torch.promote_types(g.dtype, u.dtype), d.dtype)
    w13, w2 = torch.cat((g, u), dim=1).to(dtype).contiguous(), d.to(dtype).contiguous()
    dims = (w13.shape[0], w13.shape[2], w2.shape[2])
    packed = []
    for a, b in zip(w13, w2):
        pa, pb = _packed(a), _packed(b)
        if pa is None or pb is None:
            break
        packed.append((pa, pb))
    else:
        return CpuExperts(*dims, packed=tuple(packed))
    return CpuExperts(*dims, w13=w13, w2=w2)


def prepare_mla(w_uk: Tensor, w_uv: Tensor) -> tuple[Tensor, Tensor]:
    """w_uk [H, R, qk_nope], w_uv [H, v_head, R] in the working dtype -> the same, widened to float32 where bfloat16
    is not native here (machine.weight_dtype): lossless, and the graph's bmm then rounds once as before."""
    dtype = weight_dtype(w_uk.dtype)
    return w_uk.to(dtype).contiguous(), w_uv.to(dtype).contiguous()
