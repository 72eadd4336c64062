"""The `dist` level: the backend sharded across processes, against the single-process golden.

    python -m conformance --backend NAME --level dist [--nproc 2,4]

1. collectives (conformance.dist_worker at each rank count): all_reduce, all_gather (both ends) and all_to_all with
   uneven splits, bfloat16 and float32, one element to 4 MB, on the backend's device and communication library;
   a failure names the collective, dtype and size.
2. the embedded default, float32, sharded at each rank count in both MoE combine modes (all_to_all with MTP
   speculative decoding) against one process of the same backend: greedy tokens equal for 16 new tokens,
   teacher-forced logits within 1e-5 relative; a failure names the rank count, mode and what differs, and is
   bisected (conformance.dist_trace): the output of every collective of one prefill, sharded against one process,
   names the first sharded layer that differs (embedding, layer i's attention, dense MLP or MoE, LM head).
Ranks are started here with torchrun's environment variables on 127.0.0.1 (one node); each launch is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conformance.context import FAIL, PASS, CheckResult, Suite
from conformance.dist_trace import first_difference

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600
NEW_TOKENS = 16
PROMPT = "5,6,7,8,9,10,11"
LOGITS_RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, module: str, args: list[str]) -> tuple[int, str, str]:
    """`python -m module args` as n ranks (n = 1: a plain process); rank 0's (status, stdout, stderr), the worst
    status of all ranks. Every rank is killed if the launch outlives TIMEOUT_S."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "120",
           "DSV3_EMBEDDED": "generated"}  # the generated default: decisive routing, so sharding cannot flip an expert
    procs = []
    for r in range(n):
        rank_env = env if n == 1 else {**env, "WORLD_SIZE": str(n), "RANK": str(r), "LOCAL_RANK": str(r),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=rank_env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        return 124, "", f"{n} ranks did not finish within {TIMEOUT_S} s"
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    status = max(p.returncode for p in procs)
    return status, outs[0][0], outs[0][1]


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def _mode_flags(suite: Suite) -> list[str]:
    return ["--interpret"] * suite.mode.interpret + ["--simulate"] * suite.mode.simulate


def collective_checks(suite: Suite, n: int) -> list[CheckResult]:
    t0 = time.perf_counter()
    status, out, err = launch(n, "conformance.dist_worker", ["--backend", suite.backend.name, *_mode_flags(suite)])
    if status != 0:
        return [CheckResult("dist", f"dist/collectives/{n}-ranks", "collectives", FAIL,
                            seconds=time.perf_counter() - t0, detail=_last_line(err))]
    data = json.loads(_last_line(out))
    return [CheckResult("dist", f"dist/{c['name']}/{n}-ranks", c["name"].split("/")[0], PASS if c["ok"] else FAIL,
                        dtype=next((d for d in ("float32", "bfloat16") if d in c["name"]), ""),
                        detail=c["detail"] or data["communicator"], seconds=time.perf_counter() - t0)
            for c in data["checks"]]


def _run_args(suite: Suite, logits: Path, *extra: str) -> list[str]:
    return ["--backend", suite.backend.name, *_mode_flags(suite), "--dtype", "float32", "--prompt-ids", PROMPT,
            "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos", "--json", "--logits-out", str(logits), *extra]


def bisect(suite: Suite, tmp: Path, n: int, mode: str) -> tuple[str, list[str]]:
    """(detail, culprits): the first sharded layer whose output at n ranks in `mode` differs from one process."""
    from safetensors.torch import load_file

    traces = {}
    for ranks in (1, n):
        path = tmp / f"trace-{ranks}-{mode}.safetensors"
        if not path.exists():
            status, _, err = launch(ranks, "conformance.dist_trace", ["--backend", suite.backend.name,
                                                                        *_mode_flags(suite), "--moe-combine", mode,
                                                                        "--out", str(path)])
            if status != 0:
                return f"; the layer bisection failed at {ranks} rank(s): {_last_line(err)}", []
        traces[ranks] = load_file(str(path))
    first = first_difference(traces[n], traces[1], LOGITS_RTOL)
    if first is None:
        return "; every sharded layer of one prefill agrees with one process (the difference is in decoding)", []
    layer, rel = first
    return f"; first sharded layer that differs from one process: {layer} (relative error {rel:.2g})", [layer]


def model_checks(suite: Suite, counts: list[int]) -> list[CheckResult]:
    from safetensors.torch import load_file

    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        golden_path = tmp / "one.safetensors"
        status, out, err = launch(1, "core.run", _run_args(suite, golden_path))
        if status != 0:
            return [CheckResult("dist", "dist/model/golden", "model", FAIL, detail=_last_line(err))]
        golden = json.loads(_last_line(out))
        want = load_file(str(golden_path))["logits"].double()
        for n in counts:
            for mode, extra in (("all_reduce", []), ("all_to_all", ["--mtp"])):
                t0 = time.perf_counter()
                path = tmp / f"{n}-{mode}.safetensors"
                name = f"dist/model/{n}-ranks/{mode}" + ("+mtp" if extra else "")
                status, out, err = launch(n, "core.run", _run_args(suite, path, "--moe-combine", mode, *extra))
                if status != 0:
                    results.append(CheckResult("dist", name, "model", FAIL, detail=_last_line(err),
                                               seconds=time.perf_counter() - t0))
                    continue
                rep = json.loads(_last_line(out))
                got = load_file(str(path))["logits"].double()
                rel = float((got - want).norm() / want.norm())
                same = rep["output_ids"] == golden["output_ids"]
                pairs = zip(rep["output_ids"], golden["output_ids"])
                first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
                detail = "" if same else f"greedy tokens differ from one process from position {first}"
                ok = same and rel <= LOGITS_RTOL
                culprits = []
                if not ok:
                    where, culprits = bisect(suite, tmp, n, mode)
                    detail = (detail or f"logits differ from one process by {rel:.2g} relative") + where
                results.append(CheckResult("dist", name, "model", PASS if ok else FAIL, dtype="float32",
                                           shape=f"{NEW_TOKENS} new tokens", rel_err=rel, tolerance=LOGITS_RTOL,
                                           tolerance_reason="reduction order of the all_reduce",
                                           seconds=time.perf_counter() - t0,
                                           detail=detail or (f"MTP accepted {rep['mtp']['accepted']}/"
                                                             f"{rep['mtp']['proposed']}" if extra else ""),
                                           culprits=culprits))
    return results


def run(suite: Suite, counts: list[int]) -> list[CheckResult]:
    results = []
    for n in counts:
        results += collective_checks(suite, n)
    return results + model_checks(suite, counts)
