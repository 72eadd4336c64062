"""One rank of the `dist` level's collective checks (started by conformance.dist_checks with torchrun's
environment): the backend's communicator on its own device and communication library, against exact answers.

Values are small integers, so sums and copies are exact in bfloat16 and float32 alike: any difference is a wrong
collective, not rounding. Rank 0 prints one JSON line: [{name, ok, detail}].

    python -m conformance.dist_worker --backend NAME [--interpret] [--simulate]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from core import registry
from core.backend import RunMode
from core.parallel import launch

SIZES = (1, 1000, 1 << 20)  # elements: one, unaligned, 4 MB in float32
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def values(rank: int, n: int, dtype: torch.dtype, device: torch.device, salt: int = 0) -> torch.Tensor:
    return ((torch.arange(n, device=device) * 7 + salt + 3 * rank) % 61 - 30).to(dtype)


def checks(comm, device: torch.device) -> list[dict]:
    world, rank = comm.world_size, comm.rank
    out = []
    for dname, dtype in DTYPES.items():
        for n in SIZES:
            got = comm.all_reduce(values(rank, n, dtype, device))
            want = sum(values(r, n, torch.float64, device) for r in range(world)).to(dtype)
            ok = bool(torch.equal(got, want))
            diff = "" if ok else f"max diff {float((got.double() - want.double()).abs().max())}"
            out.append({"name": f"all_reduce/{dname}/{n}", "ok": ok, "detail": diff})
            for dim in (0, -1):
                shape = (1, n) if dim == -1 else (n, 1)
                got = comm.all_gather(values(rank, n, dtype, device).view(shape), dim)
                want = torch.cat([values(r, n, dtype, device).view(shape) for r in range(world)], dim=dim)
                out.append({"name": f"all_gather/dim{dim}/{dname}/{n}", "ok": bool(torch.equal(got, want)),
                            "detail": ""})
        # uneven all_to_all: rank s sends (s + d) % 3 rows (0, 1 or 2; some ranks send nothing) of width 5 to rank d
        width = 5

        def rows(s: int, d: int) -> torch.Tensor:
            k = (s + d) % 3
            return (torch.arange(k * width, device=device).view(k, width) + 100 * s + 10 * d).to(dtype)

        splits = [(rank + d) % 3 for d in range(world)]
        send = torch.cat([rows(rank, d) for d in range(world)])
        got = comm.all_to_all(send, splits)
        want = torch.cat([rows(s, rank) for s in range(world)])
        ok = got.shape == want.shape and bool(torch.equal(got, want))
        out.append({"name": f"all_to_all/uneven/{dname}", "ok": ok, "detail": f"splits {splits}"})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", required=True)
    ap.add_argument("--interpret", action="store_true")
    ap.add_argument("--simulate", action="store_true")
    a = ap.parse_args()
    backend, avail = registry.activate(a.backend, RunMode(interpret=a.interpret, simulate=a.simulate))
    par = launch.from_environment(backend, avail.device)
    try:
        results = par.agree("collectives", lambda: checks(par.comm, par.device))
        if par.is_first:
            print(json.dumps({"communicator": par.comm.describe(), "checks": results}))
    finally:
        launch.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
