"""Tensor + expert parallelism on torch.distributed (ARCHITECTURE.md, "Communication" and "Parallelism").

One job per file:
    comm      the communicator: all_reduce, all_gather(x, dim), all_to_all(x, splits); identity with one process
    shard     the shard plan: which heads, intermediate channels, experts and vocabulary rows a rank holds
    loading   sharded loading: a rank reads only its slices; FP8 128x128 scale blocks kept or (cut) dequantised
    experts   the routed experts' share per rank: all_reduce of partial sums, or all_to_all dispatch/combine
    vocab     the vocabulary-parallel embedding lookup
    context   `Parallel`: communicator + rank + device + combine mode + failure agreement, handed to the graph
    launch    a rank started by torchrun: environment, process group with timeouts, device LOCAL_RANK, rank-0 output
The graph (core/model.py) only calls `comm.all_reduce` / `comm.all_gather` and the routed-experts callable.
"""

from core.parallel.comm import Communicator, SingleProcess, TorchDistributed
from core.parallel.context import Parallel
from core.parallel.shard import ShardPlan, Span

__all__ = ["Communicator", "Parallel", "ShardPlan", "SingleProcess", "Span", "TorchDistributed"]
