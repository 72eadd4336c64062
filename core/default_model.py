"""The embedded default: a small DeepSeek-V3-shaped model generated deterministically on the spot (no download).

Every feature of the real model is on: q_lora, YaRN (factor 8, mscale 1.0), grouped noaux_tc routing (16 experts in
4 groups, 2 groups kept, top-4) with a non-zero correction bias, a dense first layer then MoE layers with a shared
expert (router logits ~N(0,1), so sigmoid scores are spread, not saturated near 1), FP8 e4m3fn weights with 128x128 block scales whose edge blocks are partial (intermediate 320, q_lora 96,
kv_a 160 rows), bf16 norms/router/embeddings, and an MTP layer. Weights are scaled so activations stay O(1). The tokenizer
(core.engine.default_tokenizer, built in code) is a byte-level `tokenizers` BPE with the byte tokenizer's ids (0 BOS,
1 EOS, 2 pad, 3 + b = byte b) plus DeepSeek-V3's chat markers as special tokens, and a DeepSeek-V3-style chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from core.checkpoint import MemoryCheckpoint
from core.config import ModelConfig
from core.fp8 import quantize_blocks

DEFAULT_CONFIG = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 320,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16",
}

SEED = 20241226  # DeepSeek-V3's release date
RESIDUAL_SCALE = 0.2
DESCRIPTION = "embedded default (DeepSeek-V3-shaped, 4 layers + MTP, hidden 256, 16 experts, FP8 blocks)"

FP8_SUFFIXES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
                "down_proj")


def layer_tensors(cfg: ModelConfig, prefix: str, moe: bool, rand) -> dict[str, Tensor]:
    d, h = cfg.hidden_size, cfg.num_attention_heads
    r, pe, nope, v = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    t: dict[str, Tensor] = {
        "input_layernorm.weight": rand.norm(d),
        "post_attention_layernorm.weight": rand.norm(d),
        "self_attn.q_a_proj.weight": rand.linear(cfg.q_lora_rank, d),
        "self_attn.q_a_layernorm.weight": rand.norm(cfg.q_lora_rank),
        "self_attn.q_b_proj.weight": rand.linear(h * (nope + pe), cfg.q_lora_rank),
        "self_attn.kv_a_proj_with_mqa.weight": rand.linear(r + pe, d),
        "self_attn.kv_a_layernorm.weight": rand.norm(r),
        "self_attn.kv_b_proj.weight": rand.linear(h * (nope + v), r),
        "self_attn.o_proj.weight": rand.linear(d, h * v),
    }
    if not moe:
        inter = cfg.intermediate_size
        t.update({"mlp.gate_proj.weight": rand.linear(inter, d), "mlp.up_proj.weight": rand.linear(inter, d),
                  "mlp.down_proj.weight": rand.linear(d, inter)})
        return {prefix + k: w for k, w in t.items()}
    inter = cfg.moe_intermediate_size
    t["mlp.gate.weight"] = rand.linear(cfg.n_routed_experts, d, gain=1.0)  # logits ~ N(0, 1): unsaturated scores
    t["mlp.gate.e_score_correction_bias"] = (0.1 * rand.normal(cfg.n_routed_experts)).float()
    for e in range(cfg.n_routed_experts):
        t[f"mlp.experts.{e}.gate_proj.weight"] = rand.linear(inter, d)
        t[f"mlp.experts.{e}.up_proj.weight"] = rand.linear(inter, d)
        t[f"mlp.experts.{e}.down_proj.weight"] = rand.linear(d, inter)
    shared = inter * cfg.n_shared_experts
    t.update({"mlp.shared_experts.gate_proj.weight": rand.linear(shared, d),
              "mlp.shared_experts.up_proj.weight": rand.linear(shared, d),
              "mlp.shared_experts.down_proj.weight": rand.linear(d, shared)})
    return {prefix + k: w for k, w in t.items()}


class Rand:
    """Deterministic float32 draws on the CPU, independent of the torch global RNG."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.g)

    def linear(self, out_f: int, in_f: int, gain: float = 1.0) -> Tensor:
        return self.normal(out_f, in_f) * (gain / in_f ** 0.5)

    def norm(self, n: int) -> Tensor:
        return 1.0 + 0.1 * self.normal(n)


def float_state_dict(config: dict = DEFAULT_CONFIG, seed: int = SEED) -> dict[str, Tensor]:
    """The model's weights in float32 under Hugging Face names, before any quantisation."""
    cfg = ModelConfig.from_dict(config, "embedded default")
    rand = Rand(seed)
    d, n = cfg.hidden_size, cfg.num_hidden_layers
    t = {"model.embed_tokens.weight": rand.normal(cfg.vocab_size, d), "model.norm.weight": rand.norm(d),
         "lm_head.weight": rand.linear(cfg.vocab_size, d)}
    for i in range(n):
        t.update(layer_tensors(cfg, f"model.layers.{i}.", cfg.is_moe_layer(i), rand))
    if cfg.num_nextn_predict_layers:
        p = f"model.layers.{n}."
        t.update(layer_tensors(cfg, p, cfg.n_routed_experts > 0, rand))
        # A predictive MTP module, so that speculative decoding accepts drafts: eh_proj carries the token embedding
        # through (plus noise and a little of the hidden state), and its output norm is the main model's.
        eh_proj = torch.cat([torch.eye(d), torch.zeros(d, d)], dim=1) + 0.1 * rand.linear(d, 2 * d)
        t.update({p + "enorm.weight": rand.norm(d), p + "hnorm.weight": rand.norm(d),
                  p + "eh_proj.weight": eh_proj, p + "shared_head.norm.weight": t["model.norm.weight"].clone(),
                  p + "embed_tokens.weight": t["model.embed_tokens.weight"].clone(),
                  p + "shared_head.head.weight": t["lm_head.weight"].clone()})
    for name in t:  # residual branches at 0.35: each token's embedding stays visible through the stack
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            t[name] = t[name] * RESIDUAL_SCALE
    return t


def checkpoint_tensors(floats: dict[str, Tensor], fp8: bool = True) -> dict[str, Tensor]:
    """Store as a DeepSeek-V3 checkpoint does: FP8 codes + weight_scale_inv for the projection weights, float32 for
    the correction bias, bfloat16 for everything else."""
    out: dict[str, Tensor] = {}
    for name, w in floats.items():
        module = name.rsplit(".", 2)[-2]
        if fp8 and name.endswith(".weight") and module in FP8_SUFFIXES:
            out[name], out[name + "_scale_inv"] = quantize_blocks(w)
        elif name.endswith("e_score_correction_bias"):
            out[name] = w.float()
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def load_default() -> MemoryCheckpoint:
    """The embedded default as a tensor source for Model.load."""
    cfg = ModelConfig.from_dict(DEFAULT_CONFIG, "embedded default")
    return MemoryCheckpoint(cfg, checkpoint_tensors(float_state_dict()), DESCRIPTION)


def write_checkpoint(directory: Path, tensors: dict[str, Tensor], config: dict, shards: int = 1) -> None:
    """Write `tensors` and `config` as a Hugging Face checkpoint directory (sharded with an index when shards > 1)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    names = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(directory / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k].contiguous() for k in part}, str(directory / file))
        weight_map.update({k: file for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
