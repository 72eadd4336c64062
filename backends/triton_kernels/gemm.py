"""`C = A @ B.T` for linear layers: float GEMM, and the block-scaled FP8 GEMM of W8A8.

A: [M, K] activations (float, or FP8 codes with per-row-per-128-K scales `a_s` [M, ceil(K/128)]).
B: [N, K] weights (float, or FP8 codes with 128x128 block scales `b_s` [ceil(N/128), ceil(K/128)]).

The FP8 kernel is DeepSeek's (inference/kernel.py) with Triton best practice added: BLOCK_K = 128 so each K step
is one scale block, `acc += dot(a, b) * a_s[:, None] * b_s[None, :]` promotes the partial sum to the float32
accumulator every 128 K (two-level accumulation), grouped program order for L2 reuse, and split-K for decode
shapes, whose few output tiles would otherwise leave most SMs idle. Split-K writes float32 partials that a second
kernel sums in a fixed order (deterministic; no atomics).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from backends.triton_kernels.common import dot_plan, launch_options, pick_bucket
from backends.triton_kernels.quant import dot_operand

SCALE_BLOCK = 128

DEFAULT_GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "SPLIT_K": 1, "num_warps": 4,
                "num_stages": 3}


@triton.jit
def scaled_dot(acc, a, b, a_s, b_s, IEEE: tl.constexpr):
    """One W8A8 K step: the FP8 block product, promoted into the float32 accumulator with both block scales.
    a [BM, 128] and b [128, BN]: FP8, or their exact float16 / float32 (IEEE) upcast; a_s [BM], b_s [BN] float32."""
    if IEEE:
        return acc + tl.dot(a, b, input_precision="ieee") * a_s[:, None] * b_s[None, :]
    return acc + tl.dot(a, b) * a_s[:, None] * b_s[None, :]


@triton.jit
def float_dot(acc, a, b, IEEE: tl.constexpr):
    """One float K step, accumulating in float32 (IEEE float32 products when IEEE, never TF32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cs, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    HAS_SCALES: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, FP8_BIAS: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K). With HAS_SCALES, BLOCK_K equals the 128 scale block."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles sweep the columns together, so B tiles are reused from L2.
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
    if HAS_SCALES:
        a_s_rows = as_ptr + offs_m * stride_asm
        b_s_cols = bs_ptr + (offs_n // SCALE_BLOCK_N) * stride_bsn

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt_begin = split * per_split
    kt_end = tl.minimum(kt_begin + per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_begin, kt_end):
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(a_rows + offs_k[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + offs_k[:, None] * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a = dot_operand(a, DOT_DTYPE, FP8_BIAS)
        b = dot_operand(b, DOT_DTYPE, FP8_BIAS)
        if HAS_SCALES:
            a_s = tl.load(a_s_rows + kt * stride_ask, mask=m_ok, other=0.0)
            b_s = tl.load(b_s_cols + kt * stride_bsk, mask=n_ok, other=0.0)
            acc = scaled_dot(acc, a, b, a_s, b_s, IEEE)
        else:
            acc = float_dot(acc, a, b, IEEE)

    c_ptrs = c_ptr + split * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _sum_splits_kernel(ws_ptr, c_ptr, M, N, stride_ws, stride_wm, stride_cm,
                       SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """c[m, n] = sum over s of ws[s, m, n], in split order (float32), rounded once to c's dtype."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    offs = offs_m.to(tl.int64)[:, None] * stride_wm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ws + offs, mask=mask, other=0.0)
    c_offs = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptr + c_offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _split_k(cfg: Mapping[str, Any], tiles: int, k_tiles: int) -> int:
    """SPLIT_K from the config: a number, or 'auto' (enough programs for `waves` x num_sms, at least
    `min_k_tiles` K tiles per split)."""
    split = cfg.get("SPLIT_K", 1)
    if split != "auto":
        return max(1, min(int(split), k_tiles))
    target = int(cfg.get("num_sms", 1)) * int(cfg.get("waves", 2))
    want = triton.cdiv(target, max(tiles, 1))
    return max(1, min(want, k_tiles // max(int(cfg.get("min_k_tiles", 4)), 1), int(cfg.get("max_split", 16))))


def gemm(a: Tensor, b: Tensor, out_dtype: torch.dtype, a_scale: Tensor | None = None, b_scale: Tensor | None = None,
         cfg: Mapping[str, Any] | None = None) -> Tensor:
    """`a @ b.T`, float32 accumulation, rounded once to `out_dtype`.

    a: [M, K], b: [N, K], any strides. Float operands: float32/bfloat16/float16. FP8 operands (both e4m3fn or
    both e4m3fnuz) need a_scale [M, ceil(K/128)] and b_scale [ceil(N/128), ceil(K/128)] float32 (the W8A8 block
    product). cfg: `gemm`, a list of buckets {max_m, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K (int|'auto'),
    num_warps, num_stages, ...} (the first whose max_m >= M is used; the FP8 path forces BLOCK_K = 128);
    `fp8_dot`, `dot_fp32` (see common.dot_plan), `num_sms`. Returns a new contiguous [M, N] tensor.
    """
    cfg = cfg or {}
    m, k = a.shape
    n = b.shape[0]
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    scaled = a_scale is not None
    tile = {**DEFAULT_GEMM, **pick_bucket(cfg.get("gemm"), m), **{kk: cfg[kk] for kk in ("num_sms",) if kk in cfg}}
    block_m, block_n, block_k = int(tile["BLOCK_M"]), int(tile["BLOCK_N"]), int(tile["BLOCK_K"])
    if scaled:
        block_k = SCALE_BLOCK
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = _split_k(tile, tiles, k_tiles)
    plan = dot_plan(a.dtype, b.dtype, cfg)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=a.device)
    stride_cs = 0 if split == 1 else target.stride(0)
    a_s = a_scale if scaled else a  # dummies when unscaled: never read
    b_s = b_scale if scaled else b
    _gemm_kernel[(tiles, split)](
        plan.operand(a), plan.operand(b), target, a_s, b_s, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), stride_cs, target.stride(-2), target.stride(-1),
        a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1),
        HAS_SCALES=scaled, DOT_DTYPE=plan.dtype, IEEE=plan.ieee, FP8_BIAS=plan.fp8_bias, SCALE_BLOCK_N=SCALE_BLOCK,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=int(tile["GROUP_M"]), SPLIT_K=split,
        **launch_options(tile, num_warps=4, num_stages=3),
    )
    if split > 1:
        rb, cb = 16, 128
        _sum_splits_kernel[(triton.cdiv(m, rb), triton.cdiv(n, cb))](
            target, out, m, n, target.stride(0), target.stride(1), out.stride(0),
            SPLIT_K=split, BLOCK_M=rb, BLOCK_N=cb, num_warps=4,
        )
    return out
