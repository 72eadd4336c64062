"""Starting a rank the way torchrun does it: world size, rank and local rank from the environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), the process group on the backend's `dist_backend` with a timeout,
the backend's device `LOCAL_RANK`, and only rank 0 printing. With WORLD_SIZE unset or 1 nothing is initialised.

Failures: `Parallel.agree` makes every rank learn a failure at the next agreement point (after loading, and at the
end of the run) and exit with the same status and one line. A rank that fails between collectives goes straight to
the agreement; the others notice at their next collective, which times out after DSV3_DIST_TIMEOUT seconds
(default 300), and join it (the agreement's own group waits twice as long), so nothing hangs. A rank that dies
outright is torchrun's to notice: it ends the others.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from core.backend import Backend
from core.errors import UserError
from core.parallel.comm import TorchDistributed
from core.parallel.context import Parallel

DEFAULT_TIMEOUT_S = 300.0


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def timeout_seconds() -> float:
    value = os.environ.get("DSV3_DIST_TIMEOUT", "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"DSV3_DIST_TIMEOUT={value!r} is not a number of seconds") from None


def world_size_from_env() -> int:
    return _int_env("WORLD_SIZE", 1)


def rank_device(backend: Backend, device: torch.device, local_rank: int) -> torch.device:
    """The backend's device number LOCAL_RANK (the CPU has one device, shared by every rank)."""
    if device.type == "cpu":
        return device
    count = getattr(torch, device.type).device_count() if hasattr(torch, device.type) else 0
    if count and local_rank >= count:
        raise UserError(f"LOCAL_RANK {local_rank}: this node has {count} {device.type} devices; start at most "
                        f"{count} ranks per node (--nproc-per-node)")
    new = torch.device(device.type, local_rank)
    module = getattr(torch, device.type, None)
    if module is not None and hasattr(module, "set_device"):
        module.set_device(new)
    return new


def silence_other_ranks(rank: int) -> None:
    """Only rank 0 prints; the others' stdout and stderr go nowhere (DSV3_DEBUG=1 keeps them, for tracebacks)."""
    if rank != 0 and not os.environ.get("DSV3_DEBUG"):
        devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
        sys.stdout = devnull
        sys.stderr = devnull


def from_environment(backend: Backend, device: torch.device, moe_combine: str = "all_reduce",
                     strict: bool = False) -> Parallel:
    """The Parallel of this process: SingleProcess without torchrun's environment, else an initialised process
    group on `backend.dist_backend` (or the backend's own communicator, when it supplies one)."""
    world = world_size_from_env()
    if world <= 1:
        return Parallel(moe_combine=moe_combine, strict=strict, device=device)
    rank, local_rank = _int_env("RANK", 0), _int_env("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise UserError(f"WORLD_SIZE={world} but {var} is not set: launch with torchrun --nproc-per-node N")
    silence_other_ranks(rank)
    device = rank_device(backend, device, local_rank)
    timeout = timedelta(seconds=timeout_seconds())
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend.dist_backend, rank=rank, world_size=world, timeout=timeout)
        except (RuntimeError, ValueError) as e:
            raise UserError(f"cannot start torch.distributed ({backend.dist_backend}, rank {rank} of {world}): "
                            f"{str(e).splitlines()[0]}") from None
    # failures are agreed on over a separate gloo group that waits longer than a data collective does, so a rank
    # that failed outside a collective still hears from the ranks whose next collective timed out waiting for it
    control = dist.new_group(backend="gloo", timeout=2 * timeout + timedelta(seconds=10))
    make = getattr(backend, "communicator", None)
    comm = make(dist.group.WORLD) if make is not None else TorchDistributed(backend.dist_backend)

    def agree_fn(error: str | None) -> list[str | None]:
        errors: list[str | None] = [None] * world
        dist.all_gather_object(errors, error, group=control)
        return errors

    return Parallel(comm=comm, moe_combine=moe_combine, strict=strict, device=device, local_rank=local_rank,
                    agree_fn=agree_fn)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def load_progress(parallel: Parallel):
    """Rank 0's loading progress on a terminal (one line rewritten in place on stderr), else None."""
    if not parallel.is_first or not sys.stderr.isatty():
        return None
    prefix = f"loading ({parallel.world_size} ranks) " if parallel.world_size > 1 else "loading "

    def show(text: str) -> None:
        sys.stderr.write(f"\r{prefix}{text}\033[K")
        sys.stderr.flush()
    return show
