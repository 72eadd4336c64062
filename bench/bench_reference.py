"""Figures for the reference backend on this machine: prefill and decode tokens/s of the embedded default with
cpu_ref, and the latent cache's bytes per token per layer next to what transformers' cache holds for the same model.

    python bench/bench_reference.py [--dtype bfloat16] [--prompt-len 128] [--new 64] [--repeat 3]

Prints a table; the numbers are medians over --repeat runs in one process.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.default_model import DEFAULT_CONFIG, load_default, write_checkpoint  # noqa: E402
from core.fp8 import dequantize_blocks  # noqa: E402
from core.generate import Generator  # noqa: E402
from core.model import Model  # noqa: E402
from core import registry  # noqa: E402
from core.dispatch import Dispatch  # noqa: E402


def transformers_cache_bytes(dtype: torch.dtype, prompt: list[int]) -> tuple[int, str]:
    """Bytes per token per layer of transformers' DynamicCache after a forward over `prompt` (same weights)."""
    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()  # the MTP layer's tensors are "unexpected" to transformers' main model
    src = load_default()
    tensors = {}
    for name, t in src.tensors.items():
        if name.endswith("_scale_inv"):
            continue
        tensors[name] = (dequantize_blocks(t, src.tensors[name + "_scale_inv"], torch.float32)
                         if t.dtype == torch.float8_e4m3fn else t.float())
    config = {k: v for k, v in DEFAULT_CONFIG.items() if k != "quantization_config"}
    with tempfile.TemporaryDirectory() as d:
        write_checkpoint(Path(d), tensors, config)
        hf = DeepseekV3ForCausalLM.from_pretrained(d, dtype=dtype).eval()
        with torch.no_grad():
            out = hf(torch.tensor([prompt]), use_cache=True)
    cache = out.past_key_values
    total, shapes = 0, ""
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t.numel() * t.element_size()
        shapes = f"keys {list(layer.keys.shape)}, values {list(layer.values.shape)}"
    return total // (len(prompt) * len(cache.layers)), shapes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    ref = registry.load("cpu_ref")
    model = Model.load(load_default(), Dispatch(ref, ref), torch.device("cpu"), dtype, with_mtp=True)
    prompt = [0] + torch.randint(3, 259, (args.prompt_len - 1,)).tolist()
    gen = Generator(model)
    gen.generate([prompt], 4)  # warm-up
    rows = []
    for mtp in (False, True):
        runs = [gen.generate([prompt], args.new, mtp=mtp, stop_at_eos=False) for _ in range(args.repeat)]
        rows.append(("cpu_ref" + (" + MTP" if mtp else ""), statistics.median(r.prefill_tokens_per_s for r in runs),
                     statistics.median(r.decode_tokens_per_s for r in runs),
                     f"{runs[0].mtp_accepted}/{runs[0].mtp_proposed}" if mtp else "-"))
    ours = model.cfg.latent_width * torch.finfo(dtype).bits // 8
    theirs, shapes = transformers_cache_bytes(dtype, prompt)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; embedded default, {args.dtype}, prompt {args.prompt_len}, {args.new} new tokens")
    print(f"{'run':16s} {'prefill tok/s':>14s} {'decode tok/s':>13s} {'MTP accepted':>13s}")
    for name, pre, dec, acc in rows:
        print(f"{name:16s} {pre:14.1f} {dec:13.1f} {acc:>13s}")
    print(f"latent cache: {ours} bytes/token/layer ({model.cfg.kv_lora_rank} latent + {model.cfg.qk_rope_head_dim} "
          f"rope key); transformers DynamicCache: {theirs} bytes/token/layer ({shapes}); "
          f"a naive K/V cache would hold {model.cfg.num_attention_heads * (model.cfg.qk_head_dim + model.cfg.v_head_dim) * torch.finfo(dtype).bits // 8}")


if __name__ == "__main__":
    main()
