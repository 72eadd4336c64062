"""Shared pieces of the Ascend tests: the simulated backend, a recording torch_npu handle, error measures."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import Tensor

import emulation.torch_npu as emu
from backends.ascend import availability, runtime


@pytest.fixture(autouse=True)
def simulated():
    """Every Ascend test runs the adapter against the emulation, in strict mode, whatever this machine has."""
    avail = availability.simulate()
    assert avail.ok, avail.reason
    with emu.configured(strict=True, gating_expert_counts=(256, 384)):
        yield avail


class Recorder:
    """A torch_npu stand-in that records every operator call and forwards it (optionally rewritten) to the
    emulation: `rewrite(name, args, kwargs) -> (args, kwargs)` plays a buggy adapter."""

    def __init__(self, rewrite: Callable[[str, tuple, dict], tuple[tuple, dict]] | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.rewrite = rewrite

    def __getattr__(self, name: str) -> Any:
        target = getattr(emu, name)
        if not callable(target):
            return target

        def call(*args, **kwargs):
            self.calls.append((name, args, dict(kwargs)))
            if self.rewrite is not None:
                args, kwargs = self.rewrite(name, args, dict(kwargs))
            return target(*args, **kwargs)

        return call

    def kwargs_of(self, name: str) -> list[dict]:
        return [kw for n, _, kw in self.calls if n == name]


def using(rec: Recorder):
    """`with using(rec):` routes the adapter's torch_npu calls through `rec` for the block."""
    return runtime.using(rec)


def rel_err(got: Tensor, want: Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / max(float(want.norm()), 1e-30))


def assert_close(got: Tensor, want: Tensor, rel: float, what: str = "") -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.numel():
        err = rel_err(got, want)
        assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
