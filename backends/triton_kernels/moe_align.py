"""Sort the (token, slot) pairs of a routing by expert and pad every expert's run to BLOCK_M rows, so that each
BLOCK_M-row block of the grouped GEMMs belongs to one expert (vLLM/SGLang `moe_align_block_size`).

Plain device-neutral torch ops with host-known output sizes: no host synchronisation, so it can be captured in a
CUDA graph. Pair p = t * k + j stands for token t's j-th expert; padding rows hold the sentinel `T * k`. Pairs
with expert id -1 (held by another process) are left out of every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Alignment:
    """sorted_pairs: [capacity] int32 pair ids grouped by expert, each run padded to block_m with T*k.
    block_expert: [capacity / block_m] int32 expert of each block, -1 for blocks past the last used one."""

    sorted_pairs: Tensor
    block_expert: Tensor
    block_m: int

    @property
    def num_blocks(self) -> int:
        return self.block_expert.shape[0]


def capacity(pairs: int, num_experts: int, block_m: int) -> int:
    """Rows needed in the worst case: every pair, plus up to block_m - 1 padding rows per expert that received a
    pair (at most min(E, pairs) of them), rounded up to whole blocks."""
    rows = pairs + min(num_experts, pairs) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_block_size(ids: Tensor, num_experts: int, block_m: int) -> Alignment:
    """ids: [T, k] int expert ids in [0, num_experts), or -1 for an expert held by another process (expert
    parallelism): such pairs are placed in no block, so no kernel reads or writes them. Returns the Alignment
    (see the class)."""
    device = ids.device
    flat = ids.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    key = torch.where(flat < 0, num_experts, flat)  # -1 -> a virtual last expert whose pairs are dropped
    counts_all = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts_all.scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all[:num_experts]
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    first = torch.cumsum(counts_all, 0) - counts_all  # index of each expert's first pair in expert-sorted order
    order = torch.sort(key, stable=True).indices
    expert_of = key[order]
    rank = torch.arange(pairs, device=device) - first[expert_of]
    cap = capacity(pairs, num_experts, block_m)
    local = expert_of < num_experts
    dest = torch.where(local, starts[expert_of.clamp(max=num_experts - 1)] + rank, cap)  # dropped pairs -> row cap
    sorted_pairs = torch.full((cap + 1,), pairs, dtype=torch.int32, device=device)
    sorted_pairs[dest] = order.to(torch.int32)
    sorted_pairs = sorted_pairs[:cap]
    block_start = torch.arange(0, cap, block_m, device=device)
    block_expert = torch.searchsorted(ends, block_start, right=True)
    block_expert = torch.where(block_start < ends[-1], block_expert, -1).to(torch.int32)
    return Alignment(sorted_pairs, block_expert, block_m)
