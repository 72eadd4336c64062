"""Vocabulary-parallel embedding: each rank holds rows [v0, v1) of the table; a token outside them looks up zeros,
and the all_reduce of every rank's result is the full lookup (exactly: one non-zero term per token)."""

from __future__ import annotations

import torch
from torch import Tensor


def masked_lookup(table: Tensor, tokens: Tensor, start: int) -> Tensor:
    """table [V_local, D], tokens [T] int (global ids) -> [T, D]: table[tokens - start] where held, else 0."""
    local = tokens - start
    held = (local >= 0) & (local < table.shape[0])
    rows = table[local.clamp(0, max(table.shape[0] - 1, 0))]
    return torch.where(held[:, None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
