"""attention_prefill and mla_decode through npu_fused_infer_attention_score (FIA).

Prefill: TND layout, actual_seq_lengths / actual_seq_lengths_kv as CUMULATIVE Python lists, sparse_mode 3
(right-down causal, so a cached prefix is visible) with the compressed 2048x2048 mask triu(ones, 1) where
True = masked out. DeepSeek-V3's shape (q/k 192 = 128 + 64, v 128) uses FIA's MLA form with query_rope/key_rope,
as vllm-ascend does; other shapes use the plain form with head dims zero-padded to a common aligned width.
Decode (contract v2): FIA reads the paged latent cache itself through its own `block_table` (int32, per-sequence
rows) and `block_size`, in BSND with KV_N = 1 (the cache [blocks, block_size, R+P] is FIA's BnBsH key layout), with
per-sequence actual_seq_lengths_kv; nothing is gathered per step. R = 512 / P = 64 uses the absorbed MLA form
(the latent columns as key AND value, the rope columns as key_rope, both strided views of the one cache); other
shapes the plain GQA form over the whole [latent | rope] row with the output cut back to R (this needs a 16-byte
aligned row, since a paged cache cannot be padded without copying it). Block sizes are FIA's: a multiple of 16 (up
to 512 here; the plain form with S > 1 goes to FIA's prefill kernel and needs a multiple of 128).
S > 1 new tokens (MTP verification) use sparse_mode 3; S = 1 needs no mask.
The softmax scale is ALWAYS passed: FIA's default is 1.0, not 1/sqrt(D).
"""

from __future__ import annotations

import torch
from torch import Tensor

from backends.ascend.runtime import torch_npu

MASK_SIDE = 2048
HALF = (torch.float16, torch.bfloat16)
_masks: dict[torch.device, Tensor] = {}


def causal_mask(device: torch.device) -> Tensor:
    """The compressed mask sparse_mode 2/3/4 read: (2048, 2048) bool, True above the diagonal = masked out."""
    if device not in _masks:
        _masks[device] = torch.triu(torch.ones(MASK_SIDE, MASK_SIDE, dtype=torch.bool, device=device), diagonal=1)
    return _masks[device]


def aligned_width(d: int, dtype: torch.dtype) -> int:
    """The smallest width >= d whose rows are 16-byte aligned (FIA's head-dim rule)."""
    per = 16 // torch.empty(0, dtype=dtype).element_size()
    return -(-d // per) * per


def _pad(t: Tensor, width: int) -> Tensor:
    return t if t.shape[-1] == width else torch.nn.functional.pad(t, (0, width - t.shape[-1]))


def _mla_prefill_shape(dqk: int, dv: int) -> bool:
    return dqk == 192 and dv == 128


# -- attention_prefill -------------------------------------------------------------------------------------------


def prefill_supports(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> str | None:
    """None when FIA can run this call, else why it goes to cpu_ref."""
    if q.dtype not in HALF or k.dtype != q.dtype or v.dtype != q.dtype:
        return "FIA takes float16/bfloat16 only"
    if q.shape[1] > 256:
        return "more than 256 heads"
    if cu_q.numel() - 1 > 4096:
        return "more than 4096 sequences in one TND call"
    dqk, dv = q.shape[-1], v.shape[-1]
    if not _mla_prefill_shape(dqk, dv) and aligned_width(max(dqk, dv), q.dtype) > 512:
        return "head dim above 512"
    return None


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float) -> Tensor:
    """q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv]; cu_q, cu_k [B+1] int32 starts -> [Tq, H, Dv] in q.dtype.
    Query i of a sequence with a cached prefix of Lk - Lq keys attends to keys 0 .. (Lk - Lq) + i."""
    tq, heads, dqk = q.shape
    dv = v.shape[-1]
    if tq == 0:
        return q.new_zeros(0, heads, dv)
    single_query = int((cu_q[1:] - cu_q[:-1]).max()) == 1
    # One query per sequence routes FIA to its decode kernel, which ignores sparse_mode and would read the 2048^2
    # mask as a dense one; a single bottom-right query sees every key anyway, so it needs no mask.
    common = dict(num_heads=heads, num_key_value_heads=heads, input_layout="TND",
                  atten_mask=None if single_query else causal_mask(q.device), sparse_mode=0 if single_query else 3,
                  scale=scale, actual_seq_lengths=cu_q[1:].tolist(), actual_seq_lengths_kv=cu_k[1:].tolist())
    if _mla_prefill_shape(dqk, dv):
        out, _lse = torch_npu.npu_fused_infer_attention_score(
            q[..., :128].contiguous(), k[..., :128].contiguous(), v.contiguous(),
            query_rope=q[..., 128:].contiguous(), key_rope=k[..., 128:].contiguous(), **common)
        return out
    width = aligned_width(max(dqk, dv), q.dtype)  # zero columns change neither q.k nor the kept output columns
    out, _lse = torch_npu.npu_fused_infer_attention_score(_pad(q, width), _pad(k, width), _pad(v, width), **common)
    return out[..., :dv].contiguous()


# -- mla_decode --------------------------------------------------------------------------------------------------


def _mla_decode_shape(q_lat: Tensor, q_pe: Tensor) -> bool:
    return q_lat.shape[-1] == 512 and q_pe.shape[-1] == 64 and q_lat.shape[2] in (1, 2, 4, 8, 16, 32, 64, 128)


def decode_supports(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor,
                    scale: float) -> str | None:
    """None when FIA can run this call, else why it goes to cpu_ref."""
    if q_lat.dtype not in HALF or q_pe.dtype != q_lat.dtype or cache.dtype != q_lat.dtype:
        return "FIA takes float16/bfloat16 only"
    b, s, heads, r = q_lat.shape
    block_size = cache.shape[1]
    if b > 65536:
        return "more than 65536 sequences"
    if s > 16:
        return "more than 16 new tokens per sequence"
    if b and int(lens.max()) > 262144:
        return "more than 262144 cached tokens"
    if block_size % 16 or block_size > 512:
        return f"FIA's paged KV takes block sizes that are multiples of 16 up to 512, not {block_size}"
    if _mla_decode_shape(q_lat, q_pe):
        return None
    if heads > 64:
        return "plain FIA with one KV head takes at most 64 query heads (the MLA form needs R=512, P=64)"
    width = r + q_pe.shape[-1]
    if aligned_width(width, q_lat.dtype) != width or width > 512:
        return "latent + rope row not 16-byte aligned or above 512 outside the MLA form (R=512, P=64)"
    if s > 1 and block_size % 128:
        return f"plain FIA with S > 1 runs the prefill kernel, whose paged KV needs a multiple of 128, not {block_size}"
    return None


def mla_decode(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor, scale: float) -> Tensor:
    """q_lat [B, S, H, R], q_pe [B, S, H, P], paged cache [blocks, block_size, R+P] (latent then rope key),
    block_table [B, max_blocks] int32, lens [B] (including the S new tokens) -> o_lat [B, S, H, R] in q_lat.dtype.
    New token s sees positions 0 .. lens-S+s; FIA reads only the blocks the table names for lens[b] positions."""
    b, s, heads, r = q_lat.shape
    if b == 0:
        return q_lat.new_empty(q_lat.shape)
    common = dict(num_heads=heads, num_key_value_heads=1, input_layout="BSND", scale=scale,
                  actual_seq_lengths_kv=lens.tolist(), block_table=block_table.to(torch.int32),
                  block_size=cache.shape[1], sparse_mode=3 if s > 1 else 0,
                  atten_mask=causal_mask(q_lat.device) if s > 1 else None)
    if _mla_decode_shape(q_lat, q_pe):
        latent = cache[..., :r]  # (blocks, block_size, 512): key and value are the same latent cache
        out, _lse = torch_npu.npu_fused_infer_attention_score(
            q_lat.contiguous(), latent, latent, query_rope=q_pe.contiguous(), key_rope=cache[..., r:], **common)
        return out
    q = torch.cat((q_lat, q_pe), dim=-1)
    out, _lse = torch_npu.npu_fused_infer_attention_score(q, cache, cache, **common)
    return out[..., :r].contiguous()
