"""`core.plan`: parameter counts from config.json alone, checked against transformers' own model built on the meta
device (no memory), and the per-rank split."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from core.config import ModelConfig
from core.plan import ABSORBED, plan

# DeepSeek-V3's published config.json, field for field.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
    "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "aux_loss_alpha": 0.001, "seq_aux": True,
    "hidden_act": "silu", "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "use_cache": True, "bos_token_id": 0, "eos_token_id": 1, "pretraining_tp": 1, "tie_word_embeddings": False,
    "rope_theta": 10000, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                          "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                          "type": "yarn"},
    "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}

# A Moonlight-shaped variant: no q_lora, ungrouped routing, tied embeddings, attention biases, two shared experts.
MOONLIGHT_LIKE = {**DEEPSEEK_V3, "q_lora_rank": None, "n_group": 1, "topk_group": 1, "num_hidden_layers": 3,
                  "first_k_dense_replace": 1, "n_routed_experts": 64, "num_experts_per_tok": 6,
                  "tie_word_embeddings": True, "attention_bias": True, "n_shared_experts": 2, "hidden_size": 2048,
                  "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 11264,
                  "moe_intermediate_size": 1408, "vocab_size": 163840}


def transformers_count(config: dict) -> int:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields))
    params = sum(p.numel() for p in model.parameters())
    bias = sum(b.numel() for name, b in model.named_buffers() if "e_score_correction_bias" in name)
    return params + bias


@pytest.mark.parametrize("config", [DEEPSEEK_V3, MOONLIGHT_LIKE], ids=["deepseek-v3", "moonlight-like"])
def test_parameter_count_equals_transformers(config):
    cfg = ModelConfig.from_dict(config, "config.json")
    assert plan(cfg).params_without_mtp() == transformers_count(config)


def test_deepseek_v2_lite_parameter_count_equals_transformers():
    """DeepSeek-V2-Lite's published config.json (softmax gate: no correction bias) against DeepseekV2ForCausalLM."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    from tests.test_family_configs import DEEPSEEK_V2_LITE

    cfg = ModelConfig.from_dict(DEEPSEEK_V2_LITE, "config.json")
    fields = {k: v for k, v in DEEPSEEK_V2_LITE.items() if k not in ("rope_scaling", "rope_theta")}
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**fields))
    want = sum(p.numel() for p in model.parameters())
    assert plan(cfg).params_without_mtp() == plan(cfg).total_params == want
    assert 15e9 < want < 16.5e9, "DeepSeek-V2-Lite is the 16B model"


def test_deepseek_v3_split_over_ranks():
    p = plan(ModelConfig.from_dict(DEEPSEEK_V3, "config.json"))
    one, eight, sixteen = (p.bytes_per_rank(n, "fp8") for n in (1, 8, 16))
    # FP8 weights: about one byte per parameter plus scales, embeddings and the float32 router.
    assert 0.99 < one / p.total_params < 1.05
    # Experts and heads split; the replicated part (latent projections, norms, routers) stays on every rank.
    assert one / 8 < eight < one / 8 * 1.03 and one / 16 < sixteen < one / 16 * 1.06
    assert p.bytes_per_rank(8, "bf16") > 1.9 * eight
    # the cpu backend without native bfloat16: every parameter and the absorbed kv_b halves in float32
    absorbed = next(x.params for x in p.parts if x.name == ABSORBED)
    assert p.bytes_per_rank(1, "float32") == 4 * (p.total_params + absorbed)
    assert p.cache_bytes_per_token(2) == 62 * 576 * 2


def test_uneven_expert_split_takes_the_largest_rank():
    from core.plan import Plan

    p = plan(ModelConfig.from_dict({**DEEPSEEK_V3, "num_attention_heads": 96, "num_key_value_heads": 96},
                                   "config.json"))
    only_experts = Plan(p.config, [x for x in p.parts if x.split == "experts"][:1])  # the main layers' experts
    experts = only_experts.parts[0]
    layers = 61 - 3
    per_expert = (experts.params + experts.scale_elements * 4) // (experts.experts * layers)
    # 256 experts over 6 ranks: the largest rank holds 43 whole experts of each MoE layer (not 256/6)
    assert only_experts.bytes_per_rank(6, "fp8") == 43 * per_expert * layers


def test_cli_plans_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    out = subprocess.run([sys.executable, "-m", "core.plan", "--model", str(tmp_path), "--world-size", "8,16,3",
                          "--device-memory", "141"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "671.03 B main model" in out.stdout
    assert "refused: 128 attention heads do not split over 3 ranks" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "core.plan", "--world-size", "0"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--world-size" in bad.stderr
