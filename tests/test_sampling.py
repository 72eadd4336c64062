"""Per-request sampling (core/engine/sampling.py): every processor against a float64 per-row reference written
here, the sampled distributions and speculative acceptance checked by chi-square, seeds independent of the batch,
tiny temperatures, invalid logits, raw top-k logprobs, and one-line validation errors (generation_config.json too)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine import sampling
from core.engine.generation_config import read_json_object
from core.engine.sampling import (GREEDY_BELOW, InvalidLogits, RequestSampler, SamplingParams, accept,
                                  invalid_rows, process, process_logits, sample, token_logprobs)
from core.errors import CheckpointError, UserError
from tests.helpers import chi2_limit, chi_square, fresh_seed

NEG = -math.inf


# -- an independent reference: one row at a time, float64, plain Python over the vocabulary ---------------------------

def reference_row(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]):
    """(log-probabilities float64 [V], margin): the distribution `p` samples from, and how close any top_p / min_p
    decision came to its threshold (a test redraws when a float32 rounding could legitimately flip it)."""
    x = [float(v) for v in logits.double()]
    vocab = len(x)
    if len(output) < p.min_tokens:
        for t in p.stop_ids:
            x[t] = NEG
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    if p.temperature < GREEDY_BELOW:
        best = max(range(vocab), key=lambda i: (x[i], -i))  # first index among equals
        return torch.tensor([0.0 if i == best else NEG for i in range(vocab)], dtype=torch.float64), math.inf
    x = [v / p.temperature for v in x]
    order = sorted(range(vocab), key=lambda i: -x[i])
    keep = [i for i in order if x[i] > NEG]
    if 0 < p.top_k < vocab:
        kth = x[order[p.top_k - 1]]
        keep = [i for i in keep if x[i] >= kth]
    margin = math.inf

    def probs_of(ids):
        m = max(x[i] for i in ids)
        w = {i: math.exp(x[i] - m) for i in ids}
        s = sum(w.values())
        return {i: v / s for i, v in w.items()}

    if p.top_p < 1:
        pr, before, last = probs_of(keep), 0.0, None
        for i in keep:
            margin = min(margin, abs(before - p.top_p))
            if before < p.top_p:
                last = i
            before += pr[i]
        keep = [i for i in keep if x[i] >= x[last]]  # every token tied with the last one kept stays
    if p.min_p > 0:
        pr = probs_of(keep)
        top = max(pr.values())
        margin = min([margin] + [abs(v / top - p.min_p) / p.min_p for v in pr.values() if v < top])
        keep = [i for i in keep if pr[i] >= p.min_p * top]
    pr = probs_of(keep)
    out = [math.log(pr[i]) if i in pr else NEG for i in range(vocab)]
    return torch.tensor(out, dtype=torch.float64), margin


def assert_matches_reference(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    assert torch.equal(torch.isinf(got), torch.isinf(want)), "different tokens were kept"
    fin = torch.isfinite(want)
    torch.testing.assert_close(got.double()[fin], want[fin], rtol=1e-5, atol=1e-4)


def random_history(g: torch.Generator, vocab: int) -> tuple[list[int], list[int]]:
    prompt = torch.randint(0, vocab, (int(torch.randint(1, 12, (), generator=g)),), generator=g).tolist()
    output = torch.randint(0, vocab, (int(torch.randint(0, 12, (), generator=g)),), generator=g).tolist()
    return prompt, output


def draw_case(g, params, vocab=64):
    """Fresh logits and histories for every row, redrawn until no top_p / min_p decision is within 1e-4 of its
    threshold (a float32 pipeline may then rightly decide either way)."""
    for _ in range(50):
        logits = torch.randn(len(params), vocab, generator=g) * 3
        hist = [random_history(g, vocab) for _ in params]
        refs = [reference_row(logits[b], p, *hist[b]) for b, p in enumerate(params)]
        if min(m for _, m in refs) > 1e-4:
            return logits, hist, torch.stack([r for r, _ in refs])
    raise AssertionError("could not draw logits away from the thresholds")


CASES = {
    "temperature 0.5": dict(temperature=0.5),
    "temperature 1.7": dict(temperature=1.7),
    "top_k 1": dict(top_k=1),
    "top_k 5": dict(top_k=5, temperature=0.8),
    "top_k 20 (beyond a top-8 prefix)": dict(top_k=20),
    "top_k -1 (off)": dict(top_k=-1),
    "top_p 0.3": dict(top_p=0.3),
    "top_p 0.98 (beyond a top-8 prefix)": dict(top_p=0.98, temperature=1.5),
    "top_p 0.9 at T 0.6": dict(top_p=0.9, temperature=0.6),
    "min_p 0.1": dict(min_p=0.1),
    "min_p 0.02 at T 2": dict(min_p=0.02, temperature=2.0),
    "min_p 1 (the most likely only)": dict(min_p=1.0),
    "repetition 1.5": dict(repetition_penalty=1.5),
    "repetition 0.7": dict(repetition_penalty=0.7),
    "frequency 0.8": dict(frequency_penalty=0.8),
    "frequency -0.5": dict(frequency_penalty=-0.5),
    "presence 1.2": dict(presence_penalty=1.2),
    "presence -1": dict(presence_penalty=-1.0),
    "min_tokens bans eos and stop ids": dict(min_tokens=30, eos_token_ids=(1,), stop_token_ids=[3, 4]),
    "greedy with penalties": dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4),
    "everything": dict(temperature=0.7, top_k=20, top_p=0.85, min_p=0.03, repetition_penalty=1.2,
                       frequency_penalty=0.3, presence_penalty=0.2, min_tokens=30, eos_token_ids=(2,)),
}


@pytest.fixture(params=["full sort", "top-8 prefix"])
def prefix(request, monkeypatch):
    """top_k / top_p judged on a full sort, or on the 8 largest values first (the path a real vocabulary takes)."""
    if request.param == "top-8 prefix":
        monkeypatch.setattr(sampling, "TOP_PREFIX", 8)
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_each_processor_matches_the_reference(case, prefix):
    g = torch.Generator().manual_seed(fresh_seed())
    params = [SamplingParams(**CASES[case]).validate()] * 4
    logits, hist, want = draw_case(g, params)
    got = process_logits(logits, params, [h[0] for h in hist], [h[1] for h in hist])
    assert_matches_reference(got, want)


def test_a_batch_of_rows_with_different_params_matches_the_reference_row_by_row(prefix):
    g = torch.Generator().manual_seed(fresh_seed())
    names = list(CASES)
    params = [SamplingParams(**CASES[names[int(i)]]) for i in torch.randint(0, len(names), (16,), generator=g)]
    logits, hist, want = draw_case(g, params)
    got = process_logits(logits, params, [h[0] for h in hist], [h[1] for h in hist])
    assert_matches_reference(got, want)


def test_stateful_process_equals_the_stateless_form_with_extra_tokens():
    """RequestSampler keeps its penalty state incrementally; `extra` counts a draft as already emitted."""
    g = torch.Generator().manual_seed(fresh_seed())
    vocab = 50
    params = [SamplingParams(**CASES[c]) for c in ("everything", "frequency 0.8", "top_p 0.3", "greedy with penalties")]
    rows = []
    for p in params:
        prompt, output = random_history(g, vocab)
        r = RequestSampler(p, prompt, vocab)
        for t in output[:3]:
            r.append(t)
        r.penalty_state(torch.device("cpu"))  # state built now, then updated token by token
        for t in output[3:]:
            r.append(t)
        rows.append(r)
    extra = [[5], [], [7, 7], [9]]
    logits = torch.randn(len(rows), vocab, generator=g) * 3
    got = process(logits, rows, extra)
    want = process_logits(logits, params, [r.prompt_ids for r in rows],
                          [r.output_ids + e for r, e in zip(rows, extra)])
    assert torch.equal(got, want)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1),
       temperature=st.one_of(st.just(0.0), st.floats(1e-30, 1e-5), st.floats(1e-5, 1e300)),
       top_p=st.floats(1e-6, 1.0).filter(lambda v: v > 0), top_k=st.integers(-1, 80),
       min_p=st.floats(0.0, 1.0), repetition=st.floats(1e-300, 1e300), frequency=st.floats(-2.0, 2.0),
       presence=st.floats(-2.0, 2.0), scale=st.floats(1e-3, 1e30))
def test_processed_rows_are_always_distributions(seed, temperature, top_p, top_k, min_p, repetition, frequency,
                                                 presence, scale):
    """For any valid parameters and logits of any magnitude: no NaN, >= 0, sums to 1; greedy rows one-hot."""
    p = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition,
                       frequency_penalty=frequency, presence_penalty=presence).validate()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 64, generator=g) * scale
    logits[1, :5] = NEG  # some tokens already impossible
    hist = [random_history(g, 64) for _ in range(3)]
    lp = process_logits(logits, [p] * 3, [h[0] for h in hist], [h[1] for h in hist])
    probs = lp.double().exp()
    assert not torch.isnan(lp).any() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    if p.greedy:
        assert ((lp == 0).sum(-1) == 1).all()


# -- tiny temperatures, ties and invalid logits ----------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-30, 1e-12, GREEDY_BELOW / 2])
def test_a_tiny_temperature_is_greedy(temperature):
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(6, 100, generator=g).clamp(-3, 3) * torch.tensor([1, 1, 1e-6, 1e20, 1e30, 1e38])[:, None]
    logits[:, 0] = logits.min(dim=-1).values - 1  # token 0 is the least likely in every row
    greedy, tiny = SamplingParams(temperature=0.0), SamplingParams(temperature=temperature)
    lp = process_logits(logits, [tiny] * 6, [[]] * 6, [[]] * 6)
    assert torch.equal(lp, process_logits(logits, [greedy] * 6, [[]] * 6, [[]] * 6))
    rows = [RequestSampler(tiny, [], 100) for _ in range(6)]
    tokens = sample(lp, rows)
    assert torch.equal(tokens, logits.argmax(dim=-1)) and (tokens != 0).all()


def test_the_smallest_sampled_temperature_gives_a_finite_distribution():
    g = torch.Generator().manual_seed(fresh_seed())
    scales = torch.tensor([1, 1e-3, 1e10, 1e30, 1e38])[:, None]  # the last overflows unless the max comes off first
    logits = torch.randn(5, 100, generator=g).clamp(-3, 3) * scales
    lp = process_logits(logits, [SamplingParams(temperature=GREEDY_BELOW)] * 5, [[]] * 5, [[]] * 5)
    assert not torch.isnan(lp).any()
    torch.testing.assert_close(lp.double().exp().sum(-1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-5)
    assert torch.equal(lp.argmax(-1), logits.argmax(-1))


def test_top_k_and_top_p_keep_every_token_tied_with_the_last_one_kept():
    """Thresholds on the value: the kept set does not depend on where tied tokens sit in the vocabulary."""
    base = torch.tensor([4.0, 2.0, 2.0, 2.0, 0.0, -1.0])  # probs ~ .70 .095 .095 .095 .013 .005
    for params, kept in ((SamplingParams(top_k=2), {0, 1, 2, 3}), (SamplingParams(top_p=0.8), {0, 1, 2, 3}),
                         (SamplingParams(top_p=0.6), {0})):
        for perm in (torch.arange(6), torch.tensor([3, 5, 0, 2, 4, 1])):
            lp = process_logits(base[perm][None], [params], [[]], [[]])[0]
            assert {int(perm[i]) for i in torch.isfinite(lp).nonzero().flatten()} == kept, params


@pytest.mark.parametrize("top_p", [1 - 1e-9, 1 - 6e-8, 1 - 2e-7])
def test_top_p_just_below_one_never_undoes_top_k(prefix, top_p):
    """The top_k tokens' mass, summed in float32, may fall short of a top_p this close to 1: the cut still holds."""
    g = torch.Generator().manual_seed(fresh_seed())
    lp = process_logits(torch.randn(64, 64, generator=g), [SamplingParams(top_k=3, top_p=top_p)] * 64,
                        [[]] * 64, [[]] * 64)
    assert (torch.isfinite(lp).sum(-1) == 3).all()


def test_greedy_ties_take_the_first_index():
    logits = torch.tensor([[0.5, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    lp = process_logits(logits, [SamplingParams(temperature=0.0)] * 2, [[]] * 2, [[]] * 2)
    assert lp.argmax(-1).tolist() == [1, 0] and ((lp == 0).sum(-1) == 1).all()


def test_invalid_rows_are_named_and_do_not_touch_the_others():
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(5, 40, generator=g)
    logits[1, 7] = math.nan
    logits[2] = NEG
    logits[3, 0] = math.inf
    params = [SamplingParams(temperature=0.9, top_p=0.8)] * 5
    assert invalid_rows(logits) == [1, 2, 3]
    with pytest.raises(InvalidLogits) as e:
        process_logits(logits, params, [[]] * 5, [[]] * 5)
    msg = str(e.value)
    assert e.value.rows == [1, 2, 3] and "\n" not in msg
    assert "NaN in rows [1]" in msg and "+inf in rows [3]" in msg and "no finite value in rows [2]" in msg
    good = [0, 4]
    both = process_logits(logits[good], [params[0]] * 2, [[]] * 2, [[]] * 2)
    for i, r in enumerate(good):
        assert torch.equal(both[i], process_logits(logits[r:r + 1], [params[0]], [[]], [[]])[0])


def test_min_tokens_bans_stop_ids_until_enough_tokens_are_out():
    p = SamplingParams(temperature=1.0, min_tokens=2, max_tokens=4, eos_token_ids=(1,), stop_token_ids=[3])
    r = RequestSampler(p, [5], 8)
    logits = torch.zeros(1, 8)
    logits[0, 1] = logits[0, 3] = 10.0
    assert torch.isinf(process(logits, [r])[0, [1, 3]]).all()
    assert r.append(1) is None  # a stop id before min_tokens does not end the request
    assert torch.isinf(process(logits, [r])[0, [1, 3]]).all()  # one token out: still banned
    assert r.append(6) is None
    assert torch.isfinite(process(logits, [r])[0, [1, 3]]).all()
    assert r.append(3) == "stop"
    r2 = RequestSampler(SamplingParams(max_tokens=2, eos_token_ids=(1,), ignore_eos=True), [5], 8)
    assert r2.append(1) is None and r2.append(1) == "length"


# -- statistics ------------------------------------------------------------------------------------------------------

def draw_many(lp: torch.Tensor, n_rows: int, n_steps: int, params: SamplingParams) -> torch.Tensor:
    """Counts [V] of n_rows * n_steps draws of `sample` from logprobs [V], one RequestSampler per batch row."""
    rows = [RequestSampler(params, [], lp.shape[-1]) for _ in range(n_rows)]
    batch = lp.expand(n_rows, -1)
    counts = torch.zeros(lp.shape[-1], dtype=torch.float64)
    for _ in range(n_steps):
        counts += torch.bincount(sample(batch, rows), minlength=lp.shape[-1]).double()
    return counts


@pytest.mark.parametrize("case", ["temperature 0.5", "top_k 5", "top_p 0.9 at T 0.6", "min_p 0.1", "everything"])
def test_sampling_follows_the_processed_distribution(case):
    g = torch.Generator().manual_seed(fresh_seed())
    p = SamplingParams(**CASES[case])
    logits, hist, want = draw_case(g, [p], vocab=12)
    lp = process_logits(logits, [p], [hist[0][0]], [hist[0][1]])[0]
    chi2, df = chi_square(draw_many(lp, 500, 40, p), want[0].exp())
    if df > 0:
        assert chi2 < chi2_limit(df), f"chi-square {chi2:.1f} with {df} degrees of freedom (p < 1e-6 under the null)"


def test_speculative_acceptance_reproduces_the_target_exactly():
    """Draft from q, accept with min(1, p/q), else resample from max(p - q, 0): the emitted token is distributed as
    p, even where p and q have different supports (q truncated by top_k, p by top_p); the acceptance rate is
    sum(min(p, q))."""
    g = torch.Generator().manual_seed(fresh_seed())
    vocab, n_rows, n_steps = 12, 500, 40
    pp, qp = SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=1.3, top_k=5)
    while True:  # supports that overlap only in part, p's of at least 3 tokens
        p = process_logits(torch.randn(1, vocab, generator=g) * 1.5, [pp], [[]], [[]])[0]
        q = process_logits(torch.randn(1, vocab, generator=g) * 1.5, [qp], [[]], [[]])[0]
        sp, sq = torch.isfinite(p), torch.isfinite(q)
        if sp.sum() >= 3 and (sp & ~sq).any() and (sq & ~sp).any():
            break
    rows = [RequestSampler(pp, [], vocab) for _ in range(n_rows)]
    counts, accepted = torch.zeros(vocab, dtype=torch.float64), 0
    for _ in range(n_steps):
        drafts = sample(q.expand(n_rows, -1), rows)
        ok, tokens = accept(p.expand(n_rows, -1), q.expand(n_rows, -1), drafts, rows)
        assert torch.equal(tokens[ok], drafts[ok])
        counts += torch.bincount(tokens, minlength=vocab).double()
        accepted += int(ok.sum())
    chi2, df = chi_square(counts, p.double().exp())
    assert chi2 < chi2_limit(df), f"chi-square {chi2:.1f} with {df} degrees of freedom (p < 1e-6 under the null)"
    n, rate = n_rows * n_steps, float(torch.minimum(p.double().exp(), q.double().exp()).sum())
    assert abs(accepted / n - rate) < 4.5 * math.sqrt(rate * (1 - rate) / n) + 1e-9


def test_greedy_rows_accept_exactly_the_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(fresh_seed())
    vocab = 30
    logits = torch.randn(4, vocab, generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8)] * 2
    rows = [RequestSampler(p, [], vocab) for p in params]
    p = process_logits(logits, params, [[]] * 4, [[]] * 4)
    q = process_logits(torch.randn(4, vocab, generator=g), params, [[]] * 4, [[]] * 4)
    best = logits.argmax(-1)
    drafts = torch.stack([best[0], best[1], (best[2] + 1) % vocab, best[3]])
    ok, tokens = accept(p, q, drafts, rows)
    assert ok[0] and not ok[2] and tokens[0] == best[0] and tokens[2] == best[2]
    assert p[1, tokens[1]] > NEG and p[3, tokens[3]] > NEG  # sampled rows emit a token p allows


# -- seeds -----------------------------------------------------------------------------------------------------------

def test_a_seeded_request_gives_the_same_tokens_wherever_it_sits_in_any_batch():
    seed, vocab, steps = fresh_seed(), 80, 12
    g = torch.Generator().manual_seed(fresh_seed())
    target = SamplingParams(temperature=0.9, top_p=0.9, presence_penalty=0.5, seed=seed)
    logits = torch.randn(steps, 2, vocab, generator=g) * 2  # per step: the row's logits and a draft's
    prompt = [3, 1, 4, 1, 5]

    def run(batch_size: int, position: int) -> list[int]:
        me = RequestSampler(target, prompt, vocab)
        others = [RequestSampler(SamplingParams(**CASES[c]), [2, 7], vocab)
                  for c in ("everything", "top_k 5", "greedy with penalties", "min_p 0.1", "temperature 1.7",
                            "top_p 0.3")[: batch_size - 1]]
        rows = others[:position] + [me] + others[position:]
        for step in range(steps):
            batch = torch.randn(2, batch_size, vocab) * 3
            batch[:, position] = logits[step]
            lp = process(batch[0], rows)
            tok = sample(lp, rows)
            q = process(batch[1], rows)
            _, tok2 = accept(lp, q, sample(q, rows), rows)  # a speculative step on the same generators
            for r, a, b in zip(rows, tok.tolist(), tok2.tolist()):
                r.append(a)
                r.append(b)
        return me.output_ids

    alone = run(1, 0)
    assert len(set(alone)) > 3
    for batch_size, position in ((3, 0), (3, 2), (7, 4)):
        assert run(batch_size, position) == alone


def test_no_seed_means_a_fresh_random_seed():
    a, b = RequestSampler(SamplingParams(), [1], 10), RequestSampler(SamplingParams(), [1], 10)
    assert a.seed != b.seed
    assert RequestSampler(SamplingParams(seed=7), [1], 10).seed == 7


# -- logprobs --------------------------------------------------------------------------------------------------------

def test_logprobs_are_of_the_raw_distribution():
    g = torch.Generator().manual_seed(fresh_seed())
    logits = torch.randn(3, 50, generator=g) * 2
    tokens = torch.tensor([4, 17, 30])
    out = token_logprobs(logits, tokens, [5, None, 0])
    raw = torch.log_softmax(logits.double(), dim=-1)
    assert out[1] is None and out[2].top == []
    for b in (0, 2):
        t = int(tokens[b])
        assert out[b].token == t and math.isclose(out[b].logprob, float(raw[b, t]), abs_tol=1e-5)
        assert out[b].rank == 1 + int((raw[b] > raw[b, t]).sum())
    order = raw[0].argsort(descending=True)[:5].tolist()
    assert [t for t, _ in out[0].top] == order
    assert all(math.isclose(v, float(raw[0, t]), abs_tol=1e-5) for t, v in out[0].top)


# -- validation ------------------------------------------------------------------------------------------------------

BAD = [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "0.5"),
       ("temperature", True), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -2), ("top_k", 2.5),
       ("min_p", -0.1), ("min_p", 1.1), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
       ("repetition_penalty", math.inf), ("frequency_penalty", 2.5), ("presence_penalty", -3.0),
       ("max_tokens", 0), ("max_tokens", 1.5), ("min_tokens", -1), ("stop", [""]), ("stop", ["ok", 3, "a\nb"]),
       ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("seed", 2 ** 64), ("seed", "x"), ("logprobs", 21),
       ("logprobs", -1), ("ignore_eos", "yes"), ("eos_token_ids", ("1",))]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_params_are_one_line_errors_naming_the_field(name, value):
    for make in (lambda: SamplingParams(**{name: value}).validate(),
                 lambda: SamplingParams.from_generation_config(None, **{name: value})):
        with pytest.raises(UserError) as e:
            make()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(name) and "got" in msg


def test_cross_field_and_vocabulary_checks():
    with pytest.raises(UserError, match="min_tokens \\(5\\) must not exceed max_tokens \\(2\\)"):
        SamplingParams(min_tokens=5, max_tokens=2).validate()
    with pytest.raises(UserError, match="stop_token_ids \\[99\\] are outside the vocabulary \\[0, 50\\)"):
        RequestSampler(SamplingParams(stop_token_ids=[3, 99]), [1], 50)
    with pytest.raises(UserError, match="unknown sampling option 'temprature'"):
        SamplingParams().merged(temprature=0.5)
    assert SamplingParams(stop="END").stop == ["END"]
    for good in (dict(top_k=0), dict(top_k=-1), dict(top_p=1.0), dict(min_p=1.0), dict(seed=-5), dict(logprobs=0),
                 dict(logprobs=20), dict(temperature=0), dict(frequency_penalty=-2.0)):
        SamplingParams(**good).validate()


def write(path, data) -> str:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_generation_config_gives_defaults_and_explicit_fields_win(tmp_path):
    write(tmp_path / "generation_config.json", {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1,
                                                "do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                                "transformers_version": "4.46.3"})
    p = SamplingParams.from_generation_config(tmp_path)  # a checkpoint directory
    assert (p.temperature, p.top_p, p.eos_token_ids, p.top_k) == (0.6, 0.95, (1,), 0)
    p = SamplingParams.from_generation_config(tmp_path / "generation_config.json", temperature=0.0, top_p=None,
                                              max_tokens=7, seed=3)
    assert (p.temperature, p.top_p, p.max_tokens, p.seed, p.greedy) == (0.0, 0.95, 7, 3, True)
    greedy = SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.6, "top_k": 40,
                                                    "repetition_penalty": 1.1, "max_new_tokens": 9,
                                                    "eos_token_id": [1, 2]})
    assert (greedy.greedy, greedy.top_k, greedy.repetition_penalty, greedy.max_tokens, greedy.eos_token_ids) == \
        (True, 40, 1.1, 9, (1, 2))
    assert SamplingParams.from_generation_config({"do_sample": False}, temperature=0.8).temperature == 0.8
    model = SamplingParams(eos_token_ids=(5,), max_tokens=100)  # the layer below: the model's config.json
    assert SamplingParams.from_generation_config({"temperature": 0.3}, model).eos_token_ids == (5,)
    assert SamplingParams.from_generation_config({"eos_token_id": [6, 7]}, model).eos_token_ids == (6, 7)
    (tmp_path / "bare").mkdir()
    assert SamplingParams.from_generation_config(tmp_path / "bare") == SamplingParams()  # none there: no defaults


@pytest.mark.parametrize("content,expect", [
    ({"temperature": "hot"}, "temperature must be"),
    ({"top_p": 0}, "top_p must be"),
    ({"do_sample": "no"}, "do_sample must be true or false"),
    ({"eos_token_id": ["x\ny"]}, "eos_token_id must be"),
    ("{not json", "invalid JSON at line 1"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("[" * 100000 + "]" * 100000, "levels deep; refused"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_a_bad_generation_config_is_one_line_naming_the_file(tmp_path, content, expect):
    path = tmp_path / "generation_config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write(path, content)
    with pytest.raises(CheckpointError) as e:
        SamplingParams.from_generation_config(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and expect in msg


def test_json_reading_is_bounded_and_refuses_what_is_not_a_regular_file(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b"{" + b" " * (5 * 1024 * 1024) + b"}")
    with pytest.raises(CheckpointError, match="bytes exceeds the limit of 4194304 bytes"):
        read_json_object(big)
    assert read_json_object(big, max_bytes=6 * 1024 * 1024) == {}
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):  # refused without opening: never blocks
        read_json_object(fifo)
    with pytest.raises(CheckpointError, match="not found"):
        read_json_object(tmp_path / "missing.json")
