"""Paged KV for `npu_fused_infer_attention_score` (torch_npu_ops.md §5.1 "Paged KV", §9): the documented
constraints, and the gather that turns a block-table cache back into the dense per-batch layout.

With `block_table` (int32, (B, >= max_blocks)) and `block_size`, key/value/key_rope ARE the cache:
  BSH / BSND: (blocks, block_size, KV_N*D)        BNSD: (blocks, KV_N, block_size, D)
Logical position p of batch b is at block block_table[b, p // block_size], offset p % block_size; only the first
ceil(actual_seq_lengths_kv[b] / block_size) entries of a row are read. block_size: a multiple of 16 up to 1024 for
absorbed MLA (D = 512); otherwise decode (Q_S = 1) 16-aligned up to 512, prefill a multiple of 128 up to 512.
Paged attention always needs actual_seq_lengths_kv (per-request lengths). TND with paged KV is not emulated.
"""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu._common import dtype_name, not_emulated, require

OP = "npu_fused_infer_attention_score"


def check_block_size(block_size: int, absorbed_mla: bool, decode: bool) -> None:
    """The block sizes FIA's paged KV accepts."""
    require(isinstance(block_size, int) and block_size > 0, OP, f"paged KV needs block_size > 0, got {block_size}")
    if absorbed_mla:
        require(block_size % 16 == 0 and block_size <= 1024, OP,
                f"MLA (D=512) paged KV takes block_size a multiple of 16 up to 1024, got {block_size}")
    elif decode:
        require(block_size % 16 == 0 and block_size <= 512, OP,
                f"decode paged KV takes block_size 16-aligned up to 512, got {block_size}")
    else:
        require(block_size % 128 == 0 and block_size <= 512, OP,
                f"prefill paged KV takes block_size a multiple of 128 up to 512, got {block_size}")


def unpage(cache: Tensor, name: str, block_table: Tensor, block_size: int, lengths: list[int], layout: str,
           kv_heads: int) -> Tensor:
    """Gather a paged cache into the dense key layout: (B, Lmax, H) for BSH, (B, Lmax, N, D) for BSND,
    (B, N, Lmax, D) for BNSD. Positions past a batch's length are zero (FIA never reads them)."""
    if layout in ("TND", "NTD"):
        not_emulated(OP, f"paged KV with layout {layout}")
    if layout in ("BSH", "BSND"):
        require(cache.dim() == 3, OP, f"paged {name} for {layout} must be (blocks, block_size, KV_N*D), got "
                                      f"{tuple(cache.shape)}")
        require(cache.shape[1] == block_size, OP, f"paged {name} has block dim {cache.shape[1]}, block_size is "
                                                  f"{block_size}")
        rows = cache  # (blocks, bs, H)
    else:
        require(cache.dim() == 4, OP, f"paged {name} for {layout} must be (blocks, KV_N, block_size, D), got "
                                      f"{tuple(cache.shape)}")
        require(cache.shape[2] == block_size, OP, f"paged {name} has block dim {cache.shape[2]}, block_size is "
                                                  f"{block_size}")
        rows = cache.transpose(1, 2).flatten(2)  # (blocks, bs, N*D)
    blocks = cache.shape[0]
    lmax = max(lengths, default=0)
    dense = rows.new_zeros(len(lengths), lmax, rows.shape[2])
    for b, n in enumerate(lengths):
        used = -(-n // block_size)
        require(used <= block_table.shape[1], OP, f"batch {b}: {n} tokens need {used} blocks, block_table has "
                                                  f"{block_table.shape[1]} columns")
        ids = block_table[b, :used].long()
        require(used == 0 or (int(ids.min()) >= 0 and int(ids.max()) < blocks), OP,
                f"batch {b}: block_table names blocks {ids.tolist()} outside [0, {blocks})")
        dense[b, :n] = rows[ids].reshape(used * block_size, rows.shape[2])[:n]
    if layout == "BSH":
        return dense
    d = rows.shape[2] // kv_heads
    bsnd = dense.view(len(lengths), lmax, kv_heads, d)
    return bsnd if layout == "BSND" else bsnd.transpose(1, 2)


def check_table(block_table: Tensor, batches: int, lengths: list[int] | None) -> None:
    require(block_table.dtype == torch.int32, OP, f"block_table dtype {dtype_name(block_table.dtype)} is not int32")
    require(block_table.dim() == 2 and block_table.shape[0] >= batches, OP,
            f"block_table must be (B={batches}, max_blocks) int32, got {tuple(block_table.shape)}")
    require(lengths is not None, OP, "paged attention requires actual_seq_lengths_kv")
