"""Per-operator benchmark of a Triton backend at DeepSeek-V3 shapes, against the device's own roofs and cpu_ref.

    python bench/bench_ops.py [--backend cuda|rocm] [--ops linear,moe_experts,...] [--no-ref] [--rep-ms 100]
                              [--out bench/results] [--interpret --tiny]

For every operator and shape: time per call, achieved GB/s and TFLOP/s, their fraction of this run's measured
copy bandwidth (y.copy_(x) on 512 MB) and bf16 matmul rate (8192^3), and the speed-up over cpu_ref running on the
same device in the same run. Bytes and FLOPs are counted as perf_anchors.md says:
  norms / rope / SwiGLU / gate: bytes read + written (§7)
  linear (FP8 W8A8): FLOPs 2MNK, bytes M*K + N*K (FP8) + 2*M*N (bf16 out), scales excluded (DeepGEMM, §4); the
                     timed call includes the activation-quantisation kernel
  moe_experts: bytes = distinct experts routed to x (W13 + W2 FP8 bytes + scales), FLOPs = 6*k*D*I*T (§5)
  mla_decode:  FlashMLA's formulas, d = 576, dv = 512, bf16 cache (§3); attention_prefill: causal FLOPs, q/k/v/o bytes
Shapes: decode batches 1..128 and prefill up to 8192 tokens at hidden 7168; the six FP8 GEMM shapes of §4 at
M in {1, 16, 64, 128, 4096}; fused MoE with 256 experts, top-8, T in {1, 16, 64, 128, 256}; MLA decode with
128 heads over 1k..32k contexts. `--interpret --tiny` runs tiny shapes on the CPU through the Triton interpreter
(a smoke test of the script: its timings mean nothing).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402
from bench.harness import Roofs, Row  # noqa: E402
from core.backend import Backend  # noqa: E402

FP8 = torch.float8_e4m3fn


@dataclass
class Shapes:
    tokens: list[int]
    hidden: int
    inter_dense: int
    heads: int
    gemm_nk: list[tuple[int, int]]
    gemm_m: list[int]
    experts: int
    top_k: int
    groups: tuple[int, int]  # n_group, topk_group
    moe_inter: int
    moe_tokens: list[int]
    rank: int
    rope: int
    mla: list[tuple[int, int]]  # (batch, context)
    prefill: list[int]
    ref_attention_max: int  # cpu_ref materialises [H, T, T] scores: skip it beyond this many tokens


FULL = Shapes(tokens=[1, 32, 128, 1024, 8192], hidden=7168, inter_dense=18432, heads=128,
              gemm_nk=[(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)],
              gemm_m=[1, 16, 64, 128, 4096], experts=256, top_k=8, groups=(8, 4), moe_inter=2048,
              moe_tokens=[1, 16, 64, 128, 256], rank=512, rope=64,
              mla=[(128, 1024), (128, 4096), (128, 8192), (64, 16384), (32, 32768)], prefill=[1024, 4096, 8192],
              ref_attention_max=4096)
TINY = Shapes(tokens=[1, 5], hidden=256, inter_dense=160, heads=4, gemm_nk=[(200, 256), (256, 384)], gemm_m=[1, 5],
              experts=16, top_k=4, groups=(4, 2), moe_inter=128, moe_tokens=[1, 5], rank=64, rope=32,
              mla=[(2, 40)], prefill=[24], ref_attention_max=64)


@dataclass
class Case:
    """One timed call: the backend's, cpu_ref's on the same inputs, and what the operator moves and computes."""

    op: str
    shape: str
    run: Callable[[], object]
    ref: Callable[[], object] | None
    nbytes: float | None
    flops: float | None
    note: str = ""


def random_fp8(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Random finite e4m3fn codes (|value| <= 120, both signs), without materialising floats."""
    mag = torch.randint(0, 0x70, shape, dtype=torch.uint8, device=device)
    sign = torch.randint(0, 2, shape, dtype=torch.uint8, device=device) << 7
    return (mag | sign).view(FP8)


def random_scales(rows: int, cols: int, device: torch.device, lead: tuple[int, ...] = ()) -> torch.Tensor:
    shape = lead + (-(-rows // 128), -(-cols // 128))
    return torch.rand(shape, device=device) * 1e-3 + 1e-4


def elementwise_cases(s: Shapes, b: Backend, r: Backend, dev: torch.device, dt: torch.dtype) -> list[Case]:
    cases, d, elt = [], s.hidden, torch.finfo(dt).bits // 8
    w = torch.ones(d, dtype=dt, device=dev)
    for t in s.tokens:
        x, res = torch.randn(t, d, dtype=dt, device=dev), torch.randn(t, d, dtype=dt, device=dev)
        cases.append(Case("rms_norm", f"T={t} D={d}", lambda x=x: b.ops["rms_norm"](x, w, 1e-6),
                          lambda x=x: r.ops["rms_norm"](x, w, 1e-6), elt * (2 * t * d + d), None))
        cases.append(Case("add_rms_norm", f"T={t} D={d}", lambda x=x, res=res: b.ops["add_rms_norm"](x, res, w, 1e-6),
                          lambda x=x, res=res: r.ops["add_rms_norm"](x, res, w, 1e-6), elt * (4 * t * d + d), None))
        i = s.inter_dense
        g = torch.randn(t, 2 * i, dtype=dt, device=dev)
        cases.append(Case("silu_and_mul", f"T={t} I={i}", lambda g=g: b.ops["silu_and_mul"](g),
                          lambda g=g: r.ops["silu_and_mul"](g), elt * 3 * t * i, None))
        h, p = s.heads, s.rope
        q = torch.randn(t, h, 2 * p + p, dtype=dt, device=dev)[..., 2 * p:]  # the rope slice of q [T, H, 192]
        cos, sin = torch.rand(t, p // 2, device=dev), torch.rand(t, p // 2, device=dev)
        cases.append(Case("apply_rope", f"T={t} H={h} P={p}", lambda q=q, c=cos, sn=sin: b.ops["apply_rope"](q, c, sn),
                          lambda q=q, c=cos, sn=sin: r.ops["apply_rope"](q, c, sn),
                          elt * 2 * t * h * p + 4 * t * p, None))
        e, k = s.experts, s.top_k
        logits, bias = torch.randn(t, e, device=dev), torch.randn(e, device=dev) * 0.1
        gate_args = (k, s.groups[0], s.groups[1], 2.5, True)
        cases.append(Case("moe_gate", f"T={t} E={e} k={k}", lambda lg=logits: b.ops["moe_gate"](lg, bias, *gate_args),
                          lambda lg=logits: r.ops["moe_gate"](lg, bias, *gate_args), 4 * t * e + 12 * t * k, None))
    return cases


def linear_cases(s: Shapes, b: Backend, r: Backend, dev: torch.device, dt: torch.dtype) -> list[Case]:
    cases = []
    for n, k in s.gemm_nk:
        w, scale = random_fp8((n, k), dev), random_scales(n, k, dev)
        ours, ref = b.prepare_linear(w, scale), r.prepare_linear(w, scale)
        for m in s.gemm_m:
            x = torch.randn(m, k, dtype=dt, device=dev)
            cases.append(Case("linear", f"M={m} N={n} K={k}", lambda x=x, w=ours: b.ops["linear"](x, w),
                              lambda x=x, w=ref: r.ops["linear"](x, w), m * k + n * k + 2 * m * n, 2 * m * n * k,
                              "fp8 w8a8"))
    return cases


def moe_cases(s: Shapes, b: Backend, r: Backend, dev: torch.device, dt: torch.dtype) -> list[Case]:
    e, d, i, k = s.experts, s.hidden, s.moe_inter, s.top_k
    gate, up, down = random_fp8((e, i, d), dev), random_fp8((e, i, d), dev), random_fp8((e, d, i), dev)
    gs, us, ds = random_scales(i, d, dev, (e,)), random_scales(i, d, dev, (e,)), random_scales(d, i, dev, (e,))
    ours = b.prepare_experts(gate, gs, up, us, down, ds)
    ref = r.prepare_experts(gate, gs, up, us, down, ds)
    per_expert = 3 * i * d + 4 * (gs[0].numel() + us[0].numel() + ds[0].numel())
    cases = []
    for t in s.moe_tokens:
        x = torch.randn(t, d, dtype=dt, device=dev)
        ids = torch.rand(t, e, device=dev).topk(k, dim=-1).indices  # uniform routing
        weights = torch.rand(t, k, device=dev)
        touched = int(ids.unique().numel())
        cases.append(Case("moe_experts", f"T={t} E={e} k={k} D={d} I={i}",
                          lambda x=x, ids=ids, w=weights: b.ops["moe_experts"](x, ours, w, ids),
                          lambda x=x, ids=ids, w=weights: r.ops["moe_experts"](x, ref, w, ids),
                          touched * per_expert, 6 * k * d * i * t, f"{touched} experts touched"))
    return cases


def attention_cases(s: Shapes, b: Backend, r: Backend, dev: torch.device, dt: torch.dtype) -> list[Case]:
    cases, h, rank, p = [], s.heads, s.rank, s.rope
    elt = torch.finfo(dt).bits // 8
    scale = 0.1352337788608801
    spec = b.manifest.cache if b.manifest is not None else None
    page = 64 if spec is None or spec.takes(64) else spec.default()  # FlashMLA's page where the backend takes it
    for bsz, ctx in s.mla:
        for s_q in (1, 2):
            per_seq = -(-ctx // page)
            cache = torch.randn(bsz * per_seq, page, rank + p, dtype=dt, device=dev)
            table = torch.randperm(bsz * per_seq, device=dev).view(bsz, per_seq).to(torch.int32)  # shuffled pages
            q_lat = torch.randn(bsz, s_q, h, rank, dtype=dt, device=dev)
            q_pe = torch.randn(bsz, s_q, h, p, dtype=dt, device=dev)
            lens = torch.full((bsz,), ctx, dtype=torch.int64, device=dev)
            args = (q_lat, q_pe, cache, table, lens, scale)
            sum_sk, d_qk, d_v = bsz * ctx, rank + p, rank
            nbytes = elt * (sum_sk * d_qk + bsz * s_q * h * d_qk + bsz * s_q * h * d_v)
            cases.append(Case("mla_decode", f"B={bsz} S={s_q} H={h} L={ctx} page={page}", lambda a=args: b.ops["mla_decode"](*a),
                              lambda a=args: r.ops["mla_decode"](*a), nbytes, 2 * s_q * h * (d_qk + d_v) * sum_sk))
    nope, dv = 2 * p, 2 * p  # DeepSeek-V3: qk_nope 128, rope 64, v 128
    for t in s.prefill:
        q = torch.randn(t, h, nope + p, dtype=dt, device=dev)
        k = torch.randn(t, h, nope + p, dtype=dt, device=dev)
        v = torch.randn(t, h, dv, dtype=dt, device=dev)
        cu = torch.tensor([0, t], dtype=torch.int32, device=dev)
        args = (q, k, v, cu, cu, scale)
        ref_fn = (lambda a=args: r.ops["attention_prefill"](*a)) if t <= s.ref_attention_max else None
        flops = 2 * h * (t * (t + 1) / 2) * (nope + p + dv)
        cases.append(Case("attention_prefill", f"T={t} H={h} causal", lambda a=args: b.ops["attention_prefill"](*a),
                          ref_fn, elt * t * h * (2 * (nope + p) + 2 * dv), flops,
                          "" if ref_fn else "cpu_ref skipped: [H, T, T] scores"))
    return cases


GROUPS = {"elementwise": elementwise_cases, "linear": linear_cases, "moe": moe_cases, "attention": attention_cases}
GROUP_OF = {"rms_norm": "elementwise", "add_rms_norm": "elementwise", "silu_and_mul": "elementwise",
            "apply_rope": "elementwise", "moe_gate": "elementwise", "linear": "linear", "moe_experts": "moe",
            "mla_decode": "attention", "attention_prefill": "attention"}


def run(args: argparse.Namespace) -> tuple[list[Row], dict]:
    backend, avail, reference = harness.activate(args.backend, args.interpret)
    dev = avail.device
    shapes = TINY if args.tiny else FULL
    dt = torch.float32 if dev.type == "cpu" else torch.bfloat16  # the interpreter's bf16 dot is unusable
    wanted = set(args.ops.split(",")) if args.ops else set(GROUP_OF)
    unknown = wanted - set(GROUP_OF)
    if unknown:
        raise SystemExit(f"error: unknown operators {sorted(unknown)}; choose from {sorted(GROUP_OF)}")
    roofs: Roofs = harness.measure_roofs(dev, args.tiny)
    print(f"{harness.device_label(avail)}: copy {roofs.copy_gbps:.1f} GB/s, matmul {roofs.matmul_tflops:.2f} TFLOP/s",
          flush=True)
    rows = []
    for group in dict.fromkeys(GROUP_OF[op] for op in GROUP_OF if op in wanted):
        with torch.no_grad():
            for case in GROUPS[group](shapes, backend, reference, dev, dt):
                if case.op not in wanted:
                    continue
                ms = harness.bench(case.run, dev, args.rep_ms) * 1e3
                ref_ms = None
                if case.ref is not None and not args.no_ref:
                    ref_ms = harness.bench(case.ref, dev, args.rep_ms) * 1e3
                row = harness.finish_row(Row(case.op, case.shape, ms, ref_ms, note=case.note), case.nbytes,
                                         case.flops, roofs)
                rows.append(row)
                print(harness.format_table([row]).splitlines()[-1], flush=True)
        harness.empty_cache(dev)
    meta = {"title": f"bench_ops: {args.backend} operators", "device": harness.device_label(avail),
            "backend": args.backend, "dtype": str(dt).replace("torch.", ""), "tiny": args.tiny,
            "interpret": args.interpret, "copy_gbps": round(roofs.copy_gbps, 2),
            "matmul_tflops": round(roofs.matmul_tflops, 3), "environment": avail.environment,
            "timing": "torch.Event median, L2 flushed" if harness.on_gpu(dev) else "perf_counter"}
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="cuda")
    p.add_argument("--interpret", action="store_true", help="run the kernels on the CPU (Triton interpreter)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--ops", help="comma-separated operators (default: all)")
    p.add_argument("--no-ref", action="store_true", help="skip cpu_ref (no speed-up column)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement (GPU)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    rows, meta = run(args)
    print()
    print(harness.format_table(rows))
    json_path, md_path = harness.write_reports(rows, meta, args.out, "ops")
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    from core.run import run_cli

    sys.exit(run_cli(main))
