"""cpu_ref: the executable specification of the operator contract, in plain PyTorch.

Every operator computes in float32 (float64 for float64 inputs) with one rounding to the working dtype, and runs
on whatever torch device its inputs live on: other backends fall back to it on their own device, and conformance
runs it in float64 on the CPU for golden values. Readable first; fast is not its job.
"""

from __future__ import annotations

import torch

from backends.cpu_ref.activation import silu_and_mul
from backends.cpu_ref.attention import attention_prefill, mla_decode
from backends.cpu_ref.linear import (
    linear,
    linear_w8a8,
    linear_w8a8_fnuz,
    linear_w8a8_fnuz_ue8m0,
    linear_w8a8_ue8m0,
    prepare_linear,
)
from backends.cpu_ref.linear_int8 import linear_w8a8_int8, moe_experts_w8a8_int8
from backends.cpu_ref.moe import (
    moe_experts,
    moe_experts_w8a8,
    moe_experts_w8a8_fnuz,
    moe_experts_w8a8_fnuz_ue8m0,
    moe_experts_w8a8_ue8m0,
    moe_gate,
    prepare_experts,
)
from backends.cpu_ref.norm import add_rms_norm, rms_norm
from backends.cpu_ref.rope import apply_rope
from core.backend import Availability, Backend, RunMode

OPS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "apply_rope": apply_rope,
    "linear": linear,
    "silu_and_mul": silu_and_mul,
    "attention_prefill": attention_prefill,
    "mla_decode": mla_decode,
    "moe_gate": moe_gate,
    "moe_experts": moe_experts,
}

NUMERICS = {
    "reference": OPS,
    "w8a8": {**OPS, "linear": linear_w8a8, "moe_experts": moe_experts_w8a8},
    "w8a8_fnuz": {**OPS, "linear": linear_w8a8_fnuz, "moe_experts": moe_experts_w8a8_fnuz},
    "w8a8_int8": {**OPS, "linear": linear_w8a8_int8, "moe_experts": moe_experts_w8a8_int8},
    "w8a8_ue8m0": {**OPS, "linear": linear_w8a8_ue8m0, "moe_experts": moe_experts_w8a8_ue8m0},
    "w8a8_fnuz_ue8m0": {**OPS, "linear": linear_w8a8_fnuz_ue8m0, "moe_experts": moe_experts_w8a8_fnuz_ue8m0},
}
"""Numerics class -> the reference operators that define it (what conformance compares a backend with)."""


def probe(mode: RunMode) -> Availability:
    return Availability(True, device=torch.device("cpu"), environment={"device_name": "CPU"})


BACKEND = Backend(
    name="cpu_ref",
    device_type="cpu",
    dist_backend="gloo",
    probe=probe,
    ops=dict(OPS),
    prepare_linear=prepare_linear,
    prepare_experts=prepare_experts,
)
