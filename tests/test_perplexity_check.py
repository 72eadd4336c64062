"""The model level's perplexity check (conformance/perplexity_checks.py) has power: planted bugs that a random
model's logits may hide move the trained default's held-out bits per byte past the tolerance in every dtype, and the
held-out protocol counts exactly the bytes of the text it scores."""

from __future__ import annotations

import json

import pytest

from conformance import perplexity_checks
from conformance.context import FAIL, Suite
from conformance.planted_bugs import buggy_backend
from core.backend import RunMode
from core.embedded import EMBEDDED_DIR
from tests.helpers import fresh_seed


@pytest.mark.parametrize("bug", ["gate_not_renormalised", "linear_fp8_scales_transposed"])
def test_planted_bug_fails_the_perplexity_check(bug):
    backend, avail = buggy_backend(bug)
    results = perplexity_checks.run(Suite(backend, avail, RunMode(), "quick", fresh_seed()))
    assert {r.dtype for r in results} == {"bfloat16", "float32"}
    for r in results:
        assert r.verdict == FAIL and r.rel_err > r.tolerance, (bug, r.detail)


def test_held_out_pieces_spell_the_held_out_text():
    data = perplexity_checks.held_out(EMBEDDED_DIR)
    docs = json.loads((EMBEDDED_DIR / "heldout.json").read_text(encoding="utf-8"))
    assert data.nbytes == sum(len(t.encode()) for t in docs["documents"].values())
    assert all(p[0] == 0 and 1 < len(p) <= docs["window"] for p in data.pieces)
    quick = perplexity_checks.held_out(EMBEDDED_DIR, perplexity_checks.QUICK_PIECES)
    assert quick.pieces == data.pieces[:perplexity_checks.QUICK_PIECES] and 0 < quick.nbytes < data.nbytes
