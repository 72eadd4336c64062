"""The cpu backend's own promises, beyond what conformance judges: weights dequantised once and exactly, the MoE's
expert-parallel -1 ids, the paged decode never touching blocks the table does not name (NaN-poisoned), the weight
dtype chosen from the CPU's flags, and the default-backend rule. Float64 golden values are computed independently
(element loops, tests/paged_support.golden_decode); fresh random inputs every run."""

from __future__ import annotations

import pytest
import torch

from backends.cpu import fp16, machine
from backends.cpu.ops.attention_prefill import attention_prefill
from backends.cpu.ops.linear import linear
from backends.cpu.ops.mla_decode import mla_decode
from backends.cpu.ops.moe_experts import moe_experts
from backends.cpu.ops.add_rms_norm import add_rms_norm
from backends.cpu.ops.apply_rope import apply_rope
from backends.cpu.ops.rms_norm import rms_norm
from backends.cpu.ops.silu_and_mul import silu_and_mul
from backends.cpu.weights import prepare_experts, prepare_linear, prepare_mla
from backends.cpu_ref import OPS as REF
from core import registry
from core.fp8 import dequantize_blocks, quantize_blocks
from tests.helpers import fresh_seed, golden_moe
from tests.paged_support import decode_inputs, golden_decode

F64 = torch.float64
TUNING = machine.tuning()


@pytest.fixture
def g():
    return torch.Generator().manual_seed(fresh_seed())


def rel(got: torch.Tensor, golden: torch.Tensor) -> float:
    return float((got.to(F64) - golden).norm() / golden.norm())


def test_fp8_linear_is_dequantised_once_at_load_as_the_reference_does(g):
    w = torch.randn(200, 130, generator=g)  # partial 128-blocks on both axes
    codes, scale = quantize_blocks(w)
    prepared = prepare_linear(codes, scale)
    assert prepared.weight.dtype == torch.float32 and prepared.weight.is_contiguous()
    expanded = scale.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    assert torch.equal(prepared.weight, codes.float() * expanded), "cpu_ref's float32 dequantisation, bit for bit"
    exact = codes.to(F64) * expanded.to(F64)
    x = torch.randn(7, 130, generator=g, dtype=F64)
    golden = x @ exact.T
    assert rel(linear(x.float(), prepared), golden) < 2e-6
    y = linear(x.to(torch.bfloat16), prepared)
    assert y.dtype == torch.bfloat16 and rel(y, x.to(torch.bfloat16).to(F64) @ exact.T) < 8e-3


def test_bf16_weights_widened_only_without_native_bf16(monkeypatch):
    """Without the fp16 path: experts are widened to float32 where bf16 is emulated; linear keeps bfloat16
    (tuning.yaml) unless told not to."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "never"})
    ones = torch.ones(2, 4, 4, dtype=torch.bfloat16)
    assert prepare_experts(ones, None, ones, None, ones, None).w13.dtype == torch.float32
    kept = prepare_linear(torch.ones(4, 4, dtype=torch.bfloat16), None)
    assert kept.weight.dtype == torch.bfloat16 and kept.emulated_bf16
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "emulated_bf16_linear": "float32",
                                                    "fp16_weight_gemm": "never"})
    widened = prepare_linear(torch.ones(4, 4, dtype=torch.bfloat16), None)
    assert widened.weight.dtype == torch.float32 and not widened.emulated_bf16
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "emulated_bf16_linear": "fp16",
                                                    "fp16_weight_gemm": "never"})
    with pytest.raises(ValueError, match="emulated_bf16_linear"):
        prepare_linear(torch.ones(4, 4, dtype=torch.bfloat16), None)
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "never"})
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    native = prepare_linear(torch.ones(4, 4, dtype=torch.bfloat16), None)
    assert native.weight.dtype == torch.bfloat16 and not native.emulated_bf16
    assert prepare_experts(ones, None, ones, None, ones, None).w13.dtype == torch.bfloat16
    assert prepare_linear(torch.ones(4, 4, dtype=torch.float32), None).weight.dtype == torch.float32


def test_emulated_bf16_linear_rounds_once_at_every_row_count(monkeypatch, g):
    """A bfloat16 weight kept where bf16 is emulated: one row through torch's GEMV, more rows through the chunked
    widening (chunks forced small here: 5 chunks of 3 rows). Both must round the exact product once: the many-row
    path, in float32, is within float32 accumulation error of the float64 product (the GEMM's summation order may
    change with the chunk's width, its products are exact); in bfloat16 both are within one rounding of it."""
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "widen_chunk": 3 * 160, "fp16_weight_gemm": "never"})
    w = (torch.randn(15, 160, generator=g) / 160 ** 0.5).to(torch.bfloat16)
    prepared = prepare_linear(w, None)
    assert prepared.emulated_bf16
    for rows in (1, 2, 7):
        x = torch.randn(rows + 3, 160, generator=g).to(torch.bfloat16)[3:]  # a strided view, as the graph passes
        y = linear(x, prepared)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 15)
        exact = x.to(F64) @ w.to(F64).T
        acc = 160 * 2 ** -24 * (x.abs().to(F64) @ w.abs().to(F64).T)  # float32 sums, then one bf16 rounding
        assert ((y.to(F64) - exact).abs() <= (exact.abs() + acc) * 2 ** -8 + acc).all()
        xf = x.float()
        bound = 160 * 2 ** -24 * (xf.abs().to(F64) @ w.abs().to(F64).T)
        assert ((linear(xf, prepared).to(F64) - exact).abs() <= bound).all()


needs_fbgemm = pytest.mark.skipif(not fp16.present(), reason="this torch build has no FBGEMM (not x86)")


@needs_fbgemm
def test_fp16_self_test_passes_where_fbgemm_is_present():
    assert fp16.available() and machine._fbgemm_fp16()


@needs_fbgemm
def test_fp16_packing_is_exact_or_refused(g):
    """Packed only when every element is exactly fp16 after one power-of-two shift; fp16 packing itself saturates
    and rounds silently, so anything else must come back None."""
    w = torch.randn(24, 40, generator=g).bfloat16().float()
    for scale in (1.0, 2.0 ** -30, 2.0 ** 40, 2.0 ** 17):  # the shift follows the magnitude (fp16 tops at 65504)
        assert fp16.pack_exact(w * scale) is not None
    assert fp16.pack_exact(torch.zeros(3, 4)) is not None
    assert fp16.pack_exact(torch.randn(24, 40, generator=g)) is None  # float32 mantissas
    wide = w.clone()
    wide[0, 0], wide[1, 1] = 1.0, 2.0 ** -40  # dynamic range 2^40: the small one has no exact fp16 form
    assert fp16.pack_exact(wide) is None
    for bad in (float("nan"), float("inf")):
        poisoned = w.clone()
        poisoned[3, 5] = bad
        assert fp16.pack_exact(poisoned) is None


@needs_fbgemm
@pytest.mark.parametrize("magnitude", [1.0, 2.0 ** -20, 2.0 ** 20])
def test_fp16_packed_linear_is_the_float32_gemm_of_the_same_weights(g, magnitude, monkeypatch):
    """bf16 weights of any magnitude, packed: float32 inputs get float32 products and sums (within float32
    accumulation error of the float64 product: no input or weight rounded to fp16), bf16 inputs one rounding."""
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "always"})
    w = (torch.randn(70, 160, generator=g) * magnitude / 160 ** 0.5).to(torch.bfloat16)
    prepared = prepare_linear(w, None)
    assert prepared.fp16 is not None and prepared.weight is None and prepared.shape == (70, 160)
    for rows in (1, 3, 40):
        xf = torch.randn(rows + 2, 160, generator=g)[2:] * (1 + torch.rand(rows, 160, generator=g))  # full mantissas
        exact = xf.to(F64) @ w.to(F64).T
        bound = 160 * 2 ** -24 * (xf.abs().to(F64) @ w.abs().to(F64).T)
        got = linear(xf, prepared)
        assert got.dtype == torch.float32 and ((got.to(F64) - exact).abs() <= bound).all()
        xb = xf.to(torch.bfloat16)
        yb = linear(xb, prepared)
        exact_b = xb.to(F64) @ w.to(F64).T
        acc = 160 * 2 ** -24 * (xb.abs().to(F64) @ w.abs().to(F64).T)  # float32 sums; then one bf16 rounding
        assert yb.dtype == torch.bfloat16
        assert ((yb.to(F64) - exact_b).abs() <= (exact_b.abs() + acc) * 2 ** -8 + acc).all()
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "never"})
    assert prepare_linear(w, None).fp16 is None


@needs_fbgemm
def test_fp16_path_follows_the_tuning_and_falls_back_per_weight(g, monkeypatch):
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    exact = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    assert prepare_linear(exact, None).fp16 is not None  # the shipped default where bf16 is emulated
    assert prepare_linear(torch.randn(8, 16, generator=g), None).fp16 is None  # true float32: MKL
    codes, scale = quantize_blocks(torch.randn(8, 16, generator=g))
    assert prepare_linear(codes, scale).fp16 is None  # FP8 with an arbitrary scale: not exact in fp16
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert prepare_linear(exact, None).fp16 is None  # bf16 native: oneDNN, unless "always"
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "always"})
    assert prepare_linear(exact, None).fp16 is not None
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "sometimes"})
    with pytest.raises(ValueError, match="fp16_weight_gemm"):
        prepare_linear(exact, None)
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": "always"})
    gate, up = torch.randn(3, 8, 16, generator=g).bfloat16(), torch.randn(3, 8, 16, generator=g).bfloat16()
    down = torch.randn(3, 16, 8, generator=g).bfloat16()
    assert prepare_experts(gate, None, up, None, down, None).packed is not None
    down_f32 = down.float()
    down_f32[2, 0, 0] = 0.1234567  # one element of one expert has no fp16 form: every expert stays dense
    dense = prepare_experts(gate, None, up, None, down_f32, None)
    assert dense.packed is None and dense.w13.dtype == torch.float32


@pytest.mark.parametrize("setting", ["fp8", "auto-short", "auto-plenty", "float32"])
def test_fp8_weights_kept_or_dequantised_give_the_same_numbers(g, setting, monkeypatch):
    """fp8_weights: kept FP8 (by setting, or because memory is short under "auto") multiplies the very float32
    values the load-time dequantisation holds; -1 expert slots still contribute nothing."""
    choice = setting.split("-")[0]
    monkeypatch.setenv("DSV3_CPU_FP8_WEIGHTS", choice)
    gib = 1 << 30
    monkeypatch.setattr(machine, "memory_bytes", lambda: (16 * gib, (1 if setting == "auto-short" else 15) * gib))
    keep = setting in ("fp8", "auto-short")
    w = torch.randn(200, 130, generator=g)
    codes, scale = quantize_blocks(w)
    prepared = prepare_linear(codes, scale)
    assert (prepared.fp8 is not None) == keep and prepared.shape == (200, 130)
    exact = dequantize_blocks(codes, scale, F64)
    x = torch.randn(5, 130, generator=g)
    bound = 130 * 2 ** -24 * (x.abs().to(F64) @ exact.abs().T)
    assert ((linear(x, prepared).to(F64) - x.to(F64) @ exact.T).abs() <= bound).all()
    e, d, i = 4, 64, 32
    stacked = [quantize_blocks(t) for t in (torch.randn(e, i, d, generator=g), torch.randn(e, i, d, generator=g),
                                            torch.randn(e, d, i, generator=g))]
    (gc, gs), (uc, us), (dc, ds) = stacked
    experts = prepare_experts(gc, gs, uc, us, dc, ds)
    assert (experts.fp8 is not None) == keep
    xs = torch.randn(7, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(7)])
    ids[::3, 1] = -1
    mix = torch.rand(7, 2, generator=g)
    golden = golden_moe(xs, *(dequantize_blocks(c, s_, torch.float32) for c, s_ in stacked), mix, ids)
    assert rel(moe_experts(xs, experts, mix, ids), golden) < 2e-6


def test_fp8_weights_setting_is_checked(monkeypatch):
    monkeypatch.setenv("DSV3_CPU_FP8_WEIGHTS", "int4")
    codes, scale = quantize_blocks(torch.randn(8, 8))
    with pytest.raises(ValueError, match="DSV3_CPU_FP8_WEIGHTS"):
        prepare_linear(codes, scale)


def test_absorbed_mla_weights_widened_only_without_native_bf16(monkeypatch, g):
    """prepare_mla follows the linear rule and only widens: same values, same shapes, contiguous."""
    w_uk = torch.randn(3, 32, 16, generator=g).to(torch.bfloat16)
    w_uv = torch.randn(3, 8, 32, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2"}))
    uk, uv = prepare_mla(w_uk, w_uv)
    assert uk.dtype == uv.dtype == torch.float32 and uk.is_contiguous() and uv.is_contiguous()
    assert torch.equal(uk, w_uk.float()) and torch.equal(uv, w_uv.float())
    monkeypatch.setattr(machine, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    uk, uv = prepare_mla(w_uk, w_uv)
    assert uk.dtype == uv.dtype == torch.bfloat16 and torch.equal(uv, w_uv) and uv.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_ops_equal_cpu_ref_bit_for_bit(g, dtype):
    """rms_norm (torch's rms_norm), add_rms_norm, silu_and_mul and apply_rope (cpu_ref's code today) compute in
    float32 and round once, exactly as the specification does; inputs are left untouched."""
    for tokens in (1, 9):
        x = (3 * torch.randn(tokens, 96, generator=g)).to(dtype)
        res = torch.randn(tokens, 96, generator=g).to(dtype)
        w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
        x0, res0 = x.clone(), res.clone()
        assert torch.equal(rms_norm(x, w, 1e-6), REF["rms_norm"](x, w, 1e-6))
        assert torch.equal(rms_norm(x, w.float(), 1e-6), REF["rms_norm"](x, w.float(), 1e-6))
        for got, want in zip(add_rms_norm(x, res, w, 1e-6), REF["add_rms_norm"](x, res, w, 1e-6)):
            assert torch.equal(got, want)
        gate_up = (4 * torch.randn(tokens, 2, 40, generator=g)).to(dtype).view(tokens, 80)
        assert torch.equal(silu_and_mul(gate_up), REF["silu_and_mul"](gate_up))
        assert torch.equal(x, x0) and torch.equal(res, res0)
        angles = 50 * torch.rand(tokens, 16, generator=g)
        for rope_in in ((3 * torch.randn(tokens, 5, 32, generator=g)).to(dtype), x[:, 64:]):  # heads, and a view
            before = rope_in.clone()
            got = apply_rope(rope_in, angles.cos(), angles.sin())
            assert got.dtype == dtype and torch.equal(got, REF["apply_rope"](rope_in, angles.cos(), angles.sin()))
            assert torch.equal(rope_in, before)




@pytest.mark.parametrize("fp16_gemm", ["never", "always"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_experts_groups_by_expert_and_skips_minus_one(g, dtype, fp16_gemm, monkeypatch):
    monkeypatch.setattr(machine, "tuning", lambda: {**TUNING, "fp16_weight_gemm": fp16_gemm})
    e, d, i, tokens, k = 6, 40, 24, 11, 3
    gate, up = torch.randn(e, i, d, generator=g) / d ** 0.5, torch.randn(e, i, d, generator=g) / d ** 0.5
    down = torch.randn(e, d, i, generator=g) / i ** 0.5
    x = torch.randn(tokens, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    ids[::3, 0] = -1  # experts held by another process
    ids[4, :] = -1  # a token with no local expert at all
    weights = torch.rand(tokens, k, generator=g)
    if fp16_gemm == "always":  # exact in fp16 after a shift: bf16 values
        gate, up, down = gate.bfloat16().float(), up.bfloat16().float(), down.bfloat16().float()
    experts = prepare_experts(gate.to(dtype), None, up.to(dtype), None, down.to(dtype), None)
    assert (experts.packed is not None) == (fp16_gemm == "always" and machine._fbgemm_fp16())
    got = moe_experts(x.to(dtype), experts, weights, ids)
    assert got.dtype == dtype and got.shape == x.shape
    golden = golden_moe(x.to(dtype), gate.to(dtype), up.to(dtype), down.to(dtype), weights, ids)
    assert torch.equal(got[4], torch.zeros(d, dtype=dtype))
    assert rel(got, golden) < (2e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("block_size,s_new", [(16, 1), (4, 2), (64, 1)])
def test_mla_decode_reads_only_named_blocks(g, block_size, s_new):
    lens = [int(v) for v in torch.randint(s_new, 70, (5,), generator=g)]
    q_lat, q_pe, cache, table, lens_t = decode_inputs(lens, s_new, heads=3, rank=32, rope=8, block_size=block_size,
                                                      seed=fresh_seed())
    got = mla_decode(q_lat, q_pe, cache, table, lens_t, 0.3)
    assert torch.isfinite(got).all(), "a NaN block or a row past lens was read"
    assert rel(got, golden_decode(q_lat, q_pe, cache, table, lens_t, 0.3)) < 2e-6


def test_mla_decode_step_memo_never_serves_another_steps_rows(g):
    """Layers of one step share the gather rows and mask; a table or lengths that differ in one entry (same shapes,
    same tensors written in place, as the engine's reused buffers are) must rebuild them, never reuse stale ones."""
    lens = [int(v) for v in torch.randint(1, 40, (4,), generator=g)]
    q_lat, q_pe, cache, table, lens_t = decode_inputs(lens, 1, heads=2, rank=16, rope=8, block_size=8,
                                                      seed=fresh_seed())
    for _ in range(2):  # the second call is served from the memo
        got = mla_decode(q_lat, q_pe, cache, table, lens_t, 0.3)
        assert rel(got, golden_decode(q_lat, q_pe, cache, table, lens_t, 0.3)) < 2e-6
    lens_t[1] -= 1  # in place: same tensor, same shape, other content
    got = mla_decode(q_lat, q_pe, cache, table, lens_t, 0.3)
    assert rel(got, golden_decode(q_lat, q_pe, cache, table, lens_t, 0.3)) < 2e-6
    used = -(-lens_t // 8)
    named = {int(table[b, j]) for b in range(4) for j in range(int(used[b]))}
    spare = min(set(range(cache.shape[0])) - named)  # decode_inputs leaves spare blocks
    cache[spare].copy_(torch.randn(cache[spare].shape, generator=g))
    table[2, int(used[2]) - 1] = spare  # one block renamed in place
    got = mla_decode(q_lat, q_pe, cache, table, lens_t, 0.3)
    assert rel(got, golden_decode(q_lat, q_pe, cache, table, lens_t, 0.3)) < 2e-6
    table[0, 0] = cache.shape[0]  # and a bad table is still refused after a good one with the same shapes
    with pytest.raises(ValueError, match="outside the cache"):
        mla_decode(q_lat, q_pe, cache, table, lens_t, 0.3)


def test_attention_prefill_bottom_right_causal_with_prefix(g):
    h, dqk, dv = 2, 12, 8
    lq, lk = [3, 0, 5], [7, 2, 5]
    q = torch.randn(sum(lq), h, dqk, generator=g)
    k, v = torch.randn(sum(lk), h, dqk, generator=g), torch.randn(sum(lk), h, dv, generator=g)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 14], dtype=torch.int32)
    got = attention_prefill(q, k, v, cu_q, cu_k, 0.5)
    golden = torch.empty(sum(lq), h, dv, dtype=F64)
    for b in range(3):
        for i in range(lq[b]):
            row = int(cu_q[b]) + i
            keys = range(int(cu_k[b]), int(cu_k[b]) + lk[b] - lq[b] + i + 1)
            for hh in range(h):
                s = torch.stack([q[row, hh].double() @ k[j, hh].double() for j in keys]) * 0.5
                golden[row, hh] = torch.softmax(s, 0) @ torch.stack([v[j, hh].double() for j in keys])
    assert rel(got, golden) < 2e-6


def test_default_backend_is_cpu_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert registry.default_backend()[0] == "cpu"
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    assert registry.default_backend()[0] == registry.REFERENCE
