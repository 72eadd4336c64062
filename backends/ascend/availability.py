"""Availability of the Ascend backend: the real torch_npu with an NPU, or (with --simulate and no torch_npu) the
torch_npu emulation on the CPU. torch_npu is imported only here, and only when the probe is called."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

import torch

from backends.ascend import runtime
from core.backend import Availability, RunMode

SIMULATION = "simulation: torch_npu emulation (no Ascend hardware)"

REQUIRED_OPS = (
    "npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul", "npu_fused_infer_attention_score", "npu_moe_gating_top_k",
    "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_moe_finalize_routing",
)
"""Every torch_npu operator the adapter calls (op-plugin 7.0.0 / torch_npu 2.5.1 and later have them all)."""

INSTALL_HINT = ("pip install torch-npu==<your torch version>, with the CANN toolkit and the Ascend NPU driver "
                "installed")


def _major_minor(version: str) -> tuple[int, ...]:
    parts = version.split("+")[0].split(".")
    return tuple(int(p) for p in parts[:2] if p.isdigit())


def pairing_problem(torch_version: str, npu_version: str) -> str | None:
    """torch-npu X.Y.Z[.postN] pairs with torch X.Y.Z: their major.minor must match."""
    if _major_minor(torch_version) != _major_minor(npu_version):
        return (f"torch_npu {npu_version} does not match torch {torch_version} (torch-npu X.Y.* pairs with "
                f"torch X.Y.*: pip install torch-npu=={torch_version.split('+')[0]})")
    return None


def _installed_npu_version() -> str | None:
    for dist in ("torch-npu", "torch_npu"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def simulate(required: tuple[str, ...] = REQUIRED_OPS) -> Availability:
    """Point the handle at the emulation and run on the CPU."""
    try:
        module = importlib.import_module("emulation.torch_npu")
    except ImportError as e:
        return Availability.no(f"--simulate needs the torch_npu emulation package 'emulation.torch_npu' ({e})")
    missing = [op for op in required if not hasattr(module, op)]
    if missing:
        return Availability.no(f"the torch_npu emulation lacks {', '.join(missing)}")
    runtime.use(module)
    return Availability(True, device=torch.device("cpu"), environment={
        "device_name": SIMULATION,
        "simulation": "torch_npu emulation (no Ascend hardware)",
        "torch_npu": f"emulation ({module.__version__})",
        "torch": torch.__version__,
    })


def hardware(module: ModuleType, required: tuple[str, ...]) -> Availability:
    """The real torch_npu: an NPU must be visible and every operator the adapter calls must exist."""
    version = getattr(module, "__version__", "unknown")
    npu = getattr(torch, "npu", None) or getattr(module, "npu", None)
    if npu is None or not npu.is_available() or npu.device_count() == 0:
        return Availability.no(f"torch_npu {version} is installed but no NPU device is visible (check `npu-smi info`, "
                               f"the driver, and ASCEND_RT_VISIBLE_DEVICES)")
    missing = [op for op in required if not hasattr(module, op)]
    if missing:
        return Availability.no(f"torch_npu {version} lacks {', '.join(missing)} (needs op-plugin 7.0.0 / torch_npu "
                               f"2.5.1 or later)")
    runtime.use(module)
    index = npu.current_device()
    environment = {"device_name": str(npu.get_device_name(index)), "torch_npu": version, "torch": torch.__version__,
                   "device_count": str(npu.device_count())}
    cann = getattr(getattr(module, "version", None), "cann", None)
    if cann:
        environment["cann"] = str(cann)
    return Availability(True, device=torch.device("npu", index), environment=environment)


def real_torch_npu(required: tuple[str, ...]) -> Availability:
    """The installed torch_npu: version pairing, import, device, operators."""
    npu_version = _installed_npu_version()
    if npu_version is not None:
        problem = pairing_problem(torch.__version__, npu_version)
        if problem:
            return Availability.no(problem)
    try:
        module = importlib.import_module("torch_npu")
    except Exception as e:  # a broken CANN install raises all sorts of errors at import time
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Availability.no(f"import torch_npu failed: {first} (is the CANN toolkit installed and its "
                               f"set_env.sh sourced?)")
    return hardware(module, required)


def probe_with(mode: RunMode, required: tuple[str, ...] = REQUIRED_OPS) -> Availability:
    """Say whether the backend can run here, resolving the torch_npu handle when it can."""
    if importlib.util.find_spec("torch_npu") is None:
        if mode.simulate:
            return simulate(required)
        return Availability.no(f"torch_npu is not installed ({INSTALL_HINT}); pass --simulate to run the torch_npu "
                               f"emulation on the CPU instead")
    avail = real_torch_npu(required)
    if not avail.ok and mode.simulate:
        return Availability.no(f"{avail.reason}; --simulate uses the torch_npu emulation only where torch_npu is "
                               f"not installed")
    return avail


def probe(mode: RunMode) -> Availability:
    """The descriptor's probe: see probe_with."""
    return probe_with(mode, REQUIRED_OPS)
