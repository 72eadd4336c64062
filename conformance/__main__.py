"""`python -m conformance`: judge a backend, or scaffold a new one. See conformance/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from conformance import block_checks, dist_checks, model_checks, op_checks, report, scaffold
from conformance.context import PASS, CheckResult, Suite
from core import registry
from core.backend import RunMode
from core.errors import UserError
from core.ops import OPERATORS
from core.run import OneLineParser, run_cli
from core.safe_files import check_output_target, quote_name

LEVELS = ("op", "block", "model", "dist")


def parse(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="python -m conformance", description="Judge a backend against cpu_ref.")
    p.add_argument("--backend", required=True)
    p.add_argument("--interpret", action="store_true", help="run Triton kernels through the interpreter (CPU)")
    p.add_argument("--simulate", action="store_true", help="run against the vendor library's emulation")
    p.add_argument("--level", default="op,block,model", help="comma-separated: op, block, model, dist")
    p.add_argument("--nproc", default="2,4", help="dist level: comma-separated rank counts (default 2,4)")
    p.add_argument("--ops", help="comma-separated operators (op level only); default: all")
    p.add_argument("--cases", choices=["quick", "full", "gpu"],
                   help="case set (default: quick under --interpret/--simulate, else full)")
    p.add_argument("--seed", type=int, help="seed of the random inputs (default: fresh, recorded in the report)")
    p.add_argument("--report", type=Path, help="write report.json and report.md here")
    p.add_argument("--compare", type=Path, help="another report.json to compare with")
    p.add_argument("--no-bisect", action="store_true", help="do not isolate operators when a model check fails")
    args = p.parse_args(argv)
    levels = [x.strip() for x in args.level.split(",") if x.strip()]
    bad = [x for x in levels if x not in LEVELS]
    if bad or not levels:
        raise UserError(f"--level: unknown level(s) {bad or args.level!r}; choose from {', '.join(LEVELS)}")
    args.levels = levels
    try:
        args.nproc_list = [int(x) for x in args.nproc.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--nproc: expected comma-separated integers, got {args.nproc!r}") from None
    if not args.nproc_list or any(n < 2 for n in args.nproc_list):
        raise UserError(f"--nproc: every rank count must be >= 2, got {args.nproc!r}")
    args.op_list = None
    if args.ops:
        args.op_list = [x.strip() for x in args.ops.split(",") if x.strip()]
        unknown = [x for x in args.op_list if x not in OPERATORS]
        if unknown:
            raise UserError(f"--ops: {', '.join(unknown)} not in the contract ({', '.join(OPERATORS)})")
    if args.compare is not None:  # validated in full before anything runs
        args.other = report.read_other(args.compare)
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.report is not None:
        check_output_target(args.report, "--report", directory=True)  # nothing is created before the run ends
    return args


def writable_directory(path: Path, option: str) -> None:
    """Refuse, before any work, a path that is a file or a directory that cannot be created or written."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{option}: {quote_name(str(path))} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{option}: cannot create {quote_name(str(path))} ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{option}: {quote_name(str(path))} is not writable")


def run_suite(suite: Suite, levels: list[str], ops: list[str] | None = None, bisect: bool = True,
              echo=print, nproc: list[int] = (2, 4)) -> list[CheckResult]:
    results: list[CheckResult] = []
    runners = {"op": lambda: op_checks.run(suite, ops), "block": lambda: block_checks.run(suite),
               "model": lambda: model_checks.run(suite, bisect), "dist": lambda: dist_checks.run(suite, list(nproc))}
    for level in levels:
        for r in runners[level]():
            results.append(r)
            err = "" if r.rel_err is None else f" err {r.rel_err:.3g}" + (
                f" (tol {r.tolerance:.3g})" if r.tolerance is not None else "")
            echo(f"{r.verdict.upper():4s} {r.name}{err}{'  ' + r.detail if r.detail and r.verdict != PASS else ''}")
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "new-backend":
        p = OneLineParser(prog="python -m conformance new-backend")
        p.add_argument("name")
        p.add_argument("--dir", type=Path, help="create it here instead of backends/ (then set DSV3_BACKENDS_PATH)")
        a = p.parse_args(argv[1:])
        if a.dir is not None:
            writable_directory(a.dir, "--dir")
        target = scaffold.create(a.name, a.dir)
        print(f"created {target}")
        if a.dir is not None:
            print(f"make it discoverable: export {registry.PATH_ENV}={a.dir.resolve()}")
        print(f"next: python -m conformance --backend {a.name}   (every operator delegates to cpu_ref, so it passes)")
        print(f"then: edit {target}/ops/<operator>.py and run python -m conformance --backend {a.name} --ops <operator>")
        return 0
    args = parse(argv)
    mode = RunMode(interpret=args.interpret, simulate=args.simulate)
    backend, avail = registry.activate(args.backend, mode)
    case_set = args.cases or ("quick" if (args.interpret or args.simulate) else "full")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    suite = Suite(backend, avail, mode, case_set, seed)
    print(f"conformance: {backend.name} on {avail.device} ({suite.mode_name}), cases '{case_set}', seed {seed}")
    start = time.perf_counter()
    results = run_suite(suite, args.levels, args.op_list, not args.no_bisect, nproc=args.nproc_list)
    rep = report.build(results, suite, time.perf_counter() - start, " ".join(["python -m conformance", *argv]))
    comparison = report.compare(rep, args.other) if args.compare is not None else None
    if args.report is not None:
        report.write(rep, args.report, comparison)
    s = rep["summary"]
    print(f"{s['verdict']}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped of {s['checks']} "
          f"checks in {rep['wall_seconds']} s" + (f"; failing: {', '.join(s['failed_ops'] + s['failed_checks'])}"
                                                  if s["failed"] else ""))
    if comparison:
        print("\n".join(comparison))
    if args.report is not None:
        print(f"report: {args.report / 'report.md'}")
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
