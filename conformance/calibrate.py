"""Calibrate the relative verdict: run a backend's op and block checks over many seeds, record each check's error
and cpu_ref's own error on the same inputs, and tabulate the worst ratio per operator, dtype and backend.

    python -m conformance.calibrate run --backend cuda --interpret --seeds 3 --out calib/cuda.json
    python -m conformance.calibrate run --variant prefill_flash_p_rounded --ops attention_prefill --out calib/v.json
    python -m conformance.calibrate table calib/*.json some/report.json > conformance/CALIBRATION.md

`run` appends to --out (so seeds can be added later); `table` reads any number of such files, or report.json files
of `python -m conformance` runs (one seed each), and prints markdown:
per backend x check: seeds, checks, cpu_ref's error range, the worst raw ratio (error / cpu_ref's error where
cpu_ref's is non-zero), the worst floored ratio the verdict uses, the allowed multiple, and the failures either
verdict would give. Nothing here is a test: it measures, and a person picks the multiples in tolerances.yaml."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

from conformance.tolerances import ToleranceTable


def run(args: argparse.Namespace) -> None:
    from conformance import block_checks, op_checks
    from conformance.context import Suite
    from core import registry
    from core.backend import RunMode

    mode = RunMode(interpret=args.interpret, simulate=args.simulate)
    if args.variant:  # cpu_ref with one legitimate variant (conformance/planted_bugs.py LEGITIMATE)
        from conformance.planted_bugs import buggy_backend

        backend, avail = buggy_backend(args.variant)
    else:
        backend, avail = registry.activate(args.backend, mode)
    mode_label = " (interpret)" if args.interpret else " (simulate)" if args.simulate else ""
    label = args.label or (args.variant and f"variant {args.variant}") or args.backend + mode_label
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    levels = args.levels.split(",")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.perf_counter()
        suite = Suite(backend, avail, mode, args.cases, seed)
        results = (op_checks.run(suite, args.ops.split(",") if args.ops else None) if "op" in levels else [])
        results += block_checks.run(suite) if "block" in levels else []
        for r in results:
            records.append({"backend": label, "seed": seed, "name": r.name, "op": r.op, "level": r.level,
                            "dtype": r.dtype, "numerics": suite.numerics(r.op) if r.level == "op" else "",
                            "mode": suite.mode_name, "verdict": r.verdict, "rel_err": r.rel_err,
                            "ref_rel_err": r.ref_rel_err, "tolerance": r.tolerance, "detail": r.detail})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records))  # after every seed: a long run can be stopped and still counts
        fails = [r.name for r in results if r.verdict == "fail"]
        print(f"{label} seed {seed}: {len(results)} checks in {time.perf_counter() - t0:.1f} s; "
              f"failed: {fails or 'none'}", flush=True)


def _fmt(x: float | None) -> str:
    return "-" if x is None else "inf" if x == float("inf") else f"{x:.3g}"


def _records(data) -> list[dict]:
    """Calibration records, or the checks of a conformance report.json turned into records."""
    if isinstance(data, list):
        return data
    from core import registry

    env = data["environment"]
    manifest = registry.load(env["backend"]).manifest
    label = env["backend"] + {"interpret": " (interpret)", "simulate": " (simulate)"}.get(env["mode"], "")
    records = []
    for c in data["checks"]:
        if c["level"] not in ("op", "block") or isinstance(c["rel_err"], str) or isinstance(c["ref_rel_err"], str):
            continue
        entry = manifest.operators.get(c["op"])
        records.append({**c, "backend": label, "seed": env["seed"], "mode": env["mode"],
                        "numerics": (entry.numerics if entry else "reference") if c["level"] == "op" else ""})
    return records


def _table_for(label: str, cache: dict) -> ToleranceTable:
    """The tolerance table a record is judged by: with its backend's manifest overrides where it is a backend."""
    name = label.split(" ")[0]
    if name not in cache:
        from core import registry

        try:
            cache[name] = ToleranceTable(registry.load(name).manifest)
        except Exception:  # a variant or an unknown label: the plain table
            cache[name] = ToleranceTable()
    return cache[name]


def table(paths: list[str]) -> str:
    tables: dict[str, ToleranceTable] = {}
    rows: dict[tuple, list[dict]] = defaultdict(list)
    for path in paths:
        for rec in _records(json.loads(Path(path).read_text())):
            if rec["rel_err"] is None or rec["ref_rel_err"] is None:
                continue  # skipped or structurally failed: nothing numeric to calibrate
            rows[(rec["backend"], rec["level"], rec["op"], rec["dtype"], rec.get("numerics", ""))].append(rec)
    lines = [("| backend | check | dtype | numerics | seeds | checks | cpu_ref error (min-max) | worst raw ratio "
              "| worst floored ratio | allowed multiple (floor) | relative fails | absolute fails |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (backend, level, op, dtype, numerics), recs in sorted(rows.items()):
        rel = _table_for(backend, tables).relative(op, dtype, numerics or "reference", recs[0]["mode"])
        raw = [r["rel_err"] / r["ref_rel_err"] for r in recs if r["ref_rel_err"] > 0]
        floored = [rel.ratio(r["rel_err"], r["ref_rel_err"]) for r in recs] if rel else []
        rel_fails = sum(x > rel.multiple for x in floored) if rel else 0
        abs_fails = sum(r["tolerance"] is not None and r["rel_err"] > r["tolerance"] for r in recs)
        refs = [r["ref_rel_err"] for r in recs]
        lines.append(f"| {backend} | {level}/{op} | {dtype} | {numerics or '-'} | {len({r['seed'] for r in recs})} "
                     f"| {len(recs)} | {_fmt(min(refs))}-{_fmt(max(refs))} | {_fmt(max(raw) if raw else None)} "
                     f"| {_fmt(max(floored) if floored else None)} "
                     f"| {f'{rel.multiple:g} ({rel.floor:.2g})' if rel else 'none'} | {rel_fails} | {abs_fails} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m conformance.calibrate")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--backend", default="cpu_ref")
    r.add_argument("--variant", help="a legitimate variant of cpu_ref (planted_bugs.LEGITIMATE) instead of --backend")
    r.add_argument("--interpret", action="store_true")
    r.add_argument("--simulate", action="store_true")
    r.add_argument("--cases", default="quick", choices=["quick", "full", "gpu"])
    r.add_argument("--levels", default="op,block")
    r.add_argument("--ops", help="comma-separated operators (op level)")
    r.add_argument("--seeds", type=int, default=10)
    r.add_argument("--first-seed", type=int, default=0)
    r.add_argument("--label")
    r.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    if args.command == "run":
        run(args)
    else:
        print(table(args.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
