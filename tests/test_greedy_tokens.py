"""sampling.greedy_tokens (the engine's greedy shortcut) gives exactly what sample(process(...)) gives whenever it
answers, declines (None) whenever processing could change the argmax, and refuses invalid logits as process does."""

from __future__ import annotations

import pytest
import torch

from core.engine.sampling import InvalidLogits, RequestSampler, SamplingParams, greedy_tokens, process, sample
from tests.helpers import fresh_seed

VOCAB = 64


def _rows(params: list[SamplingParams], outputs: list[list[int]]) -> list[RequestSampler]:
    rows = []
    for p, out in zip(params, outputs):
        r = RequestSampler(p, [3, 4, 5], VOCAB)
        for t in out:
            r.append(t)
        rows.append(r)
    return rows


def test_greedy_rows_without_processing_take_the_processed_argmax_ties_included():
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(20):
        logits = torch.randn(5, VOCAB, generator=gen)
        logits[1, 7] = logits[1, 30] = logits[1].max() + 1  # a tie: the first index wins in both
        logits[2] = logits[2].to(torch.bfloat16).float()  # coarse values, more ties
        rows = _rows([SamplingParams(temperature=0.0, min_tokens=k % 2) for k in range(5)], [[9]] * 5)
        got = greedy_tokens(logits, rows)
        assert got == sample(process(logits, rows), rows).tolist()
        assert got[1] == 7


def test_declines_when_processing_could_change_the_argmax():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(fresh_seed()))
    greedy = SamplingParams(temperature=0.0)
    cases = [
        [greedy, SamplingParams(temperature=0.7)],  # a sampled row
        [greedy, SamplingParams(temperature=0.0, repetition_penalty=1.3)],  # penalties
        [greedy, SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[1])],  # a min_tokens ban is due
    ]
    for params in cases:
        assert greedy_tokens(logits, _rows(params, [[9], [9]])) is None
    # the ban is due for 1 token out, but not once `extra` counts the pending draft as emitted
    rows = _rows([greedy, SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1])], [[9], [9]])
    assert greedy_tokens(logits, rows) is None
    assert greedy_tokens(logits, rows, [[5], [5]]) == sample(process(logits, rows, [[5], [5]]), rows).tolist()


def test_invalid_logits_are_refused_like_process():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(fresh_seed()))
    logits[2, 4] = float("nan")
    rows = _rows([SamplingParams(temperature=0.0)] * 3, [[], [], []])
    with pytest.raises(InvalidLogits) as got:
        greedy_tokens(logits, rows)
    with pytest.raises(InvalidLogits) as want:
        process(logits, rows)
    assert got.value.rows == want.value.rows == [2]
