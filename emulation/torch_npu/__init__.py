"""A pure-PyTorch emulation of the torch_npu operators a DeepSeek-V3 inference path uses on Ascend A2/A3.

Written from the documented semantics (shared/reference/torch_npu_ops.md, which cites the op-plugin docs and real
callers), independently of this project's reference backend, so that running an adapter against it checks the
adapter's glue: argument names and order, layouts, index conventions, mask polarity, scales and dtypes. Each
operator keeps torch_npu's exact signature (positional/keyword split and defaults) and raises `NpuRejection`
(a RuntimeError) where the documented parameter checks would reject an input; `CONFIG.strict` (on by default) adds
checks for undefined behaviour and documented traps (see `_common`). It never registers an "npu" device and is never
installed as `sys.modules["torch_npu"]`: a backend's probe hands this module over in place of the real one.

It does not model the real kernels' numerics (accumulation order, internal precision), performance, memory formats
such as FRACTAL_NZ, paged KV caches, FP8 (Ascend 950) paths, or any undocumented behaviour.
"""

from __future__ import annotations

from emulation.torch_npu._common import CONFIG, NotEmulated, NpuRejection, configure, configured
from emulation.torch_npu.activation import npu_swiglu
from emulation.torch_npu.attention import npu_fused_infer_attention_score
from emulation.torch_npu.gating import npu_moe_gating_top_k
from emulation.torch_npu.gmm import npu_grouped_matmul
from emulation.torch_npu.norm import npu_add_rms_norm, npu_rms_norm
from emulation.torch_npu.quant import npu_dynamic_quant, npu_quant_matmul
from emulation.torch_npu.rotary import npu_rotary_mul
from emulation.torch_npu.routing import npu_moe_finalize_routing, npu_moe_init_routing_v2

__version__ = "2.14.0+emulation"
"""The torch-npu release whose documented operator semantics this emulates (torch_npu_ops.md §1)."""

EMULATION = True
"""Lets a caller tell this module from the real torch_npu without importing anything else."""

OPERATORS = (
    "npu_rms_norm", "npu_add_rms_norm", "npu_rotary_mul", "npu_fused_infer_attention_score", "npu_moe_gating_top_k",
    "npu_moe_init_routing_v2", "npu_grouped_matmul", "npu_swiglu", "npu_moe_finalize_routing", "npu_dynamic_quant",
    "npu_quant_matmul",
)

__all__ = list(OPERATORS) + ["CONFIG", "NotEmulated", "NpuRejection", "configure", "configured", "__version__"]
