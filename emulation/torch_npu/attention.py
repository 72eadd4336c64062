"""`npu_fused_infer_attention_score` (torch_npu_ops.md §5.1): prefill and decode attention, dense or MLA.

Every layout is normalised to per-batch (N, Sq, D) queries and (Nkv, Skv, D) keys/values, attention runs there in
float32 with the mask of the sparse mode, and the result goes back out in the requested output layout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from emulation.torch_npu import paged_kv as paged
from emulation.torch_npu._common import (HALF_DTYPES, dtype_name, not_emulated, omitted_float, reject, require,
                                          strict_require, was_omitted)

LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "TND", "TND_NTD", "NTD",
           "NTD_TND")
MLA_DECODE_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_NBSD", "BSND_NBSD", "BSH_NBSD", "TND", "TND_NTD")
MLA_PREFILL_LAYOUTS = ("BSH", "BSND", "BNSD", "TND", "NTD", "NTD_TND")
MASK_SIDE = 2048
MASK_DTYPES = (torch.bool, torch.int8, torch.uint8)
INT_MAX = 2147483647
OP = "npu_fused_infer_attention_score"


def npu_fused_infer_attention_score(
    query: Tensor, key: Tensor, value: Tensor, *, pse_shift: Tensor | None = None, atten_mask: Tensor | None = None,
    actual_seq_lengths: list[int] | None = None, actual_seq_lengths_kv: list[int] | None = None,
    dequant_scale1: Tensor | None = None, quant_scale1: Tensor | None = None, dequant_scale2: Tensor | None = None,
    quant_scale2: Tensor | None = None, quant_offset2: Tensor | None = None, antiquant_scale: Tensor | None = None,
    antiquant_offset: Tensor | None = None, block_table: Tensor | None = None,
    query_padding_size: Tensor | None = None, kv_padding_size: Tensor | None = None,
    key_antiquant_scale: Tensor | None = None, key_antiquant_offset: Tensor | None = None,
    value_antiquant_scale: Tensor | None = None, value_antiquant_offset: Tensor | None = None,
    key_shared_prefix: Tensor | None = None, value_shared_prefix: Tensor | None = None,
    actual_shared_prefix_len: list[int] | None = None, query_rope: Tensor | None = None,
    key_rope: Tensor | None = None, key_rope_antiquant_scale: Tensor | None = None, num_heads: int = 1,
    scale: float = omitted_float(1.0), pre_tokens: int = INT_MAX, next_tokens: int = INT_MAX,
    input_layout: str = "BSH", num_key_value_heads: int = 0, sparse_mode: int = 0, inner_precise: int = 0,
    block_size: int = 0, antiquant_mode: int = 0, softmax_lse_flag: bool = False, key_antiquant_mode: int = 0,
    value_antiquant_mode: int = 0,
) -> tuple[Tensor, Tensor]:
    """out = softmax(scale * (q.k^T [+ q_rope.k_rope^T]) masked) . v, per batch and head, in float32.

    `scale` is taken literally: its default is 1.0, there is no implicit 1/sqrt(D). GQA: q head h reads kv head
    h // (num_heads // num_key_value_heads) (0 kv heads = num_heads). atten_mask: 1/True = MASKED OUT.
    sparse_mode 0: atten_mask (optional) plus the band i-pre <= j <= i+next; 1: atten_mask alone; 2: left-up causal
    (j > i masked); 3: right-down causal (j > i + Skv - Sq masked); 4: right-down band. 2/3/4 read the compressed
    (2048, 2048) mask triu(ones, 1). TND/NTD: actual_seq_lengths and actual_seq_lengths_kv are required Python lists
    of CUMULATIVE ends. Other layouts: per-batch lengths (1 entry = shared), default the full S.
    Returns (attention_out in the output layout with value's D and query's dtype, softmax_lse float32
    (B, N, Sq, 1) or (T, N, 1) when softmax_lse_flag, else zeros(1)).
    """
    _reject_unmodelled(pse_shift=pse_shift, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
                       dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2,
                       antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
                       query_padding_size=query_padding_size, kv_padding_size=kv_padding_size,
                       key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
                       value_antiquant_scale=value_antiquant_scale, value_antiquant_offset=value_antiquant_offset,
                       key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
                       actual_shared_prefix_len=actual_shared_prefix_len,
                       key_rope_antiquant_scale=key_rope_antiquant_scale)
    strict_require(not was_omitted(scale), OP, "scale was not passed; the kernel then uses 1.0, not 1/sqrt(D)")
    require(input_layout in LAYOUTS, OP, f"input_layout {input_layout!r} is not one of {LAYOUTS}")
    in_layout, _, out_layout = input_layout.partition("_")
    out_layout = out_layout or in_layout
    require(query.dtype in HALF_DTYPES, OP, f"query dtype {dtype_name(query.dtype)} is not float16/bfloat16")
    require(key.dtype == query.dtype and value.dtype == query.dtype, OP,
            f"key/value dtypes {dtype_name(key.dtype)}/{dtype_name(value.dtype)} must equal query's "
            f"(int8/int4 KV needs antiquant arguments, not emulated)")
    require((query_rope is None) == (key_rope is None), OP, "query_rope and key_rope go together")
    require(sparse_mode in (0, 1, 2, 3, 4), OP, f"sparse_mode={sparse_mode} is not supported (0-4)")
    for name, lengths in (("actual_seq_lengths", actual_seq_lengths), ("actual_seq_lengths_kv",
                                                                         actual_seq_lengths_kv)):
        require(lengths is None or (isinstance(lengths, (list, tuple)) and all(isinstance(v, int) for v in lengths)),
                OP, f"{name} must be a Python list of ints (not a tensor), got {type(lengths).__name__}")
    require(num_heads >= 1, OP, "num_heads must be >= 1")
    nkv = num_key_value_heads or num_heads
    require(num_heads % nkv == 0, OP, f"num_heads={num_heads} is not a multiple of num_key_value_heads={nkv}")
    require(num_heads <= 256, OP, f"num_heads={num_heads} exceeds 256")

    if block_table is not None:  # paged KV: key/value/key_rope are the caches; gather them densely (paged_kv.py)
        if in_layout in ("TND", "NTD"):
            not_emulated(OP, f"paged KV with layout {in_layout}")
        paged.check_table(block_table, query.shape[0], actual_seq_lengths_kv)
        mla_absorbed = query_rope is not None and query.shape[-1] == 512
        q_s = query.shape[2] if in_layout == "BNSD" else query.shape[1]
        paged.check_block_size(block_size, mla_absorbed, q_s == 1)
        lengths = _per_batch("actual_seq_lengths_kv", actual_seq_lengths_kv, query.shape[0], 1 << 30)

        def unpage(t: Tensor, name: str) -> Tensor:
            return paged.unpage(t, name, block_table, block_size, lengths, in_layout, nkv)
        dense_key = unpage(key, "key")
        value = dense_key if value is key else unpage(value, "value")  # absorbed MLA: one latent cache for both
        key = dense_key
        key_rope = None if key_rope is None else unpage(key_rope, "key_rope")
    else:
        require(block_size == 0, OP, f"block_size={block_size} without a block_table")

    varlen = in_layout in ("TND", "NTD")
    q = _heads_major(query, in_layout, num_heads, "query")
    k = _heads_major(key, in_layout, nkv, "key")
    v = _heads_major(value, in_layout, nkv, "value")
    qr = _heads_major(query_rope, in_layout, num_heads, "query_rope") if query_rope is not None else None
    kr = _heads_major(key_rope, in_layout, nkv, "key_rope") if key_rope is not None else None
    d, dv = q.shape[-1], v.shape[-1]
    require(k.shape[-1] == d, OP, f"key D={k.shape[-1]} must equal query D={d}")
    for name, dim in (("query", d), ("value", dv)):
        require(dim <= 512 and (dim * query.element_size()) % 16 == 0, OP,
                f"{name} head dim {dim} must be <= 512 and 16-byte aligned")
    mla = qr is not None
    if mla:
        _check_mla(q, k, v, qr, kr, key, value, num_heads, nkv, input_layout, sparse_mode, softmax_lse_flag,
                   actual_seq_lengths, varlen)
    else:
        require(num_heads // nkv <= 64, OP, f"num_heads/num_key_value_heads = {num_heads // nkv} exceeds 64")

    if varlen:
        q_spans, kv_spans = _varlen_spans(q, k, actual_seq_lengths, actual_seq_lengths_kv)
    else:
        q_spans, kv_spans = _batch_spans(q, k, actual_seq_lengths, actual_seq_lengths_kv)
    batches = len(q_spans)
    require(batches <= 65536, OP, f"B={batches} exceeds 65536")
    max_q = max((e - s for s, e in q_spans), default=0)
    max_kv = max((e - s for s, e in kv_spans), default=0)
    decode = (q.shape[-2] if not varlen else max_q) == 1
    if decode:
        require(max_kv <= 262144, OP, f"KV_S={max_kv} exceeds 262144 for decode")
    if decode and not mla:
        sparse_mode = 0  # documented: ignored for decode without rope
    if sparse_mode in (2, 3, 4):
        require(atten_mask is not None, OP, f"sparse_mode={sparse_mode} needs the compressed "
                                            f"({MASK_SIDE}, {MASK_SIDE}) atten_mask")
        require(tuple(atten_mask.shape) == (MASK_SIDE, MASK_SIDE), OP,
                f"sparse_mode={sparse_mode} takes the compressed ({MASK_SIDE}, {MASK_SIDE}) mask, got "
                f"{tuple(atten_mask.shape)}")
    if sparse_mode == 1:
        require(atten_mask is not None, OP, "sparse_mode=1 needs atten_mask")
    if atten_mask is not None:
        require(atten_mask.dtype in MASK_DTYPES, OP, f"atten_mask dtype {dtype_name(atten_mask.dtype)} is not "
                                                     f"bool/int8/uint8")

    group = num_heads // nkv
    out = q.new_zeros(q.shape[:-1] + (dv,), dtype=torch.float32)
    lse = torch.full(q.shape[:-1] + (1,), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batches):
        (q0, q1), (k0, k1) = q_spans[b], kv_spans[b]
        if q1 == q0:
            continue
        qb, kb, vb = _take(q, b, q0, q1, varlen), _take(k, b, k0, k1, varlen), _take(v, b, k0, k1, varlen)
        scores = torch.einsum("nqd,nkd->nqk", qb.float(), kb.float().repeat_interleave(group, 0))
        if mla:
            qrb, krb = _take(qr, b, q0, q1, varlen), _take(kr, b, k0, k1, varlen)
            scores = scores + torch.einsum("nqd,nkd->nqk", qrb.float(), krb.float().repeat_interleave(group, 0))
        scores = scores * scale
        masked = _mask(atten_mask, sparse_mode, pre_tokens, next_tokens, b, q1 - q0, k1 - k0,
                       max_q if varlen else q.shape[-2], max_kv if varlen else k.shape[-2], q.device)
        if masked is not None:
            scores = scores.masked_fill(masked, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf for a fully masked row or no keys
        live = torch.isfinite(row_lse)
        p = torch.where(live, torch.exp(scores - torch.where(live, row_lse, torch.zeros_like(row_lse))),
                        torch.zeros_like(scores))
        ob = torch.einsum("nqk,nkd->nqd", p, vb.float().repeat_interleave(group, 0))
        _put(out, b, q0, q1, varlen, ob)
        _put(lse, b, q0, q1, varlen, row_lse)
    attn = _to_layout(out.to(query.dtype), in_layout, out_layout, num_heads)
    if not softmax_lse_flag:
        return attn, torch.zeros(1, dtype=torch.float32, device=query.device)
    return attn, (lse.transpose(0, 1) if varlen else lse)


def _reject_unmodelled(**args: object) -> None:
    for name, value in args.items():
        if value is not None:
            not_emulated(OP, name)


def _heads_major(t: Tensor, layout: str, heads: int, name: str) -> Tensor:
    """(B, N, S, D) for BSH/BSND/BNSD; (N, T, D) for TND/NTD."""
    want = {"BSH": 3, "BSND": 4, "BNSD": 4, "TND": 3, "NTD": 3}[layout]
    require(t.dim() == want, OP, f"{name} must be {want}-D for layout {layout}, got {tuple(t.shape)}")
    if layout == "BSH":
        require(t.shape[-1] % heads == 0, OP, f"{name} hidden size {t.shape[-1]} is not a multiple of {heads} heads")
        t = t.view(t.shape[0], t.shape[1], heads, t.shape[-1] // heads)
        layout = "BSND"
    if layout == "BSND":
        t = t.transpose(1, 2)
    elif layout == "TND":
        t = t.transpose(0, 1)
    n = t.shape[0] if layout in ("TND", "NTD") else t.shape[1]
    require(n == heads, OP, f"{name} has {n} heads, expected {heads}")
    return t


def _check_mla(q: Tensor, k: Tensor, v: Tensor, qr: Tensor, kr: Tensor, key: Tensor, value: Tensor, num_heads: int,
               nkv: int, input_layout: str, sparse_mode: int, lse_flag: bool, actual_seq_lengths: list[int] | None,
               varlen: bool) -> None:
    """The documented limits of FIA's MLA forms: absorbed (D=512, KV_N=1) decode and non-absorbed (D=128) prefill."""
    require(qr.shape[-1] == 64 and kr.shape[-1] == 64, OP, "query_rope/key_rope head dim must be 64")
    d = q.shape[-1]
    require(d in (512, 128), OP, f"with query_rope, the query head dim must be 512 (absorbed) or 128, got {d}")
    if d == 512:
        require(nkv == 1, OP, "absorbed MLA (D=512) needs num_key_value_heads=1")
        require(num_heads in (1, 2, 4, 8, 16, 32, 64, 128), OP,
                f"absorbed MLA needs num_heads in 1,2,4,...,128, got {num_heads}")
        require(input_layout in MLA_DECODE_LAYOUTS, OP, f"absorbed MLA does not take layout {input_layout}")
        require(sparse_mode in (0, 3, 4), OP, f"absorbed MLA takes sparse_mode 0/3/4, got {sparse_mode}")
        require(not lse_flag, OP, "absorbed MLA does not return softmax_lse")
        require(v.shape[-1] == 512, OP, "absorbed MLA: value must be the 512-d latent cache")
        strict_require(key is value or torch.equal(key, value), OP,
                       "absorbed MLA reads key and value from the same latent cache")
        if varlen and actual_seq_lengths:
            ends = [0] + list(actual_seq_lengths)
            require(max(b - a for a, b in zip(ends, ends[1:])) <= 16, OP,
                    "TND MLA decode takes at most 16 query tokens per request")
            require(ends[-1] == q.shape[1], OP, "TND MLA decode: the last cumulative length must equal T")
    else:
        require(k.shape[-1] == 128 and v.shape[-1] == 128, OP, "non-absorbed MLA needs K_D = V_D = 128")
        require(input_layout in MLA_PREFILL_LAYOUTS, OP, f"non-absorbed MLA does not take layout {input_layout}")


def _cumulative(name: str, ends: list[int] | None, total: int) -> list[tuple[int, int]]:
    """Check a cumulative-ends list and turn it into (start, end) spans."""
    require(ends is not None and len(ends) > 0, OP, f"{name} is required for TND/NTD layouts (cumulative ends)")
    require(len(ends) <= 4096, OP, f"{name}: at most 4096 batches")
    require(list(ends) == sorted(ends) and ends[0] >= 0, OP, f"{name} must be cumulative (non-decreasing): {ends}")
    require(ends[-1] <= total, OP, f"{name} ends at {ends[-1]} but the tensor has {total} tokens")
    starts = [0] + list(ends[:-1])
    return list(zip(starts, ends))


def _varlen_spans(q: Tensor, k: Tensor, lq: list[int] | None,
                  lk: list[int] | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(start, end) token spans per batch from cumulative ends (TND/NTD)."""
    q_spans = _cumulative("actual_seq_lengths", lq, q.shape[1])
    kv_spans = _cumulative("actual_seq_lengths_kv", lk, k.shape[1])
    require(len(q_spans) == len(kv_spans), OP, "actual_seq_lengths and actual_seq_lengths_kv differ in length")
    return q_spans, kv_spans


def _per_batch(name: str, lengths: list[int] | None, batches: int, full: int) -> list[int]:
    """Per-batch lengths: None = the full S, one entry = shared, else the first B entries."""
    if lengths is None:
        return [full] * batches
    require(len(lengths) == 1 or len(lengths) >= batches, OP, f"{name} needs 1 or >= B={batches} entries")
    values = list(lengths) * batches if len(lengths) == 1 else list(lengths[:batches])
    require(all(0 <= v <= full for v in values), OP, f"{name} values must be in [0, {full}]: {values}")
    return values


def _batch_spans(q: Tensor, k: Tensor, lq: list[int] | None,
                 lk: list[int] | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(0, length) spans per batch for the padded layouts (BSH/BSND/BNSD)."""
    batches = q.shape[0]
    require(k.shape[0] == batches, OP, f"key batch {k.shape[0]} != query batch {batches}")
    sq = _per_batch("actual_seq_lengths", lq, batches, q.shape[2])
    skv = _per_batch("actual_seq_lengths_kv", lk, batches, k.shape[2])
    return [(0, s) for s in sq], [(0, s) for s in skv]


def _take(t: Tensor, b: int, start: int, end: int, varlen: bool) -> Tensor:
    """(N, S_b, D) rows of batch b."""
    return t[:, start:end] if varlen else t[b, :, start:end]


def _put(dst: Tensor, b: int, start: int, end: int, varlen: bool, value: Tensor) -> None:
    if varlen:
        dst[:, start:end] = value
    else:
        dst[b, :, start:end] = value


def _compressed(mask: Tensor, sq: int, skv: int, offset: int, device: torch.device) -> Tensor:
    """Read the (2048, 2048) compressed mask along the diagonal j - i - offset: entry (i, j) of a batch is the
    mask value at the same diagonal, so triu(ones, 1) masks j > i + offset and an inverted mask inverts it."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    delta = (j - i - offset).clamp(-(MASK_SIDE - 1), MASK_SIDE - 1)
    row = (-delta).clamp(min=0)
    return mask[row, row + delta].bool()


def _dense(mask: Tensor, b: int, sq: int, skv: int, full_q: int, full_kv: int) -> Tensor:
    shape = tuple(mask.shape)
    if len(shape) == 2 and full_q == 1 and shape[1] == full_kv and shape[0] != 1:
        return mask[b, :skv].bool()[None, :]  # decode (B, KV_S)
    if len(shape) == 4:
        require(shape[1] == 1 and shape[2:] == (full_q, full_kv), OP, f"atten_mask shape {shape} is not supported")
        return mask[b if shape[0] > 1 else 0, 0, :sq, :skv].bool()
    if len(shape) == 3:
        require(shape[0] == 1 and shape[1:] == (full_q, full_kv), OP, f"atten_mask shape {shape} is not supported")
        return mask[0, :sq, :skv].bool()
    require(len(shape) == 2 and shape == (full_q, full_kv), OP,
            f"atten_mask shape {shape} does not match (Q_S={full_q}, KV_S={full_kv})")
    return mask[:sq, :skv].bool()


def _mask(mask: Tensor | None, sparse_mode: int, pre: int, nxt: int, b: int, sq: int, skv: int, full_q: int,
          full_kv: int, device: torch.device) -> Tensor | None:
    """(Sq, Skv) bool, True = masked out, for batch b; None = nothing masked."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(skv, device=device)[None, :]
    if sparse_mode == 0:
        if mask is None:
            return None
        return _dense(mask, b, sq, skv, full_q, full_kv) | (j < i - pre) | (j > i + nxt)
    if sparse_mode == 1:
        return _dense(mask, b, sq, skv, full_q, full_kv)
    if sparse_mode == 2:
        return _compressed(mask, sq, skv, 0, device)
    offset = skv - sq
    if sparse_mode == 3:
        return _compressed(mask, sq, skv, offset, device)
    return (j > i + offset + nxt) | (j < i + offset - pre)  # 4: band around the right-down diagonal


def _to_layout(out: Tensor, in_layout: str, out_layout: str, heads: int) -> Tensor:
    """From (B, N, S, Dv) / (N, T, Dv) to the requested output layout."""
    if in_layout in ("TND", "NTD"):
        return out.transpose(0, 1).contiguous() if out_layout == "TND" else out.contiguous()
    b, n, s, dv = out.shape
    if out_layout == "BNSD":
        return out.contiguous()
    if out_layout == "NBSD":
        return out.transpose(0, 1).contiguous()
    bsnd = out.transpose(1, 2).contiguous()
    return bsnd.view(b, s, n * dv) if out_layout == "BSH" else bsnd


