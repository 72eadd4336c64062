"""The operator contract (v2): the only compute the model graph asks of a backend.

Every operator is declared here once, as a signature with a docstring that fixes shapes, dtypes and invariants.
`backends/cpu_ref` implements each one in plain PyTorch; that implementation is the executable specification, and
every other backend is judged against it. The model graph calls these operators plus plain, device-neutral tensor
code (indexing, cat, view, embedding lookup, cache writes, sampling, the batched matmuls that absorb `kv_b` into the
query and output of MLA decode).

v2 (from v1): `mla_decode` reads a PAGED latent cache `[num_blocks, block_size, R+P]` through a per-sequence block
table instead of one `[N, L, R+P]` row per sequence; v1 is the special case block_size = L, block_table =
slots[:, None]. Each backend declares the block sizes it takes in its manifest (`cache: {block_sizes: ...}`).
`moe_experts` accepts ids of -1, experts held by another process (expert parallelism), which contribute nothing.

Conventions used below:
  T  tokens in the batch          H  attention heads          R  kv_lora_rank (512 in DeepSeek-V3)
  P  qk_rope_head_dim (64)        D  hidden size (7168)       E  routed experts (256), k = experts per token (8)
  "working dtype" is the activation dtype (bfloat16, float32, or float64 for golden values); unless stated, an
  operator computes in float32 (float64 for float64 inputs) and returns the working dtype.

Weights reach `linear` and `moe_experts` only through the backend's own prepare hooks, `prepare_linear` and
`prepare_experts`; the graph treats what they return as opaque. The reference formats are `LinearWeight` and
`ExpertWeights` below: a backend that implements `linear` but not `prepare_linear` receives a `LinearWeight`.
An optional third hook, `prepare_mla`, chooses the dtype of MLA decode's absorbed `kv_b` halves (w_uk, w_uv), which
the graph multiplies with `torch.bmm` itself; without it they stay in the working dtype.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

FP8_BLOCK = 128  # DeepSeek-V3 weight_block_size: [128, 128]


# ----------------------------------------------------------------------------------------------------------------
# Reference weight formats (what cpu_ref's prepare hooks return)
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearWeight:
    """A linear layer's weight as stored in the checkpoint.

    weight:    [N, K] float8_e4m3fn, bfloat16, float32 or float64 (N output features, K input features).
    scale_inv: [ceil(N/128), ceil(K/128)] float32 when `weight` is FP8, else None. Element (i, j) of the real weight
               is `float(weight[i, j]) * scale_inv[i // 128, j // 128]`; edge blocks may be partial.
    """

    weight: Tensor
    scale_inv: Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


@dataclass(frozen=True)
class ExpertWeights:
    """The routed experts of one MoE layer, stacked along a leading expert dimension.

    gate, up:  [E, I, D]  (I = moe_intermediate_size);   down: [E, D, I]
    *_scale:   [E, ceil(rows/128), ceil(cols/128)] float32 when the weights are FP8, else None.
    Expert e computes `down_e( silu(gate_e(x)) * up_e(x) )`.
    """

    gate: Tensor
    up: Tensor
    down: Tensor
    gate_scale: Tensor | None = None
    up_scale: Tensor | None = None
    down_scale: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.gate.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[1]


# ----------------------------------------------------------------------------------------------------------------
# The operators. Bodies are empty on purpose: the reference lives in backends/cpu_ref.
# ----------------------------------------------------------------------------------------------------------------


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dimension: `weight * x / sqrt(mean(x**2) + eps)`.

    x:      [..., D] working dtype (any number of leading dims, possibly zero tokens).
    weight: [D], any float dtype (cast to the compute dtype).
    Returns [..., D] in x.dtype. Statistics and the multiply by `weight` happen in float32; one rounding at the end.
    """


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The fused pre-norm residual step: `h = x + residual`; returns `(rms_norm(h, weight, eps), h)`.

    x, residual: [..., D] same dtype and shape.  weight: [D].
    Returns (normed [..., D], h [..., D]), both in x.dtype; `h` is rounded to x.dtype before it is normalised, so
    `normed == rms_norm(h)` exactly. Neither input is modified.
    """


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding in half layout on the last dimension.

    x:        [T, ..., P] working dtype (e.g. [T, H, P] for queries, [T, 1, P] for the shared rope key).
    cos, sin: [T, P/2] float32, gathered by each token's position (the YaRN attention factor already folded in).
    With x1 = x[..., :P/2], x2 = x[..., P/2:]:  out = cat(x1*cos - x2*sin, x2*cos + x1*sin), in float32, rounded
    once to x.dtype. The checkpoint's interleaved rope rows are permuted to half layout at load time, so pair i is
    (x[i], x[i + P/2]).
    """


def linear(x: Tensor, w: object) -> Tensor:
    """`x @ W.T` with float32 accumulation.

    x: [T, K] working dtype (float32 for the MoE gate's logits).  w: what this backend's `prepare_linear` returned
    for a weight of shape [N, K]. Returns [T, N] in x.dtype. FP8 weights are dequantised with their 128x128 block
    scales (`LinearWeight`); a backend that quantises activations declares the `w8a8` numerics class in its
    manifest and is judged against the reference's W8A8 emulation instead. On the layers where a DeepSeek-V3.1
    checkpoint asks for UE8M0 activation scales (quantization_config.scale_fmt "ue8m0": q_a, kv_a and the routed
    experts), the model calls the backend's `scale_fmt_ops["ue8m0"]` variant instead (class `w8a8_ue8m0`: each
    per-128 activation scale rounded up to a power of two; core.dispatch.Dispatch.scaled).
    """


def silu_and_mul(x: Tensor) -> Tensor:
    """SwiGLU activation: `silu(x[..., :I]) * x[..., I:]`, gate half first, up half second.

    x: [T, 2I] working dtype. Returns [T, I] in x.dtype (computed in float32).
    """


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """Variable-length causal attention, bottom-right aligned (the naive MLA prefill).

    q: [Tq, H, Dqk]; k: [Tk, H, Dqk]; v: [Tk, H, Dv] (Dqk = qk_nope + P = 192, Dv = 128 in DeepSeek-V3).
    cu_q, cu_k: [B+1] int32 cumulative sequence starts into q and k; sequence b owns q rows cu_q[b]:cu_q[b+1]
    and k/v rows cu_k[b]:cu_k[b+1], with Lk_b >= Lq_b (the first Lk_b - Lq_b keys are a cached prefix).
    Query i of sequence b attends to keys 0 .. (Lk_b - Lq_b) + i. Scores are `q.k * scale` in float32; softmax
    in float32. Returns [Tq, H, Dv] in q.dtype. Sequences with Lq_b = 0 are allowed.
    """


def mla_decode(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor,
               scale: float) -> Tensor:
    """Absorbed multi-head latent attention over the paged latent cache.

    q_lat: [B, S, H, R] queries already multiplied by W_UK;   q_pe: [B, S, H, P] roped query part.
    cache: [num_blocks, block_size, R+P] one layer's paged latent cache (normalised latent first, roped key
           second), working dtype. Blocks belong to no sequence in particular; the table says which are whose.
    block_table: [B, max_blocks] int32; cache position t of sequence b lives in block block_table[b, t // block_size],
           row t % block_size. Only the first ceil(lens[b] / block_size) entries of row b are read; the rest may
           hold anything (-1, garbage) and must not be dereferenced.
    lens: [B] int64, tokens in the cache per sequence, including the S new ones, which occupy positions
           lens-S .. lens-1 (S = 2 is MTP verification); lens[b] >= S.
    New token s attends causally to cache positions 0 .. lens-S+s:
      score[t] = (q_lat . kv[t, :R] + q_pe . kv[t, R:]) * scale, softmax in float32,
      o_lat = sum_t p[t] * kv[t, :R]          (kv[t] = the cache row of position t, through the table).
    Returns o_lat [B, S, H, R] in q_lat.dtype. Never reads a cache row at or past lens[b] of its sequence, nor a
    block the table does not name for positions < lens[b] (unused blocks may hold NaN). v1's `[N, L, R+P]` cache
    with `slots [B]` is the special case block_size = L, block_table = slots[:, None].
    """


GATE_SCORING = ("sigmoid", "softmax")
"""moe_gate scoring functions: sigmoid (DeepSeek-V3 family, noaux_tc), softmax over all E experts (DeepSeek-V2)."""
GATE_GROUP_SCORE = ("top2_sum", "max")
"""moe_gate group-scoring rules: sum of the group's top-2 selection scores (V3 noaux_tc), or its best one (V2
group_limited_greedy)."""


def moe_gate(
    logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float, renorm: bool,
    scoring: str = "sigmoid", group_score: str = "top2_sum",
) -> tuple[Tensor, Tensor]:
    """DeepSeekMoE routing: DeepSeek-V3's noaux_tc (the defaults) and DeepSeek-V2's greedy / group_limited_greedy.

    logits: [T, E] float32 router logits;  bias: [E] float32 e_score_correction_bias, or None for none.
    scoring: "sigmoid": s = sigmoid(logits);  "softmax": s = softmax(logits) over all E experts (float32).
    Selection uses c = s + bias only (c = s without a bias): when n_group > 1 and topk_group < n_group, each of
    the `n_group` contiguous groups of E/n_group experts gets a score from its members' c (group_score "top2_sum":
    the sum of its top-2, V3; "max": its best one, V2), the best `topk_group` groups are kept, and the top_k experts
    by c among them are chosen (experts of dropped groups are -inf, never 0). Otherwise the top_k of all E by c
    (V2's greedy is n_group = topk_group = 1). Weights use the unbiased s of the chosen experts, divided by their
    sum (+1e-20) when `renorm`, then multiplied by `scale` (routed_scaling_factor) exactly once.
    Returns (weights [T, top_k] float32, ids [T, top_k] int64). Order inside a row is unspecified: conformance
    compares expert sets, and ties in c may be broken either way.
    `scoring` and `group_score` extend contract v2's seven-argument form (their defaults are V3's noaux_tc, so a
    call without them means what it meant before); every backend must accept them.
    """


def moe_experts(x: Tensor, experts: object, weights: Tensor, ids: Tensor) -> Tensor:
    """The routed-expert sum: `y[t] = sum_j weights[t, j] * Expert_{ids[t, j]}(x[t])`.

    x: [T, D] working dtype; experts: what `prepare_experts` returned; weights: [T, k] float32; ids: [T, k] int64,
    values in [0, E) or -1. E is the number of experts THIS process holds; an id of -1 is an expert held by another
    process (expert parallelism) and contributes nothing (its weight is ignored; a row of only -1 gives 0), so the
    sum over ranks of each rank's result is the full routed sum. Expert(x) = down(silu(gate(x)) * up(x)). The combine over j is float32; one rounding to
    x.dtype at the end. Returns [T, D] in x.dtype. Shared experts are not part of this operator.
    """


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> object:
    """Turn a checkpoint weight [N, K] (FP8 with scale_inv [ceil(N/128), ceil(K/128)], or a float tensor) into
    whatever this backend's `linear` consumes. Called once per weight at load time, on the backend's device."""


def prepare_experts(
    gate: Tensor,
    gate_scale: Tensor | None,
    up: Tensor,
    up_scale: Tensor | None,
    down: Tensor,
    down_scale: Tensor | None,
) -> object:
    """Turn the stacked routed-expert weights of one layer (see `ExpertWeights`) into whatever this backend's
    `moe_experts` consumes. Called once per MoE layer at load time, on the backend's device."""


def prepare_mla(w_uk: Tensor, w_uv: Tensor) -> tuple[Tensor, Tensor]:
    """OPTIONAL hook: the absorbed `kv_b` halves that MLA decode multiplies with, in the dtype the graph's two batched
    matmuls should run in. Called once per attention layer at load time, on the backend's device.

    w_uk: [H, R, qk_nope] working dtype, contiguous (folded into the query: q_lat[h] = q_nope[h] @ w_uk[h].T).
    w_uv: [H, v_head, R] working dtype, contiguous (folded into the output: o[h] = o_lat[h] @ w_uv[h].T).
    (Per head, each is a linear weight [out, in]: kv_b's own layout for w_uv, its nope rows transposed for w_uk.)
    Returns (w_uk, w_uv) of the same shapes, contiguous, in one float dtype at least as wide as the working dtype
    and holding the same values (a widening, never a rounding): the graph casts its activations to that dtype, runs
    `torch.bmm` (float32 accumulation) and rounds the result once to the working dtype, so the math is the same as
    without the hook; only speed changes (e.g. float32 on a CPU whose bfloat16 matmuls are emulated). A backend
    without this hook keeps them in the working dtype (`keep_mla`, the reference)."""


def keep_mla(w_uk: Tensor, w_uv: Tensor) -> tuple[Tensor, Tensor]:
    """The reference `prepare_mla`: the absorbed weights as they are (working dtype)."""
    return w_uk, w_uv


OPERATORS: dict[str, Callable] = {
    f.__name__: f
    for f in (
        rms_norm,
        add_rms_norm,
        apply_rope,
        linear,
        silu_and_mul,
        attention_prefill,
        mla_decode,
        moe_gate,
        moe_experts,
    )
}
"""Operator name -> its declaration (signature and docstring)."""

PREPARE_HOOKS: dict[str, Callable] = {f.__name__: f for f in (prepare_linear, prepare_experts)}

WEIGHT_HOOK: dict[str, str] = {"linear": "prepare_linear", "moe_experts": "prepare_experts"}
"""An operator that consumes prepared weights, and the hook that prepares them. The two travel together."""

OPTIONAL_HOOKS: dict[str, Callable] = {"prepare_mla": prepare_mla}
"""Hooks a backend may define or leave out, each with a reference behaviour (`keep_mla`); they consume no
operator's weights, so they do not travel with one."""


def check_signature(name: str, impl: Callable) -> str | None:
    """Return why `impl` cannot stand in for the declared operator or hook `name`, or None if it can.

    The implementation must accept the declared positional parameters in order (extra parameters need defaults).
    """
    decl = OPERATORS.get(name) or PREPARE_HOOKS.get(name) or OPTIONAL_HOOKS.get(name)
    if decl is None:
        return f"'{name}' is not an operator of the contract"
    try:
        have = inspect.signature(impl)
    except (TypeError, ValueError):
        return None  # builtins and C extensions: nothing to inspect
    want = list(inspect.signature(decl).parameters)
    params = list(have.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(want):
        return f"{name}{have} takes fewer parameters than the contract's {name}{inspect.signature(decl)}"
    extra = [p.name for p in positional[len(want):] if p.default is p.empty]
    if extra:
        return f"{name}: parameters {extra} beyond the contract need defaults"
    return None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference computes in for a given working dtype: float64 stays float64, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
