"""The traps of mapping the contract onto torch_npu, each pinned by a crafted input on which the wrong choice gives
a wrong answer: the gate's bias (selection only), group_select_mode (top-2 sum, not max), the routed scaling factor
(exactly once), the attention scale (always passed: FIA's default is 1.0), mask polarity (1 = masked out),
sparse_mode (bottom-right causal), init_routing_v2's gather index and counts, finalize_routing's token-major read,
and the full-width cos/sin of 'half' rotary. A test that plays the buggy adapter must fail the comparison."""

from __future__ import annotations

import pytest
import torch

import emulation.torch_npu as emu
from backends import ascend, cpu_ref
from tests.ascend_support import Recorder, assert_close, rel_err, simulated, using  # noqa: F401 (autouse fixture)

F32, BF16 = torch.float32, torch.bfloat16


def impl(name):
    entry = ascend.OPS[name]
    return entry.impl if hasattr(entry, "impl") else entry


def logit(p: float) -> float:
    return float(torch.logit(torch.tensor(p, dtype=torch.float64)))


# -- the gate ----------------------------------------------------------------------------------------------------


def test_gate_bias_selects_but_weights_are_the_unbiased_sigmoid():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 256, generator=g) * 0.5
    bias = torch.zeros(256)
    bias[[5, 77, 130, 201]] = 10.0  # these four must be chosen whatever their own score
    weights, ids = impl("moe_gate")(logits, bias, 8, 8, 4, 2.5, True)
    for row in ids.tolist():
        assert {5, 77, 130, 201} <= set(row), "the bias steers selection"
    s = torch.sigmoid(logits)
    unbiased = s.gather(1, ids)
    assert_close(weights, unbiased / unbiased.sum(-1, keepdim=True) * 2.5, 1e-6, "weights")
    biased = (s + bias).gather(1, ids)
    assert rel_err(weights, biased / biased.sum(-1, keepdim=True) * 2.5) > 0.1, "a bias in the weights is visible"


def _group_trap_logits() -> tuple[torch.Tensor, set[int], set[int]]:
    """Groups 0-3 each hold ONE expert at 0.99 (max 0.99, top-2 sum ~0.99); groups 4-7 hold TWO at 0.9 (max 0.9,
    top-2 sum 1.8). Max-per-group keeps groups 0-3; top-2 sum keeps groups 4-7."""
    logits = torch.full((2, 256), -12.0)
    singles = {g * 32 + 3 for g in range(4)}
    pairs = {g * 32 + o for g in range(4, 8) for o in (1, 20)}
    for e in singles:
        logits[:, e] = logit(0.99)
    for e in pairs:
        logits[:, e] = logit(0.9)
    return logits, singles, pairs


def test_gate_uses_group_select_mode_1_top2_sum():
    logits, singles, pairs = _group_trap_logits()
    rec = Recorder()
    with using(rec):
        _, ids = impl("moe_gate")(logits, None, 8, 8, 4, 2.5, True)
    assert [set(r) for r in ids.tolist()] == [pairs, pairs], "top-2 sum keeps groups 4-7"
    _, ref_ids = cpu_ref.moe_gate(logits, None, 8, 8, 4, 2.5, True)
    assert [set(r) for r in ref_ids.tolist()] == [pairs, pairs]
    (call,) = rec.kwargs_of("npu_moe_gating_top_k")
    assert call["group_select_mode"] == 1 and call["norm_type"] == 1 and call["renorm"] == 0
    _, max_ids, _ = emu.npu_moe_gating_top_k(logits, 8, k_group=4, group_count=8, group_select_mode=0,
                                              norm_type=1, routed_scaling_factor=2.5)
    assert all(singles <= set(r) for r in max_ids.tolist()), "mode 0 (the op's default) keeps groups 0-3"
    assert [set(r) for r in max_ids.tolist()] != [pairs, pairs]


def test_gate_routed_scaling_factor_applied_exactly_once():
    g = torch.Generator().manual_seed(2)
    logits, bias = torch.randn(16, 256, generator=g) * 3, torch.randn(256, generator=g) * 0.1
    rec = Recorder()
    with using(rec):
        weights, _ = impl("moe_gate")(logits, bias, 8, 8, 4, 2.5, True)
    assert torch.allclose(weights.sum(-1), torch.full((16,), 2.5), rtol=1e-6), "renormalised, then x2.5, once"
    (call,) = rec.kwargs_of("npu_moe_gating_top_k")
    assert call["routed_scaling_factor"] == 2.5 and call["bias"].dtype == logits.dtype == F32


# -- attention ---------------------------------------------------------------------------------------------------


def _prefill_inputs(dqk=192, dv=128, heads=2):
    g = torch.Generator().manual_seed(3)
    cu_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9], dtype=torch.int32)  # sequence 0: 3 queries after a cached prefix of 4 keys
    q = (torch.randn(5, heads, dqk, generator=g) * 2).to(BF16)
    k = (torch.randn(9, heads, dqk, generator=g) * 2).to(BF16)
    v = torch.randn(9, heads, dv, generator=g).to(BF16)
    return q, k, v, cu_q, cu_k, 0.1352337788608801


def _decode_inputs():
    g = torch.Generator().manual_seed(4)
    cache = torch.randn(3, 16, 576, generator=g).to(BF16)
    q_lat, q_pe = torch.randn(2, 2, 4, 512, generator=g).to(BF16), torch.randn(2, 2, 4, 64, generator=g).to(BF16)
    table = torch.tensor([[2, -1], [0, -1]], dtype=torch.int32)  # one 16-row block each
    return q_lat, q_pe, cache, table, torch.tensor([9, 4]), 0.1352337788608801


@pytest.mark.parametrize("dims", [(192, 128), (64, 32)])
def test_attention_scale_is_always_passed(dims):
    args = _prefill_inputs(*dims)
    rec = Recorder()
    with using(rec):
        impl("attention_prefill")(*args)
        impl("mla_decode")(*_decode_inputs())
    calls = rec.kwargs_of("npu_fused_infer_attention_score")
    assert len(calls) == 2 and all(c["scale"] == 0.1352337788608801 for c in calls), "scale passed explicitly"


def _drop(key):
    def rewrite(name, args, kwargs):
        if name == "npu_fused_infer_attention_score":
            kwargs.pop(key, None)
        return args, kwargs
    return rewrite


def test_an_omitted_scale_is_wrong_and_rejected_in_strict_mode():
    args = _prefill_inputs()
    want = cpu_ref.attention_prefill(*args)
    assert_close(impl("attention_prefill")(*args), want, 1e-2)
    rec = Recorder(_drop("scale"))
    with using(rec), emu.configured(strict=False):
        wrong = impl("attention_prefill")(*args)  # the kernel would use 1.0
    assert rel_err(wrong, want) > 0.05, "FIA's default scale 1.0 gives a different answer"
    with using(rec), pytest.raises(emu.NpuRejection, match="scale was not passed"):
        impl("attention_prefill")(*args)


def _invert_mask(name, args, kwargs):
    if name == "npu_fused_infer_attention_score" and kwargs.get("atten_mask") is not None:
        kwargs["atten_mask"] = ~kwargs["atten_mask"]
    return args, kwargs


def test_mask_polarity_true_means_masked_out():
    args = _prefill_inputs()
    want = cpu_ref.attention_prefill(*args)
    rec = Recorder()
    with using(rec):
        assert_close(impl("attention_prefill")(*args), want, 1e-2)
    mask = rec.kwargs_of("npu_fused_infer_attention_score")[0]["atten_mask"]
    assert mask.shape == (2048, 2048) and bool(mask[0, 1]) and not bool(mask[1, 0]), "triu(ones, 1): 1 = masked"
    rec = Recorder(_invert_mask)
    with using(rec):
        inverted = impl("attention_prefill")(*args)
    assert rel_err(inverted, want) > 0.1, "an inverted (tril) mask must fail the comparison"


def test_decode_mask_polarity_for_mtp_verification():
    args = _decode_inputs()
    want = cpu_ref.mla_decode(*args)
    assert_close(impl("mla_decode")(*args), want, 1e-2)
    rec = Recorder(_invert_mask)
    with using(rec):
        assert rel_err(impl("mla_decode")(*args), want) > 0.1


def test_prefill_is_bottom_right_causal_with_a_cached_prefix():
    args = _prefill_inputs()
    want = cpu_ref.attention_prefill(*args)

    def left_up(name, a, kw):
        if name == "npu_fused_infer_attention_score":
            kw["sparse_mode"] = 2
        return a, kw

    rec = Recorder(left_up)
    with using(rec):
        assert rel_err(impl("attention_prefill")(*args), want) > 0.1, "sparse_mode 2 ignores the prefix"


def test_tnd_lengths_are_cumulative():
    args = _prefill_inputs()
    want = cpu_ref.attention_prefill(*args)

    def per_request(name, a, kw):
        if name == "npu_fused_infer_attention_score":
            kw["actual_seq_lengths"] = [3, 2]
            kw["actual_seq_lengths_kv"] = [7, 2]
        return a, kw

    rec = Recorder(per_request)
    with using(rec):
        with pytest.raises(emu.NpuRejection):  # [3, 2] is not cumulative
            impl("attention_prefill")(*args)


# -- rotary ------------------------------------------------------------------------------------------------------


def test_rotary_needs_full_width_cos_and_half_mode():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 6, 4, 64, generator=g)
    half_cos = torch.randn(1, 6, 1, 32, generator=g)
    with pytest.raises(emu.NpuRejection, match="full-D"):
        emu.npu_rotary_mul(x, half_cos, half_cos)
    xs = torch.randn(6, 4, 64, generator=g)
    angles = torch.rand(6, 32, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    want = cpu_ref.apply_rope(xs, cos, sin)
    assert_close(impl("apply_rope")(xs, cos, sin), want, 2e-6)

    def interleave(name, a, kw):
        kw["rotary_mode"] = "interleave"
        return a, kw

    rec = Recorder(interleave)
    with using(rec):
        assert rel_err(impl("apply_rope")(xs, cos, sin), want) > 0.1, "interleave mode is a different layout"


# -- MoE routing index conventions -------------------------------------------------------------------------------


def _crafted_routing():
    """3 tokens, K=2; token t's row is (t+1) * ones; ids token-major [[2, 0], [0, 1], [1, 2]]."""
    x = torch.arange(1, 4, dtype=F32)[:, None].repeat(1, 4)
    ids = torch.tensor([[2, 0], [0, 1], [1, 2]], dtype=torch.int32)
    return x, ids


def test_init_routing_v2_gather_index_and_counts():
    x, ids = _crafted_routing()
    expanded, row_idx, counts, _ = emu.npu_moe_init_routing_v2(
        x, ids, active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, 3], row_idx_type=0)
    # pairs r = t*K + j sorted stably by expert: e0 <- r1 (t0), r2 (t1); e1 <- r3 (t1), r4 (t2); e2 <- r0 (t0), r5 (t2)
    assert expanded[:, 0].tolist() == [1, 2, 2, 3, 1, 3]
    assert row_idx.tolist() == [4, 0, 1, 2, 3, 5], "gather index: row_idx[t*K + j] = expanded row of (t, j)"
    assert row_idx.dtype == torch.int32 and counts.tolist() == [2, 2, 2] and counts.dtype == torch.int64
    for r in range(6):
        assert torch.equal(expanded[row_idx[r]], x[r // 2]), "token-major pairs"
    _, scatter, cumsum, _ = emu.npu_moe_init_routing_v2(
        x, ids, active_num=6, expert_num=3, expert_tokens_num_type=0, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, 3], row_idx_type=1)
    assert scatter.tolist() == [1, 2, 3, 4, 0, 5] and cumsum.tolist() == [2, 4, 6]


def test_finalize_routing_reads_token_major_with_drop_pad_mode_2():
    x, ids = _crafted_routing()
    expanded, row_idx, _, _ = emu.npu_moe_init_routing_v2(
        x, ids, active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, 3], row_idx_type=0)
    scales = torch.tensor([[0.5, 0.25], [1.0, 2.0], [3.0, 0.125]])
    want = x * scales.sum(-1, keepdim=True)  # every expert is the identity here: y[t] = sum_j w[t, j] * x[t]
    common = dict(skip1=None, skip2=None, bias=None, scales=scales, export_for_source_row=None)
    got = emu.npu_moe_finalize_routing(expanded, expanded_src_to_dst_row=row_idx, drop_pad_mode=2, **common)
    assert torch.equal(got, want)
    k_major = emu.npu_moe_finalize_routing(expanded, expanded_src_to_dst_row=row_idx, drop_pad_mode=0, **common)
    assert not torch.allclose(k_major, want), "drop_pad_mode 0 reads the index k-major (v1's layout): wrong"
    _, scatter, _, _ = emu.npu_moe_init_routing_v2(
        x, ids, active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1,
        active_expert_range=[0, 3], row_idx_type=1)
    wrong_index = emu.npu_moe_finalize_routing(expanded, expanded_src_to_dst_row=scatter, drop_pad_mode=2, **common)
    assert not torch.allclose(wrong_index, want), "a scatter index (row_idx_type 1) is the inverse: wrong"


def _distinct_experts():
    """4 experts on D=4 whose outputs differ per expert, so any misrouted row changes the result."""
    g = torch.Generator().manual_seed(6)
    raw = [torch.randn(4, 3, 4, generator=g), None, torch.randn(4, 3, 4, generator=g), None,
           torch.randn(4, 4, 3, generator=g), None]
    x = torch.randn(5, 4, generator=g)
    ids = torch.tensor([[3, 0], [0, 1], [1, 3], [2, 0], [3, 2]])
    weights = torch.tensor([[0.7, 0.3], [0.5, 1.5], [2.0, 0.25], [1.0, 1.0], [0.1, 0.9]])
    from core.ops import ExpertWeights
    return x, raw, weights, ids, cpu_ref.moe_experts(x, ExpertWeights(raw[0], raw[2], raw[4]), weights, ids)


def _rewrite_kw(op_name, **changes):
    def rewrite(name, args, kwargs):
        if name == op_name:
            kwargs.update(changes)
        return args, kwargs
    return rewrite


def test_moe_experts_glue_conventions():
    x, raw, weights, ids, want = _distinct_experts()
    prepared = ascend.prepare_experts(*raw)
    rec = Recorder()
    with using(rec):
        assert_close(impl("moe_experts")(x, prepared, weights, ids), want, 2e-6)
    (route,) = rec.kwargs_of("npu_moe_init_routing_v2")
    assert route["quant_mode"] == -1 and route["row_idx_type"] == 0 and route["expert_tokens_num_type"] == 1
    assert [c["group_list_type"] for c in rec.kwargs_of("npu_grouped_matmul")] == [1, 1], "counts, not cumsum"
    (fin,) = rec.kwargs_of("npu_moe_finalize_routing")
    assert fin["drop_pad_mode"] == 2
    assert [n for n, _, _ in rec.calls] == ["npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu",
                                            "npu_grouped_matmul", "npu_moe_finalize_routing"]


@pytest.mark.parametrize("bug", [
    ("npu_moe_finalize_routing", {"drop_pad_mode": 0}),
    ("npu_grouped_matmul", {"group_list_type": 0}),
    ("npu_moe_init_routing_v2", {"row_idx_type": 1}),
])
def test_a_wrong_index_convention_gives_a_wrong_result(bug):
    x, raw, weights, ids, want = _distinct_experts()
    prepared = ascend.prepare_experts(*raw)
    rec = Recorder(_rewrite_kw(bug[0], **bug[1]))
    with using(rec), emu.configured(strict=False):
        try:
            got = impl("moe_experts")(x, prepared, weights, ids)
        except emu.NpuRejection:
            return  # rejected by a documented check: also caught
    assert rel_err(got, want) > 0.05, f"{bug} must not pass"


def test_swapped_gate_and_up_halves_are_visible():
    x, raw, weights, ids, want = _distinct_experts()
    gq, _, uq, _, dq, _ = raw
    swapped = ascend.prepare_experts(uq, None, gq, None, dq, None)
    assert rel_err(impl("moe_experts")(x, swapped, weights, ids), want) > 0.05, "npu_swiglu gates the FIRST half"
