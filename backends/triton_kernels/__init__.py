"""The operator contract in Triton, written once for every Triton backend (backends/cuda, backends/rocm).

This package is not a backend (it has no manifest.yaml): a backend binds these functions to its own tuning table
(`operator_table`) and adds its probe and weight-format quirks. Every operator takes the contract's positional
arguments (core.ops) plus an optional keyword `cfg`, a mapping of block sizes, warps, stages and vendor knobs.

Importing this package does not import triton. Each function below imports its kernel module on first call, so a
backend's probe can set TRITON_INTERPRET=1 (the Triton interpreter on the CPU) before triton is imported: triton
reads that variable when a function is decorated with @triton.jit, its own standard library (tl.sum, tl.max, ...)
included, so it must be set before the first `import triton` of the process (runtime.py).

    module          operators
    norm            rms_norm, add_rms_norm
    rope            apply_rope
    activation      silu_and_mul
    quant           per-token-per-128 FP8 activation quantisation (W8A8's A side)
    gemm            float and block-scaled FP8 GEMM (split-K), used by linear
    linear_layer    linear, prepare_linear
    router          moe_gate (noaux_tc / V2 grouped top-k, sigmoid or softmax)
    moe_align       expert sort + BLOCK_M padding (torch, sync-free)
    moe             moe_experts, prepare_experts (fused gate_up+SiLU(+quant), down, fp32 combine)
    attention       attention_prefill, mla_decode

No module is named after an operator: importing a submodule binds its name on this package, which would shadow
the lazy function of the same name.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any, Callable

from torch import Tensor

Cfg = Mapping[str, Any] | None

def rms_norm(x: Tensor, weight: Tensor, eps: float, cfg: Cfg = None) -> Tensor:
    """core.ops.rms_norm: x [..., D], weight [D] -> [..., D] in x.dtype (norm.py)."""
    from backends.triton_kernels.norm import rms_norm as impl

    return impl(x, weight, eps, cfg=cfg)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float, cfg: Cfg = None) -> tuple[Tensor, Tensor]:
    """core.ops.add_rms_norm: x, residual [..., D] -> (normed, h) in x.dtype (norm.py)."""
    from backends.triton_kernels.norm import add_rms_norm as impl

    return impl(x, residual, weight, eps, cfg=cfg)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, cfg: Cfg = None) -> Tensor:
    """core.ops.apply_rope: x [T, ..., P], cos/sin [T, P/2] float32 -> x's shape and dtype (rope.py)."""
    from backends.triton_kernels.rope import apply_rope as impl

    return impl(x, cos, sin, cfg=cfg)


def silu_and_mul(x: Tensor, cfg: Cfg = None) -> Tensor:
    """core.ops.silu_and_mul: x [T, 2I] -> [T, I] in x.dtype (activation.py)."""
    from backends.triton_kernels.activation import silu_and_mul as impl

    return impl(x, cfg=cfg)


def linear(x: Tensor, w: object, cfg: Cfg = None) -> Tensor:
    """core.ops.linear: x [T, K], w from prepare_linear -> [T, N] in x.dtype; W8A8 for FP8 weights (linear_layer.py)."""
    from backends.triton_kernels.linear_layer import linear as impl

    return impl(x, w, cfg=cfg)


def linear_ue8m0(x: Tensor, w: object, cfg: Cfg = None) -> Tensor:
    """linear with UE8M0 (power-of-two) activation scales: DeepSeek-V3.1's scale_fmt "ue8m0" (linear_layer.py)."""
    from backends.triton_kernels.linear_layer import linear as impl

    return impl(x, w, cfg=cfg, ue8m0=True)


def moe_gate(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
             renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum",
             cfg: Cfg = None) -> tuple[Tensor, Tensor]:
    """core.ops.moe_gate: logits [T, E] float32 -> (weights [T, k] float32, ids [T, k] int64); sigmoid or softmax
    scoring, top2_sum or max group scores (router.py)."""
    from backends.triton_kernels.router import moe_gate as impl

    return impl(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score, cfg=cfg)


def moe_experts(x: Tensor, experts: object, weights: Tensor, ids: Tensor, cfg: Cfg = None) -> Tensor:
    """core.ops.moe_experts: x [T, D], experts from prepare_experts, weights/ids [T, k] -> [T, D] (moe.py)."""
    from backends.triton_kernels.moe import moe_experts as impl

    return impl(x, experts, weights, ids, cfg=cfg)


def moe_experts_ue8m0(x: Tensor, experts: object, weights: Tensor, ids: Tensor, cfg: Cfg = None) -> Tensor:
    """moe_experts with UE8M0 (power-of-two) activation scales: DeepSeek-V3.1's scale_fmt "ue8m0" (moe.py)."""
    from backends.triton_kernels.moe import moe_experts as impl

    return impl(x, experts, weights, ids, cfg=cfg, ue8m0=True)


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
                      cfg: Cfg = None) -> Tensor:
    """core.ops.attention_prefill: q, k [T, H, Dqk], v [T, H, Dv] varlen causal -> [Tq, H, Dv] (attention.py)."""
    from backends.triton_kernels.attention import attention_prefill as impl

    return impl(q, k, v, cu_q, cu_k, scale, cfg=dict(cfg or {}))


def mla_decode(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor, scale: float,
               cfg: Cfg = None) -> Tensor:
    """core.ops.mla_decode (v2): q_lat [B, S, H, R], q_pe [B, S, H, P], paged cache [num_blocks, block_size, R+P],
    block_table [B, max_blocks] int32, lens [B] -> [B, S, H, R] (attention.py)."""
    from backends.triton_kernels.attention import mla_decode as impl

    return impl(q_lat, q_pe, cache, block_table, lens, scale, cfg=dict(cfg or {}))


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> object:
    """core.ops.prepare_linear: [N, K] weight (+ block scales) -> linear_layer.PreparedLinear."""
    from backends.triton_kernels.linear_layer import prepare_linear as impl

    return impl(weight, scale_inv)


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> object:
    """core.ops.prepare_experts: stacked [E, I, D] / [E, D, I] experts (+ scales) -> moe.PreparedExperts."""
    from backends.triton_kernels.moe import prepare_experts as impl

    return impl(gate, gate_scale, up, up_scale, down, down_scale)


OPERATORS: dict[str, Callable] = {f.__name__: f for f in (rms_norm, add_rms_norm, apply_rope, linear, silu_and_mul,
                                                          attention_prefill, mla_decode, moe_gate, moe_experts)}


SCALE_FMT_OPERATORS: dict[str, dict[str, Callable]] = {"ue8m0": {"linear": linear_ue8m0,
                                                                 "moe_experts": moe_experts_ue8m0}}


def operator_table(tuning: Any) -> dict[str, Callable]:
    """Every operator bound to its tuning: `tuning.view(name)` (a tuning.TuningTable) becomes its `cfg`."""
    return {name: partial(fn, cfg=tuning.view(name)) for name, fn in OPERATORS.items()}


def scale_fmt_table(tuning: Any) -> dict[str, dict[str, Callable]]:
    """Backend.scale_fmt_ops: the activation-scale-format variants of linear and moe_experts, bound to the same
    tuning as the operators themselves."""
    return {fmt: {name: partial(fn, cfg=tuning.view(name)) for name, fn in ops.items()}
            for fmt, ops in SCALE_FMT_OPERATORS.items()}
