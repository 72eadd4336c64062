"""cuda: the shared Triton kernels (backends/triton_kernels) on NVIDIA GPUs, or on the CPU through the Triton
interpreter with --interpret. This directory holds only what is NVIDIA's: the probe, the tuning table
(tuning.yaml, per device name) and the manifest. FP8 weights stay e4m3fn with their 128x128 block scales; linear and
moe_experts run W8A8 (numerics class `w8a8`). Importing this module imports neither triton nor a kernel.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from backends import triton_kernels
from backends.cuda.probe import probe as _probe
from backends.cuda.probe import resolver
from backends.triton_kernels.tuning import TuningTable
from core.backend import Backend

TUNING = TuningTable(Path(__file__).with_name("tuning.yaml"), resolver=resolver)

BACKEND = Backend(
    name="cuda",
    device_type="cuda",
    dist_backend="nccl",
    probe=partial(_probe, tuning=TUNING),
    ops=triton_kernels.operator_table(TUNING),
    scale_fmt_ops=triton_kernels.scale_fmt_table(TUNING),
    prepare_linear=triton_kernels.prepare_linear,
    prepare_experts=triton_kernels.prepare_experts,
)
