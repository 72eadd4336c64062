"""The token layout of one forward pass and the paged latent cache it reads and writes (operator contract v2).

Cache position t of a sequence lives in block `table[t // block_size]`, row `t % block_size`; its flat slot is
`block * block_size + row` in the cache viewed as `[num_blocks * block_size, R+P]`. Which blocks a sequence holds is
the business of `core.engine.blocks.BlockPool`; this module only lays the tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor


class PagedCache:
    """One `[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` tensor per MLA layer (the normalised latent
    followed by the roped shared key), in the working dtype. Blocks are shared by all sequences through their block
    tables; a block id means the same block in every layer."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"PagedCache needs num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.layers = [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device)
                       for _ in range(num_layers)]

    @property
    def num_blocks(self) -> int:
        return self.layers[0].shape[0]

    @property
    def bytes_per_token_per_layer(self) -> int:
        t = self.layers[0]
        return t.shape[-1] * t.element_size()

    @property
    def bytes_per_token(self) -> int:
        """One cache position in every layer (what `blocks_in_budget` calls bytes_per_token)."""
        return self.bytes_per_token_per_layer * len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def grow(self, num_blocks: int) -> None:
        """Make room for block ids up to num_blocks - 1, keeping every block's contents (no-op if already there)."""
        for i, t in enumerate(self.layers):
            if t.shape[0] < num_blocks:
                bigger = t.new_zeros(num_blocks, *t.shape[1:])
                bigger[: t.shape[0]] = t
                self.layers[i] = bigger


@dataclass
class Batch:
    """B sequences, each adding q_lens[b] tokens after starts[b] cached ones; tokens grouped by sequence.

    The first `num_decode` sequences are DECODE sequences: each adds the same number S = new_per_seq of tokens and
    attends through the absorbed path (`mla_decode` over the block table). The remaining sequences are PREFILL
    chunks of any length (naive path: their keys are gathered through their block tables, `attention_prefill`).
    Everything but attention runs once over all T tokens. position_offset shifts rope positions from cache
    positions (the MTP layer sees entry j at position j + 1).

    Tensor fields (all on the model's device):
      tokens       [T] int64            the new tokens, sequence by sequence
      block_table  [B, max_blocks] int32 each sequence's blocks (-1 past its last one)
      starts       [B] int64            tokens already cached per sequence
      lens         [B] int64            starts + q_lens (cache length after this pass)
      slot_mapping [T] int64            flat cache slot (block * block_size + row) each new token is written to
      positions    [T] int64            rope positions
      prefill_cu_q [P+1] int32          cumulative query starts of the P = B - num_decode prefill sequences
      prefill_cu_k [P+1] int32          cumulative key starts (keys = every cached position, new ones included)
      key_slots    [Tk] int64           flat slots of those keys, gathered through the block tables
    """

    tokens: Tensor
    block_table: Tensor
    starts: Tensor
    lens: Tensor
    slot_mapping: Tensor
    positions: Tensor
    prefill_cu_q: Tensor
    prefill_cu_k: Tensor
    key_slots: Tensor
    num_decode: int
    new_per_seq: int  # S of the decode sequences (0 when there are none)
    block_size: int

    @property
    def num_seqs(self) -> int:
        return self.starts.shape[0]

    @property
    def num_decode_tokens(self) -> int:
        """The decode sequences' tokens come first: tokens[:num_decode_tokens]."""
        return self.num_decode * self.new_per_seq

    @property
    def decode(self) -> bool:
        """A pure-decode batch (every sequence on the absorbed path)."""
        return self.num_decode == self.num_seqs

    def with_tokens(self, tokens: Tensor, keep: int | None = None, position_offset: int = 0) -> "Batch":
        """This batch with other token ids, for a second model over the same cache positions (the MTP layer, whose
        cache shares the block tables): the same sequences at the same starts, rope positions shifted by
        `position_offset`. keep: for a pure-decode batch, keep only the first `keep` of each sequence's S new
        positions (default: every position of every sequence, decode or prefill).

        tokens: [T'] int64 on the batch's device, sequence by sequence (T' = T, or B * keep). Builds nothing on
        the host: the block table, slots and key slots are this batch's own tensors (views of them when keep < S)."""
        s = self.new_per_seq
        if keep is None or (keep == s and self.decode):
            if tokens.shape != self.tokens.shape:
                raise ValueError(f"Batch.with_tokens: the batch has {self.tokens.shape[0]} tokens, got shape "
                                 f"{tuple(tokens.shape)}")
            return replace(self, tokens=tokens, positions=self.positions + position_offset)
        if not self.decode or not 1 <= keep < s or tokens.shape != (self.num_seqs * keep,):
            raise ValueError(f"Batch.with_tokens: keeping {keep} of S={s} positions needs a pure-decode batch and "
                             f"{self.num_seqs * keep} tokens, got shape {tuple(tokens.shape)}")
        return replace(self, tokens=tokens, slot_mapping=self.slot_mapping.view(-1, s)[:, :keep].reshape(-1),
                       positions=self.positions.view(-1, s)[:, :keep].reshape(-1) + position_offset,
                       lens=self.lens - (s - keep), new_per_seq=keep)

    @staticmethod
    def build(tokens: list[list[int]], block_tables: list[list[int]], starts: list[int], device: torch.device, *,
              block_size: int, num_decode: int = 0, decode: bool = False, position_offset: int = 0) -> "Batch":
        """Lay out one forward pass.

        tokens[b]: the new tokens of sequence b; block_tables[b]: its block ids, enough for starts[b] + len(tokens[b])
        positions; starts[b]: positions already in its cache. The first `num_decode` sequences (all of them when
        decode=True) are decode sequences and must add the same number of tokens."""
        n = len(tokens)
        if not len(block_tables) == len(starts) == n:
            raise ValueError(f"Batch.build: {n} token lists, {len(block_tables)} block tables, {len(starts)} starts")
        if decode:
            num_decode = n
        if not 0 <= num_decode <= n:
            raise ValueError(f"Batch.build: num_decode={num_decode} with {n} sequences")
        q_lens = [len(t) for t in tokens]
        if len(set(q_lens[:num_decode])) > 1:
            raise ValueError("a decode batch adds the same number of tokens to every sequence")
        lens = [s + q for s, q in zip(starts, q_lens)]
        for b, (table, length) in enumerate(zip(block_tables, lens)):
            if len(table) * block_size < length:
                raise ValueError(f"Batch.build: sequence {b} needs {length} positions but its table holds "
                                 f"{len(table)} blocks of {block_size}")

        def slot(table: list[int], t: int) -> int:
            return table[t // block_size] * block_size + t % block_size

        slots = [slot(table, s + i) for table, s, q in zip(block_tables, starts, q_lens) for i in range(q)]
        positions = [s + i + position_offset for s, q in zip(starts, q_lens) for i in range(q)]
        prefill = range(num_decode, n)
        key_slots = [slot(block_tables[b], t) for b in prefill for t in range(lens[b])]
        width = max((len(t) for t in block_tables), default=0)
        table = [list(t) + [-1] * (width - len(t)) for t in block_tables]

        def tensor(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=device)

        def cumulative(values):
            out = [0]
            for v in values:
                out.append(out[-1] + v)
            return tensor(out, torch.int32)

        return Batch(
            tokens=tensor([tok for seq in tokens for tok in seq]),
            block_table=tensor(table, torch.int32).view(n, width),
            starts=tensor(starts), lens=tensor(lens), slot_mapping=tensor(slots), positions=tensor(positions),
            prefill_cu_q=cumulative([q_lens[b] for b in prefill]), prefill_cu_k=cumulative([lens[b] for b in prefill]),
            key_slots=tensor(key_slots), num_decode=num_decode, new_per_seq=q_lens[0] if num_decode else 0,
            block_size=block_size,
        )
