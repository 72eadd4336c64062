"""rocm: the shared Triton kernels (backends/triton_kernels) on AMD GPUs, or on the CPU through the Triton
interpreter with --interpret (emulating an MI300). This directory holds only what is AMD's: the probe, the tuning
table (tuning.yaml, with waves_per_eu / matrix_instr_nonkdim / kpack), the manifest, and the FP8 weight format:
on MI300-class GPUs (gfx942) e4m3fn weights are re-encoded to e4m3fnuz with doubled scales and activations are
quantised with max 240 (numerics class `w8a8_fnuz`); gfx950 (MI350) keeps e4m3fn. torch.distributed reaches RCCL
through the "nccl" backend name. Importing this module imports neither triton nor a kernel.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from backends import triton_kernels
from backends.rocm.fnuz import e4m3fn_to_fnuz
from backends.rocm.probe import TARGET, resolver
from backends.rocm.probe import probe as _probe
from backends.triton_kernels.tuning import TuningTable
from core.backend import Backend

TUNING = TuningTable(Path(__file__).with_name("tuning.yaml"), resolver=resolver)


def _to_target(weight: Tensor, scale: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """e4m3fn codes -> e4m3fnuz (scales doubled) when the GPU is MI300-class; everything else unchanged."""
    if TARGET.fnuz and weight.dtype == torch.float8_e4m3fn:
        return e4m3fn_to_fnuz(weight, scale)
    return weight, scale


def prepare_linear(weight: Tensor, scale_inv: Tensor | None) -> object:
    """core.ops.prepare_linear with the weight in this GPU's FP8 flavour (see the module docstring)."""
    return triton_kernels.prepare_linear(*_to_target(weight, scale_inv))


def prepare_experts(gate: Tensor, gate_scale: Tensor | None, up: Tensor, up_scale: Tensor | None, down: Tensor,
                    down_scale: Tensor | None) -> object:
    """core.ops.prepare_experts with the experts in this GPU's FP8 flavour (see the module docstring)."""
    gate, gate_scale = _to_target(gate, gate_scale)
    up, up_scale = _to_target(up, up_scale)
    down, down_scale = _to_target(down, down_scale)
    return triton_kernels.prepare_experts(gate, gate_scale, up, up_scale, down, down_scale)


BACKEND = Backend(
    name="rocm",
    device_type="cuda",  # ROCm builds of torch expose AMD GPUs as torch.device("cuda")
    dist_backend="nccl",  # RCCL, under torch.distributed's "nccl" name
    probe=partial(_probe, tuning=TUNING),
    ops=triton_kernels.operator_table(TUNING),
    scale_fmt_ops=triton_kernels.scale_fmt_table(TUNING),
    prepare_linear=prepare_linear,
    prepare_experts=prepare_experts,
)
