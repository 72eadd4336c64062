"""The torch_npu module handle every Ascend operator calls through.

The adapter code reads `torch_npu.npu_rms_norm(...)` exactly as it would with `import torch_npu`, but `torch_npu`
here is a handle that the availability probe points at a module: the real torch_npu on Ascend hardware, or the
emulation (emulation/torch_npu) under --simulate when torch_npu is absent. So the same adapter code runs in both
places, and importing this backend never imports torch_npu.
"""

from __future__ import annotations

import contextlib
from types import ModuleType
from typing import Any, Iterator


class _Handle:
    """Forwards attribute access to the module the probe resolved; fails clearly before that."""

    __slots__ = ("_module",)

    def __init__(self) -> None:
        self._module: ModuleType | None = None

    def __getattr__(self, name: str) -> Any:
        module = object.__getattribute__(self, "_module")
        if module is None:
            raise RuntimeError(f"ascend backend: torch_npu.{name} called before the backend's probe resolved "
                               f"torch_npu (activate the backend first: core.registry.activate('ascend', mode))")
        return getattr(module, name)

    def __repr__(self) -> str:
        return f"<torch_npu handle -> {self._module!r}>"


torch_npu = _Handle()


def use(module: ModuleType) -> None:
    """Point the handle at `module` (the probe does this)."""
    torch_npu._module = module


def current() -> ModuleType | None:
    """The module the handle points at, or None before the probe ran."""
    return torch_npu._module


def is_emulation() -> bool:
    """True when the handle points at the emulation (simulation), not the real torch_npu."""
    return bool(getattr(current(), "EMULATION", False))


@contextlib.contextmanager
def using(module: Any) -> Iterator[None]:
    """Point the handle at `module` for a block (tests: a recording wrapper around the emulation)."""
    previous = torch_npu._module
    torch_npu._module = module
    try:
        yield
    finally:
        torch_npu._module = previous
