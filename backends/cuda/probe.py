"""Can the cuda backend run here? An NVIDIA GPU through a CUDA build of torch plus triton, or the Triton
interpreter on the CPU (--interpret). Also binds the tuning table to the device it finds."""

from __future__ import annotations

from typing import Any

import torch

from backends.triton_kernels import runtime
from backends.triton_kernels.tuning import TuningTable
from core.backend import Availability, RunMode

INTERPRETER_SMS = 4  # split heuristics in the interpreter: keep grids small


def device_facts() -> tuple[str, dict[str, Any]]:
    """(tuning description, extras for every operator's config) of the current CUDA device."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    fp8_dot = "native" if (props.major, props.minor) >= (8, 9) else "upcast"  # FP8 MMA from Ada/Hopper on
    return props.name, {"num_sms": props.multi_processor_count, "fp8_dot": fp8_dot}


def resolver() -> tuple[str, dict[str, Any]]:
    """Lazy tuning selection for ops used without a probe: the interpreter if it is on, else the current GPU."""
    if runtime.interpret_env_set() or not torch.cuda.is_available():
        return "interpreter", {"num_sms": INTERPRETER_SMS, "fp8_dot": "native"}
    return device_facts()


def probe(mode: RunMode, tuning: TuningTable) -> Availability:
    """Availability of the cuda backend; on success the tuning table is bound to the device."""
    version = runtime.triton_version()
    if version is None:
        return Availability.no("triton is not importable; install it with `pip install triton`")
    if mode.interpret:
        problem = runtime.enable_interpreter()
        if problem:
            return Availability.no(problem)
        entry = tuning.select("interpreter", {"num_sms": INTERPRETER_SMS, "fp8_dot": "native"})
        env = runtime.environment(True, "CPU (Triton interpreter)", cuda=torch.version.cuda, tuning=entry)
        return Availability(True, device=torch.device("cpu"), environment=env)
    if torch.version.hip:
        return Availability.no(f"this torch is a ROCm build (torch.version.hip = {torch.version.hip}); use "
                               f"--backend rocm, or run the same Triton kernels on the CPU with --interpret")
    if not torch.cuda.is_available():
        return Availability.no("no NVIDIA GPU visible to torch (torch.cuda.is_available() is False); run the same "
                               "Triton kernels on the CPU with --interpret")
    conflict = runtime.gpu_mode_conflict()
    if conflict:
        return Availability.no(conflict)
    name, extras = device_facts()
    entry = tuning.select(name, extras)
    major, minor = torch.cuda.get_device_capability()
    env = runtime.environment(False, name, cuda=torch.version.cuda, capability=f"sm_{major}{minor}",
                              sms=extras["num_sms"], fp8_dot=extras["fp8_dot"], tuning=entry)
    return Availability(True, device=torch.device("cuda", torch.cuda.current_device()), environment=env)
