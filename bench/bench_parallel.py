"""Tensor + expert parallelism on this machine (gloo): decode tokens/s and the overhead per decode step at 1, 2 and 4
ranks, and peak resident memory per rank (the OS's own accounting: each rank's ru_maxrss from wait4).

    python bench/bench_parallel.py [--ranks 1,2,4] [--new 32] [--model DIR | --big] [--moe-combine all_reduce]

Without --model it runs the embedded default. --big writes (once, under /tmp) a float32 checkpoint of about 1 GB
whose routed experts dominate, so that peak RSS per rank follows the shard: the figure to compare with the
single-process peak. Ranks are started with torchrun's environment variables on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BIG = Path("/tmp/dsv3_bench_parallel_big")


def write_big(directory: Path) -> Path:
    """A DeepSeek-V3-shaped float32 checkpoint with 64 experts of 1024x1024 per MoE layer (~1 GB), no MTP."""
    import torch
    from safetensors.torch import save_file

    from core.default_model import DEFAULT_CONFIG

    if (directory / "model.safetensors").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {**DEFAULT_CONFIG, "hidden_size": 1024, "intermediate_size": 2048, "moe_intermediate_size": 1024,
           "num_hidden_layers": 2, "n_routed_experts": 64, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
           "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8192, "num_nextn_predict_layers": 0,
           "torch_dtype": "float32"}
    cfg.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    r, pe, v, ql = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["q_lora_rank"]

    def w(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    t = {"model.embed_tokens.weight": torch.randn(cfg["vocab_size"], d, generator=g), "lm_head.weight":
         w(cfg["vocab_size"], d), "model.norm.weight": torch.ones(d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t.update({p + "input_layernorm.weight": torch.ones(d), p + "post_attention_layernorm.weight": torch.ones(d),
                  p + "self_attn.q_a_proj.weight": w(ql, d), p + "self_attn.q_a_layernorm.weight": torch.ones(ql),
                  p + "self_attn.q_b_proj.weight": w(heads * qk, ql),
                  p + "self_attn.kv_a_proj_with_mqa.weight": w(r + pe, d),
                  p + "self_attn.kv_a_layernorm.weight": torch.ones(r),
                  p + "self_attn.kv_b_proj.weight": w(heads * (qk - pe + v), r),
                  p + "self_attn.o_proj.weight": w(d, heads * v)})
        if i < cfg["first_k_dense_replace"]:
            inter = cfg["intermediate_size"]
            t.update({p + "mlp.gate_proj.weight": w(inter, d), p + "mlp.up_proj.weight": w(inter, d),
                      p + "mlp.down_proj.weight": w(d, inter)})
            continue
        inter, e = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
        t[p + "mlp.gate.weight"] = w(e, d) * 3
        t[p + "mlp.gate.e_score_correction_bias"] = torch.zeros(e)
        for x in range(e):
            t.update({f"{p}mlp.experts.{x}.gate_proj.weight": w(inter, d), f"{p}mlp.experts.{x}.up_proj.weight":
                      w(inter, d), f"{p}mlp.experts.{x}.down_proj.weight": w(d, inter)})
        t.update({p + "mlp.shared_experts.gate_proj.weight": w(inter, d),
                  p + "mlp.shared_experts.up_proj.weight": w(inter, d),
                  p + "mlp.shared_experts.down_proj.weight": w(d, inter)})
    save_file(t, str(directory / "model.safetensors"))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, args: list[str]) -> tuple[dict, list[float]]:
    """(rank 0's JSON report, peak RSS MiB of every rank)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for r in range(n):
        rank_env = {**env, "WORLD_SIZE": str(n), "RANK": str(r), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)} if n > 1 else env
        procs.append(subprocess.Popen([sys.executable, "-m", "core.run", *args], cwd=ROOT, env=rank_env,
                                      stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.PIPE if r == 0 else subprocess.DEVNULL, text=True))
    out, err = procs[0].stdout.read(), procs[0].stderr.read()
    rss = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        rss.append(usage.ru_maxrss / 1024)  # KiB on Linux
    if procs[0].returncode != 0:
        raise SystemExit(f"{n} ranks failed: {err.strip().splitlines()[-1] if err.strip() else 'no message'}")
    return json.loads(out.strip().splitlines()[-1]), rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="1,2,4")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--moe-combine", default="all_reduce", choices=["all_reduce", "all_to_all"])
    a = ap.parse_args()
    model = write_big(BIG) if a.big else a.model
    args = ["--dtype", "float32", "--prompt-ids", "5,6,7,8,9,10,11,12", "--max-new-tokens", str(a.new),
            "--ignore-eos", "--json", "--moe-combine", a.moe_combine] + (["--model", str(model)] if model else [])
    print(f"model: {model or 'embedded default'}; {a.new} new tokens, float32, gloo, {os.cpu_count()} CPUs")
    print(f"{'ranks':>5} {'decode tok/s':>12} {'ms/step':>8} {'overhead ms/step':>16} {'peak RSS MiB per rank':>28}")
    base = None
    for n in [int(x) for x in a.ranks.split(",")]:
        rep, rss = run(n, args)
        ms = 1000.0 / rep["decode_tokens_per_s"]
        base = ms if base is None else base
        print(f"{n:>5} {rep['decode_tokens_per_s']:>12.1f} {ms:>8.1f} {ms - base:>16.1f} "
              f"{' '.join(f'{x:.0f}' for x in rss):>28}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
