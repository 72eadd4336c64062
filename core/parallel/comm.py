"""The communicator: the graph's three collectives over the model's process group (ARCHITECTURE.md,
"Communication").

    all_reduce(x)            sum over ranks; every rank gets the sum                     [..] -> [..], same dtype
    all_gather(x, dim)       concatenation of every rank's x along `dim`, rank order    [.., n, ..] -> [.., N*n, ..]
    all_to_all(x, splits)    rows x[sum(splits[:r]) : sum(splits[:r+1])] go to rank r; returns the rows every rank
                             sent to this one, concatenated in source-rank order          [M, ..] -> [M', ..]

`SingleProcess` is the identity (nothing initialised, tensors returned as they are, so one process is bit-identical
to a run without parallelism). `TorchDistributed` runs them with torch.distributed on the group it is given, in the
backend's `dist_backend`. Tensors go in and come out on the backend's device in their own dtype; the collective
sums in that dtype (as NCCL and gloo do).
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class Communicator(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: Tensor) -> Tensor: ...

    def all_gather(self, x: Tensor, dim: int) -> Tensor: ...

    def all_to_all(self, x: Tensor, splits: Sequence[int]) -> Tensor: ...

    def describe(self) -> str: ...


class SingleProcess:
    """One process: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce(self, x: Tensor) -> Tensor:
        return x

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        return x

    def all_to_all(self, x: Tensor, splits: Sequence[int]) -> Tensor:
        if list(splits) != [x.shape[0]]:
            raise ValueError(f"all_to_all with one process: splits {list(splits)} must be [{x.shape[0]}]")
        return x

    def describe(self) -> str:
        return "single process (collectives are the identity)"


class TorchDistributed:
    """torch.distributed collectives on `group` (None: the default group), whose backend is `name`."""

    def __init__(self, name: str, group: dist.ProcessGroup | None = None):
        self.name = name
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, x: Tensor) -> Tensor:
        out = x.clone(memory_format=torch.contiguous_format)  # never the caller's tensor
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_to_all(self, x: Tensor, splits: Sequence[int]) -> Tensor:
        splits = [int(s) for s in splits]
        if len(splits) != self.world_size or sum(splits) != x.shape[0]:
            raise ValueError(f"all_to_all: splits {splits} must be {self.world_size} row counts summing to "
                             f"{x.shape[0]}")
        send = torch.tensor(splits, dtype=torch.int64, device=x.device)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # how many rows each rank sends here
        recv_splits = [int(r) for r in recv.tolist()]
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_splits, input_split_sizes=splits,
                               group=self.group)
        return out

    def describe(self) -> str:
        return f"torch.distributed ({self.name}), {self.world_size} ranks"
