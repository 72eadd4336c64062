"""The token layout of one forward pass and the latent KV cache it reads and writes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class LatentCache:
    """One `[slots, max_len, kv_lora_rank + qk_rope_head_dim]` tensor per MLA layer: the normalised latent followed
    by the roped shared key, in the working dtype. Sequence b lives in row `slot`, token i at column i."""

    def __init__(self, num_layers: int, slots: int, max_len: int, width: int, dtype: torch.dtype,
                 device: torch.device):
        self.layers = [torch.zeros(slots, max_len, width, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def bytes_per_token_per_layer(self) -> int:
        t = self.layers[0]
        return t.shape[-1] * t.element_size()


@dataclass
class Batch:
    """B sequences, each adding q_lens[b] tokens after starts[b] cached ones; tokens grouped by sequence.

    decode=True asks for the absorbed path (`mla_decode`): every sequence adds the same number S of tokens.
    position_offset shifts rope positions from cache columns (the MTP layer sees token j at position j + 1).
    """

    tokens: Tensor  # [T] int64
    slots: Tensor  # [B] int64
    starts: Tensor  # [B] int64
    lens: Tensor  # [B] int64 = starts + q_lens
    cu_q: Tensor  # [B+1] int32
    cu_k: Tensor  # [B+1] int32
    token_slot: Tensor  # [T] cache row of each token
    token_index: Tensor  # [T] cache column of each token
    positions: Tensor  # [T] rope positions
    key_slot: Tensor  # [Tk] for the prefill path: every cached key of every sequence
    key_index: Tensor  # [Tk]
    decode: bool
    new_per_seq: int  # S when decode

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]

    @staticmethod
    def build(tokens: list[list[int]], slots: list[int], starts: list[int], device: torch.device,
              decode: bool = False, position_offset: int = 0) -> "Batch":
        q_lens = [len(t) for t in tokens]
        if decode and len(set(q_lens)) > 1:
            raise ValueError("a decode batch adds the same number of tokens to every sequence")
        lens = [s + n for s, n in zip(starts, q_lens)]
        flat = [tok for seq in tokens for tok in seq]
        token_slot = [slot for slot, n in zip(slots, q_lens) for _ in range(n)]
        token_index = [s + i for s, n in zip(starts, q_lens) for i in range(n)]
        key_slot, key_index = [], []
        if not decode:
            key_slot = [slot for slot, n in zip(slots, lens) for _ in range(n)]
            key_index = [i for n in lens for i in range(n)]

        def tensor(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=device)

        def cumulative(values):
            out = [0]
            for v in values:
                out.append(out[-1] + v)
            return tensor(out, torch.int32)

        index = tensor(token_index)
        return Batch(
            tokens=tensor(flat), slots=tensor(slots), starts=tensor(starts), lens=tensor(lens),
            cu_q=cumulative(q_lens), cu_k=cumulative(lens), token_slot=tensor(token_slot), token_index=index,
            positions=index + position_offset, key_slot=tensor(key_slot), key_index=tensor(key_index),
            decode=decode, new_per_seq=q_lens[0] if q_lens else 0,
        )
