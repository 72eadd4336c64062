"""cpu: `moe_experts` (contract: core/ops.py; specification: backends/cpu_ref): tokens grouped by expert, each expert
run once per call on all its tokens, a float32 combine by one batched matmul.

The (token, slot) pairs are sorted by expert once; the tokens are gathered once in that order, so each expert's rows
are one contiguous slice that its two GEMMs read and write in place (`out=`), and the SwiGLU runs once over all
rows. Per active expert the Python loop issues two GEMMs and nothing else (the profile of issue 15's decode put ~10
small ops per expert here before: gather, GEMM, slices, silu, mul, GEMM, scatter)."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu.weights import CpuExperts


def moe_experts(x: Tensor, experts: CpuExperts, weights: Tensor, ids: Tensor) -> Tensor:
    """`y[t] = sum_j weights[t, j] * down(silu(gate(x[t])) * up(x[t]))` with expert ids[t, j].

    x [T, D] working dtype; experts: CpuExperts (w13 [E, 2I, D], w2 [E, D, I]); weights [T, k] float32; ids [T, k]
    int64 in [0, E), or -1 for an expert another process holds (contributes nothing). The GEMMs run in the weights'
    dtype (float32 unless bf16 is native, see weights.py) with the SwiGLU in float32; the combine is float32, rounded
    once to x.dtype. Returns [T, D] in x.dtype."""
    tokens, top_k = ids.shape
    dim = x.shape[1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    gemm_dtype = experts.w13.dtype
    if tokens == 0:
        return x.new_zeros(0, dim)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot indices grouped by expert; -1 slots sort first
    counts = torch.bincount(flat + 1, minlength=experts.num_experts + 1).tolist()  # [-1 slots, expert 0, ...]
    n_skip = counts[0]
    mine = order[n_skip:]
    rows = mine.numel()
    inter = experts.intermediate_size
    xs = x.index_select(0, mine // top_k)  # [rows, D], grouped by expert
    if xs.dtype != gemm_dtype:
        xs = xs.to(gemm_dtype)
    h = xs.new_empty(rows, 2 * inter)
    start = 0
    for e, n in enumerate(counts[1:]):
        if n:
            torch.mm(xs[start:start + n], experts.w13[e].t(), out=h[start:start + n])
            start += n
    hf = h if h.dtype == ct else h.to(ct)
    act = torch.nn.functional.silu(hf[:, :inter]).mul_(hf[:, inter:])
    if act.dtype != gemm_dtype:
        act = act.to(gemm_dtype)
    y = xs.new_empty(rows, dim)
    start = 0
    for e, n in enumerate(counts[1:]):
        if n:
            torch.mm(act[start:start + n], experts.w2[e].t(), out=y[start:start + n])
            start += n
    out = torch.zeros(tokens * top_k, dim, dtype=ct)
    out[mine] = y if y.dtype == ct else y.to(ct)
    mix = weights.to(ct).masked_fill(ids < 0, 0.0).reshape(tokens, 1, top_k)  # a -1 slot's weight: ignored, even NaN
    return torch.bmm(mix, out.view(tokens, top_k, dim)).view(tokens, dim).to(x.dtype)
