"""Every ascend operator, run through the torch_npu emulation, against cpu_ref on random inputs: unaligned sizes,
a single token, an empty batch, non-contiguous slices as the model passes them, and both the FIA forms (DeepSeek-V3's
MLA shapes and the plain form other shapes take). Inputs outside an operator's documented limits must be declared
(Limited -> cpu_ref) rather than attempted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends import ascend, cpu_ref
from backends.ascend import w8a8
from backends.cpu_ref.linear_int8 import linear_w8a8_int8, moe_experts_w8a8_int8
from core.backend import Manifest
from core.fp8 import dequantize_blocks, quantize_blocks
from core.ops import ExpertWeights, LinearWeight
from tests.ascend_support import assert_close, rel_err, simulated  # noqa: F401 (autouse fixture)
from tests import paged_support as paged
from tests.helpers import fresh_seed

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# float32 paths compute exactly what cpu_ref computes (same fp32 formula, one rounding); 16-bit ones may differ by a
# rounding of an intermediate the op keeps in the 16-bit dtype (cos/sin tables, the residual sum, GEMM outputs).
TIGHT = {F32: 2e-6, BF16: 8e-3, F16: 2e-3}
OPS = ascend.OPS


def op(name):
    entry = OPS[name]
    return entry.impl if hasattr(entry, "impl") else entry


def supports(name):
    return OPS[name].supports


@pytest.fixture
def g():
    return torch.Generator().manual_seed(fresh_seed())


def randn(g, *shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# -- norms, rope, activation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("shape", [(1, 7168), (13, 100), (0, 64), (3, 5, 40), (7,)])
def test_rms_norm(g, dtype, shape):
    x, w = randn(g, *shape, dtype=dtype, scale=3), 1 + randn(g, shape[-1], scale=0.1).to(dtype)
    assert_close(op("rms_norm")(x, w, 1e-6), cpu_ref.rms_norm(x, w, 1e-6), TIGHT[dtype], "rms_norm")


def test_rms_norm_non_contiguous_slice_and_float32_gamma(g):
    kv = randn(g, 9, 160, dtype=BF16)
    w = 1 + randn(g, 128, scale=0.1)  # float32 gamma with bf16 x: a supported pair
    assert_close(op("rms_norm")(kv[:, :128], w, 1e-6), cpu_ref.rms_norm(kv[:, :128], w, 1e-6), TIGHT[BF16])


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens,dim", [(1, 7168), (11, 300), (0, 64)])
def test_add_rms_norm(g, dtype, tokens, dim):
    x, r = randn(g, tokens, dim, dtype=dtype), randn(g, tokens, dim, dtype=dtype)
    w = (1 + randn(g, dim, scale=0.1)).to(dtype)
    x0, r0 = x.clone(), r.clone()
    normed, h = op("add_rms_norm")(x, r, w, 1e-6)
    want_normed, want_h = cpu_ref.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(h, want_h), "h is the sum rounded once (npu_add_rms_norm's THIRD output)"
    assert_close(normed, want_normed, TIGHT[dtype], "normed")
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs are not modified"


def _rope_tables(g, tokens, p):
    pos = torch.randint(0, 4096, (tokens,), generator=g).float()
    inv = 1.0 / 10000 ** (torch.arange(0, p, 2).float() / p)
    angles = pos[:, None] * inv[None, :]
    return angles.cos() * 1.1, angles.sin() * 1.1


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens,heads,p", [(1, 128, 64), (7, 4, 32), (5, 1, 64), (0, 3, 64), (3, 2, 6)])
def test_apply_rope(g, dtype, tokens, heads, p):
    q = randn(g, tokens, heads, 24 + p, dtype=dtype)
    x = q[..., 24:]  # the model passes the rope slice of each head: non-contiguous
    cos, sin = _rope_tables(g, tokens, p)
    assert_close(op("apply_rope")(x, cos, sin), cpu_ref.apply_rope(x, cos, sin), TIGHT[dtype], "apply_rope")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens,inter", [(0, 8), (1, 2048), (9, 37)])
def test_silu_and_mul(g, dtype, tokens, inter):
    x = randn(g, tokens, 2 * inter, dtype=dtype, scale=2)
    assert_close(op("silu_and_mul")(x), cpu_ref.silu_and_mul(x), TIGHT[dtype], "silu_and_mul")


# -- linear ------------------------------------------------------------------------------------------------------


def _fp8(g, *shape, scale=1.0):
    return quantize_blocks(torch.randn(*shape, generator=g) * scale)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens", [0, 1, 17])
def test_linear_fp8_weight_is_bf16_dequantised(g, dtype, tokens):
    codes, scale = _fp8(g, 300, 200, scale=0.07)  # partial 128-blocks in both dims
    prepared = ascend.prepare_linear(codes, scale)
    assert prepared.weight.dtype == BF16 and prepared.weight.shape == (300, 200)
    assert torch.equal(prepared.weight, dequantize_blocks(codes, scale, BF16)), "fp8_cast_bf16 semantics"
    xs = randn(g, tokens, 250, dtype=dtype)[:, 30:230]  # a non-contiguous slice
    got = op("linear")(xs, prepared)
    bf16_weight = LinearWeight(dequantize_blocks(codes, scale, BF16))
    assert_close(got, cpu_ref.linear(xs, bf16_weight), TIGHT[dtype], "against the bf16 weight")
    if tokens:
        assert rel_err(got, cpu_ref.linear(xs, LinearWeight(codes, scale))) < 4e-3, "bf16 rounding only"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_linear_float_weights_stay_as_given(g, dtype):
    router = randn(g, 256, 96)  # the MoE router: float32 weight, float32 activations
    x = randn(g, 5, 96)
    assert_close(op("linear")(x, ascend.prepare_linear(router, None)), cpu_ref.linear(x, LinearWeight(router)),
                 TIGHT[F32], "router")
    w = randn(g, 33, 64, dtype=dtype)
    x = randn(g, 4, 64, dtype=dtype)
    assert_close(op("linear")(x, ascend.prepare_linear(w, None)), cpu_ref.linear(x, LinearWeight(w)), TIGHT[dtype])


# -- attention ---------------------------------------------------------------------------------------------------


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


PREFILL_CASES = {
    "deepseek-v3 shape (MLA rope form)": (2, 192, 128, [(3, 3), (1, 5), (4, 9)]),
    "embedded default shape (plain form)": (4, 64, 32, [(6, 6), (2, 7)]),
    "unaligned head dims": (3, 40, 24, [(5, 8), (0, 3), (1, 1)]),
    "single token": (2, 192, 128, [(1, 1)]),
}


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_attention_prefill(g, dtype, case):
    heads, dqk, dv, lens = PREFILL_CASES[case]
    cu_q, cu_k = _cu([q for q, _ in lens]), _cu([k for _, k in lens])
    q = randn(g, int(cu_q[-1]), heads, dqk, dtype=dtype)
    k = randn(g, int(cu_k[-1]), heads, dqk, dtype=dtype)
    v = randn(g, int(cu_k[-1]), heads, dv, dtype=dtype)
    scale = dqk ** -0.5 * 1.3
    assert supports("attention_prefill")(q, k, v, cu_q, cu_k, scale) is None
    got = op("attention_prefill")(q, k, v, cu_q, cu_k, scale)
    assert_close(got, cpu_ref.attention_prefill(q, k, v, cu_q, cu_k, scale), 1e-2, case)


def test_attention_prefill_empty_batch_and_float32_limit(g):
    q, k, v = randn(g, 0, 2, 192, dtype=BF16), randn(g, 0, 2, 192, dtype=BF16), randn(g, 0, 2, 128, dtype=BF16)
    cu = torch.zeros(1, dtype=torch.int32)
    assert op("attention_prefill")(q, k, v, cu, cu, 0.1).shape == (0, 2, 128)
    q32 = randn(g, 3, 2, 192)
    reason = supports("attention_prefill")(q32, q32, q32[..., :128], _cu([3]), _cu([3]), 0.1)
    assert reason and "float16/bfloat16" in reason, "FIA has no float32: declared, so it runs on cpu_ref"


DECODE_CASES = {
    "deepseek-v3 absorbed MLA, S=1": (3, 1, 4, 512, 64, [5, 17, 1]),
    "deepseek-v3 absorbed MLA, S=2 (MTP verify)": (2, 2, 8, 512, 64, [2, 9]),
    "embedded default shape (plain GQA form), S=1": (3, 1, 4, 128, 32, [4, 1, 13]),
    "plain form, S=2": (2, 2, 4, 128, 32, [7, 2]),
    "unaligned latent, single sequence": (1, 1, 2, 100, 12, [6]),
}


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("case", list(DECODE_CASES))
@pytest.mark.parametrize("block_size", [16, 128])
def test_mla_decode(g, dtype, case, block_size):
    """FIA over the paged cache through its own block_table: shuffled tables, partial last blocks, NaN in unused
    blocks and table entries past the used ones, against a float64 golden."""
    b, s, heads, r, p, lens = DECODE_CASES[case]
    args = paged.decode_inputs(lens, s, heads, r, p, block_size=block_size, dtype=dtype, seed=int(g.initial_seed()))
    scale = 0.1352337788608801
    reason = supports("mla_decode")(*args, scale)
    if r != 512 and s > 1 and block_size % 128:
        assert "multiple of 128" in reason, "the plain form with S > 1 is FIA's prefill kernel: pages of 128k"
        return
    assert reason is None
    got = op("mla_decode")(*args, scale)
    assert torch.isfinite(got).all(), "read a poisoned block"
    golden = paged.golden_decode(*args, scale)
    assert_close(got, golden.to(dtype), 1e-2, case)
    assert_close(cpu_ref.mla_decode(*args, scale), golden.to(dtype), 1e-2, case)


def test_mla_decode_block_sizes_fia_rejects(g):
    """Block sizes FIA's paged KV does not take go to cpu_ref (declared), and the emulation rejects them."""
    args = paged.decode_inputs([5, 9], 1, 4, 512, 64, block_size=8, dtype=BF16)
    assert "multiples of 16" in supports("mla_decode")(*args, 0.1)
    with pytest.raises(RuntimeError, match="block_size"):
        ascend.attention.mla_decode(*args, 0.1)
    manifest = Manifest.load(Path(ascend.__file__).parent / "manifest.yaml")
    assert manifest.cache.block_sizes == (16, 32, 64, 128, 256, 512) and not manifest.cache.takes(8)


def test_mla_decode_empty_batch_and_limits(g):
    cache = randn(g, 2, 16, 576, dtype=BF16)
    empty = op("mla_decode")(randn(g, 0, 1, 4, 512, dtype=BF16), randn(g, 0, 1, 4, 64, dtype=BF16), cache,
                             torch.zeros(0, 1, dtype=torch.int32), torch.zeros(0, dtype=torch.long), 0.1)
    assert empty.shape == (0, 1, 4, 512)
    table = torch.tensor([[1]], dtype=torch.int32)
    q32, pe32, c32 = randn(g, 1, 1, 4, 512), randn(g, 1, 1, 4, 64), randn(g, 2, 16, 576)
    assert "float16/bfloat16" in supports("mla_decode")(q32, pe32, c32, table, torch.tensor([3]), 0.1)
    q3 = randn(g, 1, 1, 3, 512, dtype=BF16)  # 3 heads: not a power of two for the MLA form, and R+P > 512
    assert supports("mla_decode")(q3, randn(g, 1, 1, 3, 64, dtype=BF16), cache, table, torch.tensor([3]),
                                  0.1) is not None


# -- MoE ---------------------------------------------------------------------------------------------------------


def _same_routing(got, want):
    (gw, gi), (ww, wi) = got, want
    assert gw.dtype == torch.float32 and gi.dtype == torch.int64 and gi.shape == wi.shape
    go, wo = gi.sort(-1), wi.sort(-1)
    assert torch.equal(go.values, wo.values), "the same expert sets"
    assert_close(gw.gather(1, go.indices), ww.gather(1, wo.indices), 1e-6, "weights per expert")


@pytest.mark.parametrize("experts,n_group,topk_group,top_k", [(256, 8, 4, 8), (384, 8, 3, 6), (256, 1, 1, 8)])
@pytest.mark.parametrize("tokens", [0, 1, 33])
@pytest.mark.parametrize("with_bias", [True, False])
def test_moe_gate(g, experts, n_group, topk_group, top_k, tokens, with_bias):
    logits = randn(g, tokens, experts, scale=3)
    bias = randn(g, experts, scale=0.1) if with_bias else None
    args = (logits, bias, top_k, n_group, topk_group, 2.5, True)
    assert supports("moe_gate")(*args) is None
    _same_routing(op("moe_gate")(*args), cpu_ref.moe_gate(*args))


def test_moe_gate_limits_are_declared(g):
    logits, bias = randn(g, 4, 16), randn(g, 16)
    assert "16 experts" in supports("moe_gate")(logits, bias, 4, 4, 2, 2.5, True), "the embedded default's 16"
    logits = randn(g, 4, 256)
    assert "norm_topk_prob" in supports("moe_gate")(logits, randn(g, 256), 8, 8, 4, 2.5, False)


@pytest.mark.parametrize("n_group,topk_group", [(8, 3), (1, 1)])
@pytest.mark.parametrize("tokens", [0, 1, 33])
def test_moe_gate_deepseek_v2(g, n_group, topk_group, tokens):
    """V2's softmax gate (group_limited_greedy / greedy, no bias, no renorm) through norm_type 0 and
    group_select_mode 0, at the kernel's 256 experts."""
    logits = randn(g, tokens, 256, scale=2)
    args = (logits, None, 6, n_group, topk_group, 16.0, False, "softmax", "max")
    assert supports("moe_gate")(*args) is None
    _same_routing(op("moe_gate")(*args), cpu_ref.moe_gate(*args))


def test_moe_gate_deepseek_v2_limits_are_declared(g):
    assert "64 experts" in supports("moe_gate")(randn(g, 4, 64), None, 6, 1, 1, 1.0, False, "softmax", "max")
    reason = supports("moe_gate")(randn(g, 4, 256), None, 6, 8, 3, 1.0, True, "softmax", "max")
    assert "softmax" in reason and "norm_topk_prob" in reason


def _experts(g, e, d, inter, fp8: bool, dtype=F32):
    gate, up, down = randn(g, e, inter, d, scale=d ** -0.5), randn(g, e, inter, d, scale=d ** -0.5), \
        randn(g, e, d, inter, scale=inter ** -0.5)
    if not fp8:
        return [gate.to(dtype), None, up.to(dtype), None, down.to(dtype), None]
    (gq, gs), (uq, us), (dq, ds) = quantize_blocks(gate), quantize_blocks(up), quantize_blocks(down)
    return [gq, gs, uq, us, dq, ds]


def _routing(g, tokens, experts, k):
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]) if tokens else \
        torch.zeros(0, k, dtype=torch.long)
    return torch.rand(tokens, k, generator=g) * 0.8, ids


def _bf16_dequantised(raw):
    gq, gs, uq, us, dq, ds = raw
    return ExpertWeights(*(dequantize_blocks(w, s, BF16) for w, s in ((gq, gs), (uq, us), (dq, ds))))


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("tokens", [0, 1, 13])
def test_moe_experts_fp8(g, dtype, tokens):
    raw = _experts(g, 16, 100, 40, fp8=True)  # unaligned D and I; partial scale blocks
    prepared = ascend.prepare_experts(*raw)
    assert prepared.w13.shape == (16, 100, 80) and prepared.w2.shape == (16, 40, 100), "[E, K, N] for the GMM"
    weights, ids = _routing(g, tokens, 16, 4)
    x = randn(g, tokens, 100, dtype=dtype)
    got = op("moe_experts")(x, prepared, weights, ids)
    rel = {F32: 2e-6, BF16: 2e-2}[dtype]  # bf16: expert outputs and routing weights rounded to bf16 by the ops
    assert_close(got, cpu_ref.moe_experts(x, _bf16_dequantised(raw), weights, ids), rel, "vs bf16 weights")
    if tokens:
        assert rel_err(got, cpu_ref.moe_experts(x, ExpertWeights(*raw[::2], *raw[1::2]), weights, ids)) < 2e-2


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_moe_experts_float_weights(g, dtype):
    raw = _experts(g, 8, 64, 32, fp8=False, dtype=dtype)
    weights, ids = _routing(g, 6, 8, 3)
    x = randn(g, 6, 64, dtype=dtype)
    got = op("moe_experts")(x, ascend.prepare_experts(*raw), weights, ids)
    want = cpu_ref.moe_experts(x, ExpertWeights(raw[0], raw[2], raw[4]), weights, ids)
    assert_close(got, want, {F32: 2e-6, BF16: 2e-2}[dtype])


# -- the W8A8 int8 class (optional descriptor ascend_w8a8) -------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_w8a8_linear_matches_its_reference(g, dtype):
    codes, scale = _fp8(g, 300, 200, scale=0.07)
    x = randn(g, 7, 200, dtype=dtype)
    got = w8a8.linear_w8a8(x, w8a8.prepare_linear_w8a8(codes, scale))
    want = linear_w8a8_int8(x, LinearWeight(codes, scale))
    assert_close(got, want, 1e-3, "w8a8_int8 reference")
    assert rel_err(got, cpu_ref.linear(x, LinearWeight(codes, scale))) > 10 * rel_err(got, want), \
        "int8 quantisation is visible: the class is not the weight-only reference"
    assert w8a8.linear_w8a8(x[:0], w8a8.prepare_linear_w8a8(codes, scale)).shape == (0, 300)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_w8a8_experts_match_their_reference(g, dtype):
    raw = _experts(g, 16, 128, 96, fp8=True)
    weights, ids = _routing(g, 9, 16, 4)
    x = randn(g, 9, 128, dtype=dtype)
    got = w8a8.moe_experts_w8a8(x, w8a8.prepare_experts_w8a8(*raw), weights, ids)
    want = moe_experts_w8a8_int8(x, ExpertWeights(*raw[::2], *raw[1::2]), weights, ids)
    assert_close(got, want, 1e-3, "w8a8_int8 reference")
