"""Triton MLA attention: varlen causal flash prefill and split-KV absorbed decode over the latent cache.

Both kernels implement the contract in `core.ops` (the executable specification is `backends/cpu_ref/attention.py`)
and are written once for every Triton target; each backend passes its tuning as a plain `cfg` dict. No vendor
branches live here, and nothing is autotuned (the interpreter cannot run `@triton.autotune`).

`attention_prefill` (flash attention, online softmax in fp32):
  grid (tiles, H): one program per (BLOCK_M query rows of one sequence, one head). Tiles of all sequences are
  numbered consecutively; the grid is the host-known upper bound cdiv(Tq, BLOCK_M) + B, so there is no host sync,
  and each program finds its sequence by counting the tile prefix sums at or below its id (surplus programs
  exit at once). Keys stream in BLOCK_N blocks: blocks every row of the tile may see run unmasked, the diagonal
  blocks (bottom-right causal: row i sees keys <= Lk - Lq + i) run masked. The QK head dim is split into a
  power-of-two part and a padded remainder (192 = 128 + 64), so no FLOPs are wasted on padding.

`mla_decode` (the FlashMLA / SGLang two-stage layout, with FlagGems' many heads per program) over the paged cache:
  stage 1 grid (ceil(H / BLOCK_H), max_splits, B): BLOCK_H heads x S new tokens form the M = BLOCK_S*BLOCK_H rows
  of each dot, so a [BLOCK_N, R+P] cache tile is loaded once for all of them and serves as K (all R+P columns)
  and V (the first R). Each sequence is cut into n_b = clamp(ceil(lens_b / min_split_tokens), 1, max_splits)
  splits of a BLOCK_N-aligned length, computed on the device from `lens` (no host sync). Stage 1 writes each
  split's normalised partial output and base-2 log-sum-exp; stage 2, grid (B, S*H), merges them. With
  max_splits == 1 stage 1 writes the final output itself and stage 2 is skipped. Each cache row of a BLOCK_N tile
  is addressed through the block table (page = block: position t is block_table[b, t // PAGE], row t % PAGE, PAGE
  a compile-time constant), so any page size works (1, 16, 64, 128 are tested) and a tile may span pages. Loads of
  the table and of the cache are masked at lens[b], so cache rows at or past lens[b] and table entries past
  ceil(lens[b] / PAGE) are never read.

cfg keys (all optional; the defaults are in `_prefill_plan` / `_decode_plan`):
  prefill: BLOCK_M, BLOCK_N, num_warps, num_stages (16-bit default 128 x 64, 8 warps, 3 stages; float32 32 x 16).
  decode:  BLOCK_H (heads per program), BLOCK_N, num_warps, num_stages (16-bit default M = 64 rows, BLOCK_N 32,
           8 warps, 3 stages; M = 16 rows: BLOCK_N 64, 4 warps, 2 stages), num_splits (fixed max splits per
           sequence), max_splits (cap for the heuristic, 64), min_split_tokens (max(256, 8*S*H)), waves (target
           programs per SM for the heuristic, 1), stage2_num_warps (4).
  both:    num_sms, max_shared_mem (default: the device's; defaults that cfg does not pin are shrunk to fit it),
           dot_precision, dot_fp32, and waves_per_eu, matrix_instr_nonkdim, kpack (passed to the launch only when
           present, e.g. for AMD).
  dot_precision: tl.dot input_precision ("ieee" by default so float32 inputs are not rounded to tf32; it has no
  effect on 16-bit inputs). dot_fp32: widen dot operands to fp32 in-kernel (default: only when TRITON_INTERPRET=1,
  because the interpreter's tl.dot multiplies the raw storage bits of bfloat16 operands).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
_LAUNCH_PASSTHROUGH = ("waves_per_eu", "matrix_instr_nonkdim", "kpack")
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _launch_kwargs(cfg: dict, num_warps: int, num_stages: int) -> dict:
    kw = {"num_warps": num_warps, "num_stages": num_stages}
    kw.update({k: cfg[k] for k in _LAUNCH_PASSTHROUGH if k in cfg})
    return kw


@functools.lru_cache(maxsize=None)
def _device_properties(device: torch.device) -> dict:
    """Triton's view of a GPU (multiprocessor_count, max_shared_mem, ...), the same on every Triton target."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(triton.runtime.driver.active.utils.get_device_properties(index))


def _num_sms(device: torch.device, cfg: dict) -> int:
    """Streaming multiprocessors / compute units to fill (cfg "num_sms" wins; the interpreter gets a small 4)."""
    if "num_sms" in cfg:
        return int(cfg["num_sms"])
    if device.type == "cuda":
        return int(_device_properties(device)["multiprocessor_count"])
    return 4


def _max_shared_mem(device: torch.device, cfg: dict) -> int | None:
    """Shared memory (LDS) one program may use, in bytes; None when unknown (the interpreter has no limit)."""
    if "max_shared_mem" in cfg:
        return int(cfg["max_shared_mem"])
    if device.type == "cuda":
        return int(_device_properties(device)["max_shared_mem"])
    return None


def _fit_smem(plan: dict, cfg: dict, need: Callable[[dict], int], limit: int | None,
              shrink: tuple[tuple[str, int], ...]) -> None:
    """Shrink the knobs that cfg leaves to the defaults, in `shrink` order ((key, floor): num_stages by one, block
    sizes by half), until need(plan) <= limit bytes. Only a conservative estimate: explicit cfg values are kept."""
    if limit is None:
        return
    for key, floor in shrink:
        while need(plan) > limit and key not in cfg and plan[key] > floor:
            plan[key] = plan[key] - 1 if key == "num_stages" else plan[key] // 2


def _upcast_dots(cfg: dict) -> bool:
    """Whether tl.dot operands are widened to fp32 in-kernel: by default only under the Triton interpreter, whose
    bfloat16 dot is wrong (cfg "dot_fp32" overrides)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
    return bool(cfg.get("dot_fp32", interpreted))


def _split_dim(d: int) -> tuple[int, int, bool]:
    """Split a head dim into a power-of-two part and a padded remainder: (D_A, BLOCK_DB, has_remainder)."""
    d_a = 1 << (d.bit_length() - 1)
    if d_a < 16:  # tl.dot needs K >= 16: pad a tiny head dim as a whole
        return max(16, _next_pow2(d)), 16, False
    rest = d - d_a
    return d_a, max(16, _next_pow2(rest)), rest > 0


def _check_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"triton attention: {name} has dtype {t.dtype}; supported: {', '.join(map(str, _SUPPORTED))}")


# ----------------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions that may run out of bounds (masked elements read as 0)."""
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST widens both operands to fp32 first (exact, same products). Only the
    Triton interpreter needs it: its tl.dot multiplies the raw uint16 storage of bfloat16 operands."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        c = tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _online_softmax_step(s, m_i, l_i, acc, v, MASKED: tl.constexpr, UPCAST: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """One flash step on base-2 scores s [M, N] (fp32, -inf where masked) and values v [N, Dv].

    Returns the updated running max m_i [M], sum l_i [M] and unnormalised accumulator acc [M, Dv] (fp32). A row
    with every score masked so far keeps m_i = -inf, l_i = 0, acc = 0 (no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, UPCAST, DOT_PRECISION)
    return m_new, l_i, acc


# ----------------------------------------------------------------------------------------------------------------
# Prefill: varlen causal flash attention
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _prefill_step(
    qa, qb, m_i, l_i, acc, k_rows, v_rows, n0, k_len, prefix, offs_m, offs_n, offs_da, offs_db, offs_dv,
    stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
    D_QK: tl.constexpr, D_V: tl.constexpr, HAS_DB: tl.constexpr, EVEN_DA: tl.constexpr, EVEN_DB: tl.constexpr,
    EVEN_DV: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N block of keys n0.. for the tile's rows; MASKED applies the causal and end-of-keys masks."""
    n = n0 + offs_n
    key_ok = n < k_len
    kp = k_rows + n.to(tl.int64)[:, None] * stride_kt
    ka = _load_tile(kp + offs_da[None, :] * stride_kd, key_ok, offs_da < D_QK, MASKED, not EVEN_DA)
    s = _dot(qa, tl.trans(ka.to(qa.dtype)), None, UPCAST, DOT_PRECISION)
    if HAS_DB:
        kb = _load_tile(kp + offs_db[None, :] * stride_kd, key_ok, offs_db < D_QK, MASKED, not EVEN_DB)
        s = _dot(qb, tl.trans(kb.to(qb.dtype)), s, UPCAST, DOT_PRECISION)
    s = s * qk_scale
    if MASKED:
        allowed = (n[None, :] <= (prefix + offs_m)[:, None]) & key_ok[None, :]
        s = tl.where(allowed, s, float("-inf"))
    vp = v_rows + n.to(tl.int64)[:, None] * stride_vt
    v = _load_tile(vp + offs_dv[None, :] * stride_vd, key_ok, offs_dv < D_V, MASKED, not EVEN_DV)
    return _online_softmax_step(s, m_i, l_i, acc, v, MASKED, UPCAST, DOT_PRECISION)


@triton.jit
def _prefill_kernel(
    Q, K, V, O, CU_Q, CU_K, TILE_CU, num_seqs, qk_scale,
    stride_qt, stride_qh, stride_qd, stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd, stride_ot, stride_oh, stride_od,
    D_QK: tl.constexpr, D_V: tl.constexpr, D_A: tl.constexpr, BLOCK_DB: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    # The sequence owning tile `pid` = how many sequences have all their tiles before it.
    seq = pid * 0
    for j0 in range(0, num_seqs, SEARCH_BLOCK):
        idx = j0 + tl.arange(0, SEARCH_BLOCK)
        tile_end = tl.load(TILE_CU + 1 + idx, mask=idx < num_seqs, other=2147483647)
        seq += tl.sum((tile_end <= pid).to(tl.int32), 0)
    if seq >= num_seqs:
        return  # surplus program of the upper-bound grid

    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    prefix = k_len - q_len
    m0 = (pid - tl.load(TILE_CU + seq)) * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, D_A)
    offs_db = D_A + tl.arange(0, BLOCK_DB)
    offs_dv = tl.arange(0, BLOCK_DV)
    EVEN_DA: tl.constexpr = D_A <= D_QK
    EVEN_DB: tl.constexpr = D_A + BLOCK_DB == D_QK
    EVEN_DV: tl.constexpr = BLOCK_DV == D_V
    row_ok = offs_m < q_len

    q_rows = Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
    qa = _load_tile(q_rows + offs_da[None, :] * stride_qd, row_ok, offs_da < D_QK, True, not EVEN_DA)
    if HAS_DB:
        qb = _load_tile(q_rows + offs_db[None, :] * stride_qd, row_ok, offs_db < D_QK, True, not EVEN_DB)
    else:
        qb = qa
    k_rows = K + head * stride_kh + k_start.to(tl.int64) * stride_kt
    v_rows = V + head * stride_vh + k_start.to(tl.int64) * stride_vt

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    # Keys < prefix + m0 + 1 are visible to every row of the tile (and < k_len): whole blocks of them need no mask.
    full_end = ((prefix + m0 + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(k_len, prefix + m0 + BLOCK_M)
    for n0 in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _prefill_step(
            qa, qb, m_i, l_i, acc, k_rows, v_rows, n0, k_len, prefix, offs_m, offs_n, offs_da, offs_db, offs_dv,
            stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
            D_QK, D_V, HAS_DB, EVEN_DA, EVEN_DB, EVEN_DV, False, UPCAST, DOT_PRECISION,
        )
    for n0 in range(full_end, hi, BLOCK_N):
        m_i, l_i, acc = _prefill_step(
            qa, qb, m_i, l_i, acc, k_rows, v_rows, n0, k_len, prefix, offs_m, offs_n, offs_da, offs_db, offs_dv,
            stride_kt, stride_kd, stride_vt, stride_vd, qk_scale,
            D_QK, D_V, HAS_DB, EVEN_DA, EVEN_DB, EVEN_DV, True, UPCAST, DOT_PRECISION,
        )

    l_i = tl.where(row_ok, l_i, 1.0)  # padded rows are not stored; keep them finite
    out = acc / l_i[:, None]
    o_ptrs = O + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh
    tl.store(o_ptrs + offs_dv[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < D_V)[None, :])


def _prefill_plan(q: Tensor, v: Tensor, cfg: dict) -> dict:
    """Blocking for attention_prefill: cfg wins; defaults are the FlashAttention-2 Hopper shape for 16-bit inputs
    (128 x 64 tiles, 8 warps, 3 stages) and small tiles for float32 (its dots run on CUDA cores), shrunk until the
    operand buffers fit the device's shared memory."""
    d_qk, d_v = q.shape[2], v.shape[2]
    small = q.element_size() <= 2
    plan = {"BLOCK_M": 128 if small else 32, "BLOCK_N": 64 if small else 16, "num_warps": 8 if small else 4,
            "num_stages": 3 if small else 2}
    elt = q.element_size()
    # shared memory ~ the Q tile + num_stages x (K tile + V tile)
    need = lambda p: elt * (p["BLOCK_M"] * d_qk + p["num_stages"] * p["BLOCK_N"] * (d_qk + d_v))  # noqa: E731
    plan.update({k: int(cfg[k]) for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in cfg})
    _fit_smem(plan, cfg, need, _max_shared_mem(q.device, cfg),
              (("num_stages", 1), ("BLOCK_N", 16), ("BLOCK_M", 16)))
    plan["dot_precision"] = cfg.get("dot_precision", "ieee")
    return plan


def attention_prefill(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, scale: float,
                      cfg: dict | None = None, *, out: Tensor | None = None) -> Tensor:
    """Varlen causal flash attention, bottom-right aligned (the naive MLA prefill), softmax in float32.

    q: [Tq, H, Dqk], k: [Tk, H, Dqk], v: [Tk, H, Dv]; float32/bfloat16/float16, any strides (a stride-0 expand
    of a shared key part is fine). cu_q, cu_k: [B+1] int32 (any int dtype) cumulative starts; sequence b has
    Lq_b = cu_q[b+1]-cu_q[b] queries and Lk_b >= Lq_b keys, and its query i attends to keys 0 .. Lk_b - Lq_b + i.
    Lq_b = 0 is allowed (Lk_b < Lq_b is a contract violation and is not checked: it would need a host sync).
    scale: multiplies q.k. cfg: tuning knobs (module docstring). out: optional [Tq, H, Dv] q.dtype buffer to fill.
    Returns [Tq, H, Dv] in q.dtype (every element written). Inputs are not modified.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_dtype(name, t)
        if t.dim() != 3:
            raise ValueError(f"attention_prefill: {name} must be 3-D, got shape {tuple(t.shape)}")
    tq, heads, d_qk = q.shape
    if k.shape[1:] != (heads, d_qk) or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"attention_prefill: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    d_v = v.shape[2]
    if out is None:
        out = q.new_empty(tq, heads, d_v)
    elif out.shape != (tq, heads, d_v) or out.dtype != q.dtype:
        raise ValueError(f"attention_prefill: out must be {(tq, heads, d_v)} {q.dtype}")
    if tq == 0 or heads == 0 or d_v == 0:
        return out
    c = cfg or {}
    plan = _prefill_plan(q, v, c)
    block_m, block_n = int(plan["BLOCK_M"]), int(plan["BLOCK_N"])

    num_seqs = cu_q.numel() - 1
    cu_q = cu_q.to(device=q.device, dtype=torch.int32).contiguous()
    cu_k = cu_k.to(device=q.device, dtype=torch.int32).contiguous()
    tiles = (cu_q[1:] - cu_q[:-1] + block_m - 1) // block_m
    tile_cu = torch.zeros(num_seqs + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(tiles, 0, out=tile_cu[1:])

    d_a, block_db, has_db = _split_dim(d_qk)
    grid = (triton.cdiv(tq, block_m) + num_seqs, heads)
    _prefill_kernel[grid](
        q, k, v, out, cu_q, cu_k, tile_cu, num_seqs, float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        D_QK=d_qk, D_V=d_v, D_A=d_a, BLOCK_DB=block_db, HAS_DB=has_db, BLOCK_DV=max(16, _next_pow2(d_v)),
        BLOCK_M=block_m, BLOCK_N=block_n, SEARCH_BLOCK=min(1024, max(16, _next_pow2(num_seqs))),
        UPCAST=_upcast_dots(c), DOT_PRECISION=plan["dot_precision"],
        **_launch_kwargs(c, int(plan["num_warps"]), int(plan["num_stages"])),
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Decode: absorbed MLA over the latent cache, split-KV
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _split_range(seq_len, split, MAX_SPLITS: tl.constexpr, min_split_tokens, BLOCK_N: tl.constexpr):
    """Split `split` of a sequence of seq_len tokens: (per-split length, start, end); empty when start >= end."""
    n_splits = tl.minimum(tl.maximum(tl.cdiv(seq_len, min_split_tokens), 1), MAX_SPLITS)
    per = tl.cdiv(tl.cdiv(seq_len, n_splits), BLOCK_N) * BLOCK_N
    start = split * per
    return per, start, tl.minimum(start + per, seq_len)


@triton.jit
def _mla_step(
    q_lat, q_pe, m_i, l_i, acc, cache, table, n0, end, last, offs_n, offs_r, offs_p, stride_cn, stride_ct,
    stride_cc, qk_scale, PAGE: tl.constexpr, R: tl.constexpr, P: tl.constexpr, EVEN_R: tl.constexpr,
    EVEN_P: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One BLOCK_N block of cache positions n0..: the latent tile is K (with the rope tile) and V for all M rows.
    Position n lives in block table[n // PAGE], row n % PAGE."""
    n = n0 + offs_n
    key_ok = n < end  # end <= lens[b]: rows at or past lens are never loaded, nor their table entries
    if MASKED:
        block = tl.load(table + n // PAGE, mask=key_ok, other=0)
    else:
        block = tl.load(table + n // PAGE)
    rp = cache + block.to(tl.int64)[:, None] * stride_cn + (n % PAGE).to(tl.int64)[:, None] * stride_ct
    kv = _load_tile(rp + offs_r[None, :] * stride_cc, key_ok, offs_r < R, MASKED, not EVEN_R).to(q_lat.dtype)
    kpe = _load_tile(rp + (R + offs_p)[None, :] * stride_cc, key_ok, offs_p < P, MASKED, not EVEN_P).to(q_pe.dtype)
    s = _dot(q_lat, tl.trans(kv), None, UPCAST, DOT_PRECISION)
    s = _dot(q_pe, tl.trans(kpe), s, UPCAST, DOT_PRECISION)
    s = s * qk_scale
    if MASKED:
        s = tl.where((n[None, :] <= last[:, None]) & key_ok[None, :], s, float("-inf"))
    return _online_softmax_step(s, m_i, l_i, acc, kv, MASKED, UPCAST, DOT_PRECISION)


@triton.jit
def _mla_decode_stage1(
    Q_LAT, Q_PE, CACHE, BLOCK_TABLE, LENS, OUT, MID_O, MID_LSE, qk_scale, num_heads, min_split_tokens,
    stride_qb, stride_qs, stride_qh, stride_qr, stride_pb, stride_ps, stride_ph, stride_pp,
    stride_cn, stride_ct, stride_cc, stride_tb, stride_ob, stride_os, stride_oh, stride_or,
    PAGE: tl.constexpr, S: tl.constexpr, R: tl.constexpr, P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    head_group = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(LENS + b).to(tl.int32)
    per, start, end = _split_range(seq_len, split, MAX_SPLITS, min_split_tokens, BLOCK_N)
    if not DIRECT:
        if start >= end:
            return  # empty split: stage 2 never reads it

    # Rows of the dots: row = s * BLOCK_H + local head (the S new tokens folded into M).
    offs_row = tl.arange(0, BLOCK_S * BLOCK_H)
    s_idx = offs_row // BLOCK_H
    h_idx = head_group * BLOCK_H + offs_row % BLOCK_H
    row_ok = (s_idx < S) & (h_idx < num_heads)
    last = seq_len - S + s_idx  # the last cache position new token s may see
    row_off_q = s_idx.to(tl.int64) * stride_qs + h_idx.to(tl.int64) * stride_qh
    row_off_p = s_idx.to(tl.int64) * stride_ps + h_idx.to(tl.int64) * stride_ph
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)
    EVEN_R: tl.constexpr = BLOCK_R == R
    EVEN_P: tl.constexpr = BLOCK_P == P

    q_ptrs = Q_LAT + b * stride_qb + row_off_q[:, None]
    q_lat = _load_tile(q_ptrs + offs_r[None, :] * stride_qr, row_ok, offs_r < R, True, not EVEN_R)
    p_ptrs = Q_PE + b * stride_pb + row_off_p[:, None]
    q_pe = _load_tile(p_ptrs + offs_p[None, :] * stride_pp, row_ok, offs_p < P, True, not EVEN_P)
    table = BLOCK_TABLE + b * stride_tb

    m_i = tl.full([BLOCK_S * BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_S * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_S * BLOCK_H, BLOCK_R], tl.float32)

    # Positions <= seq_len - S are visible to every new token: whole blocks of them need no mask.
    full_end = start + (tl.maximum(tl.minimum(end, seq_len - S + 1) - start, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(start, full_end, BLOCK_N):
        m_i, l_i, acc = _mla_step(
            q_lat, q_pe, m_i, l_i, acc, CACHE, table, n0, end, last, offs_n, offs_r, offs_p, stride_cn, stride_ct,
            stride_cc, qk_scale, PAGE, R, P, EVEN_R, EVEN_P, False, UPCAST, DOT_PRECISION,
        )
    for n0 in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = _mla_step(
            q_lat, q_pe, m_i, l_i, acc, CACHE, table, n0, end, last, offs_n, offs_r, offs_p, stride_cn, stride_ct,
            stride_cc, qk_scale, PAGE, R, P, EVEN_R, EVEN_P, True, UPCAST, DOT_PRECISION,
        )

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw no position stays 0
    col_ok = offs_r < R
    if DIRECT:
        row_off_o = s_idx.to(tl.int64) * stride_os + h_idx.to(tl.int64) * stride_oh
        o_ptrs = OUT + b * stride_ob + row_off_o[:, None] + offs_r[None, :] * stride_or
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    else:
        mid_row = ((b * S + s_idx) * num_heads + h_idx) * MAX_SPLITS + split  # MID_O [B, S, H, MAX_SPLITS, R]
        tl.store(MID_O + mid_row[:, None] * R + offs_r[None, :], out, mask=row_ok[:, None] & col_ok[None, :])
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(MID_LSE + mid_row, lse, mask=row_ok)


@triton.jit
def _mla_decode_stage2(
    MID_O, MID_LSE, LENS, OUT, num_heads, min_split_tokens, stride_ob, stride_os, stride_oh, stride_or,
    S: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, MAX_SPLITS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    s = row // num_heads
    h = row % num_heads
    seq_len = tl.load(LENS + b).to(tl.int32)
    last = seq_len - S + s.to(tl.int32)
    offs_r = tl.arange(0, BLOCK_R)
    col_ok = offs_r < R
    base = ((b * S + s) * num_heads + h) * MAX_SPLITS
    m = float("-inf")
    l_sum = 0.0
    acc = tl.zeros([BLOCK_R], tl.float32)
    for j in range(0, MAX_SPLITS):
        per, start, end = _split_range(seq_len, j, MAX_SPLITS, min_split_tokens, BLOCK_N)
        if start <= last:  # split j is non-empty and this row sees at least its first position
            lse = tl.load(MID_LSE + base + j)
            o_j = tl.load(MID_O + (base + j) * R + offs_r, mask=col_ok, other=0.0)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * o_j
            l_sum = l_sum * alpha + w
            m = m_new
    out = acc / tl.where(l_sum == 0.0, 1.0, l_sum)
    o_ptrs = OUT + b * stride_ob + s * stride_os + h * stride_oh + offs_r * stride_or
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=col_ok)


def _decode_plan(q_lat: Tensor, cache: Tensor, cfg: dict) -> dict:
    """Blocking and split-count choices for mla_decode (cfg overrides every one of them).

    M = BLOCK_S * BLOCK_H rows per program: 64 for 16-bit inputs (FlagGems' 64 heads on Hopper, one warpgroup MMA
    tile; with S = 2 that is 32 heads x 2 tokens), 16 for float32 (its dots run on CUDA cores, the accumulator
    lives in registers). Splits: max_splits = ceil(num_sms * waves / (B * head groups)) so that a batch too small
    to fill the machine once is spread along the sequence (waves = 1: a full batch gains nothing from splitting
    and would pay the partial-output traffic), capped by max_splits; each sequence uses at most
    ceil(lens_b / min_split_tokens) of them, min_split_tokens = max(256, 8*S*H) so that a split streams at least
    about as many cache bytes as its fp32 partial output costs."""
    bsz, s_new, heads, rank = q_lat.shape
    rope = cache.shape[2] - rank
    small = cache.element_size() <= 2 and q_lat.element_size() <= 2
    block_s = _next_pow2(s_new)
    min_h = max(16 // block_s, 1)  # tl.dot needs M >= 16
    block_h = int(cfg.get("BLOCK_H", min((64 if small else 16) // block_s, _next_pow2(heads))))
    block_h = max(block_h, min_h)
    wide = small and block_s * block_h >= 64  # warpgroup-sized tile: deep pipeline of narrow KV blocks
    plan = {"BLOCK_H": block_h, "BLOCK_N": (32 if wide else 64) if small else 16, "num_warps": 8 if wide else 4,
            "num_stages": 3 if wide else 2}
    plan.update({k: int(cfg[k]) for k in ("BLOCK_N", "num_warps", "num_stages") if k in cfg})
    elt = cache.element_size()
    # shared memory ~ the query tile + num_stages x the [BLOCK_N, R+P] cache tile
    need = lambda p: elt * (block_s * p["BLOCK_H"] + p["num_stages"] * p["BLOCK_N"]) * (rank + rope)  # noqa: E731
    _fit_smem(plan, cfg, need, _max_shared_mem(q_lat.device, cfg),
              (("num_stages", 1), ("BLOCK_N", 16), ("BLOCK_H", min_h)))
    block_h = plan["BLOCK_H"]
    groups = triton.cdiv(heads, block_h)
    if "num_splits" in cfg:
        max_splits = int(cfg["num_splits"])
    else:
        target = _num_sms(q_lat.device, cfg) * int(cfg.get("waves", 1))
        max_splits = min(max(triton.cdiv(target, max(bsz * groups, 1)), 1), int(cfg.get("max_splits", 64)))
    min_tokens = int(cfg.get("min_split_tokens", max(256, 8 * s_new * heads)))
    min_tokens = triton.cdiv(max(min_tokens, 1), plan["BLOCK_N"]) * plan["BLOCK_N"]
    plan.update({
        "BLOCK_S": block_s, "BLOCK_R": max(16, _next_pow2(rank)),
        "BLOCK_P": max(16, _next_pow2(rope)), "groups": groups, "max_splits": max_splits, "min_tokens": min_tokens,
        "stage2_num_warps": int(cfg.get("stage2_num_warps", 4)), "dot_precision": cfg.get("dot_precision", "ieee"),
    })
    return plan


def mla_decode(q_lat: Tensor, q_pe: Tensor, cache: Tensor, block_table: Tensor, lens: Tensor, scale: float,
               cfg: dict | None = None, *, out: Tensor | None = None) -> Tensor:
    """Absorbed MLA decode over the paged latent cache (split-KV flash decoding).

    q_lat: [B, S, H, R], q_pe: [B, S, H, P] (any strides); cache: [num_blocks, block_size, R+P] (latent first, rope
    key last, any strides); float32/bfloat16/float16. block_table: [B, max_blocks] int (position t of sequence b is
    cache[block_table[b, t // block_size], t % block_size]); lens: [B] int tokens in the cache including the S new
    ones. New token s attends to positions 0 .. lens-S+s with score = (q_lat . kv[t, :R] + q_pe . kv[t, R:]) * scale,
    softmax in fp32, o = sum_t p_t kv[t, :R]. Cache rows at or past lens[b], and table entries past
    ceil(lens[b] / block_size), are never read. A row that sees no position (lens < S) is returned as zeros.
    cfg: tuning knobs (module docstring). out: optional [B, S, H, R] q_lat.dtype buffer to fill.
    Returns o_lat [B, S, H, R] in q_lat.dtype. Inputs are not modified.
    """
    for name, t in (("q_lat", q_lat), ("q_pe", q_pe), ("cache", cache)):
        _check_dtype(name, t)
    if q_lat.dim() != 4 or q_pe.dim() != 4 or q_pe.shape[:3] != q_lat.shape[:3] or cache.dim() != 3:
        raise ValueError(f"mla_decode: shapes q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}, "
                         f"cache {tuple(cache.shape)}")
    bsz, s_new, heads, rank = q_lat.shape
    rope = q_pe.shape[3]
    if cache.shape[2] != rank + rope:
        raise ValueError(f"mla_decode: cache last dim {cache.shape[2]} != R + P = {rank + rope}")
    if out is None:
        out = q_lat.new_empty(q_lat.shape)
    elif out.shape != q_lat.shape or out.dtype != q_lat.dtype:
        raise ValueError(f"mla_decode: out must be {tuple(q_lat.shape)} {q_lat.dtype}")
    if out.numel() == 0:
        return out
    plan = _decode_plan(q_lat, cache, cfg or {})
    if block_table.dim() != 2 or block_table.shape[0] != bsz:
        raise ValueError(f"mla_decode: block_table must be [B={bsz}, max_blocks], got {tuple(block_table.shape)}")
    block_table = block_table.to(device=q_lat.device, dtype=torch.int32).contiguous()
    lens = lens.to(device=q_lat.device, dtype=torch.int64).contiguous()
    max_splits, direct = plan["max_splits"], plan["max_splits"] == 1
    if direct:
        mid_o = mid_lse = out  # unused
    else:
        mid_o = torch.empty(bsz, s_new, heads, max_splits, rank, dtype=torch.float32, device=q_lat.device)
        mid_lse = torch.empty(bsz, s_new, heads, max_splits, dtype=torch.float32, device=q_lat.device)
    block_r, block_p = plan["BLOCK_R"], plan["BLOCK_P"]
    c = cfg or {}
    _mla_decode_stage1[(plan["groups"], max_splits, bsz)](
        q_lat, q_pe, cache, block_table, lens, out, mid_o, mid_lse, float(scale) * LOG2E, heads, plan["min_tokens"],
        *q_lat.stride(), *q_pe.stride(), *cache.stride(), block_table.stride(0), *out.stride(),
        PAGE=cache.shape[1], S=s_new, R=rank, P=rope, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_S=plan["BLOCK_S"],
        BLOCK_H=plan["BLOCK_H"], BLOCK_N=plan["BLOCK_N"], MAX_SPLITS=max_splits, DIRECT=direct,
        UPCAST=_upcast_dots(c), DOT_PRECISION=plan["dot_precision"],
        **_launch_kwargs(c, plan["num_warps"], plan["num_stages"]),
    )
    if not direct:
        _mla_decode_stage2[(bsz, s_new * heads)](
            mid_o, mid_lse, lens, out, heads, plan["min_tokens"], *out.stride(),
            S=s_new, R=rank, BLOCK_R=block_r, BLOCK_N=plan["BLOCK_N"], MAX_SPLITS=max_splits,
            **_launch_kwargs(c, plan["stage2_num_warps"], 1),
        )
    return out
