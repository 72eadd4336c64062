"""One rank of the `dist` level's layer bisection (started by conformance.dist_checks with torchrun's environment,
or as one plain process for the golden trace): the embedded default, float32, one teacher-forced prefill of the
prompt, recording the output of every collective the graph makes. Those collectives close exactly the sharded
layers (the vocabulary-parallel embedding, each layer's attention with its heads split, each dense MLP or MoE
with its experts and intermediate size split, the vocabulary-parallel LM head), so the first recorded output that
differs from one process names the sharded layer that breaks. With one process the collectives are the identity
and the recording sees the same points.

    python -m conformance.dist_trace --backend NAME --out PATH.safetensors [--moe-combine MODE] [--interpret]
                                     [--simulate] [--prompt-ids 5,6,7]

Rank 0 writes PATH: one float32 tensor per collective, named "NNN label" in call order.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from core import registry
from core.backend import RunMode
from core.default_model import load_default
from core.dispatch import Dispatch
from core.generate import Generator
from core.model import Model
from core.parallel import launch

LABELS = {
    "embed": "embedding (vocabulary-parallel)",
    "_attention": "layer {layer} attention (heads split)",
    "_moe": "layer {layer} MoE (routed experts and shared expert split)",
    "_layer": "layer {layer} dense MLP (intermediate size split)",
    "logits": "LM head (vocabulary-parallel)",
}
"""The graph function that makes a collective -> the sharded layer it closes."""


class RecordingComm:
    """The model's communicator, recording (label, result) of every all_reduce and all_gather the graph makes.
    all_to_all (inside the routed experts) passes through unrecorded: its result is only a part of the layer."""

    def __init__(self, comm):
        self.comm, self.rank, self.world_size = comm, comm.rank, comm.world_size
        self.records: list[tuple[str, Tensor]] = []
        self.layer = -1

    def _record(self, out: Tensor) -> Tensor:
        caller = sys._getframe(2).f_code.co_name
        if caller == "_attention":
            self.layer += 1
        label = LABELS.get(caller, caller).format(layer=self.layer)
        self.records.append((label, out.detach().float().cpu().clone()))
        return out

    def all_reduce(self, x: Tensor) -> Tensor:
        return self._record(self.comm.all_reduce(x))

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        return self._record(self.comm.all_gather(x, dim))

    def all_to_all(self, x: Tensor, splits: Sequence[int]) -> Tensor:
        return self.comm.all_to_all(x, splits)

    def describe(self) -> str:
        return self.comm.describe()


def first_difference(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> tuple[str, float] | None:
    """The first recorded collective (in call order) whose output differs from `want` by more than `rtol`
    (norm-wise relative), with that error; a missing or extra record or a shape change counts as a difference."""
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            return name.split(" ", 1)[1], float("inf")
        a, b = got[name].double(), want[name].double()
        if a.shape != b.shape:
            return name.split(" ", 1)[1], float("inf")
        rel = float((a - b).norm() / b.norm().clamp_min(1e-300))
        if not rel <= rtol:
            return name.split(" ", 1)[1], rel
    return None


def main() -> int:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(prog="python -m conformance.dist_trace")
    ap.add_argument("--backend", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--moe-combine", default="all_reduce")
    ap.add_argument("--prompt-ids", default="0,5,6,7,8,9,10,11")
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--simulate", action="store_true")
    a = ap.parse_args()
    backend, avail = registry.activate(a.backend, RunMode(interpret=a.interpret, simulate=a.simulate))
    par = launch.from_environment(backend, avail.device, a.moe_combine)
    try:
        def trace() -> list[tuple[str, Tensor]]:
            ops = Dispatch(backend, registry.load(registry.REFERENCE), numerics=avail.numerics)
            model = Model.load(load_default(), ops, par.device or avail.device, torch.float32, with_mtp=False,
                               parallel=par)
            model.comm = RecordingComm(model.comm)
            Generator(model).teacher_forced_logits([int(t) for t in a.prompt_ids.split(",")])
            return model.comm.records

        records = par.agree("tracing", trace)
        if par.is_first:
            save_file({f"{i:03d} {label}": t.contiguous() for i, (label, t) in enumerate(records)}, a.out)
    finally:
        launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
