"""Inputs for mla_decode over a paged cache (contract v2), shared by the reference, Triton and Ascend tests.

Every sequence gets its blocks from a shuffled permutation (non-contiguous, out of order), rows past lens in a
partial last block and every unused block are NaN, and each table row is padded past its used blocks with the id of
a NaN block and with -1, so an implementation that reads past lens, or a table entry it must not read, is caught.
"""

from __future__ import annotations

import torch
from torch import Tensor


def blocks_for(n: int, block_size: int) -> int:
    return -(-n // block_size)


def paged_cache(rows: list[Tensor], block_size: int, g: torch.Generator, spare: int = 3,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Scatter each sequence's [n_b, W] rows into a NaN-poisoned [num_blocks, block_size, W] cache through shuffled
    block tables. Returns (cache, block_table [B, max_used + 2] int32)."""
    width = rows[0].shape[1] if rows else 1
    used = [blocks_for(r.shape[0], block_size) for r in rows]
    total = sum(used) + spare
    perm = torch.randperm(total, generator=g).tolist()
    cache = torch.full((total, block_size, width), float("nan"), dtype=dtype)
    poisoned = perm[sum(used):]  # never handed to a sequence: all NaN
    table = torch.full((len(rows), max(used, default=0) + 2), -1, dtype=torch.int32)
    start = 0
    for b, (r, k) in enumerate(zip(rows, used)):
        ids = perm[start:start + k]
        start += k
        for t in range(r.shape[0]):
            cache[ids[t // block_size], t % block_size] = r[t].to(dtype)
        table[b, :k] = torch.tensor(ids, dtype=torch.int32)
        if poisoned:
            table[b, k] = poisoned[b % len(poisoned)]  # a NaN block just past the last used one; -1 after it
    return cache, table


def decode_inputs(lens: list[int], s_new: int, heads: int, rank: int, rope: int, block_size: int = 16,
                  dtype: torch.dtype = torch.float32, seed: int = 0, spare: int = 3):
    """(q_lat, q_pe, cache, block_table, lens): queries as views of one [B, S, H, R+P] tensor; the paged cache as
    in `paged_cache`."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(lens)
    q = torch.randn(bsz, s_new, heads, rank + rope, generator=g).to(dtype)
    rows = [torch.randn(n, rank + rope, generator=g) for n in lens]
    if not rows:
        cache = torch.full((spare, block_size, rank + rope), float("nan"), dtype=dtype)
        empty_table, no_lens = torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.int64)
        return q[..., :rank], q[..., rank:], cache, empty_table, no_lens
    cache, table = paged_cache(rows, block_size, g, spare, dtype)
    return q[..., :rank], q[..., rank:], cache, table, torch.tensor(lens, dtype=torch.int64)


def golden_decode(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor,
                  scale: float) -> Tensor:
    """Float64 golden: an independent dense computation (not through cpu_ref), gathering row by row."""
    bsz, s_new, heads, rank = q_lat.shape
    bs = cache.shape[1]
    out = torch.zeros(bsz, s_new, heads, rank, dtype=torch.float64)
    for b in range(bsz):
        n = int(lens[b])
        kv = torch.stack([cache[int(block_table[b, t // bs]), t % bs].double() for t in range(n)])
        for s in range(s_new):
            visible = kv[: n - s_new + s + 1]
            scores = (q_lat[b, s].double() @ visible[:, :rank].T + q_pe[b, s].double() @ visible[:, rank:].T) * scale
            out[b, s] = torch.softmax(scores, dim=-1) @ visible[:, :rank]
    return out
