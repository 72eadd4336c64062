"""The block pool of the paged latent cache: which cache blocks are free, and who holds the others.

A cache block holds `block_size` token positions of one sequence in every MLA layer (ARCHITECTURE.md, contract v2:
cache position t of a sequence lives in block `block_table[t // block_size]`, row `t % block_size`). The pool only
does the bookkeeping; the tensors live in the model's paged cache. Blocks are handed out lowest id first, so a run
is reproducible, and come back the moment a sequence ends or is preempted.
"""

from __future__ import annotations

import heapq

from core.errors import UserError


class OutOfBlocks(Exception):
    """Raised by `BlockPool.allocate` when fewer blocks are free than asked for; the scheduler waits or preempts."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` positions (ceil division; 0 tokens need 0 blocks)."""
    return -(-num_tokens // block_size)


def blocks_in_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """How many blocks of `block_size` positions fit in `budget_bytes`, where one position costs `bytes_per_token`
    over all layers (latent + rope key, in the cache dtype). Refuses a budget that holds no block, in one line."""
    per_block = block_size * bytes_per_token
    n = budget_bytes // per_block
    if n < 1:
        raise UserError(f"--kv-cache-memory: {budget_bytes} bytes hold no cache block "
                        f"(one block of {block_size} positions takes {per_block} bytes)")
    return int(n)


class BlockPool:
    """`num_blocks` blocks of `block_size` positions; ids 0 .. num_blocks-1."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"BlockPool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))  # a heap: lowest id first
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (lowest ids first); raises OutOfBlocks, taking none, if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"asked for {n} blocks, {len(self._free)} free of {self.num_blocks}")
        got = [heapq.heappop(self._free) for _ in range(n)]
        self._used.update(got)
        return got

    def free(self, blocks: list[int]) -> None:
        """Give blocks back. Freeing a block that is not in use is a bug in the caller and raises."""
        bad = [b for b in blocks if b not in self._used]
        if bad or len(set(blocks)) != len(blocks):
            raise ValueError(f"freeing blocks that are not in use: {sorted(set(bad)) or blocks}")
        for b in blocks:
            self._used.remove(b)
            heapq.heappush(self._free, b)

    def grow(self, extra: int) -> list[int]:
        """Add `extra` free blocks with the next ids (num_blocks .. num_blocks+extra-1) and return their ids; the
        caller grows the cache tensors to match (core.batch.PagedCache.grow). For a pool without a fixed budget."""
        if extra < 0:
            raise ValueError(f"cannot grow by {extra} blocks")
        new = list(range(self.num_blocks, self.num_blocks + extra))
        self.num_blocks += extra
        for b in new:
            heapq.heappush(self._free, b)
        return new
