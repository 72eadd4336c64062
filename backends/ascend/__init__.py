"""ascend: Huawei Ascend A2/A3 through torch_npu operators (the ones Ascend deployments of DeepSeek-V3 use).

    rms_norm / add_rms_norm   npu_rms_norm / npu_add_rms_norm
    apply_rope                npu_rotary_mul (rotary_mode='half', full-width cos/sin)
    linear                    matmul on bfloat16 weights (FP8 blocks dequantised at load: A2/A3 have no FP8)
    silu_and_mul              npu_swiglu
    attention_prefill         npu_fused_infer_attention_score (TND, sparse_mode 3, cumulative lengths)
    mla_decode                npu_fused_infer_attention_score (absorbed MLA: latent as key/value, query_rope/key_rope)
    moe_gate                  npu_moe_gating_top_k (sigmoid + group_select_mode 1 for V3, softmax + mode 0 for V2;
                              renorm 0, routed_scaling_factor)
    moe_experts               npu_moe_init_routing_v2 + npu_grouped_matmul + npu_swiglu + npu_moe_finalize_routing

Every operator calls `torch_npu.<op>` through backends.ascend.runtime's handle, which the probe points at the real
torch_npu, or under --simulate (torch_npu absent) at the emulation in emulation/torch_npu: the code is the same in
both places. Inputs outside an operator's documented limits go to cpu_ref visibly (`Limited`, manifest `limits`).
"""

from __future__ import annotations

from backends.ascend.activation import silu_and_mul
from backends.ascend.attention import attention_prefill, decode_supports, mla_decode, prefill_supports
from backends.ascend.experts import moe_experts, prepare_experts
from backends.ascend.gate import gate_supports, moe_gate
from backends.ascend.linear import linear, prepare_linear
from backends.ascend.norm import add_rms_norm, rms_norm
from backends.ascend.availability import probe
from backends.ascend.rope import apply_rope
from core.backend import Backend, Limited

OPS = {
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "apply_rope": apply_rope,
    "linear": linear,
    "silu_and_mul": silu_and_mul,
    "attention_prefill": Limited(attention_prefill, prefill_supports),
    "mla_decode": Limited(mla_decode, decode_supports),
    "moe_gate": Limited(moe_gate, gate_supports),
    "moe_experts": moe_experts,
}

BACKEND = Backend(
    name="ascend",
    device_type="npu",
    dist_backend="hccl",
    probe=probe,
    ops=dict(OPS),
    prepare_linear=prepare_linear,
    prepare_experts=prepare_experts,
)
