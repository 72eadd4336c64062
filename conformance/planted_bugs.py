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
from core.fp8 import dequantize_blocks
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


# --- Numerics: a statistic, a softmax or a combine kept in the 16-bit working dtype where the contract says
# float32. Each lands within the absolute bf16 rows of the tolerance table; the relative verdict (error against
# cpu_ref's own) and the rounded-once invariant catch them.


def rms_norm_statistic_in_working_dtype(x, weight, eps):
    """mean(x^2) and its rsqrt in x.dtype (bfloat16 in a bf16 model) instead of float32."""
    ms = x.pow(2).mean(dim=-1, keepdim=True)  # rounded to x.dtype
    inv = torch.rsqrt(ms + eps).to(x.dtype)
    return (weight.to(compute_dtype(x.dtype)) * (x * inv).to(compute_dtype(x.dtype))).to(x.dtype)


def prefill_softmax_in_working_dtype(q, k, v, cu_q, cu_k, scale):
    """Scores and softmax rounded to q.dtype before P @ V (the contract: softmax in float32)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    ct = compute_dtype(q.dtype)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        lq, lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        if lq == 0:
            continue
        qb, kb, vb = q[bq[b]:bq[b + 1]], k[bk[b]:bk[b + 1]], v[bk[b]:bk[b + 1]]
        scores = (torch.einsum("qhd,khd->hqk", qb.to(ct), kb.to(ct)) * scale).to(q.dtype)
        allowed = torch.arange(lk)[None, :] <= (lk - lq) + torch.arange(lq)[:, None]
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")).to(ct), dim=-1).to(q.dtype)
        out[bq[b]:bq[b + 1]] = torch.einsum("hqk,khd->qhd", p.to(ct), vb.to(ct)).to(q.dtype)
    return out


def _expert(experts, e: int, ct: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert e's gate, up and down weights dequantised to ct (for the expert-loop bugs and variants below)."""
    return tuple(dequantize_blocks(w[e], None if scale is None else scale[e], ct)
                 for w, scale in ((experts.gate, experts.gate_scale), (experts.up, experts.up_scale),
                                  (experts.down, experts.down_scale)))


def experts_combine_in_working_dtype(x, experts, weights, ids):
    """Each expert's weighted output rounded to x.dtype and summed in x.dtype (the contract: combine in float32)."""
    ct = compute_dtype(x.dtype)
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[token].to(ct)
        gate, up, down = _expert(experts, e, ct)
        y = (torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)) @ down.T
        out.index_add_(0, token, (y * weights[token, slot, None].to(ct)).to(x.dtype))
    return out


# --- A stated invariant broken while golden stays close.


def add_rms_norm_normalises_unrounded_sum(x, residual, weight, eps):
    """Returns h rounded to x.dtype but normalises the float32 sum (the contract: normed == rms_norm(h))."""
    ct = compute_dtype(x.dtype)
    h32 = x.to(ct) + residual.to(ct)
    return cpu_ref.rms_norm(h32, weight, eps).to(x.dtype), h32.to(x.dtype)


# --- Wrong only past a tile boundary (no case below 65 tokens or >128 keys reaches them).


def linear_tail_tile_drops_partial_k(x, w):
    """With more than 64 rows, the last (partial) 64-row tile skips K's partial last 128-block."""
    out = cpu_ref.linear(x, w)
    t, k = x.shape
    tail, k_full = (t // 64) * 64, (k // 128) * 128
    if t > 64 and tail < t and k_full < k:
        ct = compute_dtype(x.dtype)
        weight = dequantize_blocks(w.weight, w.scale_inv, ct)[:, :k_full]
        out[tail:] = (x[tail:, :k_full].to(ct) @ weight.T).to(x.dtype)
    return out


def prefill_keys_capped_at_128(q, k, v, cu_q, cu_k, scale):
    """Each sequence's key loop stops after 128 keys (one tile too few for a long cached prefix)."""
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        lq, lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        if lq == 0:
            continue
        keep = min(lk, 128)
        # keys past 128 dropped; queries still aligned bottom-right against the keys that remain
        ks = slice(bk[b] + lk - keep, bk[b + 1]) if lk > 128 else slice(bk[b], bk[b + 1])
        trimmed_k = torch.tensor([0, keep], dtype=torch.int32)
        out[bq[b]:bq[b + 1]] = _prefill(q[bq[b]:bq[b + 1]], k[ks], v[ks],
                                        torch.tensor([0, lq], dtype=torch.int32), trimmed_k, scale)
    return out


def decode_verify_without_causal_mask(q_lat, q_pe, cache, block_table, lens, scale):
    """With S > 1 new tokens (MTP verification) every new token attends to all of them: the causal mask inside the
    verify step is missing. Plain decoding (S = 1) is right; the op level's S = 2 cases catch it, and the model
    level's MTP check in float32 through its verify-logits comparison (greedy tokens alone did not move)."""
    outs = [_decode(q_lat[:, s:s + 1], q_pe[:, s:s + 1], cache, block_table, lens, scale)
            for s in range(q_lat.shape[1])]
    return torch.cat(outs, dim=1) if outs else q_lat.new_empty(q_lat.shape)


# --- Optional arguments absent.


def gate_without_bias_skips_groups(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring="sigmoid",
                                   group_score="top2_sum"):
    """Without a correction bias the kernel takes its 'ungrouped' path: top_k of all experts, groups ignored."""
    if bias is None:
        return _gate(logits, bias, top_k, 1, 1, scale, renorm, scoring, group_score)
    return _gate(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score)


def linear_float_weight_in_bfloat16(x, w):
    """A weight without block scales (a float weight: the router) is cast to bfloat16 for the GEMM."""
    if w.scale_inv is None and w.weight.dtype != torch.float64:
        return cpu_ref.linear(x, LinearWeight(w.weight.to(torch.bfloat16), None))
    return cpu_ref.linear(x, w)


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
    # the classes of issue 12: numerics in the working dtype, a broken invariant, past a tile, optional args
    "rms_norm_statistic_in_working_dtype": ("rms_norm", rms_norm_statistic_in_working_dtype),
    "prefill_softmax_in_working_dtype": ("attention_prefill", prefill_softmax_in_working_dtype),
    "experts_combine_in_working_dtype": ("moe_experts", experts_combine_in_working_dtype),
    "add_rms_norm_normalises_unrounded_sum": ("add_rms_norm", add_rms_norm_normalises_unrounded_sum),
    "linear_tail_tile_drops_partial_k": ("linear", linear_tail_tile_drops_partial_k),
    "prefill_keys_capped_at_128": ("attention_prefill", prefill_keys_capped_at_128),
    "gate_without_bias_skips_groups": ("moe_gate", gate_without_bias_skips_groups),
    "linear_float_weight_in_bfloat16": ("linear", linear_float_weight_in_bfloat16),
    "decode_verify_without_causal_mask": ("mla_decode", decode_verify_without_causal_mask),
}
"""bug name -> (the operator it lives in, the buggy implementation)."""


# --- Legitimate variants: implementations that differ from cpu_ref only where the contract allows (the rounding the
# tolerance table's reasons name: P rounded to the working dtype for the P @ V product as flash attention kernels do,
# the SwiGLU product rounded between the expert GEMMs, another float32 reduction order). They calibrate the relative
# verdict for numerics the Triton interpreter cannot show (its bf16 stores truncate) and must pass every check.


def prefill_flash_p_rounded(q, k, v, cu_q, cu_k, scale):
    ct = compute_dtype(q.dtype)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bq) - 1):
        lq, lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        if lq == 0:
            continue
        qb, kb, vb = q[bq[b]:bq[b + 1]].to(ct), k[bk[b]:bk[b + 1]].to(ct), v[bk[b]:bk[b + 1]].to(ct)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        allowed = torch.arange(lk)[None, :] <= (lk - lq) + torch.arange(lq)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # [H, q, k]
        o = torch.einsum("hqk,khd->qhd", e.to(q.dtype).to(ct), vb) / e.sum(-1).transpose(0, 1)[..., None]
        out[bq[b]:bq[b + 1]] = o.to(q.dtype)
    return out


def decode_flash_p_rounded(q_lat, q_pe, cache, block_table, lens, scale):
    from backends.cpu_ref.attention import gather_pages

    ct = compute_dtype(q_lat.dtype)
    bsz, s_new, _, rank = q_lat.shape
    if bsz == 0:
        return q_lat.new_empty(q_lat.shape)
    lens = lens.long()
    kv = gather_pages(cache, block_table, lens).to(ct)
    latent, rope_key = kv[..., :rank], kv[..., rank:]
    scores = (torch.einsum("bshr,btr->bsht", q_lat.to(ct), latent)
              + torch.einsum("bshp,btp->bsht", q_pe.to(ct), rope_key)) * scale
    last = lens[:, None] - s_new + torch.arange(s_new)[None, :]
    allowed = torch.arange(kv.shape[1])[None, None, :] <= last[:, :, None]
    scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    o = torch.einsum("bsht,btr->bshr", e.to(q_lat.dtype).to(ct), latent) / e.sum(-1)[..., None]
    return o.to(q_lat.dtype)


def experts_swiglu_rounded(x, experts, weights, ids):
    """The SwiGLU product rounded to x.dtype before the down GEMM (as grouped-GEMM kernels store it)."""
    ct = compute_dtype(x.dtype)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=ct)
    for e in torch.unique(ids).tolist():
        if e < 0:
            continue
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        xe = x[token].to(ct)
        gate, up, down = _expert(experts, e, ct)
        h = (torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)).to(x.dtype).to(ct)
        out.index_add_(0, token, (h @ down.T) * weights[token, slot, None].to(ct))
    return out.to(x.dtype)


def linear_split_k(x, w):
    """Four K-slices accumulated separately in float32 and summed (a split-K GEMM's reduction order)."""
    ct = compute_dtype(x.dtype)
    weight = dequantize_blocks(w.weight, w.scale_inv, ct)
    parts = [xs.to(ct) @ ws.T for xs, ws in zip(x.chunk(4, dim=-1), weight.chunk(4, dim=-1))] if x.shape[-1] >= 4 \
        else [x.to(ct) @ weight.T]
    return sum(parts[1:], parts[0]).to(x.dtype)


def rms_norm_two_pass(x, weight, eps):
    """Sum of squares in two halves (another float32 reduction order), rsqrt, one rounding."""
    ct = compute_dtype(x.dtype)
    xf = x.to(ct)
    half = xf.shape[-1] // 2
    ms = (xf[..., :half].pow(2).sum(-1, keepdim=True) + xf[..., half:].pow(2).sum(-1, keepdim=True)) / xf.shape[-1]
    return (weight.to(ct) * (xf * torch.rsqrt(ms + eps))).to(x.dtype)


LEGITIMATE = {
    "prefill_flash_p_rounded": ("attention_prefill", prefill_flash_p_rounded),
    "decode_flash_p_rounded": ("mla_decode", decode_flash_p_rounded),
    "experts_swiglu_rounded": ("moe_experts", experts_swiglu_rounded),
    "linear_split_k": ("linear", linear_split_k),
    "rms_norm_two_pass": ("rms_norm", rms_norm_two_pass),
}
"""variant name -> (the operator it replaces, an implementation the contract allows): must never fail."""


def buggy_backend(bug: str) -> tuple[Backend, Availability]:
    """cpu_ref with one planted bug (or one legitimate variant), as a backend the suite can judge."""
    op, impl = PLANTED[bug] if bug in PLANTED else LEGITIMATE[bug]
    ref = registry.load(registry.REFERENCE)  # with its manifest attached
    manifest = dataclasses.replace(ref.manifest, backend=f"bug-{bug}")
    backend = Backend(name=f"bug-{bug}", device_type="cpu", dist_backend="gloo", probe=ref.probe,
                      ops={**ref.ops, op: impl}, prepare_linear=ref.prepare_linear,
                      prepare_experts=ref.prepare_experts, manifest=manifest, origin="planted bug")
    return backend, ref.probe(None)
