"""`python -m conformance`: judge a backend, or scaffold a new one. See conformance/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from conformance import block_checks, dist_checks, junit, model_checks, one_check, op_checks, report, report_diff, \
    scaffold
from conformance.context import PASS, CheckResult, Suite
from conformance.portable import command_line
from core import registry
from core.backend import RunMode
from core.errors import UserError
from core.ops import OPERATORS
from core.run import OneLineParser, run_cli
from core.safe_files import check_output_target, quote_name

LEVELS = ("op", "block", "model", "dist")
DEFAULT_LEVELS = "op,block,model"

EPILOG = """\
to start a backend:
  python -m conformance new-backend NAME [--dir DIR | --package DIR]
      writes a backend whose every operator delegates to cpu_ref (it passes at once): backends/NAME/, a directory
      of backends under DIR (then set DSV3_BACKENDS_PATH=DIR), or with --package a pip-installable package in DIR
      (pip install DIR; discovered through its entry point, manifest.yaml shipped as package data)

the edit-run loop of one operator:
  python -m conformance --backend NAME --ops rms_norm            (op level only: seconds)
  python -m conformance --backend NAME --ops linear --level op,block
a failure in a report runs alone with the command printed under it:
  python -m conformance --backend NAME --cases quick --seed S --only op/rms_norm/unaligned/bfloat16
"""


def parse(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="python -m conformance", description="Judge a backend against cpu_ref (or, with "
                      "new-backend, scaffold one).", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", required=True)
    p.add_argument("--interpret", action="store_true", help="run Triton kernels through the interpreter (CPU)")
    p.add_argument("--simulate", action="store_true", help="run against the vendor library's emulation")
    p.add_argument("--level", help=f"comma-separated: op, block, model, dist (default: {DEFAULT_LEVELS}; op with --ops)")
    p.add_argument("--nproc", default="2,4", help="dist level: comma-separated rank counts (default 2,4)")
    p.add_argument("--ops", help="comma-separated operators: the op level runs only these, and (when --level asks for "
                                 "it) the block level only the blocks that use them; default: all")
    p.add_argument("--only", metavar="CHECK", help="run one check alone, named as in a report (e.g. "
                                                   "op/rms_norm/unaligned/bfloat16); give the report's --seed and --cases")
    p.add_argument("--cases", choices=["quick", "full", "gpu"],
                   help="case set (default: quick under --interpret/--simulate, else full)")
    p.add_argument("--seed", type=int, help="seed of the random inputs (default: fresh, recorded in the report)")
    p.add_argument("--report", type=Path, help="write report.json, report.md (and errors.png with matplotlib) here")
    p.add_argument("--junit", type=Path, help="write JUnit XML here (one testcase per check)")
    p.add_argument("--compare", type=Path, help="another report.json to compare with (errors only when the seeds match)")
    p.add_argument("--no-bisect", action="store_true", help="do not isolate operators when a model check fails")
    args = p.parse_args(argv)
    if args.only is not None and (args.ops or args.level):
        raise UserError("--only runs one named check: leave out --ops and --level")
    level_text = args.level or ("op" if args.ops else DEFAULT_LEVELS)
    levels = [x.strip() for x in level_text.split(",") if x.strip()]
    bad = [x for x in levels if x not in LEVELS]
    if bad or not levels:
        raise UserError(f"--level: unknown level(s) {bad or level_text!r}; choose from {', '.join(LEVELS)}")
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
        if unknown or not args.op_list:
            raise UserError(f"--ops: {', '.join(unknown) or repr(args.ops)} not in the contract ({', '.join(OPERATORS)})")
    if args.only is not None:
        one_check.level_of(args.only)  # a malformed name is refused before anything runs
    if args.compare is not None:  # validated in full before anything runs
        args.other = report_diff.read_other(args.compare)
    if args.seed is not None and not 0 <= args.seed < 2 ** 32:
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if args.report is not None:
        check_output_target(args.report, "--report", directory=True)  # nothing is created before the run ends
    if args.junit is not None:
        check_output_target(args.junit, "--junit")
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


def blocks_of(ops: list[str] | None) -> set[str] | None:
    """The block checks that run any of `ops` (None: all)."""
    return None if ops is None else {name for name, needs in block_checks.NEEDS.items() if set(needs) & set(ops)}


def run_suite(suite: Suite, levels: list[str], ops: list[str] | None = None, bisect: bool = True,
              echo=print, nproc: list[int] = (2, 4), only: str | None = None) -> list[CheckResult]:
    results: list[CheckResult] = []
    blocks = blocks_of(ops)
    runners = {"op": lambda: op_checks.run(suite, ops),
               "block": lambda: [r for r in block_checks.run(suite) if blocks is None or r.op in blocks],
               "model": lambda: model_checks.run(suite, bisect), "dist": lambda: dist_checks.run(suite, list(nproc))}
    batches = [lambda: one_check.run(suite, only, bisect)] if only else [runners[level] for level in levels]
    for batch in batches:
        for r in batch():
            results.append(r)
            err = "" if r.rel_err is None else f" err {r.rel_err:.3g}" + (
                f" (tol {r.tolerance:.3g})" if r.tolerance is not None else "")
            echo(f"{r.verdict.upper():4s} {r.name}{err}{'  ' + r.detail if r.detail and r.verdict != PASS else ''}")
    return results


def new_backend(argv: list[str]) -> int:
    p = OneLineParser(prog="python -m conformance new-backend",
                      description="Write a backend whose every operator delegates to cpu_ref.")
    p.add_argument("name")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--dir", type=Path, help="create DIR/NAME/ instead of backends/NAME/ (then set "
                                                f"{registry.PATH_ENV}=DIR)")
    where.add_argument("--package", type=Path, help="create a pip-installable package in DIR (pyproject.toml with the "
                                                    "entry point, NAME/ with manifest.yaml as package data)")
    a = p.parse_args(argv)
    if a.package is not None:
        target = scaffold.create_package(a.name, a.package)
        print(f"created {target}")
        print(f"install it: pip install {a.package}   (or pip install -e {a.package} while you edit)")
        print(f"it is found through the entry point group {registry.ENTRY_POINT_GROUP}: "
              f"python -m conformance --backend {a.name}")
    else:
        if a.dir is not None:
            writable_directory(a.dir, "--dir")
        target = scaffold.create(a.name, a.dir)
        print(f"created {target}")
        if a.dir is not None:
            print(f"make it discoverable: export {registry.PATH_ENV}={a.dir.resolve()}")
    print(f"next: python -m conformance --backend {a.name}   (every operator delegates to cpu_ref, so it passes)")
    print(f"then: edit {target}/ops/<operator>.py and run python -m conformance --backend {a.name} --ops <operator>")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "new-backend":
        return new_backend(argv[1:])
    args = parse(argv)
    mode = RunMode(interpret=args.interpret, simulate=args.simulate)
    backend, avail = registry.activate(args.backend, mode)
    case_set = args.cases or ("quick" if (args.interpret or args.simulate) else "full")
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    suite = Suite(backend, avail, mode, case_set, seed)
    print(f"conformance: {backend.name} on {avail.device} ({suite.mode_name}), cases '{case_set}', seed {seed}")
    start = time.perf_counter()
    results = run_suite(suite, args.levels, args.op_list, not args.no_bisect, nproc=args.nproc_list, only=args.only)
    rep = report.build(results, suite, time.perf_counter() - start, command_line(argv))
    comparison = report_diff.compare(rep, args.other) if args.compare is not None else None
    if args.report is not None:
        report.write(rep, args.report, comparison)
    if args.junit is not None:
        junit.write(rep, args.junit)
    s = rep["summary"]
    print(f"{s['verdict']}: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped of {s['checks']} "
          f"checks in {rep['wall_seconds']} s" + (f"; failing: {', '.join(s['failed_ops'] + s['failed_checks'])}"
                                                  if s["failed"] else ""))
    for c in rep["checks"]:
        if c["verdict"] == "fail":
            print(f"  reproduce {c['name']}: {c['reproduce']}")
    if comparison:
        print("\n".join(comparison))
    if args.report is not None:
        print(f"report: {args.report / 'report.md'}")
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
