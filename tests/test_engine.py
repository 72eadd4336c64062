"""The engine: continuous batching over the paged cache gives every request exactly what it gets alone.

The reference for "alone" is `core.generate.Generator`, the simple one-batch loop that the transformers-equivalence
tests pin down; the engine shares none of its scheduling, cache allocation or sampling code.
"""

from __future__ import annotations

import random

import pytest
import torch

from core.engine.engine import EngineConfig
from core.engine.llm import LLM
from core.engine.sampling import SamplingParams
from core.generate import Generator

BYTES_PER_TOKEN = 4 * 160 * 4  # embedded default: 4 layers x (128 + 32) x float32


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", engine=EngineConfig(max_num_seqs=16, max_num_batched_tokens=96, block_size=4))


def random_prompts(rng: random.Random, n: int, longest: int = 48) -> list[list[int]]:
    return [[0] + [rng.randrange(3, 512) for _ in range(rng.randrange(1, longest))] for _ in range(n)]


def alone(llm: LLM, prompt: list[int], max_tokens: int) -> list[int]:
    return Generator(llm.model).generate([prompt], max_tokens, stop_at_eos=False).output_ids[0]


def submit_at_random_steps(llm: LLM, jobs: list[tuple[list[int], SamplingParams]], rng: random.Random
                           ) -> dict[str, list[int]]:
    """Add the jobs a few at a time between engine steps; collect every finished output (none may be lost)."""
    engine, pending, ids, done = llm.engine, list(jobs), [], {}
    while pending or engine.has_unfinished:
        for _ in range(rng.randrange(0, 4) if engine.has_unfinished else 1):
            if pending:
                prompt, params = pending.pop(0)
                ids.append(engine.add(prompt, params))
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out.token_ids
    assert sorted(done) == sorted(ids), "every request finished exactly once"
    return {rid: done[rid] for rid in ids}


def test_64_requests_at_random_times_equal_each_request_alone(llm):
    rng = random.Random(torch.randint(0, 2 ** 31, ()).item())
    prompts = random_prompts(rng, 64)
    lengths = [rng.randrange(1, 10) for _ in prompts]
    jobs = [(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    outputs = list(submit_at_random_steps(llm, jobs, rng).values())
    for prompt, n, got in zip(prompts, lengths, outputs):
        assert got == alone(llm, prompt, n)
    assert llm.engine.pool.num_used == 0, "every block is back in the pool"


def test_a_cache_too_small_for_all_makes_requests_wait_or_be_preempted_and_all_finish_identically():
    rng = random.Random(torch.randint(0, 2 ** 31, ()).item())
    small = LLM(dtype="float32", engine=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
                                                     kv_cache_memory=24 * 4 * BYTES_PER_TOKEN))
    prompts = random_prompts(rng, 16, longest=40)
    jobs = [(p, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)) for p in prompts]
    outputs = list(submit_at_random_steps(small, jobs, rng).values())
    assert small.engine.stats.preemptions > 0 or small.engine.stats.peak_blocks_used == small.engine.pool.num_blocks
    for prompt, got in zip(prompts, outputs):
        assert got == alone(small, prompt, 8)
    assert small.engine.pool.num_used == 0


def test_mtp_in_busy_batches_equals_plain_greedy_and_drafts_are_both_accepted_and_rejected():
    rng = random.Random(torch.randint(0, 2 ** 31, ()).item())
    mtp = LLM(dtype="float32", engine=EngineConfig(max_num_seqs=6, max_num_batched_tokens=48, block_size=4,
                                                   mtp=True, kv_cache_memory=40 * 4 * BYTES_PER_TOKEN * 5 // 4))
    prompts = random_prompts(rng, 10, longest=30)
    outs = mtp.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == alone(mtp, prompt, 12)
    proposed, accepted = mtp.engine.stats.drafts_proposed, mtp.engine.stats.drafts_accepted
    assert 0 < accepted < proposed
    assert mtp.engine.pool.num_used == 0


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(llm):
    rng = random.Random(torch.randint(0, 2 ** 31, ()).item())
    prompts = random_prompts(rng, 6)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, repetition_penalty=1.2, max_tokens=10, seed=s,
                             ignore_eos=True) for s in range(6)]
    together = [o.token_ids for o in llm.generate(prompts, params)]
    reversed_batch = [o.token_ids for o in llm.generate(prompts[::-1], params[::-1])][::-1]
    one_by_one = [llm.generate([p], q)[0].token_ids for p, q in zip(prompts, params)]
    assert together == reversed_batch == one_by_one
    assert len({tuple(t) for t in together}) > 1


def test_logprobs_are_the_models_own(llm):
    prompt = [0] + torch.randint(3, 512, (20,)).tolist()
    (out,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True))
    full = prompt + out.token_ids
    logits = Generator(llm.model).teacher_forced_logits(full).double()
    want = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    for i, (tok, lp) in enumerate(zip(out.token_ids, out.logprobs)):
        assert lp.token == tok and lp.rank == 1, "greedy picks the most likely token"
        assert abs(lp.logprob - float(want[i, tok])) < 1e-4
        top_ids = [t for t, _ in lp.top]
        assert top_ids == want[i].topk(3).indices.tolist()


def test_stop_string_across_tokens_ends_the_request_without_showing_it(llm):
    prompt = llm.encode("The assert statement")
    (free,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    text = free.text
    assert len(text) >= 6
    stop = text[3:6]  # spans several byte tokens of the embedded default
    (cut,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop=[stop], ignore_eos=True))
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    assert llm.engine.pool.num_used == 0


def test_abort_frees_blocks_at_once(llm):
    engine = llm.engine
    rid = engine.add([0, 5, 6, 7, 8, 9], SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_used > 0
    assert engine.abort(rid)
    assert engine.pool.num_used == 0 and not engine.has_unfinished


def test_streamed_deltas_concatenate_to_the_final_text(llm):
    outs = list(llm.stream("Hello", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)))
    assert outs[-1].finished and "".join(o.new_text for o in outs) == outs[-1].text
    assert sum(len(o.new_token_ids) for o in outs) == len(outs[-1].token_ids) == 12


def test_bad_requests_fail_in_one_line_before_anything_is_queued(llm):
    from core.errors import UserError

    with pytest.raises(UserError, match=r"exceed the context length"):
        llm.generate([[0] * 10], SamplingParams(max_tokens=llm.engine.max_model_len))
    with pytest.raises(UserError, match=r"top_p"):
        llm.generate([[0, 4]], SamplingParams(top_p=0.0))
    with pytest.raises(UserError, match=r"outside the vocabulary"):
        llm.generate([[0, 100000]], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished


def test_chat_uses_the_template_with_one_bos(llm):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = llm.encode_chat(messages)
    assert ids.count(llm.tokenizer.bos_token_id) == 1 and ids[0] == llm.tokenizer.bos_token_id
    (out,) = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    assert out.token_ids == alone(llm, ids, 4)
