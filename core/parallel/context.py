"""`Parallel`: what a rank needs to run its shard: the communicator, its rank, device, the MoE combine mode, and
how it agrees with the other ranks on failures (so that every rank exits with the same status and one line)."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import torch

from core.config import ModelConfig
from core.errors import CheckpointError, ContractError, UserError
from core.parallel.comm import Communicator, SingleProcess
from core.parallel.experts import MODES, routed_experts
from core.parallel.shard import ShardPlan

T = TypeVar("T")


@dataclass
class Parallel:
    comm: Communicator = field(default_factory=SingleProcess)
    moe_combine: str = "all_reduce"
    strict: bool = False
    device: torch.device | None = None
    local_rank: int = 0
    agree_fn: Callable[[str | None], list[str | None]] | None = None  # gathers every rank's error (None: ok)

    def __post_init__(self):
        if self.moe_combine not in MODES:
            raise UserError(f"--moe-combine must be one of {', '.join(MODES)}, got {self.moe_combine!r}")

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def is_first(self) -> bool:
        """Rank 0: the one rank that prints (and serves HTTP)."""
        return self.comm.rank == 0

    def plan(self, cfg: ModelConfig) -> ShardPlan:
        return ShardPlan.for_rank(cfg, self.comm.rank, self.comm.world_size)

    def routed_experts(self, ops):
        return routed_experts(self.moe_combine, ops, self.comm)

    def agree(self, what: str, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails on any, every rank raises the same one-line UserError naming the
        first rank that failed and why (so all exit with status 2 and nobody waits on a dead peer)."""
        if self.agree_fn is None:
            return fn()
        error, result = None, None
        try:
            result = fn()
        except (UserError, ContractError, CheckpointError) as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 -- reported to every rank as one line, then raised there
            if os.environ.get("DSV3_DEBUG"):
                traceback.print_exc()
            error = f"{type(e).__name__}: {e}".splitlines()[0]
        errors = self.agree_fn(error)
        for rank, err in enumerate(errors):
            if err is not None:
                raise UserError(f"{what} failed on rank {rank} of {len(errors)}: {err}")
        return result
