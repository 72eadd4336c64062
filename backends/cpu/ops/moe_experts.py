"""cpu: `moe_experts` (contract: core/ops.py; specification: backends/cpu_ref): tokens grouped by expert, each expert
run once per call on all its tokens, a float32 combine by one batched matmul.

The (token, slot) pairs are sorted by expert once; the tokens are gathered once in that order, so each expert's rows
are one contiguous slice (one `split` for all) that its two GEMMs read and write in place (`out=`) through
transposed views built at load, and the SwiGLU runs once over all rows. Per active expert the Python loop issues two
GEMMs and nothing else (the profile of issue 15's decode put ~10 small ops per expert here before: gather, GEMM,
slices, silu, mul, GEMM, scatter)."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu import fp16
from backends.cpu.weights import CpuExperts
from backends.cpu_ref import OPS as REFERENCE


def moe_experts(x: Tensor, experts: CpuExperts, weights: Tensor, ids: Tensor) -> Tensor:
    """`y[t] = sum_j weights[t, j] * down(silu(gate(x[t])) * up(x[t]))` with expert ids[t, j].

    x [T, D] working dtype; experts: CpuExperts (packed fp16 per expert, or w13 [E, 2I, D], w2 [E, D, I]); weights
    [T, k] float32; ids [T, k] int64 in [0, E), or -1 for an expert another process holds (contributes nothing). The
    GEMMs run in float32 on packed fp16 weights (exact, fp16.py), else in the weights' dtype (float32 unless bf16 is
    native, see weights.py), with the SwiGLU in float32; the combine is float32, rounded once to x.dtype. Returns
    [T, D] in x.dtype."""
    if experts.fp8 is not None:  # FP8 kept (memory): cpu_ref's loop dequantises each active expert per call
        return REFERENCE["moe_experts"](x, experts.fp8, weights, ids)
    tokens, top_k = ids.shape
    dim = x.shape[1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    gemm_dtype = experts.gemm_dtype
    if tokens == 0:
        return x.new_zeros(0, dim)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot indices grouped by expert; -1 slots sort first
    counts = torch.bincount(flat + 1, minlength=experts.num_experts + 1).tolist()  # [-1 slots, expert 0, ...]
    n_skip = counts[0]
    active = [(e, n) for e, n in enumerate(counts[1:]) if n]
    mine = order[n_skip:] if n_skip else order
    inter = experts.intermediate_size
    xs = x.index_select(0, mine // top_k)  # [rows, D], grouped by expert
    if xs.dtype != gemm_dtype:
        xs = xs.to(gemm_dtype)
    h = _expert_gemms(experts, 0, xs, active, 2 * inter)
    hf = h if h.dtype == ct else h.to(ct)
    act = torch.nn.functional.silu(hf[:, :inter]).mul_(hf[:, inter:])
    if act.dtype != gemm_dtype:
        act = act.to(gemm_dtype)
    y = _expert_gemms(experts, 1, act, active, dim)
    yc = y if y.dtype == ct else y.to(ct)
    mix = weights.to(ct)
    if n_skip:
        out = torch.zeros(tokens * top_k, dim, dtype=ct)
        out[mine] = yc
        mix = mix.masked_fill(ids < 0, 0.0)  # a -1 slot's weight: ignored, even NaN
    else:  # every slot is local: place the rows back in slot order with one scatter
        out = torch.empty(tokens * top_k, dim, dtype=ct).index_copy_(0, mine, yc)
    return torch.bmm(mix.reshape(tokens, 1, top_k), out.view(tokens, top_k, dim)).view(tokens, dim).to(x.dtype)


def _expert_gemms(experts: CpuExperts, which: int, rows: Tensor, active: list[tuple[int, int]], cols: int) -> Tensor:
    """One GEMM per active expert (e, n) on its n consecutive rows of `rows` [sum n, K]: which 0 = gate and up,
    1 = down. Packed fp16 weights (exact, fp16.py): fbgemm's GEMM, outputs concatenated; dense weights: torch.mm
    written in place through the transposed views. Returns [sum n, cols]."""
    if not active:
        return rows.new_empty(0, cols)
    parts = rows.split([n for _, n in active])
    if experts.packed is not None:
        return torch.cat([fp16.mm(part, experts.packed[e][which]) for (e, _), part in zip(active, parts)])
    weights_t = experts.w13_t if which == 0 else experts.w2_t
    out = rows.new_empty(rows.shape[0], cols)
    for (e, _), part, dest in zip(active, parts, out.split([n for _, n in active])):
        torch.mm(part, weights_t[e], out=dest)
    return out
