"""cpu: `moe_gate` (contract: core/ops.py; specification: backends/cpu_ref).

cpu_ref's vectorised PyTorch code serves here as is: elementwise work and the router are not where the time goes
(see the profile printed by bench/bench_cpu_peers.py)."""

from __future__ import annotations

from torch import Tensor

from backends.cpu_ref import OPS


def moe_gate(logits: Tensor, bias: Tensor | None, top_k: int, n_group: int, topk_group: int, scale: float,
             renorm: bool, scoring: str = "sigmoid", group_score: str = "top2_sum") -> tuple[Tensor, Tensor]:
    """Routing (noaux_tc for V3, softmax greedy / group-limited for V2): logits [T, E] float32, bias [E] or None ->
    (weights [T, top_k] float32, ids [T, top_k] int64)."""
    return OPS["moe_gate"](logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score)
