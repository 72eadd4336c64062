"""Realistic bugs, each planted in one operator of an otherwise-reference backend, for the suite's self-test: the
suite must fail every one of them and name the right operator (tests/test_conformance_selftest.py)."""

from __future__ import annotations

import dataclasses

import torch

from backends import cpu_ref
from backends.cpu_ref.attention import attention_prefill as _prefill
from backends.cpu_ref.attention import mla_decode as _decode
from backends.cpu_ref.moe import moe_gate as _gate
from core import registry
from core.backend import Availability, Backend
from core.ops import LinearWeight, compute_dtype


def rope_on_interleaved_pairs(x, cos, sin):
    """Rotates (x[2i], x[2i+1]) as the checkpoint's raw layout would, instead of the half layout."""
    ct = compute_dtype(x.dtype)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1] // 2,)
    c, s = cos.to(ct).reshape(shape), sin.to(ct).reshape(shape)
    x1, x2 = x[..., 0::2].to(ct), x[..., 1::2].to(ct)
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)


def gate_bias_in_weights(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring="sigmoid",
                         group_score="top2_sum"):
    """The correction bias leaks into the expert weights."""
    weights, ids = _gate(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score)
    s = torch.sigmoid(logits.float()) if scoring == "sigmoid" else torch.softmax(logits.float(), -1)
    biased = s + (bias.float() if bias is not None else 0)
    w = biased.gather(1, ids)
    if renorm:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return (w * scale).to(weights.dtype), ids


def gate_group_by_max(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring="sigmoid",
                      group_score="top2_sum"):
    """Groups scored by the other family's rule: by their best expert (V2) where the sum of their top two (V3) is
    asked for, and the other way round."""
    wrong = "max" if group_score == "top2_sum" else "top2_sum"
    return _gate(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, wrong)


def gate_not_renormalised(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring="sigmoid",
                          group_score="top2_sum"):
    return _gate(logits, bias, top_k, n_group, topk_group, scale, False, scoring, group_score)


def prefill_default_scale(q, k, v, cu_q, cu_k, scale):
    """Uses 1/sqrt(head_dim) (the YaRN mscale^2 factor missing) instead of the scale it was given."""
    return _prefill(q, k, v, cu_q, cu_k, q.shape[-1] ** -0.5)


def prefill_top_left_mask(q, k, v, cu_q, cu_k, scale):
    """Causal mask aligned to the top left: with a cached prefix, query i sees keys 0..i only."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        lq = bq[b + 1] - bq[b]
        if lq == 0:
            continue
        trimmed = torch.tensor([0, lq], dtype=torch.int32)
        out[bq[b]:bq[b + 1]] = _prefill(q[bq[b]:bq[b + 1]], k[bk[b]:bk[b] + lq], v[bk[b]:bk[b] + lq], trimmed,
                                        trimmed, scale)
    return out


def linear_scales_transposed(x, w):
    """FP8 block scales read with rows and columns swapped (the grid's data transposed)."""
    s = w.scale_inv
    if s is not None:
        s = s.t().contiguous().view(s.shape)
    return cpu_ref.linear(x, LinearWeight(w.weight, s))


def silu_on_up_half(x):
    inter = x.shape[-1] // 2
    return cpu_ref.silu_and_mul(torch.cat([x[..., inter:], x[..., :inter]], dim=-1))


def decode_one_position_too_many(q_lat, q_pe, cache, block_table, lens, scale):
    """Attends to one cache position past the sequence's length."""
    return _decode(q_lat, q_pe, cache, block_table, lens + 1, scale)


def decode_hard_coded_v3_scale(q_lat, q_pe, cache, block_table, lens, scale):
    """Ignores the scale it is given and uses DeepSeek-V3's 0.1352 (right for V3, wrong for any other model)."""
    return _decode(q_lat, q_pe, cache, block_table, lens, 0.1352337788608801)


def decode_last_block_off_by_one(q_lat, q_pe, cache, block_table, lens, scale):
    """Reads the last (partial) block of each sequence from the next table entry: an off-by-one in the block index
    (e.g. ceil where floor belongs) that only shows on the last page."""
    table = block_table.clone()
    bs = cache.shape[1]
    for b in range(table.shape[0]):
        last = (int(lens[b]) - 1) // bs
        if last + 1 < table.shape[1]:
            table[b, last] = block_table[b, last + 1]
    return _decode(q_lat, q_pe, cache, table, lens, scale)


def decode_ignores_block_table(q_lat, q_pe, cache, block_table, lens, scale):
    """Takes only each sequence's first block from the table and assumes the rest follow it contiguously (the v1
    layout): right for contiguous tables, wrong for shuffled ones."""
    table = block_table.clone()
    steps = torch.arange(table.shape[1], dtype=table.dtype, device=table.device)
    table[:] = (block_table[:, :1] + steps[None, :]) % cache.shape[0]
    return _decode(q_lat, q_pe, cache, table, lens, scale)


def add_rms_norm_fixed_eps(x, residual, weight, eps):
    return cpu_ref.add_rms_norm(x, residual, weight, 1e-6)


def rms_norm_fixed_eps(x, weight, eps):
    """A hard-coded epsilon of 1e-5 instead of the model's."""
    return cpu_ref.rms_norm(x, weight, 1e-5)


PLANTED = {
    "rope_on_interleaved_pairs": ("apply_rope", rope_on_interleaved_pairs),
    "gate_bias_in_weights": ("moe_gate", gate_bias_in_weights),
    "gate_group_by_max": ("moe_gate", gate_group_by_max),
    "gate_not_renormalised": ("moe_gate", gate_not_renormalised),
    "prefill_yarn_scale_missing": ("attention_prefill", prefill_default_scale),
    "prefill_top_left_mask": ("attention_prefill", prefill_top_left_mask),
    "linear_fp8_scales_transposed": ("linear", linear_scales_transposed),
    "silu_on_up_half": ("silu_and_mul", silu_on_up_half),
    "decode_one_position_too_many": ("mla_decode", decode_one_position_too_many),
    "rms_norm_wrong_eps": ("rms_norm", rms_norm_fixed_eps),
    "decode_hard_coded_v3_scale": ("mla_decode", decode_hard_coded_v3_scale),
    "decode_last_block_off_by_one": ("mla_decode", decode_last_block_off_by_one),
    "decode_ignores_block_table": ("mla_decode", decode_ignores_block_table),
    "add_rms_norm_ignores_eps": ("add_rms_norm", add_rms_norm_fixed_eps),
}
"""bug name -> (the operator it lives in, the buggy implementation)."""


def buggy_backend(bug: str) -> tuple[Backend, Availability]:
    """cpu_ref with one planted bug, as a backend the suite can judge."""
    op, impl = PLANTED[bug]
    ref = registry.load(registry.REFERENCE)  # with its manifest attached
    manifest = dataclasses.replace(ref.manifest, backend=f"bug-{bug}")
    backend = Backend(name=f"bug-{bug}", device_type="cpu", dist_backend="gloo", probe=ref.probe,
                      ops={**ref.ops, op: impl}, prepare_linear=ref.prepare_linear,
                      prepare_experts=ref.prepare_experts, manifest=manifest, origin="planted bug")
    return backend, ref.probe(None)
