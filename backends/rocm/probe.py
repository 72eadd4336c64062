"""Can the rocm backend run here? An AMD GPU through a ROCm build of torch plus triton, or the Triton interpreter on
the CPU (--interpret, emulating an MI300: e4m3fnuz weights and activations). Also decides the FP8 flavour and
binds the tuning table to the device it finds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backends.triton_kernels import runtime
from backends.triton_kernels.tuning import TuningTable
from core.backend import Availability, RunMode

FNUZ_ARCHS = ("gfx940", "gfx941", "gfx942")  # MI300 family: FP8 is e4m3fnuz only
FP8_MMA_ARCHS = FNUZ_ARCHS + ("gfx950",)  # gfx950 (MI350) has OCP e4m3fn matrix units
INTERPRETER_FACTS = {"num_sms": 4, "fp8_dot": "native"}


@dataclass
class Target:
    """What the probe found: the FP8 flavour weights are re-encoded to (read by the prepare hooks)."""

    fnuz: bool = True  # MI300-class unless the probe finds otherwise; the manifest declares w8a8_fnuz


TARGET = Target()


def gpu_arch() -> str:
    """'gfx942' from gcnArchName 'gfx942:sramecc+:xnack-' of the current device."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return str(getattr(props, "gcnArchName", "unknown")).split(":")[0]


def device_facts() -> tuple[str, dict[str, Any], str]:
    """(tuning description 'name arch', extras for every operator's config, arch)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    arch = gpu_arch()
    extras = {"num_sms": props.multi_processor_count, "fp8_dot": "native" if arch in FP8_MMA_ARCHS else "upcast"}
    return f"{props.name} {arch}", extras, arch


def resolver() -> tuple[str, dict[str, Any]]:
    """Lazy tuning selection for ops used without a probe: the interpreter if it is on, else the current GPU."""
    if runtime.interpret_env_set() or not torch.cuda.is_available():
        return "interpreter", dict(INTERPRETER_FACTS)
    description, extras, _ = device_facts()
    return description, extras


def probe(mode: RunMode, tuning: TuningTable) -> Availability:
    """Availability of the rocm backend; on success the tuning table and the FP8 flavour are bound to the device."""
    version = runtime.triton_version()
    if version is None:
        return Availability.no("triton is not importable; install the ROCm build of triton (`pip install triton` "
                               "from the ROCm wheel index)")
    if mode.interpret:
        problem = runtime.enable_interpreter()
        if problem:
            return Availability.no(problem)
        TARGET.fnuz = True
        entry = tuning.select("interpreter", dict(INTERPRETER_FACTS))
        env = runtime.environment(True, "CPU (Triton interpreter, emulating gfx942 e4m3fnuz)",
                                  hip=torch.version.hip, fp8="e4m3fnuz", tuning=entry)
        return Availability(True, device=torch.device("cpu"), environment=env)
    if not torch.version.hip:
        return Availability.no("this torch has no ROCm support (torch.version.hip is None); install a ROCm build of "
                               "torch, or run the same Triton kernels on the CPU with --interpret")
    if not torch.cuda.is_available():
        return Availability.no("no AMD GPU visible to torch (torch.cuda.is_available() is False on this ROCm build); "
                               "run the same Triton kernels on the CPU with --interpret")
    conflict = runtime.gpu_mode_conflict()
    if conflict:
        return Availability.no(conflict)
    description, extras, arch = device_facts()
    TARGET.fnuz = arch in FNUZ_ARCHS
    entry = tuning.select(description, extras)
    env = runtime.environment(False, description, hip=torch.version.hip, arch=arch,
                              fp8="e4m3fnuz" if TARGET.fnuz else "e4m3fn", cus=extras["num_sms"],
                              fp8_dot=extras["fp8_dot"], tuning=entry)
    numerics = {} if TARGET.fnuz else {"linear": "w8a8", "moe_experts": "w8a8"}  # gfx950: OCP e4m3fn, max 448
    return Availability(True, device=torch.device("cuda", torch.cuda.current_device()), environment=env,
                        numerics=numerics)
