"""The shared Triton kernels (backends/triton_kernels) against cpu_ref, operator by operator.

W8A8 operators (linear and moe_experts with FP8 weights) are compared with cpu_ref.NUMERICS['w8a8'] (and
'w8a8_fnuz' for re-encoded weights), everything else with cpu_ref itself. Shapes are small and unaligned (FP8 edge
blocks partial, e.g. 576 or 200 rows, K = 300), plus a single token, an empty batch and strided inputs. Every
wrapper-allocated buffer is poisoned (NaN / -7777) so an unwritten element shows; inputs must come back unchanged.

float32 is compared tightly: the interpreter computes in float32 exactly like a GPU. bfloat16 is checked to within
2 ulps: the interpreter rounds float32 -> bfloat16 toward zero (1 ulp) and the float32 summation order differs.
The activation quantiser must match core.fp8 bit for bit (it rounds explicitly, so the interpreter's faulty
fp32 -> fp8 conversion never sees an inexact value).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.triton_support import DEVICE, poisoned_allocations, rel_err, within_ulps  # noqa: I001  (sets the mode)

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")
tl = triton.language

import backends.triton_kernels as tk  # noqa: E402
from backends import cpu_ref  # noqa: E402
from backends.rocm.fnuz import e4m3fn_to_fnuz  # noqa: E402
from backends.triton_kernels.moe_align import align_block_size  # noqa: E402
from backends.triton_kernels.quant import fp8_bits_to_fp16, fp8_grid_to_bits, quantize_activation  # noqa: E402
from core.fp8 import quantize_activation as ref_quantize_activation  # noqa: E402
from core.fp8 import quantize_blocks  # noqa: E402
from core.ops import ExpertWeights, LinearWeight  # noqa: E402

F32 = 2e-6  # float32: a few ulps of accumulation-order difference
W8A8 = cpu_ref.NUMERICS["w8a8"]
W8A8_FNUZ = cpu_ref.NUMERICS["w8a8_fnuz"]

# Kernel configs exercised on top of each wrapper's defaults: small tiles, split-K, the fp16-upcast FP8 dot, the
# unfused FP8 quantisation of the SwiGLU output (gate_up BLOCK_N != 128), float32 dots for 16-bit operands.
GEMM_CFGS = {
    "default": {},
    "split_k": {"gemm": [{"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 3, "GROUP_M": 2}]},
    "upcast": {"fp8_dot": "upcast", "gemm": [{"BLOCK_M": 16, "BLOCK_N": 256, "SPLIT_K": "auto", "num_sms": 8}]},
}
MOE_CFGS = {
    "fused_quant": {"dot_fp32": True},
    "unfused_upcast": {"fp8_dot": "upcast", "dot_fp32": True,
                       "buckets": [{"BLOCK_M": 32, "gate_up": {"BLOCK_N": 64}, "down": {"BLOCK_N": 32}}]},
}


@pytest.fixture
def g():
    return torch.Generator().manual_seed(1234)


def randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def unchanged(*pairs):
    return all(torch.equal(a, b) for a, b in pairs)


def check(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert not got.isnan().any(), "an output element was never written"
    if dtype == torch.float32:
        assert rel_err(got, ref) < F32, rel_err(got, ref)
    else:
        assert within_ulps(got, ref, 2.0), f"more than 2 bf16 ulps off (max {float((got - ref).abs().max())})"


# -- norms, rope, activation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7168), (13, 100), (0, 64), (5, 1), (2, 3, 40)])
def test_rms_norm(g, dtype, shape):
    x, w = randn(g, *shape, scale=3, dtype=dtype), 1 + randn(g, shape[-1], scale=0.1, dtype=dtype)
    x0 = x.clone()
    with poisoned_allocations():
        got = tk.rms_norm(x, w, 1e-6)
    check(got, cpu_ref.rms_norm(x, w, 1e-6), dtype)
    assert unchanged((x, x0))


def test_rms_norm_strided_slice(g):
    kv = randn(g, 6, 160)
    w = 1 + randn(g, 128, scale=0.1)
    with poisoned_allocations():
        got = tk.rms_norm(kv[:, :128], w, 1e-6, cfg={"ROWS": 4})
    check(got, cpu_ref.rms_norm(kv[:, :128], w, 1e-6), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,dim", [(9, 300), (1, 7168), (0, 16)])
def test_add_rms_norm(g, dtype, tokens, dim):
    x, r = randn(g, tokens, dim, dtype=dtype), randn(g, tokens, dim, dtype=dtype)
    w = 1 + randn(g, dim, scale=0.1, dtype=dtype)
    x0, r0 = x.clone(), r.clone()
    with poisoned_allocations():
        normed, h = tk.add_rms_norm(x, r, w, 1e-5, cfg={"ROWS": 4})
    ref_normed, ref_h = cpu_ref.add_rms_norm(x, r, w, 1e-5)
    check(h, ref_h, dtype)
    check(normed, ref_normed, dtype)
    assert torch.equal(normed, tk.rms_norm(h, w, 1e-5, cfg={"ROWS": 4})), "normed == rms_norm(h) exactly"
    assert unchanged((x, x0), (r, r0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,nope,p", [(11, 4, 32, 64), (1, 1, 0, 64), (7, 3, 8, 10), (0, 2, 0, 8)])
def test_apply_rope_on_strided_slices(g, dtype, tokens, heads, nope, p):
    q = randn(g, tokens, heads, nope + p, dtype=dtype)
    x = q[..., nope:]  # the graph's rope slice of q: non-contiguous
    pos = torch.randint(0, 5000, (tokens,), generator=g).double()
    angle = pos[:, None] / 10000 ** (torch.arange(0, p, 2, dtype=torch.float64) / p)
    cos, sin = angle.cos().float().to(DEVICE), angle.sin().float().to(DEVICE)
    q0 = q.clone()
    with poisoned_allocations():
        got = tk.apply_rope(x, cos, sin, cfg={"BLOCK_R": 8})
    check(got, cpu_ref.apply_rope(x, cos, sin), dtype)
    kv = randn(g, tokens, 40 + p, dtype=dtype)  # the shared rope key: kv[:, None, R:] -> [T, 1, P]
    with poisoned_allocations():
        got = tk.apply_rope(kv[:, None, 40:], cos, sin)
    check(got, cpu_ref.apply_rope(kv[:, None, 40:], cos, sin), dtype)
    assert unchanged((q, q0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,inter", [(6, 77), (1, 2048), (0, 8)])
def test_silu_and_mul(g, dtype, tokens, inter):
    x = randn(g, tokens, 2 * inter + 5, scale=3, dtype=dtype)[:, : 2 * inter]  # strided rows
    x0 = x.clone()
    with poisoned_allocations():
        got = tk.silu_and_mul(x, cfg={"BLOCK_M": 2, "BLOCK_N": 64})
    check(got, cpu_ref.silu_and_mul(x), dtype)
    assert unchanged((x, x0))


# -- FP8 activation quantisation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("tokens,k", [(5, 300), (1, 128), (33, 1024), (0, 256)])
def test_activation_quantisation_is_bit_exact(g, fp8, tokens, k):
    fp8_max = 448.0 if fp8 == torch.float8_e4m3fn else 240.0
    x = randn(g, tokens, k) * torch.rand(tokens, 1, generator=g).to(DEVICE) * 10
    if tokens >= 2:
        x[1, :128] = 0  # an all-zero group takes the 1e-4 floor
        # values the interpreter's own fp32 -> fp8 conversion mis-rounds or flushes
        x[0, :4] = torch.tensor([7.85, 31.5, 1e-3, -0.0]).to(DEVICE)
    if tokens >= 3 and k >= 256:  # the group's amax is fp8_max, so s = 1 and x/s = x: exact ties between two
        # e4m3 neighbours (ties to even), subnormal codes, and the largest code
        grid = torch.tensor([1.0625, 3.125, 9.5, 13.0, 0.0029296875, 0.0068359375, -1.1875, fp8_max])
        x[2, 128:256] = grid.repeat(16).to(DEVICE)
    with poisoned_allocations():
        q, s = quantize_activation(x, fp8, cfg={"BLOCK_M": 4})
    rq, rs = ref_quantize_activation(x.cpu(), fp8_dtype=fp8, fp8_max=fp8_max)
    assert torch.equal(s.cpu(), rs)
    assert torch.equal(q.cpu().float(), rq.float()), "every code equals core.fp8's"


@triton.jit
def _code_roundtrip(codes_ptr, values_ptr, recoded_ptr, BIAS: tl.constexpr):
    i = tl.arange(0, 256)
    v = fp8_bits_to_fp16(tl.load(codes_ptr + i), BIAS)
    tl.store(values_ptr + i, v)
    tl.store(recoded_ptr + i, fp8_grid_to_bits(v.to(tl.float32), BIAS))


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_fp8_code_helpers_cover_every_code(fp8):
    """fp8_bits_to_fp16 (the float16 upcast of GPUs without FP8 matrix units) decodes all 256 codes exactly, and
    fp8_grid_to_bits (how every FP8 store is made) re-encodes every finite value to its own code (-0 to +0)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).to(DEVICE)
    values = torch.empty(256, dtype=torch.float16, device=DEVICE)
    recoded = torch.empty(256, dtype=torch.uint8, device=DEVICE)
    bias = 7 if fp8 == torch.float8_e4m3fn else 8
    _code_roundtrip[(1,)](codes, values, recoded, BIAS=bias)
    truth = codes.view(fp8).float()
    finite = ~truth.isnan()
    assert torch.equal(values.float()[finite], truth[finite])
    negative_zero = codes == 0x80
    assert torch.equal(recoded[finite & ~negative_zero], codes[finite & ~negative_zero])
    assert int(recoded[negative_zero]) == 0


# -- linear ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", list(GEMM_CFGS), ids=list(GEMM_CFGS))
@pytest.mark.parametrize("tokens,n,k", [(1, 576, 256), (7, 200, 300), (3, 129, 1), (0, 64, 64)])
def test_linear_fp8_is_w8a8(g, cfg, tokens, n, k):
    w, scale = quantize_blocks(torch.randn(n, k, generator=g) * 0.05)
    w, scale = w.to(DEVICE), scale.to(DEVICE)
    x = randn(g, tokens, k)
    prepared = tk.prepare_linear(w, scale)
    x0, w0 = x.clone(), w.clone()
    with poisoned_allocations():
        got = tk.linear(x, prepared, cfg=GEMM_CFGS[cfg])
    check(got, W8A8["linear"](x, LinearWeight(w, scale)), torch.float32)
    assert unchanged((x, x0), (w.view(torch.uint8), w0.view(torch.uint8)))


def test_linear_fp8_strided_input_and_fnuz(g):
    """kv[:, :R]-style column slices; rocm's e4m3fnuz re-encoding against the w8a8_fnuz reference."""
    w, scale = quantize_blocks(torch.randn(160, 384, generator=g) * 0.05)
    w, scale = w.to(DEVICE), scale.to(DEVICE)
    x = randn(g, 5, 400)[:, 8:392]
    got = tk.linear(x, tk.prepare_linear(w, scale))
    check(got, W8A8["linear"](x, LinearWeight(w, scale)), torch.float32)
    fnuz = tk.prepare_linear(*e4m3fn_to_fnuz(w, scale))
    with poisoned_allocations():
        got = tk.linear(x, fnuz, cfg=GEMM_CFGS["split_k"])
    check(got, W8A8_FNUZ["linear"](x, LinearWeight(w, scale)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,n,k", [(5, 16, 70), (1, 256, 256), (0, 8, 8)])
def test_linear_float_weights(g, dtype, tokens, n, k):
    """The router (float32 x, float32 weight: IEEE float32, never TF32) and bf16 weights."""
    x, w = randn(g, tokens, k, dtype=dtype), randn(g, n, k, scale=0.1, dtype=dtype)
    with poisoned_allocations():
        got = tk.linear(x, tk.prepare_linear(w, None), cfg={"dot_fp32": True, **GEMM_CFGS["split_k"]})
    ref = cpu_ref.linear(x, LinearWeight(w))
    if dtype == torch.float32:
        check(got, ref, dtype)
    else:  # float32 accumulation in another order, then one (truncating, in the interpreter) rounding
        assert got.dtype == dtype and not got.isnan().any() and rel_err(got, ref) < 8e-3


# -- MoE --------------------------------------------------------------------------------------------------------------


def gate_case(g, tokens, experts):
    return randn(g, tokens, experts, scale=2), randn(g, experts, scale=0.2)


@pytest.mark.parametrize("experts,groups,kept,top_k,renorm", [
    (256, 8, 4, 8, True), (16, 4, 2, 4, True), (12, 1, 1, 3, False), (8, 8, 3, 2, True), (20, 4, 2, 3, True)])
@pytest.mark.parametrize("tokens", [1, 37, 0])
def test_moe_gate_noaux_tc(g, experts, groups, kept, top_k, renorm, tokens):
    logits, bias = gate_case(g, tokens, experts)
    logits0, bias0 = logits.clone(), bias.clone()
    for b in (bias, None):
        with poisoned_allocations():
            w, ids = tk.moe_gate(logits, b, top_k, groups, kept, 2.5, renorm, cfg={"BLOCK_T": 16})
        rw, rids = cpu_ref.moe_gate(logits, b, top_k, groups, kept, 2.5, renorm)
        assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (tokens, top_k)
        for t in range(tokens):
            assert set(ids[t].tolist()) == set(rids[t].tolist())
        order, rorder = ids.argsort(dim=1), rids.argsort(dim=1)
        torch.testing.assert_close(w.gather(1, order), rw.gather(1, rorder), rtol=1e-6, atol=1e-7)
    assert unchanged((logits, logits0), (bias, bias0))


@pytest.mark.parametrize("experts,groups,kept,top_k,renorm", [
    (64, 1, 1, 6, False), (160, 8, 3, 6, False), (16, 4, 2, 4, True), (20, 4, 2, 3, False), (12, 3, 1, 2, False)])
@pytest.mark.parametrize("tokens", [1, 37])
def test_moe_gate_deepseek_v2_softmax(g, experts, groups, kept, top_k, renorm, tokens):
    """DeepSeek-V2's gate: softmax over all (non-power-of-two) experts, groups scored by their best expert."""
    logits = randn(g, tokens, experts, scale=2)
    logits0 = logits.clone()
    with poisoned_allocations():
        w, ids = tk.moe_gate(logits, None, top_k, groups, kept, 16.0, renorm, "softmax", "max", cfg={"BLOCK_T": 16})
    rw, rids = cpu_ref.moe_gate(logits, None, top_k, groups, kept, 16.0, renorm, "softmax", "max")
    for t in range(tokens):
        assert set(ids[t].tolist()) == set(rids[t].tolist())
    order, rorder = ids.argsort(dim=1), rids.argsort(dim=1)
    torch.testing.assert_close(w.gather(1, order), rw.gather(1, rorder), rtol=1e-6, atol=1e-7)
    assert unchanged((logits, logits0))


def test_moe_gate_rules_are_independent(g):
    """Each rule alone differs from the other (so the kernel really switches): sigmoid with max groups, softmax
    with top-2 groups, both equal to cpu_ref."""
    logits, bias = gate_case(g, 37, 16)
    for scoring, rule in (("sigmoid", "max"), ("softmax", "top2_sum")):
        w, ids = tk.moe_gate(logits, bias, 4, 4, 1, 2.5, True, scoring, rule, cfg={"BLOCK_T": 16})
        rw, rids = cpu_ref.moe_gate(logits, bias, 4, 4, 1, 2.5, True, scoring, rule)
        assert torch.equal(ids.sort(1).values, rids.sort(1).values), (scoring, rule)
        torch.testing.assert_close(w.gather(1, ids.argsort(1)), rw.gather(1, rids.argsort(1)), rtol=1e-6, atol=1e-7)


def expert_case(g, e, d, inter):
    gate, up, down = (torch.randn(*s, generator=g) * 0.1 for s in ((e, inter, d), (e, inter, d), (e, d, inter)))
    (gq, gs), (uq, us), (dq, ds) = (quantize_blocks(t) for t in (gate, up, down))
    return [t.to(DEVICE) for t in (gq, gs, uq, us, dq, ds)], [t.to(DEVICE) for t in (gate, up, down)]


def routing(g, tokens, e, k):
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.int64)
    return torch.rand(tokens, k, generator=g).to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize("cfg", list(MOE_CFGS), ids=list(MOE_CFGS))
@pytest.mark.parametrize("e,d,inter,tokens,k", [(6, 136, 72, 9, 3), (4, 256, 128, 1, 2), (5, 128, 128, 0, 2)])
def test_moe_experts_fp8_is_w8a8(g, cfg, e, d, inter, tokens, k):
    fp8, _ = expert_case(g, e, d, inter)
    x = randn(g, tokens, d)
    weights, ids = routing(g, tokens, e, k)
    inputs = [t.clone() for t in (x, weights, ids)]
    prepared = tk.prepare_experts(*fp8)
    with poisoned_allocations():
        got = tk.moe_experts(x, prepared, weights, ids, cfg=MOE_CFGS[cfg])
    check(got, W8A8["moe_experts"](x, ExpertWeights(*fp8[0::2], *fp8[1::2]), weights, ids), torch.float32)
    assert unchanged(*zip((x, weights, ids), inputs))


def test_moe_experts_fnuz(g):
    fp8, _ = expert_case(g, 4, 256, 128)
    fnuz = []
    for w, s in ((fp8[0], fp8[1]), (fp8[2], fp8[3]), (fp8[4], fp8[5])):
        fnuz += list(e4m3fn_to_fnuz(w, s))
    x = randn(g, 5, 256)
    weights, ids = routing(g, 5, 4, 2)
    with poisoned_allocations():
        got = tk.moe_experts(x, tk.prepare_experts(*fnuz), weights, ids, cfg=MOE_CFGS["fused_quant"])
    ref = W8A8_FNUZ["moe_experts"](x, ExpertWeights(*fp8[0::2], *fp8[1::2]), weights, ids)
    check(got, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_float_weights(g, dtype):
    _, floats = expert_case(g, 5, 96, 40)
    gate, up, down = (t.to(dtype) for t in floats)
    x = randn(g, 7, 96, dtype=dtype)
    weights, ids = routing(g, 7, 5, 3)
    small = {"BLOCK_M": 16, "gate_up": {"BLOCK_N": 32, "BLOCK_K": 32}, "down": {"BLOCK_N": 64, "BLOCK_K": 16}}
    with poisoned_allocations():
        got = tk.moe_experts(x, tk.prepare_experts(gate, None, up, None, down, None), weights, ids,
                             cfg={"dot_fp32": True, "buckets": [small]})
    ref = cpu_ref.moe_experts(x, ExpertWeights(gate, up, down), weights, ids)
    if dtype == torch.float32:
        check(got, ref, dtype)
    else:  # h is rounded to bfloat16 between the GEMMs (as vLLM/SGLang do); the reference keeps it in float32
        assert got.dtype == dtype and not got.isnan().any() and rel_err(got, ref) < 1.5e-2


def test_moe_align_block_size(g):
    tokens, k, e, block = 9, 3, 6, 4
    _, ids = routing(g, tokens, e, k)
    a = align_block_size(ids, e, block)
    pairs = tokens * k
    sorted_pairs, block_expert = a.sorted_pairs.cpu(), a.block_expert.cpu()
    real = sorted_pairs[sorted_pairs < pairs]
    assert sorted(real.tolist()) == list(range(pairs)), "every pair exactly once"
    flat = ids.reshape(-1).cpu()
    for b in range(a.num_blocks):
        rows = sorted_pairs[b * block:(b + 1) * block]
        rows = rows[rows < pairs]
        if block_expert[b] < 0:
            assert rows.numel() == 0
        else:
            assert (flat[rows.long()] == block_expert[b]).all(), "a block holds one expert's pairs"
    used = int((block_expert >= 0).sum())
    assert used == sum(math.ceil(int((flat == x).sum()) / block) for x in range(e)), "runs padded to whole blocks"
