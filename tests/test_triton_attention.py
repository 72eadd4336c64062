"""Triton MLA attention (backends/triton_kernels/attention.py) against the cpu_ref specification.

Runs the kernels under the Triton interpreter on the CPU (TRITON_INTERPRET=1 must be set before any kernel is
defined, hence before the imports below). Shapes are small because the interpreter is slow; one case per operator
uses the real DeepSeek-V3 head dims. float32 is compared tightly (the interpreter is exact there); bfloat16 loosely
(P is rounded to bf16 before the PV dot, and the interpreter rounds bf16 stores toward zero).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from backends.cpu_ref import attention as ref  # noqa: E402
from backends.triton_kernels import attention as tri  # noqa: E402
from tests import paged_support as paged  # noqa: E402

F32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
SMALL_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16}


def cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def prefill_inputs(lq: list[int], lk: list[int], heads: int, d_qk: int, d_v: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), heads, d_qk, generator=g).to(dtype)
    k = torch.randn(sum(lk), heads, d_qk, generator=g).to(dtype)
    v = torch.randn(sum(lk), heads, d_v, generator=g).to(dtype)
    return q, k, v, cumulative(lq), cumulative(lk)


def check_prefill(q, k, v, cu_q, cu_k, scale, cfg=None, tol=F32_TOL):
    before = [t.clone() for t in (q, k, v, cu_q, cu_k)]
    out = tri.attention_prefill(q, k, v, cu_q, cu_k, scale, cfg)
    expected = ref.attention_prefill(q, k, v, cu_q, cu_k, scale)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    for a, b in zip(before, (q, k, v, cu_q, cu_k)):
        assert torch.equal(a, b), "an input was modified"
    return out


# ------------------------------------------------------------------------------------------------ prefill


@pytest.mark.parametrize("cfg", [SMALL_BLOCKS, None], ids=["blocks16", "default"])
def test_prefill_varlen_prefixes_f32(cfg):
    # cached prefixes (p > 0), a zero-query sequence, a single token, Lq == Lk, a tile-crossing length
    lq, lk = [3, 0, 17, 1, 9, 21], [5, 4, 30, 1, 9, 40]
    check_prefill(*prefill_inputs(lq, lk, heads=3, d_qk=48, d_v=32), scale=0.3, cfg=cfg)


def test_prefill_block_boundaries():
    # prefixes and lengths on both sides of the 16-wide block edges (diagonal blocks start mid-block or at its edge)
    lq = [15, 16, 17, 14, 31, 7, 2]
    lk = [16, 31, 31, 16, 47, 16, 17]
    check_prefill(*prefill_inputs(lq, lk, heads=1, d_qk=32, d_v=16, seed=3), scale=0.3, cfg=SMALL_BLOCKS)


def test_prefill_single_token():
    check_prefill(*prefill_inputs([1], [1], heads=2, d_qk=48, d_v=32), scale=0.5, cfg=SMALL_BLOCKS)
    check_prefill(*prefill_inputs([1], [13], heads=2, d_qk=48, d_v=32), scale=0.5, cfg=SMALL_BLOCKS)


@pytest.mark.parametrize("d_qk,d_v", [(24, 20), (8, 16), (32, 40)])
def test_prefill_general_head_dims(d_qk, d_v):
    # remainder part masked (24 = 16 + 8), a head dim below the dot minimum, a non-power-of-two Dv
    check_prefill(*prefill_inputs([5, 12], [9, 12], heads=2, d_qk=d_qk, d_v=d_v), scale=0.4, cfg=SMALL_BLOCKS)


def test_prefill_bf16():
    q, k, v, cu_q, cu_k = prefill_inputs([7, 0, 19], [10, 3, 33], heads=2, d_qk=48, d_v=32, dtype=torch.bfloat16)
    out = check_prefill(q, k, v, cu_q, cu_k, 0.3, cfg=SMALL_BLOCKS, tol=BF16_TOL)
    golden = ref.attention_prefill(q.double(), k.double(), v.double(), cu_q, cu_k, 0.3)
    ref_err = (ref.attention_prefill(q, k, v, cu_q, cu_k, 0.3).double() - golden).abs().max()
    assert (out.double() - golden).abs().max() <= 4 * ref_err + 1e-2


def test_prefill_real_head_dims_model_layout():
    """Dqk = 192 (128 nope + 64 rope), Dv = 128 built the way core/model.py builds them."""
    g = torch.Generator().manual_seed(1)
    heads, nope, pe, dv = 2, 128, 64, 128
    lq, lk = [2, 3], [4, 3]
    tq, tk = sum(lq), sum(lk)
    q = torch.cat([torch.randn(tq, heads, nope, generator=g), torch.randn(tq, heads, pe, generator=g)], dim=-1)
    kv_full = torch.randn(tk, heads, nope + dv, generator=g)
    k_pe = torch.randn(tk, pe, generator=g)
    k = torch.cat([kv_full[..., :nope], k_pe[:, None, :].expand(tk, heads, pe)], dim=-1)
    v = kv_full[..., nope:]  # non-contiguous slice
    assert not v.is_contiguous()
    check_prefill(q, k, v, cumulative(lq), cumulative(lk), 192 ** -0.5)
    check_prefill(q, k, v, cumulative(lq), cumulative(lk), 192 ** -0.5, cfg={"BLOCK_M": 16, "BLOCK_N": 32})


def test_prefill_noncontiguous_and_stride0():
    g = torch.Generator().manual_seed(2)
    lq, lk, heads, d_qk, d_v = [4, 6], [9, 6], 3, 48, 32
    q = torch.randn(heads, sum(lq), d_qk, generator=g).transpose(0, 1)  # [Tq, H, D] with a transposed layout
    k = torch.randn(sum(lk), 1, d_qk, generator=g).expand(sum(lk), heads, d_qk)  # stride-0 heads (MQA-like)
    v = torch.randn(sum(lk), heads, 2 * d_v, generator=g)[..., ::2]  # strided last dim
    assert not q.is_contiguous() and k.stride(1) == 0 and v.stride(2) == 2
    check_prefill(q, k, v, cumulative(lq), cumulative(lk), 0.25, cfg=SMALL_BLOCKS)


def test_prefill_empty():
    q, k, v, cu_q, cu_k = prefill_inputs([], [], heads=2, d_qk=48, d_v=32)
    assert tri.attention_prefill(q, k, v, cu_q, cu_k, 0.3).shape == (0, 2, 32)
    # sequences that all have zero queries but cached keys
    q, k, v, cu_q, cu_k = prefill_inputs([0, 0], [3, 5], heads=2, d_qk=48, d_v=32)
    assert tri.attention_prefill(q, k, v, cu_q, cu_k, 0.3).shape == (0, 2, 32)


def test_prefill_writes_every_output_element():
    q, k, v, cu_q, cu_k = prefill_inputs([5, 0, 18], [8, 2, 18], heads=2, d_qk=48, d_v=32)
    out = torch.full((q.shape[0], 2, 32), float("nan"))
    res = tri.attention_prefill(q, k, v, cu_q, cu_k, 0.3, SMALL_BLOCKS, out=out)
    assert res.data_ptr() == out.data_ptr() and not out.isnan().any()
    torch.testing.assert_close(out, ref.attention_prefill(q, k, v, cu_q, cu_k, 0.3), **F32_TOL)


# ------------------------------------------------------------------------------------------------ decode


def decode_inputs(lens: list[int], s_new: int, heads: int, rank: int, rope: int, dtype=torch.float32, seed=0,
                  block_size: int = 16):
    """Queries as views of one [B, S, H, R+P] tensor; a paged cache with shuffled block tables whose rows past lens,
    unused blocks and table entries past the used ones are NaN or -1 (tests/paged_support.py)."""
    return paged.decode_inputs(lens, s_new, heads, rank, rope, block_size=block_size, dtype=dtype, seed=seed)


def check_decode(q_lat, q_pe, cache, slots, lens, scale, cfg=None, tol=F32_TOL):
    before = [t.clone() for t in (q_lat, q_pe, cache, slots, lens)]
    out = tri.mla_decode(q_lat, q_pe, cache, slots, lens, scale, cfg)
    expected = ref.mla_decode(q_lat, q_pe, cache, slots, lens, scale)
    assert out.shape == q_lat.shape and out.dtype == q_lat.dtype
    assert not out.isnan().any(), "read a poisoned cache row at or past lens"
    torch.testing.assert_close(out.float(), expected.float(), **tol)
    for a, b in zip(before, (q_lat, q_pe, cache, slots, lens)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg="an input was modified")
    return out


SPLIT_CFGS = [
    {"num_splits": 1},  # single stage, output written by stage 1
    {"num_splits": 3, "min_split_tokens": 8, "BLOCK_N": 16},
    {"num_splits": 4, "min_split_tokens": 16, "BLOCK_N": 16},  # lens 33: last split holds 1 token
    None,  # defaults (heuristic)
]


@pytest.mark.parametrize("s_new", [1, 2])
@pytest.mark.parametrize("cfg", SPLIT_CFGS, ids=["splits1", "splits3", "splits4", "default"])
def test_decode_f32_splits(s_new, cfg):
    lens = [40, 2, 17, 33, 32] if s_new == 2 else [40, 1, 17, 33, 16]
    check_decode(*decode_inputs(lens, s_new, heads=4, rank=64, rope=16), scale=0.15, cfg=cfg)


def test_decode_many_head_groups():
    # H = 20 not a multiple of BLOCK_H; S = 2 folded into M = 2 * 8 rows
    check_decode(*decode_inputs([12, 29], 2, heads=20, rank=32, rope=16), scale=0.2,
                 cfg={"BLOCK_H": 8, "BLOCK_N": 16, "num_splits": 2, "min_split_tokens": 8})


def test_decode_general_dims():
    # R and P not powers of two (masked columns)
    check_decode(*decode_inputs([9, 21], 1, heads=3, rank=40, rope=12), scale=0.2,
                 cfg={"BLOCK_N": 16, "num_splits": 2, "min_split_tokens": 8})


def test_decode_bf16():
    args = decode_inputs([37, 5, 20], 2, heads=4, rank=64, rope=16, dtype=torch.bfloat16)
    out = check_decode(*args, scale=0.15, cfg={"num_splits": 3, "min_split_tokens": 8, "BLOCK_N": 16},
                       tol=BF16_TOL)
    q_lat, q_pe, cache, slots, lens = args
    golden = ref.mla_decode(q_lat.double(), q_pe.double(), cache.double(), slots, lens, 0.15)
    ref_err = (ref.mla_decode(*args, 0.15).double() - golden).abs().max()
    assert (out.double() - golden).abs().max() <= 4 * ref_err + 1e-2


def test_decode_real_head_dims():
    """R = 512, P = 64 at tiny lengths, few heads, MTP (S = 2), with and without splits, V3's softmax scale."""
    args = decode_inputs([5, 19], 2, heads=2, rank=512, rope=64, block_size=64)
    check_decode(*args, scale=0.1352337788608801)
    check_decode(*args, scale=0.1352337788608801, cfg={"num_splits": 2, "min_split_tokens": 8, "BLOCK_N": 16})


def test_decode_noncontiguous_cache_and_queries():
    q_lat, q_pe, cache, slots, lens = decode_inputs([14, 30], 2, heads=4, rank=32, rope=16)
    interleaved = torch.full((cache.shape[0], cache.shape[1], 2, cache.shape[2]), float("nan"))
    interleaved[:, :, 1] = cache
    layer_view = interleaved[:, :, 1]  # [blocks, block_size, R+P] with a row stride of 2*(R+P)
    q_lat_t = q_lat.transpose(1, 2).contiguous().transpose(1, 2)  # [B, S, H, R] with S and H swapped in memory
    assert not layer_view.is_contiguous() and not q_lat_t.is_contiguous()
    check_decode(q_lat_t, q_pe, layer_view, slots, lens, 0.2,
                 cfg={"num_splits": 2, "min_split_tokens": 8, "BLOCK_N": 16})


def test_decode_empty_batch():
    q_lat, q_pe, cache, slots, lens = decode_inputs([], 2, heads=4, rank=64, rope=16)
    assert tri.mla_decode(q_lat, q_pe, cache, slots, lens, 0.2).shape == (0, 2, 4, 64)


def test_decode_writes_every_output_element():
    q_lat, q_pe, cache, slots, lens = decode_inputs([33, 3], 2, heads=4, rank=64, rope=16)
    expected = ref.mla_decode(q_lat, q_pe, cache, slots, lens, 0.2)
    for cfg in ({"num_splits": 1}, {"num_splits": 4, "min_split_tokens": 16, "BLOCK_N": 16}):
        out = torch.full(q_lat.shape, float("nan"))
        tri.mla_decode(q_lat, q_pe, cache, slots, lens, 0.2, cfg, out=out)
        assert not out.isnan().any()
        torch.testing.assert_close(out, expected, **F32_TOL)


def test_decode_padding_entry_is_zero():
    """A batch entry with lens = 0 (e.g. padding) reads nothing and returns zeros (the reference gives NaN)."""
    q_lat, q_pe, cache, slots, lens = decode_inputs([12, 0], 1, heads=2, rank=32, rope=16)
    for cfg in ({"num_splits": 1}, {"num_splits": 2, "min_split_tokens": 8, "BLOCK_N": 16}):
        out = tri.mla_decode(q_lat, q_pe, cache, slots, lens, 0.2, cfg)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        torch.testing.assert_close(out[:1], ref.mla_decode(q_lat[:1], q_pe[:1], cache, slots[:1], lens[:1], 0.2),
                                   **F32_TOL)


@pytest.mark.parametrize("block_size", [1, 16, 64, 128])
@pytest.mark.parametrize("s_new", [1, 2])
def test_decode_paged_block_sizes_against_float64_golden(block_size, s_new):
    """Shuffled block tables, partial last blocks, very different lengths, NaN in unused blocks and past lens; the
    split boundaries (BLOCK_N 16) fall inside and across pages."""
    lens = [1 + s_new, 150, 17, 64] if block_size > 1 else [s_new, 40, 17]
    args = decode_inputs(lens, s_new, heads=4, rank=32, rope=16, block_size=block_size, seed=block_size)
    golden = paged.golden_decode(*args, 0.2)
    for cfg in ({"num_splits": 1, "BLOCK_N": 16}, {"num_splits": 3, "min_split_tokens": 16, "BLOCK_N": 16}):
        out = check_decode(*args, scale=0.2, cfg=cfg)
        torch.testing.assert_close(out.double(), golden, rtol=1e-5, atol=1e-5)


def test_decode_v1_layout_is_block_size_l():
    """v1's [N, L, R+P] cache with slots is v2 with block_size = L and block_table = slots[:, None]."""
    g = torch.Generator().manual_seed(7)
    cache = torch.randn(5, 40, 48, generator=g)
    slots, lens = torch.tensor([3, 0, 4]), torch.tensor([40, 9, 23])
    cache[0, 9:] = float("nan")
    q = torch.randn(3, 2, 4, 48, generator=g)
    args = (q[..., :32], q[..., 32:], cache, slots[:, None].to(torch.int32), lens)
    out = check_decode(*args, scale=0.2, cfg={"num_splits": 2, "min_split_tokens": 16, "BLOCK_N": 16})
    torch.testing.assert_close(out.double(), paged.golden_decode(*args, 0.2), rtol=1e-5, atol=1e-5)
