"""`x @ W.T` against a bfloat16 weight on a CPU without a bf16 dot product, at float32 speed and half the bytes.

torch's bfloat16 GEMM on such a CPU (AVX2) is 3-5x slower than float32 at 2-32 rows; only its one-row GEMV is fast.
Widening the whole weight per call costs a float32 copy that falls out of cache before the GEMM reads it. Widening
chunk by chunk (tuning.yaml widen_chunk elements) into one reused float32 buffer keeps each chunk in cache between
the widening and its GEMM: the DRAM reads are the bfloat16 bytes, and the products and the GEMM are exactly those of
float32 weights (bfloat16 widens to float32 exactly)."""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from backends.cpu import machine

_buffers = threading.local()  # one float32 buffer per thread, grown to the largest chunk asked for


def chunk_elements() -> int:
    return int(machine.tuning().get("widen_chunk", 1 << 20))


def _buffer(elements: int) -> Tensor:
    buf = getattr(_buffers, "buf", None)
    if buf is None or buf.numel() < elements:
        buf = _buffers.buf = torch.empty(elements, dtype=torch.float32)
    return buf


def mm_widened(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, K] float32 (any strides), weight [N, K] bfloat16 contiguous -> x @ weight.T [M, N] float32."""
    n, k = weight.shape
    rows = max(1, chunk_elements() // max(k, 1))
    buf = _buffer(min(n, rows) * k)
    parts = []
    for n0 in range(0, n, rows):
        chunk = weight[n0:n0 + rows]
        parts.append(torch.nn.functional.linear(x, buf[: chunk.numel()].view(chunk.shape).copy_(chunk)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
