"""Model configuration from a Hugging Face DeepSeek-V2 / V3 `config.json` (the DeepSeek-V3 class as published).

`model_type` picks the family: `deepseek_v3` and `kimi_k2` (V3, R1, V3.1, Kimi-K2, Moonlight) take the defaults of
transformers' `DeepseekV3Config` (DeepSeek-V3's values); `deepseek_v2` (V2, V2-Lite, V2.5) those of
`DeepseekV2Config`. So every configuration those classes accept loads here: no q_lora (Moonlight-style), plain RoPE,
`norm_topk_prob: false`, all layers MoE, several shared experts, tied embeddings, attention biases.

Every routing field is read (`scoring_func`, `topk_method`, `n_group`, `topk_group`, `norm_topk_prob`,
`routed_scaling_factor`, `moe_layer_freq`), and a value this project does not implement is refused in one line naming
the field and the value, never run as something else. What runs is what DeepSeek's own code for the family runs:
V3 family: sigmoid scores, `noaux_tc` (groups scored by the sum of their top-2 biased scores); V2 family: softmax
scores, `greedy` (no groups) or `group_limited_greedy` (groups scored by their best expert), no correction bias.
Inconsistent values are refused with the field named.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.errors import CheckpointError
from core.rope import RopeConfig
from core.safe_files import MAX_CONFIG_BYTES, quote_name, quote_value, read_json_file

ACCEPTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2", "deepseek_v2")

HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_attention_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "attention_bias": False,
    "num_nextn_predict_layers": 1,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
}

# transformers' DeepseekV2Config defaults (DeepSeek-V2-Lite's checkpoint card), plus what V2 never has: MTP layers,
# a correction bias, and a half-layout rope (V2 rotates interleaved pairs, always).
HF_V2_DEFAULTS: dict[str, Any] = {
    **HF_DEFAULTS,
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "n_shared_experts": 2,
    "n_routed_experts": 64,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": 1536,
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "num_nextn_predict_layers": 0,
    "scoring_func": "softmax",
    "topk_method": "greedy",
}

# The routing each family implements: model_type -> (scoring_func, topk_methods).
ROUTING: dict[str, tuple[str, tuple[str, ...]]] = {
    "deepseek_v3": ("sigmoid", ("noaux_tc",)),
    "kimi_k2": ("sigmoid", ("noaux_tc",)),
    "deepseek_v2": ("softmax", ("greedy", "group_limited_greedy")),
}
# topk_method -> the moe_gate group-scoring rule (core.ops.moe_gate `group_score`).
GROUP_SCORE = {"noaux_tc": "top2_sum", "group_limited_greedy": "max", "greedy": "max"}

# Upper bounds of every size and count (far beyond any released DeepSeek-V3-class model: V3 has hidden 7168,
# vocab 129280, 61 layers, 256 experts, 163840 positions). A value above its bound is refused before anything is
# sized from it.
MAX_INT: dict[str, int] = {
    "vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
    "num_hidden_layers": 1024, "num_attention_heads": 1024, "q_lora_rank": 1 << 16, "kv_lora_rank": 1 << 16,
    "qk_nope_head_dim": 1 << 12, "qk_rope_head_dim": 1 << 12, "v_head_dim": 1 << 12, "n_routed_experts": 1 << 14,
    "n_shared_experts": 1 << 10, "num_experts_per_tok": 1 << 14, "n_group": 1 << 14, "topk_group": 1 << 14,
    "first_k_dense_replace": 1024, "max_position_embeddings": 1 << 24, "num_nextn_predict_layers": 64,
    "bos_token_id": 1 << 22,
}
# (lowest, highest, whether the lowest is allowed) of every real-valued field.
FLOAT_RANGE: dict[str, tuple[float, float, bool]] = {
    "rms_norm_eps": (0.0, 1.0, False),
    "routed_scaling_factor": (0.0, 1e4, False),
}
MAX_EOS_IDS = 1024


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    rms_norm_eps: float
    max_position_embeddings: int
    num_nextn_predict_layers: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_interleave: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    rope: RopeConfig
    fp8: bool = False  # quantization_config says fp8 128x128 blocks
    scale_fmt: str | None = None  # quantization_config.scale_fmt: "ue8m0" (V3.1: power-of-two activation scales)
    model_type: str = "deepseek_v3"
    scoring_func: str = "sigmoid"  # moe_gate scoring: sigmoid (V3 family) or softmax (V2 family)
    topk_method: str = "noaux_tc"  # noaux_tc (V3 family), greedy or group_limited_greedy (V2 family)
    source: str = "config.json"
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim ** -0.5 * self.rope.softmax_scale_factor

    @property
    def latent_width(self) -> int:
        """Values cached per token per layer: the normalised latent and the roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def group_score(self) -> str:
        """moe_gate's group-scoring rule: "top2_sum" (noaux_tc) or "max" (group_limited_greedy)."""
        return GROUP_SCORE[self.topk_method]

    @property
    def gate_groups(self) -> tuple[int, int]:
        """(n_group, topk_group) as moe_gate takes them: `greedy` ignores groups (one group, kept)."""
        return (1, 1) if self.topk_method == "greedy" else (self.n_group, self.topk_group)

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @staticmethod
    def from_file(path: Path, what: str | None = None) -> "ModelConfig":
        """Parse config.json at `path` (already resolved inside its checkpoint; `what` names it in messages)
        through core.safe_files.read_json_file: a regular file, size- and depth-limited, no duplicate keys."""
        what = what or quote_name(str(path))
        if not Path(path).exists():
            raise CheckpointError(f"{what}: not found (a Hugging Face checkpoint directory needs config.json)")
        data = read_json_file(Path(path), MAX_CONFIG_BYTES, what=what)
        if not isinstance(data, dict):
            raise CheckpointError(f"{what}: expected a JSON object")
        return ModelConfig.from_dict(data, what)

    @staticmethod
    def from_dict(data: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {quote_value(data)}")
        model_type = data.get("model_type")
        if not isinstance(model_type, str) or model_type not in ACCEPTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type is {quote_value(model_type)}; this project runs "
                f"{', '.join(ACCEPTED_MODEL_TYPES)}"
            )
        text = data.get("text_config") if isinstance(data.get("text_config"), dict) else None
        d = {**(HF_V2_DEFAULTS if model_type == "deepseek_v2" else HF_DEFAULTS), **(text or data)}

        def integer(key: str, minimum: int = 1, optional: bool = False) -> int | None:
            v = d.get(key)
            if v is None and optional:
                return None
            maximum = MAX_INT[key]
            if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
                raise CheckpointError(f"{source}: {key} must be an integer in [{minimum}, {maximum}], "
                                      f"got {quote_value(v)}")
            return v

        def number(key: str) -> float:
            v = d.get(key)
            low, high, low_ok = FLOAT_RANGE[key]
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or not (low <= v if low_ok else low < v) or v > high):
                raise CheckpointError(f"{source}: {key} must be a finite number in {'[' if low_ok else '('}{low:g}, "
                                      f"{high:g}], got {quote_value(v)}")
            return float(v)

        def flag(key: str) -> bool:
            v = d.get(key)
            if not isinstance(v, bool):
                raise CheckpointError(f"{source}: {key} must be true or false, got {quote_value(v)}")
            return v

        if d.get("hidden_act") != "silu":
            raise CheckpointError(f"{source}: hidden_act {quote_value(d.get('hidden_act'))} is not supported "
                                  f"(DeepSeek-V3 uses silu)")
        scoring, topk_method = _routing(d, model_type, source)
        n_experts = integer("n_routed_experts", 0)
        n_group = integer("n_group", 1, optional=True) or 1
        topk_group = integer("topk_group", 1, optional=True) or n_group
        top_k = integer("num_experts_per_tok", 1, optional=True) or 1
        if topk_method == "greedy" and n_experts and top_k > n_experts:
            raise CheckpointError(f"{source}: num_experts_per_tok ({top_k}) exceeds n_routed_experts ({n_experts})")
        if n_experts and topk_method != "greedy":
            if n_experts % n_group:
                raise CheckpointError(f"{source}: n_routed_experts ({n_experts}) is not a multiple of n_group ({n_group})")
            if topk_group > n_group:
                raise CheckpointError(f"{source}: topk_group ({topk_group}) exceeds n_group ({n_group})")
            if top_k > topk_group * (n_experts // n_group):
                raise CheckpointError(
                    f"{source}: num_experts_per_tok ({top_k}) exceeds the experts in the kept groups "
                    f"({topk_group} x {n_experts // n_group})"
                )
        rope_dim = integer("qk_rope_head_dim", 2)
        if rope_dim % 2:
            raise CheckpointError(f"{source}: qk_rope_head_dim must be even, got {rope_dim}")
        layers = integer("num_hidden_layers", 1)
        first_dense = integer("first_k_dense_replace", 0, optional=True) or 0
        if first_dense > layers:
            raise CheckpointError(f"{source}: first_k_dense_replace ({first_dense}) exceeds num_hidden_layers ({layers})")
        vocab = integer("vocab_size")
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        if len(eos_ids) > MAX_EOS_IDS or not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < vocab
                                                 for e in eos_ids):
            raise CheckpointError(f"{source}: eos_token_id must be an id in [0, vocab_size={vocab}) or a list of "
                                  f"such ids, got {quote_value(eos)}")
        bos = integer("bos_token_id", 0, optional=True)
        if bos is not None and bos >= vocab:
            raise CheckpointError(f"{source}: bos_token_id {bos} is outside the vocabulary [0, {vocab})")
        max_pos = integer("max_position_embeddings", 1)
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=integer("hidden_size"),
            intermediate_size=integer("intermediate_size"),
            moe_intermediate_size=integer("moe_intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=integer("num_attention_heads"),
            q_lora_rank=integer("q_lora_rank", optional=True),
            kv_lora_rank=integer("kv_lora_rank"),
            qk_nope_head_dim=integer("qk_nope_head_dim", 0),
            qk_rope_head_dim=rope_dim,
            v_head_dim=integer("v_head_dim"),
            n_routed_experts=n_experts,
            n_shared_experts=integer("n_shared_experts", 0, optional=True) or 0,
            num_experts_per_tok=top_k,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=number("routed_scaling_factor"),
            norm_topk_prob=flag("norm_topk_prob"),
            first_k_dense_replace=first_dense,
            rms_norm_eps=number("rms_norm_eps"),
            max_position_embeddings=max_pos,
            num_nextn_predict_layers=integer("num_nextn_predict_layers", 0, optional=True) or 0,
            tie_word_embeddings=flag("tie_word_embeddings"),
            attention_bias=flag("attention_bias"),
            rope_interleave=flag("rope_interleave"),
            bos_token_id=bos,
            eos_token_ids=eos_ids,
            rope=RopeConfig.from_hf(d, rope_dim, max_pos, source),
            fp8=_fp8_blocks(d.get("quantization_config"), source),
            scale_fmt=_scale_fmt(d.get("quantization_config"), source),
            source=source,
            raw=dict(data),
            model_type=model_type,
            scoring_func=scoring,
            topk_method=topk_method,
        )

    def to_hf(self) -> dict:
        """The config.json that describes this model (used to write checkpoints)."""
        out = {k: v for k, v in asdict(self).items() if k in HF_DEFAULTS}
        arch = "DeepseekV2ForCausalLM" if self.model_type == "deepseek_v2" else "DeepseekV3ForCausalLM"
        out.update(model_type=self.model_type, architectures=[arch],
                   eos_token_id=list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
                   num_key_value_heads=self.num_attention_heads, **self.rope.to_hf())
        if self.fp8:
            out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
            if self.scale_fmt:
                out["quantization_config"]["scale_fmt"] = self.scale_fmt
        return out


def _routing(d: dict, model_type: str, source: str) -> tuple[str, str]:
    """(scoring_func, topk_method) after refusing, in one line naming the field and value, any routing this project
    does not implement for `model_type` (what DeepSeek's own code for that family refuses too)."""
    scoring, methods = ROUTING[model_type]
    value = d.get("scoring_func")
    if value != scoring:
        raise CheckpointError(f"{source}: scoring_func {quote_value(value)} is not implemented for model_type "
                              f"{model_type} (it routes with {quote_value(scoring)})")
    method = d.get("topk_method")
    if method not in methods:
        raise CheckpointError(f"{source}: topk_method {quote_value(method)} is not implemented for model_type "
                              f"{model_type} (supported: {', '.join(methods)})")
    if d.get("mlp_bias") is True:
        raise CheckpointError(f"{source}: mlp_bias {quote_value(True)} is not implemented (DeepSeek's MLPs have no biases)")
    freq = d.get("moe_layer_freq")
    if freq != 1 or isinstance(freq, bool):
        raise CheckpointError(f"{source}: moe_layer_freq {quote_value(freq)} is not implemented (only 1: every layer "
                              f"from first_k_dense_replace on is MoE)")
    if model_type == "deepseek_v2":
        if d.get("norm_topk_prob") is True:
            raise CheckpointError(f"{source}: norm_topk_prob {quote_value(True)} is not implemented for model_type deepseek_v2 "
                                  f"(DeepSeek-V2's code then drops routed_scaling_factor, transformers ignores the "
                                  f"field; every published V2 config says false)")
        if d.get("rope_interleave") is False:
            raise CheckpointError(f"{source}: rope_interleave {quote_value(False)} is not implemented for model_type deepseek_v2 "
                                  f"(V2 rotates interleaved pairs)")
    return scoring, method


SCALE_FORMATS = ("ue8m0",)


def _scale_fmt(q: Any, source: str) -> str | None:
    """quantization_config.scale_fmt (DeepSeek-V3.1): None, or "ue8m0" (activation scales rounded up to powers of
    two where DeepSeek's code quantises activations; the reference class never quantises activations, so it is
    recorded, not applied, there). Any other value is refused."""
    fmt = q.get("scale_fmt") if isinstance(q, dict) else None
    if fmt is not None and fmt not in SCALE_FORMATS:
        raise CheckpointError(f"{source}: quantization_config.scale_fmt {quote_value(fmt)} is not implemented "
                              f"(supported: {', '.join(SCALE_FORMATS)})")
    return fmt


def _fp8_blocks(q: Any, source: str) -> bool:
    if q is None:
        return False
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: quantization_config must be an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{source}: quantization_config.quant_method {quote_value(method)} is not supported "
                              f"(only fp8)")
    block = q.get("weight_block_size", [128, 128])
    if not isinstance(block, list) or block != [128, 128]:
        raise CheckpointError(f"{source}: quantization_config.weight_block_size {quote_value(block)} is not "
                              f"supported (only [128, 128])")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{source}: quantization_config.fmt {quote_value(q.get('fmt'))} is not supported "
                              f"(only e4m3)")
    return True
