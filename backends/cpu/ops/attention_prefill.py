"""cpu: `attention_prefill` (contract: core/ops.py; specification: backends/cpu_ref) on torch's fused SDPA."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """Varlen causal attention, bottom-right aligned, one fused SDPA call per sequence.

    q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] working dtype; cu_q, cu_k [B+1] int32. Query i of a sequence with
    Lk - Lq cached keys attends to keys 0 .. Lk-Lq+i. torch's CPU flash kernel keeps scores, softmax and the
    running sum in float32 for bfloat16 inputs. Returns [Tq, H, Dv] in q.dtype."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk < lq:
            raise ValueError(f"attention_prefill: sequence {b} has {lq} queries but only {lk} keys")
        qb = q[q0:q1].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, Dqk]
        kb = k[k0:k1].transpose(0, 1).unsqueeze(0)
        vb = v[k0:k1].transpose(0, 1).unsqueeze(0)
        if lq == lk:
            o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale)
        else:
            allowed = torch.arange(lk)[None, :] <= (lk - lq) + torch.arange(lq)[:, None]
            o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scale)
        out[q0:q1] = o[0].transpose(0, 1)
    return out
