"""Each family of the DeepSeek-V3 class against transformers on tiny checkpoints written by transformers (float32):
DeepSeek-V2-Lite-shaped and V2-shaped (`DeepseekV2ForCausalLM`: softmax routing, greedy / group_limited_greedy, no
correction bias, V2's YaRN), and Moonlight- and Kimi-K2-shaped (`DeepseekV3ForCausalLM` with one expert group, no
q_lora / many experts). Teacher-forced logits within 1e-5 relative, identical greedy continuations (prefill and
decode paths). The same families saved in bfloat16 (as most of them are published): run in bfloat16, our logits sit
as close to the float32 truth of those weights as transformers' own bfloat16 run does; run in float32, they equal
transformers' float32 run of the bf16 weights (1e-5) with identical greedy tokens."""

from __future__ import annotations

import json

import pytest
import torch

from core.generate import Generator
from tests.helpers import (
    YARN,
    GateMargins,
    fresh_seed,
    init_weights,
    load_ours,
    reference_dispatch,
)

PROMPT_LEN = 48
NEW_TOKENS = 16
V2_YARN = dict(YARN, mscale=0.707, mscale_all_dim=0.707)  # V2-Lite's rope_scaling, at tiny positions

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
            v_head_dim=16, max_position_embeddings=512, eos_token_id=1, bos_token_id=0, first_k_dense_replace=1)

FAMILIES = {
    # DeepSeek-V2-Lite: no q_lora, greedy routing over 64 experts (here 16), 2 shared, scale 1.0, YaRN mscale 0.707
    "v2-lite": ("v2", dict(q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                           topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0,
                           norm_topk_prob=False, rope_parameters=dict(V2_YARN)), {}),
    # DeepSeek-V2 / V2.5: q_lora, group_limited_greedy (8 groups keep 3; here 4 keep 2), scale 16
    "v2": ("v2", dict(q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                      topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=16.0,
                      norm_topk_prob=False, rope_parameters=dict(V2_YARN)), {}),
    # Moonlight-16B-A3B: V3 architecture, no q_lora, one group, plain rope theta 50000
    "moonlight": ("v3", dict(q_lora_rank=None, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                             n_group=1, topk_group=1, routed_scaling_factor=2.446, norm_topk_prob=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                             num_nextn_predict_layers=0), {}),
    # Kimi-K2: model_type kimi_k2, V3 architecture, many experts in one group (384; here 48), 64 heads (here 8)
    "kimi-k2": ("v3", dict(q_lora_rank=48, n_routed_experts=48, num_experts_per_tok=8, n_shared_experts=1,
                           n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                           num_attention_heads=8, num_key_value_heads=8, rope_parameters=dict(YARN),
                           num_nextn_predict_layers=0), {"model_type": "kimi_k2"}),
}


def tiny_transformers_model(arch: str, overrides: dict):
    """transformers' float32 model of the family ("v2": DeepseekV2, else DeepseekV3) with TINY + overrides."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    config_cls, model_cls = ((DeepseekV2Config, DeepseekV2ForCausalLM) if arch == "v2"
                             else (DeepseekV3Config, DeepseekV3ForCausalLM))
    return model_cls(config_cls(**{**TINY, **overrides})).float().eval()


def build(directory, seed: int, arch: str, overrides: dict, config_edits: dict, dtype: torch.dtype = torch.float32):
    model = tiny_transformers_model(arch, overrides)
    # softmax scores of N(0, 1) logits over 16 experts are ~1/16 with gaps ~1e-3 (sigmoid families: N(0, 9))
    init_weights(model, seed, gate_gain=1.0 if arch == "v2" else 3.0)
    model.to(dtype).save_pretrained(directory)  # bfloat16: every tensor stored in bf16, config dtype bfloat16
    if config_edits:  # fields transformers' class does not write (Kimi-K2's model_type)
        path = directory / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_edits}))
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """A fresh tiny model of the family whose routing on a fresh prompt has no near-ties, redrawn if needed."""
    arch, overrides, edits = FAMILIES[request.param]
    for _ in range(5):
        seed = fresh_seed()
        d = tmp_path_factory.mktemp(request.param)
        hf = build(d, seed, arch, overrides, edits)
        ops = reference_dispatch()
        margins = GateMargins(ops)
        ours = load_ours(d, ops=ops, with_mtp=False)
        prompt = torch.randint(2, 96, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()
        Generator(ours).teacher_forced_logits(prompt)
        if margins.smallest >= 1e-5:
            return request.param, hf, ours, prompt, seed
    pytest.fail(f"{request.param}: could not draw a model with decisive routing in 5 tries")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_family_config_read(family):
    name, _hf, ours, _, _ = family
    c = ours.cfg
    want = {"v2-lite": ("deepseek_v2", "softmax", "greedy"), "v2": ("deepseek_v2", "softmax", "group_limited_greedy"),
            "moonlight": ("deepseek_v3", "sigmoid", "noaux_tc"), "kimi-k2": ("kimi_k2", "sigmoid", "noaux_tc")}
    assert (c.model_type, c.scoring_func, c.topk_method) == want[name]
    assert all(layer.ffn.bias is None for layer in ours.w.layers[1:]) == name.startswith("v2")


def test_family_logits_match_transformers(family):
    name, hf, ours, prompt, seed = family
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    got = Generator(ours, prefill_chunk=13).teacher_forced_logits(prompt)
    assert rel(got, want) < 1e-5, f"{name} seed {seed}"


def test_family_greedy_continuation_matches_transformers(family):
    name, hf, ours, prompt, seed = family
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    want = out[0, len(prompt):].tolist()
    got = Generator(ours).generate([prompt], NEW_TOKENS, stop_at_eos=False).output_ids[0]
    assert got == want, f"{name} seed {seed}"


def test_v2_gate_equals_transformers_router():
    """cpu_ref's moe_gate (softmax, greedy and group_limited_greedy) against transformers' DeepseekV2TopkRouter on
    the same logits: same expert sets, same weights (float32)."""
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2TopkRouter,
    )

    from backends.cpu_ref.moe import moe_gate

    g = torch.Generator().manual_seed(fresh_seed())
    for method, groups, keep in (("greedy", 1, 1), ("group_limited_greedy", 8, 3)):
        cfg = DeepseekV2Config(hidden_size=32, num_attention_heads=4, n_routed_experts=64, num_experts_per_tok=6,
                               topk_method=method, n_group=groups, topk_group=keep, routed_scaling_factor=16.0)
        router = DeepseekV2TopkRouter(cfg)
        with torch.no_grad():
            router.weight.copy_(torch.randn(64, 32, generator=g))
            x = torch.randn(40, 32, generator=g)
            logits, want_w, want_ids = router(x)
        n_group, topk_group = (1, 1) if method == "greedy" else (groups, keep)
        w, ids = moe_gate(logits, None, 6, n_group, topk_group, 16.0, False, "softmax", "max")
        order, want_order = ids.argsort(1), want_ids.argsort(1)
        assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order)), method
        torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["v2-lite", "v2"])
def test_v2_fp8_checkpoint_matches_transformers_on_its_dequantisation(tmp_path, name):
    """A V2 checkpoint with FP8 128x128 block weights (every *_proj, as DeepSeek ships them) and
    quantization_config: our logits equal transformers' on the dequantised weights (written back as float32 and
    loaded by transformers itself), and the greedy continuations agree."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV2ForCausalLM

    from core.fp8 import dequantize_blocks, quantize_blocks

    arch, overrides, edits = FAMILIES[name]
    for _ in range(5):
        seed = fresh_seed()
        src, fp8, twin = tmp_path / f"src{seed}", tmp_path / f"fp8{seed}", tmp_path / f"twin{seed}"
        build(src, seed, arch, overrides, edits)
        tensors = load_file(str(src / "model.safetensors"))
        codes, dequantised = {}, {}
        for key, t in tensors.items():
            if key.endswith("_proj.weight") and t.dim() == 2:
                q, scale = quantize_blocks(t)
                codes[key], codes[key[:-len("weight")] + "weight_scale_inv"] = q, scale
                dequantised[key] = dequantize_blocks(q, scale, torch.float32)
            else:
                codes[key] = dequantised[key] = t
        config = json.loads((src / "config.json").read_text())
        for directory, weights, cfg in (
                (fp8, codes, {**config, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                "activation_scheme": "dynamic",
                                                                "weight_block_size": [128, 128]}}),
                (twin, dequantised, config)):
            directory.mkdir()
            save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
            (directory / "config.json").write_text(json.dumps(cfg))
        ops = reference_dispatch()
        margins = GateMargins(ops)
        ours = load_ours(fp8, ops=ops, with_mtp=False)
        assert ours.cfg.fp8
        prompt = torch.randint(2, 96, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()
        got = Generator(ours).teacher_forced_logits(prompt)
        if margins.smallest >= 1e-5:
            break
    else:
        pytest.fail("could not draw a model with decisive routing in 5 tries")
    hf = DeepseekV2ForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert rel(got, want) < 1e-5, f"{name} seed {seed}"
    assert Generator(ours).generate([prompt], 8, stop_at_eos=False).output_ids[0] == out[0, len(prompt):].tolist()


# -- bfloat16 checkpoints ------------------------------------------------------------------------------------------

BF16_MEDIAN_REL = 0.06
"""Median over prompt positions of ||ours - transformers|| / ||transformers|| (per position's logits), both run in
bfloat16 on the same bf16 checkpoint. Both round every operator's output to bfloat16, in different places
(transformers keeps the expert combine and the residual stream in bf16; we combine experts in float32), about 4e-3
per operator compounding over the layers; the median ignores the few positions where that flips an MoE routing
decision (routing is discontinuous: a flipped position moves by up to ~0.5, and later positions follow through
attention). Measured over 5 seeds per family: 1.1e-2 to 2.8e-2 (whole-prompt norm-wise: up to 0.23, flip-driven)."""
BF16_TOP1 = 0.8
"""Fraction of positions whose bf16 argmax agrees with transformers' bf16 argmax; measured 0.88 to 1.0."""


def transformers_twin(arch: str, overrides: dict, state: dict, dtype: torch.dtype):
    """transformers' model of the family holding `state` (float32 tensors), its parameters in `dtype`. Built fresh
    rather than by from_pretrained (which drops a kimi_k2 config's experts: its weight conversion is keyed by
    model_type) or by casting a model (which would round the rotary inv_freq buffers to bfloat16 as well)."""
    model = tiny_transformers_model(arch, overrides)
    model.load_state_dict(state)
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def bf16_family(request, tmp_path_factory):
    """A fresh tiny model of the family saved in bfloat16 by transformers, with decisive float32 routing, and
    transformers' float32 and bfloat16 runs of those bf16 weights."""
    arch, overrides, edits = FAMILIES[request.param]
    for _ in range(5):
        seed = fresh_seed()
        d = tmp_path_factory.mktemp(f"{request.param}-bf16")
        written = build(d, seed, arch, overrides, edits, dtype=torch.bfloat16)
        ops = reference_dispatch()
        margins = GateMargins(ops)
        ours32 = load_ours(d, ops=ops, with_mtp=False)
        prompt = torch.randint(2, 96, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()
        Generator(ours32).teacher_forced_logits(prompt)
        if margins.smallest >= 1e-5:
            state = {k: v.float() for k, v in written.state_dict().items()}  # the stored bf16 values, exactly
            hf32 = transformers_twin(arch, overrides, state, torch.float32)
            hf_bf16 = transformers_twin(arch, overrides, state, torch.bfloat16)
            return request.param, d, hf_bf16, hf32, ours32, prompt, seed
    pytest.fail(f"{request.param}: could not draw a model with decisive routing in 5 tries")


def test_bf16_checkpoint_is_stored_in_bf16(bf16_family):
    from safetensors import safe_open

    name, d, *_ = bf16_family
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}, f"{name}: {dtypes}"
    config = json.loads((d / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_bf16_checkpoint_in_float32_matches_transformers(bf16_family):
    """float32 runs of the bf16 weights: logits within 1e-5 of transformers', identical greedy continuations."""
    name, _d, _hf_bf16, hf32, ours32, prompt, seed = bf16_family
    with torch.no_grad():
        want = hf32(torch.tensor([prompt])).logits[0]
        out = hf32.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert rel(Generator(ours32).teacher_forced_logits(prompt), want) < 1e-5, f"{name} seed {seed}"
    got = Generator(ours32).generate([prompt], NEW_TOKENS, stop_at_eos=False).output_ids[0]
    assert got == out[0, len(prompt):].tolist(), f"{name} seed {seed}"


def test_bf16_checkpoint_in_bf16_matches_transformers_bf16(bf16_family):
    """bfloat16 runs of the bf16 checkpoint, ours and transformers': median per-position relative logit distance
    within BF16_MEDIAN_REL, top-1 agreement at least BF16_TOP1; and each really ran in bfloat16 (distance from the
    float32 run of the same weights > 0)."""
    name, d, hf_bf16, _hf32, ours32, prompt, seed = bf16_family
    truth = Generator(ours32).teacher_forced_logits(prompt)
    with torch.no_grad():
        theirs = hf_bf16(torch.tensor([prompt])).logits[0].float()
    ours = Generator(load_ours(d, dtype=torch.bfloat16, with_mtp=False)).teacher_forced_logits(prompt)
    assert rel(ours, truth) > 1e-4 and rel(theirs, truth) > 1e-4, "bfloat16 rounds: a tiny error means float32 ran"
    per_position = (ours - theirs).norm(dim=-1) / theirs.norm(dim=-1)
    median = float(per_position.median())
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
    assert median < BF16_MEDIAN_REL, f"{name} seed {seed}: median per-position distance {median:.3g}"
    assert top1 >= BF16_TOP1, f"{name} seed {seed}: top-1 agreement {top1:.2f}"
