"""Random inputs for one operator case: drawn once in float64 (fresh, from a recorded seed), then materialised both
in the working dtype on the backend's device and, from those very rounded values, in float64 on the CPU for the
golden run. Weights pass through each side's own prepare hook."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from core.fp8 import quantize_blocks
from core.rope import RopeConfig, RotaryTable

F64 = torch.float64

V3_ROPE = RopeConfig("yarn", 10000.0, 64, 40.0, 4096, 32.0, 1.0, 1.0, 1.0, 1.0, True)
V3_SOFTMAX_SCALE = 192 ** -0.5 * V3_ROPE.softmax_scale_factor  # 0.1352337788608801


@dataclass
class Hooks:
    prepare_linear: Callable
    prepare_experts: Callable


@dataclass
class CaseInputs:
    """`make(work_dtype, run_dtype, device, hooks)` returns the positional arguments of the operator."""

    make: Callable[[torch.dtype, torch.dtype, torch.device, Hooks], tuple]
    shape: str
    extra: dict = field(default_factory=dict)  # what comparisons need (e.g. golden gate margins)


def act(master: Tensor, work: torch.dtype, run: torch.dtype, device: torch.device) -> Tensor:
    """An activation rounded to the working dtype, then held in the run dtype (float64 for golden)."""
    return master.to(work).to(run).to(device)


def fixed_dtype(op: str, p: dict) -> torch.dtype | None:
    """The one working dtype a case runs in, when the contract fixes it (router logits and activations are float32)."""
    if op == "moe_gate" or (op == "linear" and p.get("activation") == "float32"):
        return torch.float32
    return None


def strided(t: Tensor, enabled: bool) -> Tensor:
    """A view of `t` inside a wider buffer whose extra last-dim columns are NaN (as the graph passes kv[:, :R] or
    q[..., nope:]): a kernel that assumes contiguity, or reads outside the view, shows up."""
    if not enabled or t.dim() == 0:
        return t
    wide = torch.full((*t.shape[:-1], t.shape[-1] + 8), float("nan"), dtype=t.dtype, device=t.device)
    wide[..., 8:] = t
    return wide[..., 8:]


def build(op: str, p: dict, g: torch.Generator) -> CaseInputs:
    return BUILDERS[op](p, g)


def randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _leading(p) -> tuple[int, ...]:
    """The leading dims of an activation: tokens, then `middle` (a list) where the contract allows more dims."""
    middle = p.get("middle", [])
    return (p["tokens"], *(middle if isinstance(middle, list) else [middle]))


def _dims(shape: tuple[int, ...]) -> str:
    return ",".join(str(d) for d in shape)


def _norm(p, g):
    lead = _leading(p)
    x, w = randn(g, *lead, p["dim"], scale=p.get("scale", 1.0)), 1 + 0.1 * randn(g, p["dim"])
    eps, view = p.get("eps", 1e-6), p.get("strided", False)
    return CaseInputs(lambda wd, rd, dev, h: (strided(act(x, wd, rd, dev), view), act(w, wd, rd, dev), eps),
                      f"x[{_dims(lead)},{p['dim']}]{' strided' if view else ''} eps={eps}")


def _add_norm(p, g):
    s, lead = p.get("scale", 1.0), _leading(p)
    x, r, w = randn(g, *lead, p["dim"], scale=s), randn(g, *lead, p["dim"], scale=s), 1 + 0.1 * randn(g, p["dim"])
    eps = p.get("eps", 1e-6)
    return CaseInputs(lambda wd, rd, dev, h: (act(x, wd, rd, dev), act(r, wd, rd, dev), act(w, wd, rd, dev), eps),
                      f"x,residual[{_dims(lead)},{p['dim']}] eps={eps}")


def _rope(p, g):
    t, dim = p["tokens"], p["dim"]
    heads = _dims(tuple(p["heads"]) if isinstance(p["heads"], list) else (p["heads"],))
    x = randn(g, t, *(p["heads"] if isinstance(p["heads"], list) else [p["heads"]]), dim)
    pos = torch.randint(0, p.get("max_position", 4096), (t,), generator=g)
    rope = RopeConfig(**{**V3_ROPE.__dict__, "dim": dim})
    cos, sin = RotaryTable(rope, torch.device("cpu"), torch.float32)(pos)
    view = p.get("strided", False)
    return CaseInputs(lambda wd, rd, dev, h: (strided(act(x, wd, rd, dev), view),
                                              cos.to(rd if rd == F64 else torch.float32).to(dev),
                                              sin.to(rd if rd == F64 else torch.float32).to(dev)),
                      f"x[{t},{heads},{dim}]{' strided' if view else ''} cos,sin[{t},{dim // 2}]")


def _linear(p, g):
    t, n, k = p["tokens"], p["n"], p["k"]
    x = randn(g, t, k)
    w = randn(g, n, k, scale=1 / math.sqrt(k))
    kind, view = p.get("weight", "fp8"), p.get("strided", False)
    if kind == "fp8":
        codes, scale = quantize_blocks(w.float())

        def make(wd, rd, dev, h):
            return strided(act(x, wd, rd, dev), view), h.prepare_linear(codes.to(dev), scale.to(dev))
        shape = f"x[{t},{k}] W[{n},{k}] fp8 scale[{math.ceil(n / 128)},{math.ceil(k / 128)}]"
    else:
        wdt = {"same": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[kind]

        def make(wd, rd, dev, h):
            return strided(act(x, wd, rd, dev), view), h.prepare_linear(act(w, wdt or wd, rd, dev), None)
        shape = f"x[{t},{k}] W[{n},{k}] {kind}"
    return CaseInputs(make, shape + (" x strided" if view else ""))


def _silu(p, g):
    x = randn(g, p["tokens"], 2 * p["inter"], scale=p.get("scale", 2.0))
    return CaseInputs(lambda wd, rd, dev, h: (act(x, wd, rd, dev),), f"x[{p['tokens']},{2 * p['inter']}]")


def _prefill(p, g):
    seqs, heads, dqk, dv = [tuple(s) for s in p["seqs"]], p["heads"], p["dqk"], p["dv"]
    tq, tk = sum(s[0] for s in seqs), sum(s[1] for s in seqs)
    q, k, v = randn(g, tq, heads, dqk), randn(g, tk, heads, dqk), randn(g, tk, heads, dv)
    cu_q = torch.tensor([0] + [sum(s[0] for s in seqs[:i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    cu_k = torch.tensor([0] + [sum(s[1] for s in seqs[:i + 1]) for i in range(len(seqs))], dtype=torch.int32)
    scale, view = p.get("scale", V3_SOFTMAX_SCALE), p.get("strided", False)

    def make(wd, rd, dev, h):
        return (act(q, wd, rd, dev), act(k, wd, rd, dev), strided(act(v, wd, rd, dev), view), cu_q.to(dev),
                cu_k.to(dev), scale)
    return CaseInputs(make, f"q[{tq},{heads},{dqk}] k[{tk},{heads},{dqk}] v[..,{dv}]{' strided' if view else ''} "
                            f"seqs(q,k)={list(seqs)} scale={scale:.4g}")


def paged_decode_cache(lens: list[int], width: int, block_size: int, g: torch.Generator, layout: str = "shuffled",
                       spare: int = 3) -> tuple[Tensor, Tensor]:
    """A float64 paged cache [blocks, block_size, width] and its block table [B, max_used + 2] int32 (contract v2).

    layout "shuffled": every sequence's blocks drawn from a random permutation (non-contiguous, out of order);
    "contiguous": sequence b owns consecutive blocks. Rows past lens in a partial last block and the `spare` unused
    blocks are NaN; each table row continues past its used blocks with a NaN block's id, then -1, so an
    implementation that reads past lens or dereferences a table entry it must not read returns NaN (or fails)."""
    used = [-(-n // block_size) for n in lens]
    total = sum(used) + spare
    order = torch.randperm(total, generator=g).tolist() if layout == "shuffled" else list(range(total))
    cache = torch.full((total, block_size, width), float("nan"), dtype=F64)
    table = torch.full((len(lens), max(used, default=0) + 2), -1, dtype=torch.int32)
    spare_ids, start = order[sum(used):], 0
    for b, (n, k) in enumerate(zip(lens, used)):
        ids = order[start:start + k]
        start += k
        rows = randn(g, k * block_size, width)
        rows[n:] = float("nan")
        cache[ids] = rows.view(k, block_size, width)
        table[b, :k] = torch.tensor(ids, dtype=torch.int32)
        if spare_ids:
            table[b, k] = spare_ids[b % len(spare_ids)]
    return cache, table


def _decode(p, g):
    b, s, heads, r, pe = p["batch"], p["new"], p["heads"], p["rank"], p["rope"]
    bs, layout = p.get("block_size", 16), p.get("table", "shuffled")
    seq_lens = [p["lens"][i % len(p["lens"])] for i in range(b)] if p["lens"] else []  # cycled up to the batch
    lens = torch.tensor(seq_lens, dtype=torch.int64)
    cache, table = paged_decode_cache(seq_lens, r + pe, bs, g, layout)
    q_lat, q_pe = randn(g, b, s, heads, r, scale=0.1), randn(g, b, s, heads, pe)
    scale, view = p.get("scale", V3_SOFTMAX_SCALE), p.get("strided", False)

    def make(wd, rd, dev, h):
        return (act(q_lat, wd, rd, dev), strided(act(q_pe, wd, rd, dev), view), act(cache, wd, rd, dev),
                table.to(dev), lens.to(dev), scale)
    shown = seq_lens if len(seq_lens) <= 8 else f"{p['lens']} cycled over {b} sequences"
    return CaseInputs(make, f"q_lat[{b},{s},{heads},{r}] q_pe{' strided' if view else ''} "
                            f"cache[{cache.shape[0]},{bs},{r + pe}] {layout} table lens={shown} "
                            f"scale={scale:.4g}", extra={"block_size": bs})


def _gate(p, g):
    t, e = p["tokens"], p["experts"]
    logits = randn(g, t, e, scale=2.0).float()
    bias = (0.1 * randn(g, e)).float()
    scoring, group_score = p.get("scoring", "sigmoid"), p.get("group_score", "top2_sum")
    args = (p["top_k"], p["groups"], p["topk_group"], p["scale"], p.get("renorm", True), scoring, group_score)
    with_bias = p.get("bias", True)  # DeepSeek-V2's softmax gate has no correction bias

    def make(wd, rd, dev, h):
        dt = F64 if rd == F64 else torch.float32
        return (logits.to(dt).to(dev), bias.to(dt).to(dev) if with_bias else None) + args
    return CaseInputs(make, f"logits[{t},{e}] {scoring} groups={p['groups']} ({group_score}) keep={p['topk_group']} "
                            f"top_k={p['top_k']}{'' if with_bias else ' no bias'}")


def _experts(p, g):
    t, e, d, inter, k = p["tokens"], p["experts"], p["hidden"], p["inter"], p["top_k"]
    x = randn(g, t, d)
    ws = [randn(g, e, inter, d, scale=d ** -0.5), randn(g, e, inter, d, scale=d ** -0.5),
          randn(g, e, d, inter, scale=inter ** -0.5)]
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.int64)
    weights = torch.rand(t, k, generator=g, dtype=F64).float() * 0.8 + 0.1
    remote = float(p.get("remote", 0.0))  # expert parallelism: this share of slots held by another rank (id -1)
    if remote and t:
        ids[torch.rand(t, k, generator=g, dtype=F64) < remote] = -1
        ids[0] = -1  # one token with no local expert at all: its row must be exactly 0
        # a -1 slot's weight is ignored (core/ops.py): NaN, inf, or a weight that would dominate the row if an
        # expert were applied with it; a combine that multiplies it by a zero contribution is caught by the NaN
        poison = torch.tensor([float("nan"), 1.0e4, float("inf")])
        weights[ids < 0] = poison[torch.arange(int((ids < 0).sum())) % 3]
    if p.get("weight", "fp8") == "fp8":
        quantized = [quantize_blocks(w.float()) for w in ws]

        def prepared(wd, rd, dev, h):
            flat = [x for c, s in quantized for x in (c.to(dev), s.to(dev))]
            return h.prepare_experts(*flat)
    else:  # float experts (no scales): in the working dtype ("same") or a fixed one
        wdt = {"same": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[p["weight"]]

        def prepared(wd, rd, dev, h):
            return h.prepare_experts(act(ws[0], wdt or wd, rd, dev), None, act(ws[1], wdt or wd, rd, dev), None,
                                     act(ws[2], wdt or wd, rd, dev), None)

    def make(wd, rd, dev, h):
        return (act(x, wd, rd, dev), prepared(wd, rd, dev, h), weights.to(F64 if rd == F64 else torch.float32).to(dev),
                ids.to(dev))
    shape = f"x[{t},{d}] experts[{e}x({inter},{d})] top_k={k} {p.get('weight', 'fp8')}"
    return CaseInputs(make, shape + (f" remote(-1)={int((ids < 0).sum())}/{ids.numel()}" if remote else ""))


BUILDERS = {
    "rms_norm": _norm, "add_rms_norm": _add_norm, "apply_rope": _rope, "linear": _linear, "silu_and_mul": _silu,
    "attention_prefill": _prefill, "mla_decode": _decode, "moe_gate": _gate, "moe_experts": _experts,
}
