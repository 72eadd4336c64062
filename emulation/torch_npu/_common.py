"""Shared pieces of the torch_npu emulation: configuration, rejections, and sentinels for omitted arguments.

Two kinds of checks exist. Documented checks ([doc] in torch_npu_ops.md) always raise `NpuRejection`, as the
hardware's parameter checks would. Strict checks guard behaviour the documents leave undefined or flag as a trap
(an omitted `scale` that silently means 1.0, an omitted `quant_mode` whose default changed between releases,
NaN router logits, group_list totals that do not cover the rows); they raise only while `CONFIG.strict` is True,
which is the default, because glue code that relies on them is wrong even where the hardware stays silent.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, NoReturn

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class NpuRejection(RuntimeError):
    """An input the documented torch_npu/CANN checks reject (the real library raises RuntimeError too)."""


class NotEmulated(NotImplementedError):
    """A documented feature of the real operator that this emulation does not model (paged KV, FP8, NZ...)."""


@dataclass
class Config:
    """strict: raise on undefined behaviour and documented traps (see the module docstring).
    gating_expert_counts: the expert counts the A2/A3 `npu_moe_gating_top_k` kernels accept (older CANN: 256 only,
    later 256 and 384; callers check `n_routed_experts in [256, 384]`); None accepts every count the schema allows."""

    strict: bool = True
    gating_expert_counts: tuple[int, ...] | None = (256, 384)


CONFIG = Config()


def configure(**changes: object) -> Config:
    """Change the emulation's configuration; returns the previous one."""
    previous = dataclasses.replace(CONFIG)
    for key, value in changes.items():
        if not hasattr(CONFIG, key):
            raise TypeError(f"unknown emulation setting {key!r}")
        setattr(CONFIG, key, value)
    return previous


@contextlib.contextmanager
def configured(**changes: object) -> Iterator[Config]:
    """`with configured(strict=False): ...` changes the configuration for a block."""
    previous = configure(**changes)
    try:
        yield CONFIG
    finally:
        configure(**dataclasses.asdict(previous))


def reject(op: str, message: str) -> NoReturn:
    """Raise NpuRejection for `op`, as the documented parameter checks would."""
    raise NpuRejection(f"{op}: {message}")


def require(ok: bool, op: str, message: str) -> None:
    """A documented constraint: raise NpuRejection when it does not hold."""
    if not ok:
        reject(op, message)


def strict_require(ok: bool, op: str, message: str) -> None:
    """An emulation-only check (undefined behaviour or a documented trap): raises only in strict mode."""
    if not ok and CONFIG.strict:
        raise NpuRejection(f"{op}: {message} [strict emulation check; set strict=False to apply the documented "
                           f"default instead]")


def not_emulated(op: str, what: str) -> NoReturn:
    """Raise NotEmulated: a documented feature outside this emulation's scope."""
    raise NotEmulated(f"{op}: {what} is documented but not emulated")


class _OmittedFloat(float):
    """A float default that remembers it was not passed (`arg is OMITTED_*`), with the documented value."""


class _OmittedInt(int):
    """An int default that remembers it was not passed, with the documented value."""


def omitted_float(value: float) -> float:
    """A default of `value` that `was_omitted` recognises."""
    return _OmittedFloat(value)


def omitted_int(value: int) -> int:
    """A default of `value` that `was_omitted` recognises."""
    return _OmittedInt(value)


def was_omitted(value: object) -> bool:
    """True when `value` is an omitted_* default, i.e. the caller did not pass the argument."""
    return isinstance(value, (_OmittedFloat, _OmittedInt))


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16, for messages."""
    return str(dtype).replace("torch.", "")
