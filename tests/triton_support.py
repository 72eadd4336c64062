"""Shared setup for the Triton kernel tests: where they run, poisoned allocations, error metrics.

On a machine without a GPU the kernels run in the Triton interpreter, which must be switched on before triton is
first imported (triton decorates its own tl.* functions at import): importing this module does that, so import it
before anything that imports triton. With a GPU (and TRITON_INTERPRET unset) the same tests run natively on it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from backends.triton_kernels import runtime  # noqa: E402  (imports no triton)

INTERPRETER = runtime.interpret_env_set()
DEVICE = torch.device("cpu") if INTERPRETER else torch.device("cuda")

POISON_INT = -7777


@contextmanager
def poisoned_allocations():
    """torch.empty / Tensor.new_empty return NaN-filled (floats, FP8) or POISON_INT-filled (integers) tensors, so
    an output element a kernel forgets to write shows up in the result."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.numel():
            t.fill_(float("nan") if t.is_floating_point() else POISON_INT)
        return t

    def empty(*args, **kwargs):
        return poison(real_empty(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison(real_new_empty(self, *args, **kwargs))

    torch.empty, torch.Tensor.new_empty = empty, new_empty
    try:
        yield
    finally:
        torch.empty, torch.Tensor.new_empty = real_empty, real_new_empty


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (0 for empty tensors)."""
    if ref.numel() == 0:
        return 0.0
    g, r = got.double().cpu(), ref.double().cpu()
    return float((g - r).norm() / max(float(r.norm()), 1e-300))


def within_ulps(got: torch.Tensor, ref: torch.Tensor, ulps: float = 1.0) -> bool:
    """Elementwise |got - ref| <= ulps units in the last place of ref's dtype (relative to |ref|, plus a floor)."""
    eps = torch.finfo(ref.dtype).eps
    g, r = got.double().cpu(), ref.double().cpu()
    return bool(((g - r).abs() <= ulps * eps * r.abs() + 1e-30).all())
