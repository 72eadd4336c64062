"""config.json files shaped exactly like the published DeepSeek-V3-class ones load without edits, and every routing
field is read: a value the project does not implement is refused in one line naming the field and the value."""

from __future__ import annotations

import json

import pytest

from core.config import ModelConfig
from core.errors import CheckpointError
from core.safe_files import quote_value

# Field sets as published on the Hub (config.json of each repository; auto_map left out: it names remote code).
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
DEEPSEEK_V2 = {  # DeepSeek-V2 / V2-Chat / V2.5 (236B)
    **DEEPSEEK_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_attention_heads": 128, "num_key_value_heads": 128, "num_hidden_layers": 60, "q_lora_rank": 1536,
    "n_routed_experts": 160, "n_group": 8, "topk_group": 3, "topk_method": "group_limited_greedy",
    "routed_scaling_factor": 16.0, "ep_size": 1, "eos_token_id": 100001, "max_position_embeddings": 163840,
}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}
KIMI_K2 = {
    **DEEPSEEK_V3, "model_type": "kimi_k2", "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
    "max_position_embeddings": 131072, "n_group": 1, "topk_group": 1, "n_routed_experts": 384,
    "num_attention_heads": 64, "num_key_value_heads": 64, "num_nextn_predict_layers": 0,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "vocab_size": 163840,
}
MOONLIGHT = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163585, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11264, "kv_lora_rank": 512, "max_position_embeddings": 8192, "model_type": "deepseek_v3",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": True, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 50000.0,
    "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "transformers_version": "4.48.2",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}


def load(fields: dict, tmp_path) -> ModelConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(fields))
    return ModelConfig.from_file(path)


@pytest.mark.parametrize("fields, family", [
    (DEEPSEEK_V2_LITE, ("deepseek_v2", "softmax", "greedy", "max", (1, 1), 1.0, False, 0)),
    (DEEPSEEK_V2, ("deepseek_v2", "softmax", "group_limited_greedy", "max", (8, 3), 16.0, False, 0)),
    (DEEPSEEK_V3, ("deepseek_v3", "sigmoid", "noaux_tc", "top2_sum", (8, 4), 2.5, True, 1)),
    (KIMI_K2, ("kimi_k2", "sigmoid", "noaux_tc", "top2_sum", (1, 1), 2.827, True, 0)),
    (MOONLIGHT, ("deepseek_v3", "sigmoid", "noaux_tc", "top2_sum", (1, 1), 2.446, True, 1)),
], ids=["v2-lite", "v2", "v3", "kimi-k2", "moonlight"])
def test_published_configs_load_without_edits(tmp_path, fields, family):
    c = load(fields, tmp_path)
    model_type, scoring, method, group_score, groups, scale, renorm, mtp = family
    assert (c.model_type, c.scoring_func, c.topk_method, c.group_score, c.gate_groups) == (
        model_type, scoring, method, group_score, groups)
    assert (c.routed_scaling_factor, c.norm_topk_prob, c.num_nextn_predict_layers) == (scale, renorm, mtp)
    assert c.n_routed_experts == fields["n_routed_experts"] and c.q_lora_rank == fields["q_lora_rank"]
    assert c.first_k_dense_replace == fields["first_k_dense_replace"]
    assert c.rope_interleave and c.fp8 == ("quantization_config" in fields)


def test_v2_lite_yarn_settings(tmp_path):
    """V2-Lite's YaRN (factor 40, mscale = mscale_all_dim = 0.707): cos/sin unscaled, softmax scale times
    mscale(40, 0.707)^2."""
    c = load(DEEPSEEK_V2_LITE, tmp_path)
    assert c.rope.rope_type == "yarn" and c.rope.factor == 40 and c.rope.original_max_position_embeddings == 4096
    assert c.rope.attention_factor == pytest.approx(1.0)
    mscale = 0.1 * 0.707 * __import__("math").log(40) + 1.0
    assert c.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)


def test_v2_defaults_are_transformers_deepseek_v2_config(tmp_path):
    """A minimal deepseek_v2 config.json takes DeepseekV2Config's defaults, not V3's."""
    from transformers import DeepseekV2Config

    hf = DeepseekV2Config(num_experts_per_tok=6)
    c = load({"model_type": "deepseek_v2", "num_experts_per_tok": 6}, tmp_path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "q_lora_rank", "kv_lora_rank", "first_k_dense_replace", "norm_topk_prob", "max_position_embeddings",
                "bos_token_id", "tie_word_embeddings", "topk_method"):
        assert getattr(c, key) == getattr(hf, key), key
    assert c.eos_token_ids == (hf.eos_token_id,)
    assert c.scoring_func == "softmax" and c.gate_groups == (1, 1) and c.num_nextn_predict_layers == 0


@pytest.mark.parametrize("base, field, value", [
    (DEEPSEEK_V3, "scoring_func", "softmax"),
    (DEEPSEEK_V3, "scoring_func", None),
    (DEEPSEEK_V3, "topk_method", "greedy"),
    (DEEPSEEK_V3, "topk_method", "group_limited_greedy"),
    (KIMI_K2, "scoring_func", "sqrtsoftplus"),
    (DEEPSEEK_V2_LITE, "scoring_func", "sigmoid"),
    (DEEPSEEK_V2_LITE, "topk_method", "noaux_tc"),
    (DEEPSEEK_V2_LITE, "norm_topk_prob", True),
    (DEEPSEEK_V2_LITE, "rope_interleave", False),
    (DEEPSEEK_V3, "moe_layer_freq", 2),
    (DEEPSEEK_V2, "mlp_bias", True),
])
def test_unimplemented_routing_is_refused_naming_field_and_value(tmp_path, base, field, value):
    with pytest.raises(CheckpointError) as e:
        load({**base, field: value}, tmp_path)
    message = str(e.value)
    assert "\n" not in message and field in message and quote_value(value) in message
    assert "config.json" in message


def test_missing_routing_fields_take_the_family_defaults(tmp_path):
    v3 = {k: v for k, v in DEEPSEEK_V3.items() if k not in ("scoring_func", "topk_method", "moe_layer_freq")}
    v2 = {k: v for k, v in DEEPSEEK_V2.items() if k not in ("scoring_func", "moe_layer_freq")}
    assert (load(v3, tmp_path).scoring_func, load(v3, tmp_path).topk_method) == ("sigmoid", "noaux_tc")
    c = load(v2, tmp_path)
    assert (c.scoring_func, c.topk_method, c.gate_groups) == ("softmax", "group_limited_greedy", (8, 3))


def test_greedy_ignores_groups_but_checks_top_k(tmp_path):
    c = load({**DEEPSEEK_V2_LITE, "n_group": 8, "topk_group": 3}, tmp_path)
    assert c.gate_groups == (1, 1)
    with pytest.raises(CheckpointError, match="num_experts_per_tok"):
        load({**DEEPSEEK_V2_LITE, "num_experts_per_tok": 65}, tmp_path)


def test_v3_1_scale_fmt_is_read_and_unknown_formats_refused(tmp_path):
    q = DEEPSEEK_V3["quantization_config"]
    assert load(DEEPSEEK_V3, tmp_path).scale_fmt is None
    assert load({**DEEPSEEK_V3, "quantization_config": {**q, "scale_fmt": "ue8m0"}}, tmp_path).scale_fmt == "ue8m0"
    with pytest.raises(CheckpointError, match="scale_fmt 'e5m2' is not implemented"):
        load({**DEEPSEEK_V3, "quantization_config": {**q, "scale_fmt": "e5m2"}}, tmp_path)
