"""Every cpu_ref operator against an independent float64 evaluation of its formula, written differently from the
reference (element loops, complex rotation, explicit block sums), on fresh random inputs: unaligned sizes, a single
token, an empty batch, and FP8 weights whose shape is not a multiple of 128."""

from __future__ import annotations

import math

import pytest
import torch

from backends import cpu_ref
from core.fp8 import quantize_activation, quantize_blocks
from core.ops import ExpertWeights, LinearWeight
from tests.helpers import fresh_seed
from tests.paged_support import paged_cache

F64 = torch.float64
# (rtol on ||got - golden|| / ||golden||) per working dtype: float32 is a few ulps of accumulation; bf16 one rounding.
REL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3}
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture
def g():
    return torch.Generator().manual_seed(fresh_seed())


def randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def assert_close(got, golden, dtype):
    assert got.dtype == dtype
    err = float((got.to(F64) - golden).norm() / max(float(golden.norm()), 1e-300))
    assert err < REL[dtype], f"relative error {err:.3g} >= {REL[dtype]} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,dim", [(1, 7168), (13, 100), (0, 64), (5, 1)])
def test_rms_norm(g, dtype, tokens, dim):
    x, w = randn(g, tokens, dim, scale=3), 1 + 0.1 * randn(g, dim)
    golden = torch.empty(tokens, dim, dtype=F64)
    for t in range(tokens):
        golden[t] = w * x[t].to(dtype).to(F64) / math.sqrt(float((x[t].to(dtype).to(F64) ** 2).sum()) / dim + 1e-6)
    got = cpu_ref.rms_norm(x.to(dtype), w.to(dtype), 1e-6)
    assert got.shape == x.shape
    if tokens:
        assert_close(got, golden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(g, dtype):
    x, r, w = randn(g, 9, 300), randn(g, 9, 300), 1 + 0.1 * randn(g, 300)
    xd, rd = x.to(dtype), r.to(dtype)
    x0, r0 = xd.clone(), rd.clone()
    normed, h = cpu_ref.add_rms_norm(xd, rd, w.to(dtype), 1e-5)
    h_golden = xd.to(F64) + rd.to(F64)
    assert torch.equal(h, h_golden.to(dtype)), "h is the sum rounded once"
    assert torch.equal(normed, cpu_ref.rms_norm(h, w.to(dtype), 1e-5)), "normed == rms_norm(h) exactly"
    assert torch.equal(xd, x0) and torch.equal(rd, r0), "inputs are not modified"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,p", [(1, 1, 64), (11, 128, 64), (7, 3, 10)])
def test_apply_rope_is_complex_rotation_of_pairs(g, dtype, tokens, heads, p):
    x, pos = randn(g, tokens, heads, p), torch.randint(0, 10_000, (tokens,), generator=g)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, p, 2, dtype=F64) / p)
    angle = pos.to(F64)[:, None] * inv_freq[None, :]
    xd = x.to(dtype).to(F64)
    pairs = torch.complex(xd[..., : p // 2], xd[..., p // 2:])  # half layout: pair i = (x[i], x[i + P/2])
    rotated = pairs * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    golden = torch.cat([rotated.real, rotated.imag], dim=-1)
    got = cpu_ref.apply_rope(x.to(dtype), angle.cos().float(), angle.sin().float())
    tol = {torch.float64: 1e-6, torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]  # cos/sin are float32
    assert float((got.to(F64) - golden).norm() / golden.norm()) < tol


def golden_block_dequant(w_fp8, scale):
    n, k = w_fp8.shape
    out = torch.empty(n, k, dtype=F64)
    for i in range(0, n, 128):
        for j in range(0, k, 128):
            out[i:i + 128, j:j + 128] = w_fp8[i:i + 128, j:j + 128].to(F64) * float(scale[i // 128, j // 128])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,n,k", [(1, 576, 256), (7, 200, 300), (3, 129, 1), (0, 64, 64)])
def test_linear_fp8_blocks_with_partial_edges(g, dtype, tokens, n, k):
    w, scale = quantize_blocks(randn(g, n, k, scale=0.05).float())
    assert scale.shape == (math.ceil(n / 128), math.ceil(k / 128))
    x = randn(g, tokens, k)
    golden = x.to(dtype).to(F64) @ golden_block_dequant(w, scale).T
    got = cpu_ref.linear(x.to(dtype), cpu_ref.prepare_linear(w, scale))
    assert got.shape == (tokens, n)
    if tokens:
        assert_close(got, golden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_float_weights(g, dtype):
    w, x = randn(g, 33, 70), randn(g, 5, 70)
    got = cpu_ref.linear(x.to(dtype), LinearWeight(w.to(dtype)))
    assert_close(got, x.to(dtype).to(F64) @ w.to(dtype).to(F64).T, dtype)


def test_linear_w8a8_is_the_block_scaled_sum(g):
    """The W8A8 class: C[m,n] = sum_kb (sum_k qa*qw) * sa[m,kb] * S[n//128, kb]."""
    w, scale = quantize_blocks(randn(g, 300, 384, scale=0.05).float())
    x = randn(g, 4, 384).float()
    qa, sa = quantize_activation(x)
    golden = torch.zeros(4, 300, dtype=F64)
    for kb in range(3):
        ks = slice(kb * 128, (kb + 1) * 128)
        partial = qa[:, ks].to(F64) @ w[:, ks].to(F64).T
        golden += partial * sa[:, kb, None].to(F64) * scale[torch.arange(300) // 128, kb][None, :].to(F64)
    got = cpu_ref.linear_w8a8(x.double(), LinearWeight(w, scale))
    assert float((got - golden).norm() / golden.norm()) < 1e-12
    ref = x.double() @ golden_block_dequant(w, scale).T
    assert 1e-3 < float((got - ref).norm() / ref.norm()) < 0.1, "activation quantisation is visible, and bounded"


def test_activation_quantisation_rule(g):
    x = randn(g, 3, 256, scale=5).float()
    x[1, 128:] = 0  # an all-zero group takes the 1e-4 floor
    q, s = quantize_activation(x)
    amax = x.view(3, 2, 128).abs().amax(-1)
    assert torch.equal(s, amax.clamp_min(1e-4) / 448)
    assert torch.equal(q.float(), (x.view(3, 2, 128) / s[..., None]).to(torch.float8_e4m3fn).float().view(3, 256))
    assert float(q.float().abs().max()) == 448.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(g, dtype):
    x = randn(g, 6, 2 * 77, scale=3)
    xd = x.to(dtype).to(F64)
    gate, up = xd[:, :77], xd[:, 77:]
    golden = gate / (1 + torch.exp(-gate)) * up
    assert_close(cpu_ref.silu_and_mul(x.to(dtype)), golden, dtype)


def golden_attention(q, k, v, scale, prefix):
    """q [Lq,H,D], k [Lk,H,D]: per query, per head, a softmax over the keys it may see."""
    lq, h, _ = q.shape
    out = torch.zeros(lq, h, v.shape[-1], dtype=F64)
    for i in range(lq):
        for hh in range(h):
            visible = prefix + i + 1
            s = (k[:visible, hh] @ q[i, hh]) * scale
            p = torch.exp(s - s.max())
            out[i, hh] = (p / p.sum()) @ v[:visible, hh]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_varlen_bottom_right(g, dtype):
    lens_q, lens_k = [5, 1, 0, 12], [9, 1, 3, 12]  # prefixes 4, 0, 3 (no queries), 0
    h, dqk, dv = 3, 24, 16
    q, k, v = randn(g, sum(lens_q), h, dqk), randn(g, sum(lens_k), h, dqk), randn(g, sum(lens_k), h, dv)
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
    got = cpu_ref.attention_prefill(qd, kd, vd, cu_q, cu_k, 0.135)
    golden = torch.cat([golden_attention(qd[cu_q[b]:cu_q[b + 1]].to(F64), kd[cu_k[b]:cu_k[b + 1]].to(F64),
                                         vd[cu_k[b]:cu_k[b + 1]].to(F64), 0.135, lens_k[b] - lens_q[b])
                        for b in range(4)])
    assert got.shape == (sum(lens_q), h, dv)
    assert_close(got, golden, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s_new", [1, 2])
@pytest.mark.parametrize("block_size", [1, 16, 30])
def test_mla_decode_matches_naive_attention_over_the_latent(g, dtype, s_new, block_size):
    """Absorbed decode over a paged cache equals attention with k = [latent, rope key] per head and v = latent,
    the cache rows gathered through shuffled block tables (block_size 30 with slots[:, None] is v1's layout)."""
    bsz, h, r, p = 3, 4, 40, 8
    lens = torch.tensor([s_new, 17, 30])
    rows = [randn(g, int(n), r + p).to(dtype) for n in lens]
    cache, table = paged_cache(rows, block_size, g, dtype=dtype)  # NaN past lens, in unused blocks, past the table
    q_lat, q_pe = randn(g, bsz, s_new, h, r).to(dtype), randn(g, bsz, s_new, h, p).to(dtype)
    got = cpu_ref.mla_decode(q_lat, q_pe, cache, table, lens, 0.09)
    golden = torch.empty(bsz, s_new, h, r, dtype=F64)
    for b in range(bsz):
        kv = rows[b].to(F64)
        q = torch.cat([q_lat[b], q_pe[b]], dim=-1).to(F64)  # [S, H, R+P]
        k = kv[:, None, :].expand(-1, h, -1)
        golden[b] = golden_attention(q, k, kv[:, None, :r].expand(-1, h, -1), 0.09, int(lens[b]) - s_new)
    assert got.shape == q_lat.shape and not got.isnan().any()
    assert_close(got, golden, dtype)


def golden_gate(logits, bias, top_k, n_group, topk_group, scale, renorm):
    """Per token, in plain Python floats: the noaux_tc rule of deepseek_v3_semantics.md §6."""
    weights, ids = [], []
    for row in logits.to(F64).tolist():
        s = [1 / (1 + math.exp(-v)) for v in row]
        b = [x + y for x, y in zip(s, bias.tolist())]
        per = len(row) // n_group
        group_score = [sum(sorted(b[gi * per:(gi + 1) * per], reverse=True)[:2]) for gi in range(n_group)]
        kept = sorted(range(n_group), key=lambda gi: -group_score[gi])[:topk_group]
        candidates = [e for e in range(len(row)) if e // per in kept]
        chosen = sorted(candidates, key=lambda e: -b[e])[:top_k]
        w = [s[e] for e in chosen]
        total = sum(w) + 1e-20 if renorm else 1.0
        weights.append([x / total * scale for x in w])
        ids.append(chosen)
    return torch.tensor(weights, dtype=F64), torch.tensor(ids)


@pytest.mark.parametrize("experts,groups,kept,top_k,renorm", [
    (256, 8, 4, 8, True), (16, 4, 2, 4, True), (12, 1, 1, 3, False), (8, 8, 3, 2, True)])
@pytest.mark.parametrize("tokens", [1, 37])
def test_moe_gate_noaux_tc(g, experts, groups, kept, top_k, renorm, tokens):
    logits = randn(g, tokens, experts, scale=2).float()
    bias = (0.2 * randn(g, experts)).float()
    w, ids = cpu_ref.moe_gate(logits, bias, top_k, groups, kept, 2.5, renorm)
    gw, gids = golden_gate(logits, bias, top_k, groups, kept, 2.5, renorm)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and w.shape == ids.shape == (tokens, top_k)
    for t in range(tokens):
        assert set(ids[t].tolist()) == set(gids[t].tolist())
        order = torch.argsort(ids[t]), torch.argsort(gids[t])
        torch.testing.assert_close(w[t][order[0]].double(), gw[t][order[1]], rtol=1e-6, atol=1e-7)


def test_moe_gate_bias_selects_but_does_not_weigh(g):
    logits = randn(g, 4, 16).float()
    bias = torch.zeros(16)
    bias[[3, 7, 11, 15]] = 10.0  # forces these experts (one per group) to be chosen
    w, ids = cpu_ref.moe_gate(logits, bias, 4, 4, 4, 1.0, False)
    assert all(set(r) == {3, 7, 11, 15} for r in ids.tolist())
    torch.testing.assert_close(w, torch.sigmoid(logits).gather(1, ids))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fp8", [True, False])
def test_moe_experts(g, dtype, fp8):
    e, d, inter, tokens, k = 6, 136, 72, 9, 3
    gate, up, down = randn(g, e, inter, d, scale=0.1), randn(g, e, inter, d, scale=0.1), randn(g, e, d, inter, scale=0.1)
    if fp8:
        (gq, gs), (uq, us), (dq, ds) = (quantize_blocks(t.float()) for t in (gate, up, down))
        experts = cpu_ref.prepare_experts(gq, gs, uq, us, dq, ds)
        gate = torch.stack([golden_block_dequant(gq[i], gs[i]) for i in range(e)])
        up = torch.stack([golden_block_dequant(uq[i], us[i]) for i in range(e)])
        down = torch.stack([golden_block_dequant(dq[i], ds[i]) for i in range(e)])
    else:
        gate, up, down = gate.to(dtype).to(F64), up.to(dtype).to(F64), down.to(dtype).to(F64)
        experts = ExpertWeights(gate.to(dtype), up.to(dtype), down.to(dtype))
    x = randn(g, tokens, d)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    got = cpu_ref.moe_experts(x.to(dtype), experts, weights, ids)
    golden = torch.zeros(tokens, d, dtype=F64)
    xd = x.to(dtype).to(F64)
    for t in range(tokens):
        for j in range(k):
            ex = int(ids[t, j])
            hg, hu = gate[ex] @ xd[t], up[ex] @ xd[t]
            golden[t] += float(weights[t, j]) * (down[ex] @ (hg / (1 + torch.exp(-hg)) * hu))
    assert_close(got, golden, dtype)


def test_fp8_block_quantiser_round_trip(g):
    w = randn(g, 300, 200, scale=0.02).float()
    q, s = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    assert float(s[2, 1]) == float(w[256:, 128:].abs().max() / 448), "the partial edge block's amax covers real rows"
    err = (golden_block_dequant(q, s) - w.double()).abs() / w.double().abs().clamp_min(1e-3)
    assert float(err.median()) < 0.04
