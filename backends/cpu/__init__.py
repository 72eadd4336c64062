"""cpu: the fast CPU backend (started from `python -m conformance new-backend cpu`).

Weights are prepared once at load (weights.py): those exactly fp16 after a power-of-two shift (every bf16 weight)
as fbgemm's packed fp16 where the CPU has no bf16 dot product (fp16.py: float32 products and sums, the same numbers
as float32 weights, 2-4x MKL's float32 GEMM on AVX2); FP8 dequantised to float32 as cpu_ref does per call; other bf16
kept for oneDNN where bf16 is native, or for torch's GEMV and a chunked widening (widen.py) where it is emulated.
The MoE groups tokens by expert (two GEMMs per active expert per call), prefill runs on torch's fused SDPA and the
absorbed paged MLA decode as two float32 bmm over one batched gather of the cache rows, its rows and mask built once
per step. `prepare_mla` (the optional hook of core/ops.py) widens MLA decode's absorbed kv_b halves to float32 where
bfloat16 is emulated, since torch's bfloat16 bmm is 20-80x slower than float32 there. rms_norm is one call of
torch's rms_norm, add_rms_norm and silu_and_mul in fewer passes than cpu_ref (bit-identical), the router in fewer
ops (bit-identical); rope reuses cpu_ref's PyTorch code. torch.compile was measured and not used: 188 s to compile
add_rms_norm alone on this 2-core machine, and slower than eager afterwards. cpu_ref stays the specification
conformance compares with; this backend is the default when no backend is named and no accelerator is present
(core/registry.py).
"""

from __future__ import annotations

import torch

from core.backend import Availability, Backend, RunMode

from . import machine
from .ops.rms_norm import rms_norm
from .ops.add_rms_norm import add_rms_norm
from .ops.apply_rope import apply_rope
from .ops.linear import linear
from .ops.silu_and_mul import silu_and_mul
from .ops.attention_prefill import attention_prefill
from .ops.mla_decode import mla_decode
from .ops.moe_gate import moe_gate
from .ops.moe_experts import moe_experts
from .weights import prepare_experts, prepare_linear, prepare_mla


def probe(mode: RunMode) -> Availability:
    """Always available (any CPU torch runs on); sets torch's intra-op threads from the machine (tuning.yaml)."""
    if torch.get_num_threads() != machine.threads():
        torch.set_num_threads(machine.threads())
    return Availability(True, device=torch.device("cpu"), environment={"device_name": f"CPU ({machine.describe()})"})


BACKEND = Backend(
    name="cpu",
    device_type="cpu",
    dist_backend="gloo",
    probe=probe,
    ops={
        "rms_norm": rms_norm,
        "add_rms_norm": add_rms_norm,
        "apply_rope": apply_rope,
        "linear": linear,
        "silu_and_mul": silu_and_mul,
        "attention_prefill": attention_prefill,
        "mla_decode": mla_decode,
        "moe_gate": moe_gate,
        "moe_experts": moe_experts,
    },
    prepare_linear=prepare_linear,
    prepare_experts=prepare_experts,
    prepare_mla=prepare_mla,
)
