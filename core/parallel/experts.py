"""The routed experts under expert parallelism: each rank holds whole experts [e0, e1) and returns ITS SHARE of
the routed sum, [T, D]; the graph adds the shared experts' partial output and all-reduces once. Two ways to
produce that share, equal in result (ARCHITECTURE.md, "Parallelism"):

  all_reduce  (default) every rank runs all T tokens through its own experts: global ids outside [e0, e1) become -1
              (contract v2: held by another rank, contributes nothing). Its share is the partial sum over its
              experts.
  all_to_all  token dispatch and combine (DeepSeek's EP): rank r takes tokens [T*r/N, T*(r+1)/N), sends every
              (token, expert) pair to the rank holding that expert, which computes it (moe_experts with k = 1),
              and gets the outputs back, weighting and summing them in float32 itself. Its share is the complete
              routed sum of its tokens, zero for the other tokens. (Each pair's output is rounded to the working
              dtype before the combine, as in DeepSeek's and vLLM's dispatch.)

With one process both are `ops.moe_experts` on the unchanged ids (all_to_all's exchanges are the identity).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.parallel.comm import Communicator
from core.parallel.shard import Span

MODES = ("all_reduce", "all_to_all")


def local_ids(ids: Tensor, mine: Span | None) -> Tensor:
    """Global expert ids -> this rank's numbering, -1 for experts another rank holds (mine None: unchanged)."""
    if mine is None:
        return ids
    held = (ids >= mine.start) & (ids < mine.stop)
    return torch.where(held, ids - mine.start, torch.full_like(ids, -1))


class AllReduceExperts:
    """Partial sums over this rank's experts (the graph's all_reduce completes them)."""

    mode = "all_reduce"

    def __init__(self, ops, comm: Communicator):
        self.ops, self.comm = ops, comm

    def __call__(self, x: Tensor, experts: object, mine: Span | None, weights: Tensor, ids: Tensor) -> Tensor:
        return self.ops.moe_experts(x, experts, weights, local_ids(ids, mine))


class AllToAllExperts:
    """Token dispatch and combine over all_to_all (see the module docstring)."""

    mode = "all_to_all"

    def __init__(self, ops, comm: Communicator):
        self.ops, self.comm = ops, comm

    def __call__(self, x: Tensor, experts: object, mine: Span | None, weights: Tensor, ids: Tensor) -> Tensor:
        if mine is None:  # this rank holds every expert: nothing to exchange
            return self.ops.moe_experts(x, experts, weights, ids)
        n, rank = self.comm.world_size, self.comm.rank
        tokens, k = ids.shape
        t0, t1 = tokens * rank // n, tokens * (rank + 1) // n
        flat_ids = ids[t0:t1].reshape(-1)
        per_rank = mine.size  # every rank holds the same number of experts
        dest = flat_ids // per_rank
        order = torch.argsort(dest, stable=True)
        splits = torch.bincount(dest, minlength=n).tolist()
        pair_token = t0 + order // k
        # dispatch: each pair's token row and global expert id to the rank holding the expert
        recv_x = self.comm.all_to_all(x[pair_token], splits)
        recv_ids = self.comm.all_to_all(flat_ids[order], splits)
        recv_counts = self.comm.all_to_all(torch.tensor(splits, dtype=torch.int64, device=x.device), [1] * n)
        ones = torch.ones(recv_x.shape[0], 1, dtype=weights.dtype, device=x.device)
        y = self.ops.moe_experts(recv_x, experts, ones, (recv_ids - mine.start)[:, None])
        # combine: outputs back to the ranks that sent the pairs, in the order they were sent
        back = self.comm.all_to_all(y, recv_counts.tolist())
        per_pair = torch.empty_like(back)
        per_pair[order] = back
        w = weights[t0:t1].to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        mine_sum = (per_pair.to(w.dtype).view(t1 - t0, k, x.shape[1]) * w[..., None]).sum(dim=1)
        share = torch.zeros(x.shape, dtype=x.dtype, device=x.device)
        share[t0:t1] = mine_sum.to(x.dtype)
        return share


def routed_experts(mode: str, ops, comm: Communicator):
    if mode == "all_reduce":
        return AllReduceExperts(ops, comm)
    if mode == "all_to_all":
        return AllToAllExperts(ops, comm)
    raise ValueError(f"MoE combine mode must be one of {', '.join(MODES)}, got {mode!r}")
