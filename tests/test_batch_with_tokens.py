"""Batch.with_tokens (the MTP pass reusing the verify pass's layout) lays out exactly what Batch.build would for the
same sequences, starts and block tables with the new tokens and shifted positions."""

from __future__ import annotations

import random
from dataclasses import fields

import pytest
import torch

from core.batch import Batch


def _same(a: Batch, b: Batch) -> None:
    for f in fields(Batch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def _tables(rng: random.Random, lens: list[int], block_size: int) -> list[list[int]]:
    pool = list(range(200))
    rng.shuffle(pool)
    out = []
    for n in lens:
        k = -(-n // block_size)
        out.append(pool[:k])
        pool = pool[k:]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_decode_batch_with_other_tokens_matches_a_fresh_build(seed):
    rng = random.Random(seed)
    bs, n, s = rng.choice([1, 4, 16]), rng.randint(1, 5), 2
    starts = [rng.randint(0, 40) for _ in range(n)]
    tables = _tables(rng, [st + s for st in starts], bs)
    verify = [[rng.randrange(1000) for _ in range(s)] for _ in range(n)]
    batch = Batch.build(verify, tables, starts, torch.device("cpu"), block_size=bs, decode=True)
    for keep in (2, 1):
        new = [[rng.randrange(1000) for _ in range(keep)] for _ in range(n)]
        flat = torch.tensor([t for row in new for t in row])
        want = Batch.build(new, tables, starts, torch.device("cpu"), block_size=bs, decode=True, position_offset=1)
        _same(batch.with_tokens(flat, keep, position_offset=1), want)


def test_mixed_batch_with_other_tokens_matches_a_fresh_build():
    rng = random.Random(7)
    starts, q = [5, 9, 0, 3], [2, 2, 6, 4]  # two decodes (S = 2), two prefill chunks
    tables = _tables(rng, [a + b for a, b in zip(starts, q)], 4)
    toks = [[rng.randrange(1000) for _ in range(k)] for k in q]
    batch = Batch.build(toks, tables, starts, torch.device("cpu"), block_size=4, num_decode=2)
    new = [[rng.randrange(1000) for _ in range(k)] for k in q]
    want = Batch.build(new, tables, starts, torch.device("cpu"), block_size=4, num_decode=2, position_offset=1)
    _same(batch.with_tokens(torch.tensor([t for row in new for t in row]), position_offset=1), want)
    with pytest.raises(ValueError, match="pure-decode"):
        batch.with_tokens(torch.tensor([1, 2]), keep=1)
    with pytest.raises(ValueError, match="tokens"):
        batch.with_tokens(torch.tensor([1, 2, 3]))
