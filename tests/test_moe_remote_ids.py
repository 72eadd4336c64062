"""moe_experts with ids of -1 (contract v2: an expert held by another process contributes nothing), for every
in-tree backend: cpu_ref against a float64 golden written out here, the Triton kernels (interpreter) and the Ascend
adapter through its emulation against cpu_ref on the same -1 routing, and the expert-parallel identity: the sum over
ranks of each rank's partial result (its own experts, local ids, the rest -1) equals the single-process result."""

from __future__ import annotations

import pytest
import torch

from tests.triton_support import poisoned_allocations, rel_err  # noqa: I001  (sets the Triton mode first)

from backends import cpu_ref
from core.fp8 import quantize_blocks
from core.ops import ExpertWeights
from tests.helpers import fresh_seed, golden_moe

F64 = torch.float64


@pytest.fixture
def g():
    return torch.Generator().manual_seed(fresh_seed())


def expert_tensors(g, e, d, inter, dtype=torch.float32):
    gate = torch.randn(e, inter, d, generator=g) * d ** -0.5
    up = torch.randn(e, inter, d, generator=g) * d ** -0.5
    down = torch.randn(e, d, inter, generator=g) * inter ** -0.5
    return [t.to(dtype) for t in (gate, up, down)]


def routing_with_remote(g, tokens, e, k, remote_fraction=0.4):
    """Distinct ids per row, about `remote_fraction` of them replaced by -1; one row all -1 when tokens > 2. A -1
    slot's weight is NaN, inf or 1e4: the contract ignores it, so a combine that multiplies it by zero fails."""
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    ids[torch.rand(tokens, k, generator=g) < remote_fraction] = -1
    if tokens > 2:
        ids[1] = -1
    weights = torch.rand(tokens, k, generator=g) * 0.8 + 0.1
    poison = torch.tensor([float("nan"), float("inf"), 1.0e4])
    weights[ids < 0] = poison[torch.arange(int((ids < 0).sum())) % 3]
    return weights, ids




def split_experts(ids, lo, hi):
    """The ids one rank holding experts [lo, hi) sees: local numbering, -1 elsewhere."""
    return torch.where((ids >= lo) & (ids < hi), ids - lo, torch.full_like(ids, -1))


def test_cpu_ref_skips_remote_ids_against_float64_golden(g):
    e, d, inter, tokens, k = 6, 40, 24, 9, 3
    gate, up, down = expert_tensors(g, e, d, inter, F64)
    x = torch.randn(tokens, d, generator=g, dtype=F64)
    weights, ids = routing_with_remote(g, tokens, e, k)
    weights = weights.double()
    got = cpu_ref.moe_experts(x, ExpertWeights(gate, up, down), weights, ids)
    assert torch.allclose(got, golden_moe(x, gate, up, down, weights, ids), rtol=1e-12, atol=1e-13)
    assert torch.equal(got[1], torch.zeros(d, dtype=F64)), "a row of only -1 ids gives 0"
    assert cpu_ref.moe_experts(x, ExpertWeights(gate, up, down), weights, torch.full_like(ids, -1)).abs().max() == 0


@pytest.mark.parametrize("ranks", [2, 3])
def test_cpu_ref_partial_sums_over_ranks_equal_the_whole(g, ranks):
    e, d, inter, tokens, k = 6, 32, 16, 11, 4
    gate, up, down = expert_tensors(g, e, d, inter, F64)
    x = torch.randn(tokens, d, generator=g, dtype=F64)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g, dtype=F64)
    whole = cpu_ref.moe_experts(x, ExpertWeights(gate, up, down), weights, ids)
    bounds = [e * r // ranks for r in range(ranks + 1)]
    parts = sum(cpu_ref.moe_experts(x, ExpertWeights(gate[lo:hi], up[lo:hi], down[lo:hi]), weights,
                                    split_experts(ids, lo, hi))
                for lo, hi in zip(bounds, bounds[1:]))
    assert torch.allclose(parts, whole, rtol=1e-12, atol=1e-13)


def test_w8a8_references_skip_remote_ids(g):
    from backends.cpu_ref.linear_int8 import moe_experts_w8a8_int8
    e, d, inter, tokens, k = 4, 128, 128, 6, 2
    (gq, gs), (uq, us), (dq, ds) = (quantize_blocks(t) for t in expert_tensors(g, e, d, inter))
    experts = ExpertWeights(gq, uq, dq, gs, us, ds)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64)  # float64: no combine-order rounding to hide in
    weights, ids = routing_with_remote(g, tokens, e, k)
    keep = ids >= 0
    for fn in (cpu_ref.NUMERICS["w8a8"]["moe_experts"], moe_experts_w8a8_int8):
        # zero weight on a real expert == that slot skipped (per-token quantisation does not depend on the slot)
        zeroed = fn(x, experts, weights.masked_fill(~keep, 0.0), ids.clamp(min=0))
        assert torch.allclose(fn(x, experts, weights, ids), zeroed, rtol=1e-12, atol=1e-13)


# -- the Triton kernels (interpreter on this machine) --------------------------------------------------------------

def _triton():
    pytest.importorskip("triton", reason="triton is not installed")
    import backends.triton_kernels as tk
    from backends.triton_kernels.moe_align import align_block_size
    return tk, align_block_size


def test_triton_align_leaves_remote_pairs_out(g):
    _, align_block_size = _triton()
    tokens, k, e, block = 9, 3, 6, 4
    _, ids = routing_with_remote(g, tokens, e, k)
    a = align_block_size(ids, e, block)
    flat = ids.reshape(-1)
    pairs = flat.numel()
    placed = a.sorted_pairs[a.sorted_pairs < pairs]
    assert sorted(placed.tolist()) == torch.nonzero(flat >= 0).flatten().tolist(), "local pairs once, -1 never"
    for b in range(a.num_blocks):
        rows = a.sorted_pairs[b * block:(b + 1) * block]
        rows = rows[rows < pairs].long()
        assert (flat[rows] == a.block_expert[b]).all()


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8", "float32"])
def test_triton_moe_experts_skip_remote_ids(g, fp8):
    tk, _ = _triton()
    e, d, inter, tokens, k = 5, 136, 128, 7, 3
    gate, up, down = expert_tensors(g, e, d, inter)
    x = torch.randn(tokens, d, generator=g)
    weights, ids = routing_with_remote(g, tokens, e, k)
    if fp8:
        raw = [t for w in (gate, up, down) for t in quantize_blocks(w)]
        ref = cpu_ref.NUMERICS["w8a8"]["moe_experts"](x, ExpertWeights(*raw[0::2], *raw[1::2]), weights, ids)
    else:
        raw = [gate, None, up, None, down, None]
        ref = golden_moe(x, gate, up, down, weights, ids).float()
    with poisoned_allocations():
        got = tk.moe_experts(x, tk.prepare_experts(*raw), weights, ids, cfg={"dot_fp32": True})
    assert not got.isnan().any(), "a skipped pair's row leaked into the combine"
    assert rel_err(got, ref) < 2e-6
    assert torch.equal(got[1], torch.zeros(d)), "a row of only -1 ids gives 0"


# -- Ascend through the torch_npu emulation ------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8-as-bf16", "float32"])
def test_ascend_moe_experts_skip_remote_ids(g, fp8):
    import emulation.torch_npu as emu
    from backends import ascend
    from backends.ascend import availability
    from core.fp8 import dequantize_blocks

    assert availability.simulate().ok
    e, d, inter, tokens, k = 8, 100, 40, 9, 3
    gate, up, down = expert_tensors(g, e, d, inter)
    x = torch.randn(tokens, d, generator=g)
    weights, ids = routing_with_remote(g, tokens, e, k)
    if fp8:
        raw = [t for w in (gate, up, down) for t in quantize_blocks(w)]
        as_bf16 = [dequantize_blocks(w, s, torch.bfloat16) for w, s in zip(raw[0::2], raw[1::2])]
        ref = golden_moe(x, *as_bf16, weights, ids).float()
    else:
        raw = [gate, None, up, None, down, None]
        ref = golden_moe(x, gate, up, down, weights, ids).float()
    entry = ascend.OPS["moe_experts"]
    impl = entry.impl if hasattr(entry, "impl") else entry
    with emu.configured(strict=True):  # strict: the rows init_routing drops are NaN, so a leak shows
        got = impl(x, ascend.prepare_experts(*raw), weights, ids)
    assert not got.isnan().any()
    assert rel_err(got, ref) < 2e-6
    assert torch.equal(got[1], torch.zeros(d))
