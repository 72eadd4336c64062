"""The torch_npu emulation itself: it keeps torch_npu's signatures, computes the documented formulas, and rejects
what the documented parameter checks reject (plus, in strict mode, the documented traps), so glue that would fail on
hardware fails in CI too."""

from __future__ import annotations

import inspect

import pytest
import torch

import emulation.torch_npu as emu
from tests.ascend_support import simulated  # noqa: F401 (autouse fixture)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
I32, I64 = torch.int32, torch.int64


def t(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


MASK = torch.triu(torch.ones(2048, 2048, dtype=torch.bool), diagonal=1)


def fia(q=None, k=None, v=None, **kw):
    q = t(5, 2, 64, dtype=BF16) if q is None else q
    k = t(5, 2, 64, dtype=BF16) if k is None else k
    v = t(5, 2, 64, dtype=BF16) if v is None else v
    args = dict(num_heads=2, input_layout="TND", scale=0.125, sparse_mode=3, atten_mask=MASK,
                actual_seq_lengths=[5], actual_seq_lengths_kv=[5])
    args.update(kw)
    return emu.npu_fused_infer_attention_score(q, k, v, **args)


def paged_fia(block_size=16, cache_block=16, table=None, lens=(20, 5), heads=4, width=512, rope=64, s=1, **kw):
    """Absorbed-MLA (width 512, rope 64) or plain (rope 0) decode over a paged BSND cache of 4 blocks."""
    latent = t(4, cache_block, width, dtype=BF16)
    table = torch.tensor([[1, 3], [0, -1]], dtype=I32) if table is None else table
    args = dict(num_heads=heads, num_key_value_heads=1, input_layout="BSND", scale=0.1, block_table=table,
                block_size=block_size, actual_seq_lengths_kv=list(lens),
                sparse_mode=3 if s > 1 else 0, atten_mask=MASK if s > 1 else None)
    if rope:
        args.update(query_rope=t(2, s, heads, rope, dtype=BF16), key_rope=t(4, cache_block, rope, dtype=BF16))
    args.update(kw)
    return emu.npu_fused_infer_attention_score(t(2, s, heads, width, dtype=BF16), latent, latent, **args)


def gate(x=None, **kw):
    x = t(3, 256) if x is None else x
    args = dict(k=8, k_group=4, group_count=8, group_select_mode=1, norm_type=1)
    args.update(kw)
    return emu.npu_moe_gating_top_k(x, args.pop("k"), **args)


def route(x=None, ids=None, **kw):
    x = t(3, 8) if x is None else x
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]], dtype=I32) if ids is None else ids
    args = dict(active_num=6, expert_num=3, expert_tokens_num_type=1, expert_tokens_num_flag=True, quant_mode=-1)
    args.update(kw)
    return emu.npu_moe_init_routing_v2(x, ids, **args)


def gmm(x=None, w=None, group_list=None, **kw):
    x = t(6, 8) if x is None else x
    w = t(3, 8, 5) if w is None else w
    group_list = torch.tensor([2, 2, 2], dtype=I64) if group_list is None else group_list
    args = dict(group_list=group_list, split_item=2, group_type=0, group_list_type=1)
    args.update(kw)
    return emu.npu_grouped_matmul([x], [w], **args)


REJECTIONS = {
    # norms
    "rms_norm: 1-D x": lambda: emu.npu_rms_norm(t(8), t(8)),
    "rms_norm: (bf16 x, fp16 gamma)": lambda: emu.npu_rms_norm(t(2, 8, dtype=BF16), t(8, dtype=F16)),
    "rms_norm: (fp32 x, bf16 gamma)": lambda: emu.npu_rms_norm(t(2, 8), t(8, dtype=BF16)),
    "rms_norm: gamma not the trailing dims": lambda: emu.npu_rms_norm(t(2, 8), t(4)),
    "add_rms_norm: empty": lambda: emu.npu_add_rms_norm(t(0, 8), t(0, 8), t(8)),
    "add_rms_norm: gamma dtype != x1 dtype": lambda: emu.npu_add_rms_norm(t(2, 8, dtype=BF16), t(2, 8, dtype=BF16),
                                                                          t(8)),
    "add_rms_norm: x1/x2 dtypes differ": lambda: emu.npu_add_rms_norm(t(2, 8), t(2, 8, dtype=BF16), t(8)),
    # rotary
    "rotary_mul: half-width cos": lambda: emu.npu_rotary_mul(t(1, 4, 2, 64), t(1, 4, 1, 32), t(1, 4, 1, 32)),
    "rotary_mul: unknown mode": lambda: emu.npu_rotary_mul(t(1, 4, 2, 64), t(1, 4, 1, 64), t(1, 4, 1, 64),
                                                           rotary_mode="quarter"),
    "rotary_mul: odd D": lambda: emu.npu_rotary_mul(t(1, 4, 2, 7), t(1, 4, 1, 7), t(1, 4, 1, 7)),
    "rotary_mul: 2-D input": lambda: emu.npu_rotary_mul(t(4, 64), t(4, 64), t(4, 64)),
    "rotary_mul: B >= 1000": lambda: emu.npu_rotary_mul(t(1000, 1, 1, 8), t(1000, 1, 1, 8), t(1000, 1, 1, 8)),
    "rotary_mul: cos dtype != input (strict)": lambda: emu.npu_rotary_mul(t(1, 4, 2, 64, dtype=BF16),
                                                                          t(1, 4, 1, 64), t(1, 4, 1, 64)),
    # attention
    "FIA: unknown layout": lambda: fia(input_layout="THD"),
    "FIA: float32 query": lambda: fia(q=t(5, 2, 64), k=t(5, 2, 64), v=t(5, 2, 64)),
    "FIA: scale omitted (strict)": lambda: emu.npu_fused_infer_attention_score(
        t(1, 1, 2, 64, dtype=BF16), t(1, 3, 2, 64, dtype=BF16), t(1, 3, 2, 64, dtype=BF16), num_heads=2,
        input_layout="BSND"),
    "FIA: lengths as a tensor": lambda: fia(actual_seq_lengths=torch.tensor([5])),
    "FIA: TND without lengths": lambda: fia(actual_seq_lengths=None),
    "FIA: TND lengths not cumulative": lambda: fia(q=t(5, 2, 64, dtype=BF16), actual_seq_lengths=[3, 2],
                                                   actual_seq_lengths_kv=[3, 2]),
    "FIA: sparse_mode 3 without mask": lambda: fia(atten_mask=None),
    "FIA: sparse_mode 3 with a (S, S) mask": lambda: fia(atten_mask=MASK[:5, :5]),
    "FIA: float mask": lambda: fia(atten_mask=MASK.float()),
    "FIA: sparse_mode 5": lambda: fia(sparse_mode=5),
    "FIA: head dim above 512": lambda: fia(t(2, 1, 520, dtype=BF16), t(2, 1, 520, dtype=BF16),
                                           t(2, 1, 520, dtype=BF16), num_heads=1, actual_seq_lengths=[2],
                                           actual_seq_lengths_kv=[2]),
    "FIA: unaligned head dim": lambda: fia(t(5, 2, 60, dtype=BF16), t(5, 2, 60, dtype=BF16),
                                           t(5, 2, 60, dtype=BF16)),
    "FIA: num_heads != query heads": lambda: fia(num_heads=4),
    "FIA: GQA ratio above 64": lambda: emu.npu_fused_infer_attention_score(
        t(1, 1, 128, 64, dtype=BF16), t(1, 3, 1, 64, dtype=BF16), t(1, 3, 1, 64, dtype=BF16), num_heads=128,
        num_key_value_heads=1, input_layout="BSND", scale=0.1),
    "FIA: MLA rope dim 32": lambda: fia(t(5, 2, 128, dtype=BF16), t(5, 2, 128, dtype=BF16),
                                        t(5, 2, 128, dtype=BF16), query_rope=t(5, 2, 32, dtype=BF16),
                                        key_rope=t(5, 2, 32, dtype=BF16)),
    "FIA: query_rope without key_rope": lambda: fia(query_rope=t(5, 2, 64, dtype=BF16)),
    "FIA: absorbed MLA with 3 heads": lambda: emu.npu_fused_infer_attention_score(
        t(1, 1, 3, 512, dtype=BF16), t(1, 4, 1, 512, dtype=BF16), t(1, 4, 1, 512, dtype=BF16),
        query_rope=t(1, 1, 3, 64, dtype=BF16), key_rope=t(1, 4, 1, 64, dtype=BF16), num_heads=3,
        num_key_value_heads=1, input_layout="BSND", scale=0.1),
    "FIA: absorbed MLA asking for softmax_lse": lambda: emu.npu_fused_infer_attention_score(
        t(1, 1, 4, 512, dtype=BF16), t(1, 4, 1, 512, dtype=BF16), t(1, 4, 1, 512, dtype=BF16),
        query_rope=t(1, 1, 4, 64, dtype=BF16), key_rope=t(1, 4, 1, 64, dtype=BF16), num_heads=4,
        num_key_value_heads=1, input_layout="BSND", scale=0.1, softmax_lse_flag=True),
    "FIA paged: int64 block_table": lambda: paged_fia(table=torch.tensor([[1, 3], [0, -1]])),
    "FIA paged: MLA block_size 8": lambda: paged_fia(block_size=8, cache_block=8, lens=(10, 5)),
    "FIA paged: MLA block_size above 1024": lambda: paged_fia(block_size=1040, cache_block=1040),
    "FIA paged: no actual_seq_lengths_kv": lambda: paged_fia(actual_seq_lengths_kv=None),
    "FIA paged: cache block dim != block_size": lambda: paged_fia(block_size=32),
    "FIA paged: table names a block outside the cache": lambda: paged_fia(table=torch.tensor([[1, 9], [0, -1]],
                                                                                            dtype=I32)),
    "FIA paged: -1 inside a sequence's used blocks": lambda: paged_fia(lens=(20, 17)),
    "FIA paged: table too narrow for the length": lambda: paged_fia(lens=(40, 5)),
    "FIA paged: plain decode block_size 24": lambda: paged_fia(block_size=24, cache_block=24, width=128, rope=0),
    "FIA paged: plain decode block_size 1024": lambda: paged_fia(block_size=1024, cache_block=1024, width=128,
                                                                 rope=0),
    "FIA paged: plain S=2 (prefill kernel) block_size 16": lambda: paged_fia(width=128, rope=0, s=2),
    "FIA: block_size without block_table": lambda: fia(block_size=16),
    # gate
    "gating: 16 experts (A2/A3 kernel)": lambda: gate(t(3, 16), k=4, k_group=2, group_count=4),
    "gating: more than 2048 experts": lambda: emu.npu_moe_gating_top_k(t(2, 4096), 8),
    "gating: bias dtype != x dtype": lambda: gate(bias=t(256, dtype=BF16)),
    "gating: renorm 1": lambda: gate(renorm=1),
    "gating: k above k_group * E / group_count": lambda: gate(k=129),
    "gating: group_count not dividing E": lambda: gate(group_count=3),
    "gating: k_group above group_count": lambda: gate(k_group=9),
    "gating: E / group_count <= 2": lambda: gate(group_count=128, k_group=4, k=8),
    "gating: NaN logits (strict)": lambda: gate(torch.full((2, 256), float("nan"))),
    "gating: hash routing arguments": lambda: gate(input_ids=torch.zeros(3, dtype=I64)),
    # routing
    "init_routing_v2: int64 expert_idx": lambda: route(ids=torch.tensor([[0, 1], [1, 2], [2, 0]])),
    "init_routing_v2: quant_mode omitted (strict)": lambda: emu.npu_moe_init_routing_v2(
        t(3, 8), torch.zeros(3, 2, dtype=I32), active_num=6, expert_num=3),
    "init_routing_v2: FP8 quant_mode on A2/A3": lambda: route(quant_mode=2),
    "init_routing_v2: no expert_num and no range": lambda: route(expert_num=-1),
    "init_routing_v2: ids / x rows differ": lambda: route(ids=torch.zeros(4, 2, dtype=I32)),
    "finalize_routing: skip2 without skip1": lambda: emu.npu_moe_finalize_routing(
        t(6, 4), None, t(3, 4), None, t(3, 2), torch.arange(6, dtype=I32), None, drop_pad_mode=2),
    "finalize_routing: int64 index": lambda: emu.npu_moe_finalize_routing(
        t(6, 4), None, None, None, t(3, 2), torch.arange(6), None, drop_pad_mode=2),
    "finalize_routing: index out of range": lambda: emu.npu_moe_finalize_routing(
        t(6, 4), None, None, None, t(3, 2), torch.arange(1, 7, dtype=I32), None, drop_pad_mode=2),
    # grouped matmul
    "grouped_matmul: x not a list": lambda: emu.npu_grouped_matmul(t(6, 8), [t(3, 8, 5)],
                                                                   group_list=torch.tensor([2, 2, 2]),
                                                                   split_item=2, group_type=0, group_list_type=1),
    "grouped_matmul: int32 group_list": lambda: gmm(group_list=torch.tensor([2, 2, 2], dtype=I32)),
    "grouped_matmul: weight not transposed (E, N, K)": lambda: gmm(w=t(3, 5, 8)),
    "grouped_matmul: cumsum read as counts overflows M": lambda: gmm(group_list=torch.tensor([2, 4, 6])),
    "grouped_matmul: bf16 x with fp32 weight": lambda: gmm(x=t(6, 8, dtype=BF16)),
    "grouped_matmul: int8 without output_dtype": lambda: gmm(x=torch.ones(6, 8, dtype=torch.int8),
                                                             w=torch.ones(3, 8, 5, dtype=torch.int8)),
    "grouped_matmul: group_type with a List[int]": lambda: gmm(group_list=[2, 2, 2]),
    # activation and quantisation
    "swiglu: non-contiguous": lambda: emu.npu_swiglu(t(8, 4).t()),
    "swiglu: odd size": lambda: emu.npu_swiglu(t(2, 7)),
    "swiglu: empty": lambda: emu.npu_swiglu(t(0, 8)),
    "dynamic_quant: float32 input": lambda: emu.npu_dynamic_quant(t(3, 8)),
    "dynamic_quant: 1-D input": lambda: emu.npu_dynamic_quant(t(8, dtype=BF16)),
    "dynamic_quant: FP8 output on A2/A3": lambda: emu.npu_dynamic_quant(t(3, 8, dtype=BF16),
                                                                        dst_type=torch.float8_e4m3fn),
    "quant_matmul: weight not transposed": lambda: emu.npu_quant_matmul(
        torch.ones(3, 8, dtype=torch.int8), torch.ones(5, 6, dtype=torch.int8), torch.ones(6)),
    "quant_matmul: float x1": lambda: emu.npu_quant_matmul(t(3, 8), torch.ones(8, 5, dtype=torch.int8),
                                                           torch.ones(5)),
    "quant_matmul: N above 65535": lambda: emu.npu_quant_matmul(
        torch.ones(1, 2, dtype=torch.int8), torch.ones(2, 65536, dtype=torch.int8), torch.ones(1)),
}


def test_grouped_matmul_rows_past_the_group_list_are_undefined():
    """Counts that do not cover M are allowed (expert-parallel routing leaves rows of other ranks' experts past the
    group list); those rows are undefined, which the strict emulation makes NaN so nothing may read them."""
    out = gmm(group_list=torch.tensor([2, 2, 1]))[0]
    assert torch.isnan(out[5:]).all() and torch.isfinite(out[:5]).all()


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_documented_rejection(case):
    with pytest.raises(emu.NpuRejection):
        REJECTIONS[case]()


def test_strict_checks_are_switchable():
    x = t(1, 1, 2, 64, dtype=BF16)
    with emu.configured(strict=False):
        out, lse = emu.npu_fused_infer_attention_score(x, x, x, num_heads=2, input_layout="BSND")
    assert out.shape == x.shape and lse.shape == (1,)
    with emu.configured(gating_expert_counts=None):
        y, idx, _ = gate(t(3, 16), k=4, k_group=2, group_count=4)
    assert y.shape == idx.shape == (3, 4)


def test_signatures_are_torch_npu_s():
    fia_params = inspect.signature(emu.npu_fused_infer_attention_score).parameters
    assert [p for p in fia_params if fia_params[p].kind != inspect.Parameter.KEYWORD_ONLY] == ["query", "key",
                                                                                             "value"]
    assert fia_params["scale"].default == 1.0 and fia_params["sparse_mode"].default == 0
    assert fia_params["input_layout"].default == "BSH" and fia_params["next_tokens"].default == 2147483647
    gating = inspect.signature(emu.npu_moe_gating_top_k).parameters
    assert gating["group_select_mode"].default == 0 and gating["renorm"].default == 0
    assert gating["norm_type"].default == 0 and gating["routed_scaling_factor"].default == 1.0
    assert gating["eps"].default == 1e-20
    assert inspect.signature(emu.npu_moe_finalize_routing).parameters["drop_pad_mode"].default == 0
    assert inspect.signature(emu.npu_rotary_mul).parameters["rotary_mode"].default == "half"
    assert inspect.signature(emu.npu_rms_norm).parameters["epsilon"].default == 1e-6
    assert inspect.signature(emu.npu_grouped_matmul).parameters["group_list_type"].default == 0


# -- documented semantics on small examples ----------------------------------------------------------------------


def test_norm_outputs():
    x, w = t(3, 16), 1 + 0.1 * t(16)
    y, rstd = emu.npu_rms_norm(x, w, 1e-6)
    assert rstd.shape == (3, 1) and rstd.dtype == F32
    assert torch.allclose(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w)
    xb, rb = t(3, 16, dtype=BF16), t(3, 16, dtype=BF16)
    normed, rstd, s = emu.npu_add_rms_norm(xb, rb, w.to(BF16))
    assert torch.equal(s, (xb.float() + rb.float()).to(BF16)) and rstd.shape == (3, 1) and normed.dtype == BF16
    assert torch.equal(emu.npu_rms_norm(torch.zeros(2, 4), torch.ones(4))[0], torch.zeros(2, 4)), "zero row -> 0"


@pytest.mark.parametrize("rope", [64, 0])
@pytest.mark.parametrize("s", [1, 2])
def test_fia_paged_kv_reads_only_the_tables_blocks(rope, s):
    """Paged FIA equals dense FIA on the gathered rows; unused blocks and table entries past the used ones
    (poisoned with NaN, and -1) are never read."""
    width, bs, heads = (512, 16, 4) if rope else (128, 128, 4)
    lens = [bs + 3, 5]
    cache = torch.full((5, bs, width + rope), float("nan"), dtype=BF16)
    rows = [t(n, width + rope, dtype=BF16) for n in lens]
    cache[3, :] = rows[0][:bs]
    cache[1, :3] = rows[0][bs:]
    cache[4, :5] = rows[1]
    table = torch.tensor([[3, 1, 0], [4, 2, -1]], dtype=I32)  # blocks 0 and 2 (all NaN) must not be read
    q, qr = t(2, s, heads, width, dtype=BF16), t(2, s, heads, max(rope, 1), dtype=BF16)
    mask = dict(sparse_mode=3 if s > 1 else 0, atten_mask=MASK if s > 1 else None)
    extra = dict(query_rope=qr) if rope else {}
    latent = cache[..., :width] if rope else cache
    paged_out, _ = emu.npu_fused_infer_attention_score(
        q, latent, latent, key_rope=cache[..., width:] if rope else None, num_heads=heads, num_key_value_heads=1,
        input_layout="BSND", scale=0.1, block_table=table, block_size=bs, actual_seq_lengths_kv=lens, **extra,
        **mask)
    dense = torch.zeros(2, max(lens), 1, width + rope, dtype=BF16)
    for b, r in enumerate(rows):
        dense[b, : r.shape[0], 0] = r
    dl = dense[..., :width]
    dense_out, _ = emu.npu_fused_infer_attention_score(
        q, dl, dl, key_rope=dense[..., width:] if rope else None, num_heads=heads, num_key_value_heads=1,
        input_layout="BSND", scale=0.1, actual_seq_lengths_kv=lens, **extra, **mask)
    assert torch.isfinite(paged_out).all()
    assert torch.equal(paged_out, dense_out)


def test_fia_paged_tnd_is_documented_but_not_emulated():
    with pytest.raises(emu.NotEmulated, match="paged KV with layout TND"):
        fia(block_table=torch.tensor([[0]], dtype=I32), block_size=16)


def test_fia_scale_is_literal_and_lse_is_reported():
    q, k, v = t(1, 1, 1, 16, dtype=BF16), t(1, 4, 1, 16, dtype=BF16), t(1, 4, 1, 16, dtype=BF16)
    out, lse = emu.npu_fused_infer_attention_score(q, k, v, num_heads=1, input_layout="BSND", scale=1.0,
                                                   softmax_lse_flag=True)
    scores = q[0, 0, 0].float() @ k[0, :, 0].float().T
    assert torch.allclose(out[0, 0, 0].float(), torch.softmax(scores, -1) @ v[0, :, 0].float(), atol=1e-2)
    assert lse.shape == (1, 1, 1, 1) and torch.allclose(lse.flatten(), torch.logsumexp(scores, -1).flatten())


def test_fia_empty_kv_gives_zeros_and_lengths_limit_keys():
    q, k = t(2, 1, 2, 16, dtype=BF16), t(2, 5, 2, 16, dtype=BF16)
    out, _ = emu.npu_fused_infer_attention_score(q, k, k, num_heads=2, input_layout="BSND", scale=0.25,
                                                 actual_seq_lengths_kv=[0, 5])
    assert torch.equal(out[0], torch.zeros_like(out[0])) and out[1].abs().sum() > 0
    out3, _ = emu.npu_fused_infer_attention_score(q, k, k, num_heads=2, input_layout="BSND", scale=0.25,
                                                  actual_seq_lengths_kv=[3])
    ref, _ = emu.npu_fused_infer_attention_score(q, k[:, :3], k[:, :3], num_heads=2, input_layout="BSND",
                                                 scale=0.25)
    assert torch.equal(out3, ref), "a length of 1 entry is shared by every batch"


def test_fia_output_layouts():
    q = t(2, 3, 2, 16, dtype=BF16)  # BSND
    base, _ = emu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BSND", scale=0.25)
    bnsd, _ = emu.npu_fused_infer_attention_score(q.transpose(1, 2).contiguous(), q.transpose(1, 2).contiguous(),
                                                  q.transpose(1, 2).contiguous(), num_heads=2, input_layout="BNSD",
                                                  scale=0.25)
    nbsd, _ = emu.npu_fused_infer_attention_score(q, q, q, num_heads=2, input_layout="BSND_NBSD", scale=0.25)
    bsh, _ = emu.npu_fused_infer_attention_score(q.flatten(2), q.flatten(2), q.flatten(2), num_heads=2,
                                                 input_layout="BSH", scale=0.25)
    assert torch.equal(bnsd, base.transpose(1, 2)) and torch.equal(nbsd, base.permute(2, 0, 1, 3))
    assert torch.equal(bsh, base.flatten(2))


def test_gating_norm_out_and_softmax_does_not_renormalise():
    x = t(4, 256)
    y, idx, norm_out = gate(x, out_flag=True, norm_type=0, routed_scaling_factor=1.0)
    assert torch.allclose(norm_out, x.softmax(-1)) and idx.dtype == I32 and y.dtype == F32
    assert torch.allclose(y, x.softmax(-1).gather(1, idx.long())), "softmax weights are not renormalised"
    assert gate(x)[2].numel() == 0, "norm_out is empty without out_flag"


def test_init_routing_drops_padding_and_marks_undefined_rows():
    x = t(3, 4)
    ids = torch.tensor([[0, -1], [1, 0], [-1, 1]], dtype=I32)  # -1 = padding (sglang)
    expanded, row_idx, counts, _ = route(x, ids, expert_num=2)
    assert counts.tolist() == [2, 2] and row_idx.tolist() == [0, -1, 2, 1, -1, 3]
    assert torch.isnan(expanded[4:]).all(), "rows past the routed ones are undefined: sentinels in strict mode"
    with emu.configured(strict=False):
        assert torch.equal(route(x, ids, expert_num=2)[0][4:], torch.zeros(2, 4))
    _, _, pairs, _ = route(x, ids, expert_num=2, expert_tokens_num_type=2)
    assert pairs.tolist() == [[0, 2], [1, 2]]


def test_dynamic_quant_and_quant_matmul():
    x = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=BF16)
    y, scale = emu.npu_dynamic_quant(x)
    assert torch.equal(scale, torch.tensor([0.0, 2.0 / 127])) and y.tolist() == [[0, 0], [64, -127]]
    a = torch.randint(-128, 128, (3, 70), dtype=torch.int8)
    b = torch.randint(-128, 128, (70, 5), dtype=torch.int8)
    acc = emu.npu_quant_matmul(a, b, torch.ones(1), output_dtype=torch.int32)
    assert torch.equal(acc, (a.long() @ b.long()).int()), "exact int32 accumulation"
    out = emu.npu_quant_matmul(a, b, torch.full((5,), 0.5), pertoken_scale=torch.tensor([1.0, 2.0, 4.0]),
                               output_dtype=BF16)
    assert torch.equal(out, ((a.long() @ b.long()).float() * 0.5 * torch.tensor([[1.0], [2.0], [4.0]])).to(BF16))


def test_grouped_matmul_forms():
    x, w = t(6, 8), t(3, 8, 5)
    counts = torch.tensor([1, 0, 5], dtype=I64)
    (y,) = gmm(x, w, counts)
    want = torch.cat([x[:1] @ w[0], x[1:] @ w[2]])
    assert torch.allclose(y, want, atol=1e-5), "an empty group is legal"
    (y0,) = gmm(x, w, counts.cumsum(0), group_list_type=0)
    assert torch.equal(y0, y)
    per_group = gmm(x, w, counts, split_item=0)
    assert [p.shape[0] for p in per_group] == [1, 0, 5]
    with emu.configured(strict=False):
        (short,) = gmm(x, w, torch.tensor([1, 0, 3], dtype=I64))
    assert torch.equal(short[4:], torch.zeros(2, 5)), "rows past the covered total stay zero"
