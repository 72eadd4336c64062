"""Memory plan from config.json alone: parameters, bytes per device for a given number of ranks, and latent-cache
bytes per token. Reads no weights, so it answers "how many GPUs does this checkpoint need" before a download ends.

    python -m core.plan [--model DIR] [--world-size 1,8,16] [--weights fp8|bf16|float32] [--cache-dtype bfloat16]
                        [--device-memory GiB]

The layout is ARCHITECTURE.md's ("Parallelism"): with N ranks, attention heads (`q_b_proj`/`q_proj`, `kv_b_proj`,
`o_proj`), dense MLPs and shared experts are split N ways; routed experts are split whole (E/N per rank, the last
ranks holding one fewer when N does not divide E); embedding and LM head are split by vocabulary; `q_a_proj`,
`kv_a_proj_with_mqa`, norms, the router and its bias are replicated, and so is the latent cache. The decode path
also keeps kv_b absorbed as `w_uk`/`w_uv` in the working dtype (split by head; a backend's optional prepare_mla may
widen them). FP8 checkpoints keep FP8 codes plus one float32 scale per 128x128 block for every projection
(`--weights fp8`, what cuda, rocm and cpu_ref hold); `--weights bf16` is what a backend that dequantises at load holds
(ascend; cpu with a bf16 checkpoint: bf16 where bfloat16 is native, exact fp16 where it is emulated, with only
w_uk/w_uv in float32 there, 0.2% of V3's parameters); `--weights float32` is what cpu holds for an FP8 checkpoint
(dequantised once to float32, cpu_ref's numbers bit for bit): every weight, and w_uk/w_uv, in float32; where memory
is short it keeps FP8 instead (backends/cpu/tuning.yaml fp8_weights), which is `--weights fp8`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.config import ModelConfig
from core.errors import UserError
from core.ops import FP8_BLOCK

GiB = 1024 ** 3
ABSORBED = "absorbed kv_b (w_uk, w_uv)"  # decode-path copies, not checkpoint parameters
CACHE_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass
class Part:
    """One group of tensors: parameters in all, and how they split over ranks."""

    name: str
    params: int  # elements in the whole model
    quantized: bool  # a projection that FP8 checkpoints store as FP8 with block scales
    split: str  # "replicated", "sharded" (even N-way split) or "experts" (whole experts over ranks)
    scale_elements: int = 0  # float32 block scales when stored as FP8
    experts: int = 0  # for split == "experts": routed experts per layer (every MoE layer has the same number)


@dataclass
class Plan:
    config: ModelConfig
    parts: list[Part] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(p.params for p in self.parts if p.name != ABSORBED)

    def params_without_mtp(self) -> int:
        return sum(p.params for p in self.parts if p.name != ABSORBED and not p.name.startswith("mtp"))

    def bytes_per_rank(self, world: int, weights: str, work_bytes: int = 2) -> int:
        """Largest per-rank weight bytes over the ranks (rank 0 holds the most experts when N does not divide E)."""
        total = 0
        for p in self.parts:
            if weights == "float32":
                per_elem = 4
            elif p.name == ABSORBED:
                per_elem = work_bytes
            elif p.quantized and weights == "fp8":
                per_elem = 1
            elif p.name.endswith(("router", "router bias")):
                per_elem = 4  # held in float32
            else:
                per_elem = 2
            size = p.params * per_elem + (p.scale_elements * 4 if p.quantized and weights == "fp8" else 0)
            if p.split == "sharded":
                size = -(-size // world)
            elif p.split == "experts":
                size = size * -(-p.experts // world) // p.experts
            total += size
        return total

    def cache_bytes_per_token(self, cache_bytes: int, with_mtp: bool = True) -> int:
        c = self.config
        layers = c.num_hidden_layers + (min(c.num_nextn_predict_layers, 1) if with_mtp else 0)
        return layers * c.latent_width * cache_bytes


def _scales(rows: int, cols: int) -> int:
    return -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)


def _linear(name: str, rows: int, cols: int, split: str, count: int = 1) -> Part:
    return Part(name, rows * cols * count, True, split, _scales(rows, cols) * count)


def _layer_parts(c: ModelConfig, moe: bool, prefix: str) -> list[Part]:
    d, h = c.hidden_size, c.num_attention_heads
    qk, r, p = c.qk_head_dim, c.kv_lora_rank, c.qk_rope_head_dim
    parts = [Part(f"{prefix}norms", 2 * d + r + (c.q_lora_rank or 0), False, "replicated")]
    if c.q_lora_rank:
        parts += [_linear(f"{prefix}q_a_proj", c.q_lora_rank, d, "replicated"),
                  _linear(f"{prefix}q_b_proj", h * qk, c.q_lora_rank, "sharded")]
    else:
        parts.append(_linear(f"{prefix}q_proj", h * qk, d, "sharded"))
    parts += [_linear(f"{prefix}kv_a_proj_with_mqa", r + p, d, "replicated"),
              _linear(f"{prefix}kv_b_proj", h * (c.qk_nope_head_dim + c.v_head_dim), r, "sharded"),
              _linear(f"{prefix}o_proj", d, h * c.v_head_dim, "sharded"),
              Part(ABSORBED, h * (c.qk_nope_head_dim + c.v_head_dim) * r, False, "sharded")]
    if c.attention_bias:
        # transformers' layout: q_a_proj, kv_a_proj_with_mqa and o_proj carry biases; q_proj and kv_b_proj do not
        parts.append(Part(f"{prefix}attention biases", (c.q_lora_rank or 0) + r + p + d, False, "replicated"))
    if not moe:
        parts.append(_linear(f"{prefix}dense mlp", c.intermediate_size, d, "sharded", count=3))
        return parts
    e, im = c.n_routed_experts, c.moe_intermediate_size
    parts.append(Part(f"{prefix}router", e * d, False, "replicated"))
    if c.topk_method == "noaux_tc":  # the V3 family's e_score_correction_bias (V2's softmax gate has none)
        parts.append(Part(f"{prefix}router bias", e, False, "replicated"))
    parts.append(Part(f"{prefix}routed experts", 3 * im * d * e, True, "experts", 3 * _scales(im, d) * e, experts=e))
    if c.n_shared_experts:
        parts.append(_linear(f"{prefix}shared experts", c.n_shared_experts * im, d, "sharded", count=3))
    return parts


def plan(cfg: ModelConfig) -> Plan:
    """Every parameter of the model (main layers and the first MTP layer), grouped by how it splits."""
    d, v = cfg.hidden_size, cfg.vocab_size
    out = Plan(cfg)
    out.parts.append(Part("embedding", v * d, False, "sharded"))
    if not cfg.tie_word_embeddings:
        out.parts.append(Part("lm_head", v * d, False, "sharded"))
    out.parts.append(Part("final norm", d, False, "replicated"))
    for i in range(cfg.num_hidden_layers):
        out.parts += _layer_parts(cfg, cfg.is_moe_layer(i), "")
    if cfg.num_nextn_predict_layers:
        out.parts += [Part("mtp norms", 3 * d, False, "replicated"),
                      _linear("mtp eh_proj", d, 2 * d, "replicated")]
        out.parts += _layer_parts(cfg, cfg.is_moe_layer(cfg.num_hidden_layers), "mtp ")
    _merge_same_names(out)
    return out


def _merge_same_names(p: Plan) -> None:
    merged: dict[tuple[str, str], Part] = {}
    for part in p.parts:
        key = (part.name, part.split)
        if key in merged:
            m = merged[key]
            m.params += part.params
            m.scale_elements += part.scale_elements
        else:
            merged[key] = Part(part.name, part.params, part.quantized, part.split, part.scale_elements, part.experts)
    p.parts = list(merged.values())


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(p: Plan, worlds: list[int], weights: str, cache_dtype: str, device_gib: float | None) -> str:
    c = p.config
    cache_bytes = CACHE_DTYPE_BYTES[cache_dtype]
    per_token = p.cache_bytes_per_token(cache_bytes)
    mtp = c.num_nextn_predict_layers > 0
    lines = [f"model: {c.source} ({c.model_type}, {c.scoring_func} {c.topk_method} routing)",
             f"parameters: {_count(p.params_without_mtp())} main model"
             + (f", {_count(p.total_params)} with the MTP layer" if mtp else " (no MTP layer)")
             + f" ({c.num_hidden_layers} layers, {c.n_routed_experts} routed experts, vocab {c.vocab_size})",
             f"latent cache: {per_token} bytes per token ({c.num_hidden_layers}{' + MTP' if mtp else ''} layers x "
             f"{c.latent_width} x {cache_bytes} B, {cache_dtype}), replicated on every rank",
             f"weights held as {weights}" + (" (FP8 codes + float32 128x128 block scales)" if weights == "fp8" else "")
             + (" (absorbed w_uk/w_uv too)" if weights == "float32" else ""),
             ""]
    head = f"{'ranks':>5}  {'weights/rank':>13}  {'experts/rank':>12}"
    if device_gib:
        head += f"  {'cache tokens in ' + format(device_gib, 'g') + ' GiB':>24}"
    lines.append(head)
    for n in worlds:
        if c.num_attention_heads % n:
            lines.append(f"{n:>5}  refused: {c.num_attention_heads} attention heads do not split over {n} ranks")
            continue
        b = p.bytes_per_rank(n, weights)
        row = f"{n:>5}  {b / GiB:>9.2f} GiB  {-(-c.n_routed_experts // n) if c.n_routed_experts else 0:>12}"
        if device_gib:
            free = device_gib * GiB - b
            row += f"  {('does not fit' if free <= 0 else f'{int(free // per_token):,}'):>24}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from core.checkpoint import read_config
    from core.default_model import load_default
    from core.engine.options import OneLineParser

    ap = OneLineParser(prog="python -m core.plan", description="Memory per rank from config.json alone.")
    ap.add_argument("--model", type=Path, help="checkpoint directory (only config.json is read); default: embedded")
    ap.add_argument("--world-size", default="1,2,4,8,16", help="comma-separated rank counts (default 1,2,4,8,16)")
    ap.add_argument("--weights", choices=("fp8", "bf16", "float32"),
                    help="how weights are held (default: as the checkpoint; float32: the cpu backend, see above)")
    ap.add_argument("--cache-dtype", default="bfloat16", choices=sorted(CACHE_DTYPE_BYTES))
    ap.add_argument("--device-memory", type=float, help="GiB per device: also print how many cache tokens fit")
    args = ap.parse_args(argv)
    try:
        worlds = [int(x) for x in args.world_size.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--world-size: expected comma-separated integers, got {args.world_size!r}") from None
    if not worlds or any(n < 1 for n in worlds):
        raise UserError(f"--world-size: every rank count must be >= 1, got {args.world_size!r}")
    if args.device_memory is not None and not args.device_memory > 0:
        raise UserError(f"--device-memory must be a positive number of GiB, got {args.device_memory}")
    cfg = load_default().config if args.model is None else read_config(args.model)
    weights = args.weights or ("fp8" if cfg.fp8 else "bf16")
    print(format_plan(plan(cfg), worlds, weights, args.cache_dtype, args.device_memory))
    return 0


if __name__ == "__main__":
    from core.run import run_cli

    sys.exit(run_cli(main))
