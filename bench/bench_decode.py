"""Whole-model decode throughput on a slice of DeepSeek-V3: the backend against cpu_ref on the same device.

    python bench/bench_decode.py [--backend cuda] [--layers 3] [--batches 1,32,128] [--prompt-len 16] [--new 8]
                                 [--no-ref] [--out bench/results] [--interpret --tiny]

The slice has the real dimensions (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, 256 routed experts + 1 shared,
top-8 in 8 groups, vocab 129280, YaRN) and `--layers` decoder layers (the first dense, the rest MoE: 3 layers are
~26 GB of FP8 weights), with random FP8 block-scaled weights generated on the device as the loader reads them
(a MemoryCheckpoint whose tensors are made on demand, so the host never holds them). Each batch size decodes
`--new` tokens after a `--prompt-len`-token prompt per sequence (short contexts: this measures the weight-streaming
regime that dominates single-GPU decode, perf_anchors.md §5). Reported: decode tokens/s, ms per step, the
weight-read floor per step at this run's measured copy bandwidth, and the speed-up over cpu_ref.
`--interpret --tiny` runs the embedded default's dimensions on the CPU through the Triton interpreter (smoke test).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.bench_ops import random_fp8  # noqa: E402
from bench.harness import Row  # noqa: E402
from core.backend import Backend  # noqa: E402
from core.checkpoint import MemoryCheckpoint  # noqa: E402
from core.config import ModelConfig  # noqa: E402
from core.default_model import DEFAULT_CONFIG  # noqa: E402
from core.dispatch import Dispatch  # noqa: E402
from core.generate import Generator  # noqa: E402
from core.model import Model  # noqa: E402

REAL_DIMS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}
FP8_MODULES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")
CODE_RMS = 29.0  # rms of bench_ops.random_fp8's code values (uniform bit patterns 0x00..0x6F, both signs)


class SyntheticCheckpoint(MemoryCheckpoint):
    """A MemoryCheckpoint whose entries are factories: each tensor is generated on `device` when the loader reads it
    and is not kept, so a 26 GB slice never sits in host memory (or twice on the device)."""

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]()


def slice_config(layers: int, tiny: bool) -> dict:
    base = {**DEFAULT_CONFIG, "num_hidden_layers": layers, "first_k_dense_replace": 1, "num_nextn_predict_layers": 0}
    return base if tiny else {**base, **REAL_DIMS}


def tensor_factories(cfg: ModelConfig, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """Checkpoint names -> factories: FP8 codes with block scales sized for O(1) activations, bf16 elsewhere."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    qk, r, pe, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
    out: dict[str, Callable[[], torch.Tensor]] = {}

    def fp8(name: str, rows: int, cols: int) -> None:
        out[name] = lambda: random_fp8((rows, cols), device)
        scale = 1.0 / (math.sqrt(cols) * CODE_RMS)
        out[name + "_scale_inv"] = lambda: torch.full((-(-rows // 128), -(-cols // 128)), scale, device=device)

    def bf16(name: str, *shape: int, gain: float | None = None, ones: bool = False) -> None:
        if ones:
            out[name] = lambda: torch.ones(*shape, dtype=torch.bfloat16, device=device)
        else:
            std = gain if gain is not None else 1.0 / math.sqrt(shape[-1])
            out[name] = lambda: (torch.randn(*shape, device=device) * std).to(torch.bfloat16)

    bf16("model.embed_tokens.weight", cfg.vocab_size, d, gain=1.0)
    bf16("lm_head.weight", cfg.vocab_size, d)
    bf16("model.norm.weight", d, ones=True)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        bf16(p + "input_layernorm.weight", d, ones=True)
        bf16(p + "post_attention_layernorm.weight", d, ones=True)
        fp8(p + "self_attn.q_a_proj.weight", cfg.q_lora_rank, d)
        bf16(p + "self_attn.q_a_layernorm.weight", cfg.q_lora_rank, ones=True)
        fp8(p + "self_attn.q_b_proj.weight", h * qk, cfg.q_lora_rank)
        fp8(p + "self_attn.kv_a_proj_with_mqa.weight", r + pe, d)
        bf16(p + "self_attn.kv_a_layernorm.weight", r, ones=True)
        fp8(p + "self_attn.kv_b_proj.weight", h * (cfg.qk_nope_head_dim + v), r)
        fp8(p + "self_attn.o_proj.weight", d, h * v)
        if not cfg.is_moe_layer(i):
            for kind, shape in (("gate", (cfg.intermediate_size, d)), ("up", (cfg.intermediate_size, d)),
                                ("down", (d, cfg.intermediate_size))):
                fp8(f"{p}mlp.{kind}_proj.weight", *shape)
            continue
        inter = cfg.moe_intermediate_size
        bf16(p + "mlp.gate.weight", cfg.n_routed_experts, d, gain=3.0 / math.sqrt(d))
        out[p + "mlp.gate.e_score_correction_bias"] = lambda: torch.randn(cfg.n_routed_experts, device=device) * 0.1
        for e in range(cfg.n_routed_experts):
            for kind, shape in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                fp8(f"{p}mlp.experts.{e}.{kind}_proj.weight", *shape)
        shared = inter * cfg.n_shared_experts
        for kind, shape in (("gate", (shared, d)), ("up", (shared, d)), ("down", (d, shared))):
            fp8(f"{p}mlp.shared_experts.{kind}_proj.weight", *shape)
    return out


def weight_floor_bytes(cfg: ModelConfig, batch: int) -> float:
    """FP8/bf16 bytes one decode step must read: every non-routed weight, plus the routed experts `batch` tokens are
    expected to touch under uniform routing (256 * (1 - (1 - 8/256)^B) per MoE layer), plus B embedding rows."""
    d, h, inter = cfg.hidden_size, cfg.num_attention_heads, cfg.moe_intermediate_size
    qk, r, pe = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    attn = (cfg.q_lora_rank * d + h * qk * cfg.q_lora_rank + (r + pe) * d
            + h * (cfg.qk_nope_head_dim + cfg.v_head_dim) * r + d * h * cfg.v_head_dim)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = e * (1 - (1 - k / e) ** batch)
    total = 2 * cfg.vocab_size * d + 2 * batch * d  # lm_head (bf16) + embedding rows
    for i in range(cfg.num_hidden_layers):
        total += attn
        total += 3 * d * (inter * (touched + cfg.n_shared_experts) if cfg.is_moe_layer(i) else cfg.intermediate_size)
    return float(total)


def decode_rate(backend: Backend, reference: Backend, cfg: ModelConfig, raw: dict, device: torch.device,
                batches: list[int], prompt_len: int, new: int) -> dict[int, float]:
    """Decode tokens/s of `backend` per batch size (greedy, EOS ignored)."""
    ops = Dispatch(backend, reference, strict=backend.name != reference.name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    source = SyntheticCheckpoint(ModelConfig.from_dict(raw, "bench slice"), tensor_factories(cfg, device),
                                 "bench slice")
    model = Model.load(source, ops, device, dtype, with_mtp=False)
    gen = Generator(model)
    g = torch.Generator().manual_seed(0)
    rates = {}
    for b in batches:
        prompts = torch.randint(2, cfg.vocab_size, (b, prompt_len), generator=g).tolist()
        gen.generate(prompts, 2, stop_at_eos=False)  # warm-up: JIT compilation, allocator
        harness.sync(device)
        result = gen.generate(prompts, new, stop_at_eos=False)
        rates[b] = result.decode_tokens_per_s
        print(f"  {backend.name:8s} batch {b:4d}: {rates[b]:.1f} decode tokens/s", flush=True)
    del model, gen, source
    gc.collect()
    harness.empty_cache(device)
    return rates


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--interpret", action="store_true", help="run the kernels on the CPU (Triton interpreter)")
    p.add_argument("--tiny", action="store_true", help="the embedded default's dimensions (smoke test)")
    p.add_argument("--layers", type=int, default=3, help="decoder layers in the slice (first dense, rest MoE)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32,128; tiny 1,2)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new", type=int, default=None, help="new tokens per sequence (default 8; tiny 2)")
    p.add_argument("--no-ref", action="store_true", help="skip cpu_ref (no speed-up column)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    backend, avail, reference = harness.activate(args.backend, args.interpret)
    device = avail.device
    layers = 2 if args.tiny and args.layers == 3 else args.layers
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,32,128")).split(",")]
    new = args.new or (2 if args.tiny else 8)
    raw = slice_config(layers, args.tiny)
    cfg = ModelConfig.from_dict(raw, "bench slice")
    roofs = harness.measure_roofs(device, args.tiny)
    print(f"{harness.device_label(avail)}: copy {roofs.copy_gbps:.1f} GB/s; slice: {layers} layers, hidden "
          f"{cfg.hidden_size}, {cfg.n_routed_experts} experts", flush=True)
    with torch.no_grad():
        ours = decode_rate(backend, reference, cfg, raw, device, batches, args.prompt_len, new)
        ref = {} if args.no_ref else decode_rate(reference, reference, cfg, raw, device, batches, args.prompt_len, new)
    rows = []
    for b in batches:
        step_ms = 1e3 * b / ours[b] if ours[b] else float("nan")
        floor_ms = 1e3 * weight_floor_bytes(cfg, b) / (roofs.copy_gbps * 1e9)
        row = Row("decode", f"batch {b}", step_ms, 1e3 * b / ref[b] if ref.get(b) else None,
                  note=f"{ours[b]:.1f} tok/s; weight floor {floor_ms:.3f} ms/step",
                  extra={"tokens_per_s": ours[b], "ref_tokens_per_s": ref.get(b), "floor_ms": floor_ms})
        rows.append(harness.finish_row(row, weight_floor_bytes(cfg, b), None, roofs))
    meta = {"title": f"bench_decode: {args.backend} vs cpu_ref, {layers}-layer DeepSeek-V3 slice",
            "device": harness.device_label(avail), "backend": args.backend, "tiny": args.tiny,
            "interpret": args.interpret, "layers": layers, "prompt_len": args.prompt_len, "new_tokens": new,
            "copy_gbps": round(roofs.copy_gbps, 2), "environment": avail.environment,
            "note": "time = ms per decode step; GB/s = weight-floor bytes / step time"}
    print()
    print(harness.format_table(rows))
    json_path, md_path = harness.write_reports(rows, meta, args.out, "decode")
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    from core.run import run_cli

    sys.exit(run_cli(main))
