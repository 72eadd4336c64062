"""The graph against transformers' DeepseekV3ForCausalLM on the same weights (float32): teacher-forced logits,
greedy continuations, chunked prefill, the absorbed decode path, and the MTP module against transformers' MtpLayer."""

from __future__ import annotations

import pytest
import torch

from core.batch import Batch
from core.generate import Generator
from core.model import Model
from tests.helpers import GateMargins, build_hf, fresh_seed, hf_mtp, load_ours, reference_dispatch

PROMPT_LEN = 80
NEW_TOKENS = 32


def decisive_model(tmp_path, **overrides):
    """A fresh random model whose routing on a fresh prompt has no near-ties (margin >= 1e-4), redrawn if needed."""
    for _ in range(5):
        seed = fresh_seed()
        d = tmp_path / f"m{seed}"
        hf = build_hf(d, seed, **overrides)
        ops = reference_dispatch()
        margins = GateMargins(ops)
        ours = load_ours(d, ops=ops)
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(2, hf.config.vocab_size, (PROMPT_LEN,), generator=g).tolist()
        Generator(ours).teacher_forced_logits(prompt)
        if margins.smallest >= 1e-4:
            return hf, ours, d, prompt, seed
    pytest.fail("could not draw a model with decisive routing in 5 tries")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return decisive_model(tmp_path_factory.mktemp("hf"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_teacher_forced_logits_match_transformers(tiny):
    hf, ours, _, prompt, seed = tiny
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    got = Generator(ours).teacher_forced_logits(prompt)
    assert got.shape == want.shape
    assert rel(got, want) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("chunk", [None, 7, 32])
def test_greedy_continuation_matches_transformers(tiny, chunk):
    hf, ours, _, prompt, seed = tiny
    hf.generation_config.eos_token_id = None  # no stop token on either side (min_new_tokens would mask EOS)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    want = out[0, len(prompt):].tolist()
    got = Generator(ours, prefill_chunk=chunk).generate([prompt], NEW_TOKENS, stop_at_eos=False).output_ids[0]
    assert got == want, f"seed {seed}, chunk {chunk}"


BS = 16


def paged(model, positions: int, seed: int, mtp: bool = False):
    """A paged cache with spare blocks, and a shuffled (non-contiguous) block table holding `positions` positions."""
    need = -(-positions // BS)
    cache = model.new_cache(need + 3, BS, mtp=mtp)
    return cache, torch.randperm(need + 3, generator=torch.Generator().manual_seed(seed))[:need].tolist()


def decode_path_logits(ours, prompt: list[int], seed: int) -> list[torch.Tensor]:
    """Logits of `prompt` teacher-forced through the absorbed path: a prefill of its first half, then one mla_decode
    step per remaining token, over a paged cache."""
    cache, table = paged(ours, len(prompt), seed)
    half = len(prompt) // 2
    outs = [ours.logits(ours.forward(Batch.build([prompt[:half]], [table], [0], ours.device, block_size=BS), cache))]
    for i in range(half, len(prompt)):
        b = Batch.build([[prompt[i]]], [table], [i], ours.device, block_size=BS, decode=True)
        outs.append(ours.logits(ours.forward(b, cache)))
    return outs


def test_decode_path_logits_match_transformers(tiny):
    """Teacher-forced through the absorbed path: prefill half, then one mla_decode step per token."""
    hf, ours, _, prompt, seed = tiny
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        outs = decode_path_logits(ours, prompt, seed)
    assert rel(torch.cat(outs), want) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("widen", [False, True])
def test_absorb_matmul_is_the_exact_product_rounded_once(widen):
    """Model._absorb (the graph's per-head matmul with w_uk / w_uv): bfloat16 activations times bfloat16 weights,
    kept as they are or widened to float32 by a prepare_mla, give the float64 product within one bfloat16 ulp."""
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(5, 3, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(3, 40, 64, generator=g).to(torch.bfloat16)  # [H, N, K]
    golden = torch.einsum("thk,hnk->thn", x.double(), w.double())
    got = Model._absorb(x, w.float() if widen else w)
    assert got.dtype == torch.bfloat16 and got.shape == (5, 3, 40) and got.is_contiguous()
    assert ((got.double() - golden).abs() <= golden.abs() * 2.0 ** -7 + 1e-30).all()


def test_decode_path_with_widened_absorbed_weights_matches_transformers(tiny):
    """A backend's prepare_mla that widens w_uk / w_uv (here to float64) changes only the dtype of the graph's two
    absorb matmuls: the decode path still matches transformers."""
    hf, _, d, prompt, seed = tiny
    ops = reference_dispatch()
    ops.prepare_mla = lambda w_uk, w_uv: (w_uk.double(), w_uv.double())
    ours = load_ours(d, ops=ops)
    assert ours.w.layers[0].attn.w_uk.dtype == torch.float64
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        outs = decode_path_logits(ours, prompt, seed)
    got = torch.cat(outs)
    assert got.dtype == torch.float32 and rel(got, want) < 1e-5, f"seed {seed}"


def test_batched_prefill_matches_single_sequences(tiny):
    """Three sequences of different lengths in one varlen batch equal each run alone."""
    hf, ours, _, prompt, seed = tiny
    prompts = [prompt[:17], prompt[5:70], prompt[40:41]]
    gen = Generator(ours, prefill_chunk=16)
    together = gen.generate(prompts, 8, stop_at_eos=False).output_ids
    alone = [Generator(ours).generate([p], 8, stop_at_eos=False).output_ids[0] for p in prompts]
    assert together == alone, f"seed {seed}"


def test_mtp_draft_logits_match_transformers(tiny):
    hf, ours, d, prompt, seed = tiny
    mtp = hf_mtp(hf, d)
    n = len(prompt)
    with torch.no_grad():
        h = hf.model(torch.tensor([prompt])).last_hidden_state
        tokens = torch.tensor([prompt[1:]])
        want = mtp._project_to_logits(mtp.forward_layer(0, h[:, :-1], torch.arange(1, n)[None], None,
                                                        input_ids=tokens))[0]
        (cache, table), (mtp_cache, mtp_table) = paged(ours, n, seed), paged(ours, n, seed + 1, mtp=True)
        hidden = ours.forward(Batch.build([prompt], [table], [0], ours.device, block_size=BS), cache)
        g = ours.mtp_forward(Batch.build([prompt[1:]], [mtp_table], [0], ours.device, block_size=BS,
                                         position_offset=1), hidden[:-1], mtp_cache)
        got = ours.logits(g)
    assert rel(hidden, h[0]) < 1e-5
    assert rel(got, want) < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("overrides", [
    dict(q_lora_rank=None),                                   # Moonlight-style: q_proj, no q_lora
    dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_interleave=False),
    dict(norm_topk_prob=False, n_shared_experts=2),
    dict(first_k_dense_replace=0, n_group=1, topk_group=1),   # every layer MoE, ungrouped routing
    dict(tie_word_embeddings=True, attention_bias=True),
], ids=["no-q-lora", "plain-rope-half-layout", "no-renorm-2-shared", "all-moe-ungrouped", "tied-bias"])
def test_config_variants_match_transformers(tmp_path, overrides):
    hf, ours, _, prompt, seed = decisive_model(tmp_path, mtp=False, **overrides)
    if overrides.get("attention_bias"):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # transformers initialises biases to zero; make them count, and reload
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
        d = tmp_path / "biased"
        hf.save_pretrained(d)
        ours = load_ours(d, with_mtp=False)
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    got = Generator(ours, prefill_chunk=29).teacher_forced_logits(prompt)
    assert rel(got, want) < 1e-5, f"seed {seed} {overrides}"
