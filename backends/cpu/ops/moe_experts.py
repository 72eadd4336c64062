"""cpu: `moe_experts` (contract: core/ops.py; specification: backends/cpu_ref): tokens grouped by expert, each expert
run once per call on all its tokens, a float32 combine by one batched matmul."""

from __future__ import annotations

import torch
from torch import Tensor

from backends.cpu.weights import CpuExperts


def moe_experts(x: Tensor, experts: CpuExperts, weights: Tensor, ids: Tensor) -> Tensor:
    """`y[t] = sum_j weights[t, j] * down(silu(gate(x[t])) * up(x[t]))` with expert ids[t, j].

    x [T, D] working dtype; experts: CpuExperts (w13 [E, 2I, D], w2 [E, D, I]); weights [T, k] float32; ids [T, k]
    int64 in [0, E), or -1 for an expert another process holds (contributes nothing). The GEMMs run in the weights'
    dtype (float32 unless bf16 is native, see weights.py); the combine is float32, rounded once to x.dtype.
    Returns [T, D] in x.dtype."""
    tokens, top_k = ids.shape
    dim = x.shape[1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    gemm_dtype = experts.w13.dtype
    if tokens == 0:
        return x.new_zeros(0, dim)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # slot indices grouped by expert
    counts = torch.bincount(flat.clamp(min=0), minlength=experts.num_experts)
    n_skip = int((flat < 0).sum())  # -1 slots sort first
    counts[0] -= n_skip
    xs = x.to(gemm_dtype) if x.dtype != gemm_dtype else x
    inter = experts.intermediate_size
    out = torch.zeros(tokens * top_k, dim, dtype=ct)
    start = n_skip
    for e, n in enumerate(counts.tolist()):
        if n == 0:
            continue
        slots = order[start:start + n]
        start += n
        xe = xs.index_select(0, slots // top_k)
        h = torch.mm(xe, experts.w13[e].t())
        act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        out[slots] = torch.mm(act, experts.w2[e].t()).to(ct)
    mix = weights.to(ct).reshape(tokens, 1, top_k)
    return torch.bmm(mix, out.view(tokens, top_k, dim)).view(tokens, dim).to(x.dtype)
