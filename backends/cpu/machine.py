"""What this CPU offers the cpu backend: its ISA flags, the dtype to keep bfloat16 weights in, and the thread count.

The choices are data (backends/cpu/tuning.yaml); this module only reads the machine and applies them."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import yaml

TUNING = Path(__file__).resolve().parent / "tuning.yaml"


@functools.lru_cache(maxsize=1)
def tuning() -> dict:
    return yaml.safe_load(TUNING.read_text())


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ISA flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    """Whether oneDNN multiplies bfloat16 in hardware here (avx512_bf16 or AMX)."""
    return bool(cpu_flags() & set(tuning()["bf16_native_flags"]))


def weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a float weight of `dtype` is kept in: bfloat16 stays bfloat16 only where it is native."""
    if dtype == torch.bfloat16 and not native_bf16():
        return torch.float32
    return dtype


def _choice(key: str, allowed: tuple[str, ...], default: str, env: str | None = None) -> str:
    """tuning.yaml's value for key (or environment variable env, when set), checked to be one of allowed."""
    choice = (os.environ.get(env) if env else None) or tuning().get(key, default)
    if choice not in allowed:
        where = f"{env} or {TUNING}" if env else str(TUNING)
        raise ValueError(f"{key} ({where}) must be {', '.join(allowed)}, not {choice!r}")
    return choice


def linear_keeps_bf16() -> bool:
    """Whether `linear` keeps bfloat16 weights as bfloat16 where bf16 is emulated (tuning.yaml emulated_bf16_linear)."""
    return _choice("emulated_bf16_linear", ("bfloat16", "float32"), "float32") == "bfloat16"


@functools.lru_cache(maxsize=1)
def _fbgemm_fp16() -> bool:
    from backends.cpu import fp16
    return fp16.available()


def fp16_gemm() -> bool:
    """Whether float weights that are exact in fp16 are held as fbgemm's packed fp16 (tuning.yaml fp16_weight_gemm)."""
    choice = _choice("fp16_weight_gemm", ("bf16_emulated", "always", "never"), "never")
    wanted = choice == "always" or (choice == "bf16_emulated" and not native_bf16())
    return wanted and _fbgemm_fp16()


def fp8_weights() -> str:
    """tuning.yaml fp8_weights (auto, float32 or fp8), or $DSV3_CPU_FP8_WEIGHTS when set."""
    return _choice("fp8_weights", ("auto", "float32", "fp8"), "float32", env="DSV3_CPU_FP8_WEIGHTS")


def memory_bytes() -> tuple[int, int]:
    """(MemTotal, MemAvailable) from /proc/meminfo in bytes; (0, 0) where there is no such file."""
    found = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                found[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return found.get("MemTotal", 0), found.get("MemAvailable", 0)


def fp8_dequantise(float32_bytes: int) -> bool:
    """Whether an FP8 weight whose float32 copy takes float32_bytes is dequantised at load (else kept as FP8)."""
    choice = fp8_weights()
    if choice != "auto":
        return choice == "float32"
    total, available = memory_bytes()
    if total == 0:  # no /proc/meminfo: nothing says memory is short
        return True
    return available - float32_bytes >= float(tuning().get("fp8_auto_reserve", 0.15)) * total


def threads() -> int:
    """torch's intra-op thread count for this process (tuning.yaml `threads`, "auto" = CPUs it may run on)."""
    want = tuning().get("threads", "auto")
    if want == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return int(want)


def describe() -> str:
    """One line for reports: ISA, bf16 support, threads."""
    return (f"{torch.backends.cpu.get_cpu_capability()}, bf16 {'native' if native_bf16() else 'emulated'}, "
            f"{'fbgemm fp16 weights, ' if fp16_gemm() else ''}{torch.get_num_threads()} threads")
