"""ascend_w8a8: the ascend backend with W8A8 int8 GEMMs (numerics class `w8a8_int8`): linear through
npu_dynamic_quant + npu_quant_matmul, routed experts through int8 npu_grouped_matmul. Every other operator is the
ascend backend's. Select it with DSV3_BACKENDS_PATH=backends/ascend/variants and --backend ascend_w8a8.
Conformance judges its linear and moe_experts against cpu_ref's w8a8_int8 class (backends/cpu_ref/linear_int8.py).
"""

from __future__ import annotations

from backends.ascend import OPS
from backends.ascend.availability import REQUIRED_OPS, probe_with
from backends.ascend.w8a8 import linear_w8a8, moe_experts_w8a8, prepare_experts_w8a8, prepare_linear_w8a8
from core.backend import Availability, Backend, RunMode

W8A8_REQUIRED_OPS = REQUIRED_OPS + ("npu_dynamic_quant", "npu_quant_matmul")


def probe(mode: RunMode) -> Availability:
    """The ascend probe, also requiring the int8 operators."""
    return probe_with(mode, W8A8_REQUIRED_OPS)


BACKEND = Backend(
    name="ascend_w8a8",
    device_type="npu",
    dist_backend="hccl",
    probe=probe,
    ops={**OPS, "linear": linear_w8a8, "moe_experts": moe_experts_w8a8},
    prepare_linear=prepare_linear_w8a8,
    prepare_experts=prepare_experts_w8a8,
)
