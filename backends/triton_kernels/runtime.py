"""Vendor-neutral pieces of a Triton backend's probe: is triton installed, and switching the Triton interpreter on.

TRITON_INTERPRET is read whenever a function is decorated with @triton.jit, and triton decorates its own standard
library (tl.sum, tl.max, tl.sigmoid, ...) when `triton.language` is first imported. So the interpreter must be chosen
before the first `import triton` of the process, and a process that imported triton in one mode stays in it. This
module therefore never imports triton itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

import torch

INTERPRET_ENV = "TRITON_INTERPRET"


def triton_version() -> str | None:
    """The installed triton's version (read from its metadata, without importing it), or None if not installed."""
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def interpret_env_set() -> bool:
    """True when TRITON_INTERPRET is set to a true value in this process's environment."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def triton_mode() -> str | None:
    """'interpreter' or 'gpu' once triton.language has been imported in this process (fixed from then on), else
    None."""
    lang = sys.modules.get("triton.language")
    if lang is None:
        return None
    return "interpreter" if type(lang.sum).__name__ == "InterpretedFunction" else "gpu"


def enable_interpreter() -> str | None:
    """Make the kernels run in the Triton interpreter on the CPU: set TRITON_INTERPRET=1 before triton is imported.
    Returns None on success, or why it is too late (triton already imported for the GPU in this process)."""
    if triton_mode() == "gpu":
        return ("triton was already imported for the GPU in this process, so its kernels cannot switch to the "
                "interpreter; choose --interpret at startup (or set TRITON_INTERPRET=1 before importing triton)")
    os.environ[INTERPRET_ENV] = "1"
    return None


def gpu_mode_conflict() -> str | None:
    """Why the kernels cannot run natively on a GPU in this process (the interpreter was forced by the environment or
    by an earlier --interpret), or None."""
    if interpret_env_set() or triton_mode() == "interpreter":
        return (f"{INTERPRET_ENV}=1 is set in this process, so the kernels would run in the CPU interpreter; "
                f"unset it, or pass --interpret to run on the CPU deliberately")
    return None


def environment(interpreter: bool, device_name: str, **extra: object) -> dict[str, str]:
    """The Availability.environment every Triton backend reports."""
    env = {"triton": triton_version() or "missing", "torch": torch.__version__, "device_name": device_name,
           "interpreter": "yes" if interpreter else "no"}
    env.update({k: str(v) for k, v in extra.items()})
    return env
