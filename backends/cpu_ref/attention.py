"""MLA attention: the naive varlen prefill and the absorbed decode over the paged latent cache (contract v2)."""

from __future__ import annotations

import torch
from torch import Tensor

from core.ops import compute_dtype


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """Per sequence b: softmax(q_b k_b^T * scale + bottom-right causal mask) v_b, float32 throughout.

    q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv]; cu_q, cu_k [B+1]. Query i of a sequence with a cached prefix of
    p = Lk - Lq keys attends to keys 0..p+i."""
    ct = compute_dtype(q.dtype)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        q0, q1, k0, k1 = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk < lq:
            raise ValueError(f"attention_prefill: sequence {b} has {lq} queries but only {lk} keys")
        qb, kb, vb = q[q0:q1].to(ct), k[k0:k1].to(ct), v[k0:k1].to(ct)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        allowed = torch.arange(lk, device=q.device)[None, :] <= (lk - lq) + torch.arange(lq, device=q.device)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, vb).to(q.dtype)
    return out


def gather_pages(cache: Tensor, block_table: Tensor, lens: Tensor) -> Tensor:
    """Each sequence's cache rows 0 .. max(lens)-1 through its block table: [B, Lmax, R+P], rows at or past lens[b]
    zero. Only table entries below ceil(lens[b] / block_size) are read; nothing past lens[b] is copied."""
    bsz = block_table.shape[0]
    block_size = cache.shape[1]
    lmax = int(lens.max()) if bsz else 0
    out = cache.new_zeros(bsz, lmax, cache.shape[2])
    for b in range(bsz):
        n = int(lens[b])
        used = -(-n // block_size)
        blocks = block_table[b, :used].long()
        if used and (int(blocks.min()) < 0 or int(blocks.max()) >= cache.shape[0]):
            raise ValueError(f"mla_decode: sequence {b} names blocks {blocks.tolist()} outside the cache's "
                             f"{cache.shape[0]} blocks")
        out[b, :n] = cache[blocks].reshape(used * block_size, cache.shape[2])[:n]
    return out


def mla_decode(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor, scale: float) -> Tensor:
    """score[b,s,h,t] = (q_lat . c_t + q_pe . pe_t) * scale over t <= lens[b]-S+s; o = softmax(score) @ c, where
    row t of sequence b is cache[block_table[b, t // block_size], t % block_size].

    q_lat [B,S,H,R], q_pe [B,S,H,P], cache [num_blocks, block_size, R+P] (latent first), block_table [B, max_blocks]
    int32, lens [B]. float32 throughout (float64 for float64 inputs)."""
    ct = compute_dtype(q_lat.dtype)
    bsz, s_new, _, rank = q_lat.shape
    if bsz == 0:
        return q_lat.new_empty(q_lat.shape)
    lens = lens.to(q_lat.device).long()
    kv = gather_pages(cache, block_table, lens).to(ct)  # [B, Lmax, R+P]
    t = torch.arange(kv.shape[1], device=q_lat.device)
    latent, rope_key = kv[..., :rank], kv[..., rank:]
    scores = torch.einsum("bshr,btr->bsht", q_lat.to(ct), latent)
    scores = scores + torch.einsum("bshp,btp->bsht", q_pe.to(ct), rope_key)
    scores = scores * scale
    last = lens[:, None] - s_new + torch.arange(s_new, device=q_lat.device)[None, :]
    allowed = t[None, None, :] <= last[:, :, None]  # [B, S, Lmax]
    scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bsht,btr->bshr", p, latent).to(q_lat.dtype)
