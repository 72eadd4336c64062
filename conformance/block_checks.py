"""Block level: one MLA layer (a varlen prefill, then decode steps of one and of two new tokens against the paged
latent cache, shuffled block tables and NaN-poisoned unused blocks, and one MIXED step where one sequence decodes
while the other prefills a chunk) and one MoE layer with the reference's routing injected, so that a gate
difference cannot hide an expert-GEMM bug. Both run the real graph code (core.model) with the backend's operators
and weight preparation, against the same code in float64 with cpu_ref."""

from __future__ import annotations

import zlib

import torch

from conformance.compare import Errors, errors
from conformance.context import FAIL, SKIP, CheckResult, Suite
from core.batch import Batch
from core.checkpoint import MemoryCheckpoint
from core.config import ModelConfig
from core.default_model import DEFAULT_CONFIG, Rand, checkpoint_tensors, layer_tensors
from core.model import Model
from core.weights import WeightLoader

MLA_DIMS = {
    "quick": dict(hidden_size=256, num_attention_heads=4, q_lora_rank=96, kv_lora_rank=128, qk_rope_head_dim=32,
                  qk_nope_head_dim=32, v_head_dim=32),
    "full": dict(hidden_size=1024, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=512, qk_rope_head_dim=64,
                 qk_nope_head_dim=128, v_head_dim=128),
    "gpu": dict(hidden_size=7168, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
                qk_nope_head_dim=128, v_head_dim=128),
}
MOE_DIMS = {
    "quick": dict(hidden_size=256, moe_intermediate_size=96, n_routed_experts=16, n_group=4, topk_group=2,
                  num_experts_per_tok=4),
    "full": dict(hidden_size=1024, moe_intermediate_size=256, n_routed_experts=32, n_group=8, topk_group=4,
                 num_experts_per_tok=8),
    "gpu": dict(hidden_size=7168, moe_intermediate_size=2048, n_routed_experts=256, n_group=8, topk_group=4,
                num_experts_per_tok=8),
}
V3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}


def _layer_source(dims: dict, moe: bool, seed: int) -> MemoryCheckpoint:
    config = {**DEFAULT_CONFIG, **dims, "num_hidden_layers": 1, "first_k_dense_replace": 0 if moe else 1,
              "intermediate_size": 128, "rope_scaling": V3_YARN, "max_position_embeddings": 163840}
    cfg = ModelConfig.from_dict(config, "conformance block")
    tensors = checkpoint_tensors(layer_tensors(cfg, "model.layers.0.", moe, Rand(seed)))
    return MemoryCheckpoint(cfg, tensors, "conformance block")


class _InjectedGate:
    """A dispatch whose moe_gate returns fixed routing (moved to the caller's device)."""

    def __init__(self, inner, weights: torch.Tensor, ids: torch.Tensor):
        self._inner, self._routing = inner, (weights, ids)

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def moe_gate(self, logits, *args):
        w, ids = self._routing
        return w.to(logits.device, torch.float64 if logits.dtype == torch.float64 else torch.float32), ids.to(logits.device)


def _result(suite: Suite, name: str, dtype: torch.dtype, shape: str) -> tuple[CheckResult, object]:
    dname = str(dtype).replace("torch.", "")
    classes = [suite.numerics(op) for op in NEEDS[name] if suite.numerics(op) != "reference"]
    tol = suite.tolerances.lookup(name, dname, classes[0] if classes else "reference", suite.mode_name)
    r = CheckResult("block", f"block/{name}/{suite.case_set}/{dname}", name, SKIP, dname, shape, tolerance=tol.rtol,
                    tolerance_reason=tol.reason, tolerance_source=tol.source)
    return r, tol


def _verdict(suite: Suite, r: CheckResult, err: Errors, ref_err: Errors, tol, parts: list | None = None
             ) -> CheckResult:
    """Absolute verdict on the worst error; relative verdict step by step (`parts`: (err, ref_err) per step and
    for the cache rows), so a bug confined to one step (the prefill) is not diluted by the others."""
    classes = [suite.numerics(op) for op in NEEDS[r.op] if suite.numerics(op) != "reference"]
    rel = suite.tolerances.relative(r.op, r.dtype, classes[0] if classes else "reference", suite.mode_name)
    return r.judge(err, ref_err, tol, rel, parts)

def mla_steps(model: Model, attn, xs: list[torch.Tensor], plan: list[tuple], cache, tables: list[list[int]]
              ) -> list[torch.Tensor]:
    """Run the layer's attention over the plan's steps (tokens, starts, num_decode) on the paged cache."""
    outs = []
    for x, (tokens, starts, num_decode) in zip(xs, plan):
        batch = Batch.build(tokens, tables, starts, model.device, block_size=cache.block_size, num_decode=num_decode)
        cos, sin = model.rope(batch.positions)
        outs.append(model._attention(attn, x.to(model.device), batch, cache.layers[0], cos, sin))
    return outs


def block_size_for(suite: Suite) -> int:
    """16 where the backend takes it (several blocks per sequence here), else its preferred size."""
    spec = suite.manifest.cache
    return 16 if spec.takes(16) else spec.default()


def check_mla(suite: Suite, dtype: torch.dtype) -> CheckResult:
    dims = MLA_DIMS[suite.case_set]
    seed = suite.seed ^ zlib.crc32(b"mla")
    prompt = (9, 14)
    plan = [([[5] * prompt[0], [5] * prompt[1]], [0, 0], 0)]  # prefill (tokens only size the batch)
    lens = list(prompt)
    for new, num_decode in (((1, 1), 2), ((1, 3), 1), ((1, 1), 2), ((2, 2), 2)):  # step 2: decode + prefill chunk
        plan.append(([[5] * n for n in new], list(lens), num_decode))
        lens = [n + k for n, k in zip(lens, new)]
    bs = block_size_for(suite)
    used = [-(-n // bs) for n in lens]
    order = torch.randperm(sum(used) + 2, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = [order[:used[0]], order[used[0]:sum(used)]]  # shuffled; two blocks nobody owns
    r, tol = _result(suite, "mla_block", dtype, f"layer {dims}; paged block_size {bs}; prefill {list(prompt)}, "
                                                f"decode S=1, decode+prefill-chunk 3, decode S=1, S=2")
    if tol.skip:
        r.detail = tol.reason
        return r
    source = _layer_source(dims, False, seed)
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(sum(len(t) for t in tokens), dims["hidden_size"], generator=g, dtype=torch.float64)
          for tokens, _, _ in plan]

    def run(ops, device, work, run_dtype):
        attn = WeightLoader(source, ops, device, run_dtype).attention("model.layers.0.self_attn.")
        model = Model(source.config, None, ops, device, run_dtype)
        cache = model.new_cache(len(order), bs)
        cache.layers[0].fill_(float("nan"))  # unused blocks, and rows not yet written, must never be read
        outs = mla_steps(model, attn, [x.to(work).to(run_dtype) for x in xs], plan, cache, tables)
        flat = cache.layers[0].view(-1, cache.layers[0].shape[-1])
        rows = [flat[[t[i // bs] * bs + i % bs for i in range(n)]] for t, n in zip(tables, lens)]
        return outs, rows

    cpu = torch.device("cpu")
    golden, golden_cache = run(suite.golden_dispatch(), cpu, dtype, torch.float64)
    ref, ref_cache = run(suite.golden_dispatch(), cpu, dtype, dtype)
    try:
        with torch.no_grad():
            (got, got_cache), seconds = suite.timed(run, suite.dispatch, suite.device, dtype, dtype)
    except Exception as e:
        r.verdict, r.detail = FAIL, f"raised {type(e).__name__}: {e}"
        return r
    r.seconds = seconds
    err, ref_err = Errors.zero(), Errors.zero()
    worst_step, parts = 0, []
    for i, (a, b, c) in enumerate(zip(got, golden, ref)):
        e, e_ref = errors(a, b), errors(c, b)
        if e.rel > err.rel:
            worst_step = i
        err, ref_err = err.worst(e), ref_err.worst(e_ref)
        parts.append((e, e_ref))
    for a, b, c in zip(got_cache, golden_cache, ref_cache):
        e, e_ref = errors(a, b), errors(c, b)
        err, ref_err = err.worst(e), ref_err.worst(e_ref)
        parts.append((e, e_ref))
    kind = {0: "prefill", 2: "mixed decode + prefill chunk"}.get(worst_step, "decode")
    r.detail = f"worst step {worst_step} ({kind})"
    return _verdict(suite, r, err, ref_err, tol, parts)


def check_moe(suite: Suite, dtype: torch.dtype) -> CheckResult:
    dims = MOE_DIMS[suite.case_set]
    seed = suite.seed ^ zlib.crc32(b"moe")
    tokens = 16
    r, tol = _result(suite, "moe_block", dtype, f"layer {dims}; {tokens} tokens, reference routing injected")
    if tol.skip:
        r.detail = tol.reason
        return r
    source = _layer_source(dims, True, seed)
    x = torch.randn(tokens, dims["hidden_size"], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cpu = torch.device("cpu")
    golden_ops = suite.golden_dispatch()
    golden_layer = WeightLoader(source, golden_ops, cpu, torch.float64).moe("model.layers.0.mlp.")
    golden_model = Model(source.config, None, golden_ops, cpu, torch.float64)
    xw = x.to(dtype).to(torch.float64)
    c = source.config
    logits = golden_model._linear(xw, golden_layer.router)
    routing = golden_ops.moe_gate(logits, golden_layer.bias, c.num_experts_per_tok, c.n_group, c.topk_group,
                                  c.routed_scaling_factor, c.norm_topk_prob)

    def run(ops, device, run_dtype):
        injected = _InjectedGate(ops, *routing)
        layer = WeightLoader(source, ops, device, run_dtype).moe("model.layers.0.mlp.")
        return Model(source.config, None, injected, device, run_dtype)._moe(layer, xw.to(run_dtype).to(device))

    golden = run(golden_ops, cpu, torch.float64)
    ref = run(golden_ops, cpu, dtype)
    try:
        with torch.no_grad():
            got, r.seconds = suite.timed(run, suite.dispatch, suite.device, dtype)
    except Exception as e:
        r.verdict, r.detail = FAIL, f"raised {type(e).__name__}: {e}"
        return r
    return _verdict(suite, r, errors(got, golden), errors(ref, golden), tol)


NEEDS = {"mla_block": ["rms_norm", "apply_rope", "linear", "attention_prefill", "mla_decode"],
         "moe_block": ["linear", "silu_and_mul", "moe_experts"]}
"""The operators each block runs (their common dtypes are the block's working dtypes)."""
CHECKS = {"mla_block": check_mla, "moe_block": check_moe}


def run(suite: Suite) -> list[CheckResult]:
    results = []
    for name, check in CHECKS.items():
        missing = [op for op in NEEDS[name] if op not in suite.backend.ops]
        if missing:
            results.append(CheckResult("block", f"block/{name}", name, FAIL,
                                       detail=f"needs {', '.join(missing)}, not implemented by {suite.backend.name}"))
            continue
        for dtype in suite.working_dtypes(NEEDS[name]):
            results.append(check(suite, dtype))
    return results
