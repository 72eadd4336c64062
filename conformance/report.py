"""report.json and report.md: the environment, a row per check, the dispatch table and a summary; and the
difference between two reports (--compare)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import platform
import subprocess
from collections import Counter
from pathlib import Path

import torch

from conformance.context import FAIL, PASS, SKIP, CheckResult, Suite
from core.errors import UserError
from core.safe_files import MAX_REPORT_BYTES, one_line, quote_name, quote_value, read_json_file, \
    write_files_atomically

MAX_CHECKS = 100_000

ROOT = Path(__file__).resolve().parent.parent


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (not a git checkout)"


def environment(suite: Suite, command: str) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "backend": suite.backend.name,
        "backend_origin": suite.backend.origin,
        "device": str(suite.device),
        "mode": suite.mode_name,
        "triton_interpreter": suite.mode.interpret,
        "simulation": suite.mode.simulate,
        "case_set": suite.case_set,
        "seed": suite.seed,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "torch_hip": str(torch.version.hip),
        "triton": _version("triton"),
        "torch_npu": _version("torch_npu"),
        "commit": _commit(),
    }
    env.update({f"backend_{k}": v for k, v in suite.availability.environment.items()})
    return env


def summary(results: list[CheckResult]) -> dict:
    by_level: dict[str, Counter] = {}
    for r in results:
        by_level.setdefault(r.level, Counter())[r.verdict] += 1
    total = Counter(r.verdict for r in results)
    return {"passed": total[PASS], "failed": total[FAIL], "skipped": total[SKIP], "checks": len(results),
            "by_level": {k: dict(v) for k, v in by_level.items()},
            "failed_ops": sorted({r.op for r in results if r.verdict == FAIL and r.level == "op"}),
            "failed_checks": sorted({f"{r.level}/{r.op}" for r in results if r.verdict == FAIL and r.level != "op"}),
            "culprits": sorted({c for r in results for c in r.culprits}),
            "verdict": "PASS" if not total[FAIL] else "FAIL"}


def _finite(row: dict) -> dict:
    """JSON has no infinity: an infinite error (NaN or inf in the output) is written as the string "inf"."""
    return {k: ("inf" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def build(results: list[CheckResult], suite: Suite, seconds: float, command: str = "") -> dict:
    return {"environment": environment(suite, command), "summary": summary(results),
            "wall_seconds": round(seconds, 2), "dispatch": suite.dispatch.table(), "manifest": str(suite.manifest.path),
            "checks": [_finite(r.to_dict()) for r in results]}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.3g}"
    return str(v)


def markdown(report: dict, comparison: list[str] | None = None) -> str:
    env, s = report["environment"], report["summary"]
    lines = [f"# Conformance report: `{env['backend']}` on {env.get('backend_device_name', env['device'])}", "",
             f"**{s['verdict']}**: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped of "
             f"{s['checks']} checks in {report['wall_seconds']} s."]
    if env["triton_interpreter"]:
        lines.append("\nRan under the **Triton interpreter on the CPU**: bfloat16 and FP8-activation results are not "
                     "the GPU's numerics (skipped or judged with the interpreter rows of the tolerance table); "
                     "the verdict for the hardware comes from a run on the GPU.")
    if env["simulation"]:
        lines.append("\nRan against the **emulation of the vendor library** (no vendor hardware): this proves the "
                     "adapter's glue against the documented semantics, not the hardware kernels' numerics.")
    if s["failed_ops"] or s["failed_checks"]:
        lines.append(f"\nFailing: {', '.join(s['failed_ops'] + s['failed_checks'])}"
                     + (f"; the model-level failures are reproduced by {', '.join(s['culprits'])}" if s["culprits"] else ""))
    lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", "## Dispatch", "", "| operator | implementation |", "|---|---|"]
    lines += [f"| {op} | {impl} |" for op, impl in report["dispatch"].items()]
    if comparison:
        lines += ["", "## Compared with another report", ""] + comparison
    reasons: dict[str, int] = {}
    for level in ("op", "block", "model", "dist"):
        rows = [c for c in report["checks"] if c["level"] == level]
        if not rows:
            continue
        lines += ["", f"## {level.capitalize()} level", "",
                  "| verdict | check | shape | rel err | max abs | max rel | cpu_ref rel err | tolerance | time s | detail |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in rows:
            ref = ""
            if c["tolerance_reason"]:
                ref = f" [{reasons.setdefault(c['tolerance_reason'], len(reasons) + 1)}]"
            detail = c["detail"].replace("|", "\\|")
            lines.append(f"| {c['verdict'].upper()} | {c['name']} | {c['shape'].replace('|', '/')} | {_fmt(c['rel_err'])} | "
                         f"{_fmt(c['max_abs'])} | {_fmt(c['max_rel'])} | {_fmt(c['ref_rel_err'])} | "
                         f"{_fmt(c['tolerance'])}{ref} | {c['seconds']:.3f} | {detail} |")
    if reasons:
        lines += ["", "## Tolerances used", ""] + [f"{i}. {r}" for r, i in reasons.items()]
    return "\n".join(lines) + "\n"


def _cell(text: object) -> str:
    """A value from a report as one markdown table cell: one line, pipes escaped."""
    return one_line(text).replace("|", "\\|")


def read_other(path: Path) -> dict:
    """Read and validate, in full, a report.json given to --compare (before anything runs): a regular file within
    the size and depth limits, with every field compare() uses present and of the right type."""
    shown = f"--compare: {quote_name(str(path))}"
    data = read_json_file(Path(path), MAX_REPORT_BYTES, error=UserError, what=shown)
    validate(data, shown)
    return data


def validate(data: object, shown: str) -> None:
    """Raise a one-line UserError unless `data` has the shape of a conformance report.json."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{shown} is not a conformance report.json ({what})")

    need(isinstance(data, dict) and isinstance(data.get("checks"), list)
         and all(isinstance(data.get(k), dict) for k in ("environment", "summary")),
         "needs environment, summary and checks")
    env, summary, checks = data["environment"], data["summary"], data["checks"]
    for key in ("backend", "device", "commit"):
        need(isinstance(env.get(key), str), f"environment.{key} must be a string")
    need(isinstance(env.get("backend_device_name", ""), str), "environment.backend_device_name must be a string")
    need(isinstance(summary.get("verdict"), str), "summary.verdict must be a string")
    for key in ("passed", "failed"):
        v = summary.get(key)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"summary.{key} must be a count")
    need(len(checks) <= MAX_CHECKS, f"more than {MAX_CHECKS} checks")
    names = set()
    for i, c in enumerate(checks):
        need(isinstance(c, dict) and isinstance(c.get("name"), str), f"checks[{i}] needs a name")
        need(c["name"] not in names, f"check {quote_name(c['name'])} appears twice")
        names.add(c["name"])
        need(c.get("verdict") in (PASS, FAIL, SKIP), f"checks[{i}].verdict {quote_value(c.get('verdict'))} is "
                                                     f"not pass, fail or skip")
        err = c.get("rel_err")
        need(err is None or err == "inf" or (isinstance(err, (int, float)) and not isinstance(err, bool)
                                             and math.isfinite(err) and err >= 0),
             f"checks[{i}].rel_err {quote_value(err)} is not a non-negative number, \"inf\" or null")


def compare(current: dict, other: dict) -> list[str]:
    """What changed between two reports: verdicts, checks present in only one, errors that moved by > 2x.
    `other` has passed validate(); every value taken from it is shown through _cell."""
    mine = {c["name"]: c for c in current["checks"]}
    theirs = {c["name"]: c for c in other["checks"]}
    o_env = other["environment"]
    lines = [f"Other: `{_cell(o_env['backend'])}` on {_cell(o_env.get('backend_device_name') or o_env['device'])}, "
             f"commit {_cell(o_env['commit'])}, {_cell(other['summary']['verdict'])} "
             f"({other['summary']['passed']} passed, {other['summary']['failed']} failed).", ""]
    rows = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            rows.append(f"| {_cell(name)} | {'-' if b is None else b['verdict']} | "
                        f"{'-' if a is None else a['verdict']} | only in one report |")
            continue
        moved = ""
        numbers = all(isinstance(c["rel_err"], (int, float)) for c in (a, b))
        if numbers and min(a["rel_err"], b["rel_err"]) > 0:
            ratio = a["rel_err"] / b["rel_err"]
            if ratio > 2 or ratio < 0.5:
                moved = f"error {_fmt(b['rel_err'])} -> {_fmt(a['rel_err'])}"
        if a["verdict"] != b["verdict"] or moved:
            rows.append(f"| {_cell(name)} | {b['verdict']} | {a['verdict']} | {moved} |")
    if not rows:
        return lines + ["No check changed verdict, and no error moved by more than 2x."]
    return lines + ["| check | other | this | change |", "|---|---|---|---|"] + rows


def write(report: dict, directory: Path, comparison: list[str] | None = None) -> None:
    """Write report.json and report.md: both or neither (core.safe_files.write_files_atomically); a failure is one
    line and leaves nothing half-written."""
    write_files_atomically(Path(directory), {
        "report.json": json.dumps(report, indent=2, default=str).encode(),
        "report.md": markdown(report, comparison).encode(),
    }, "--report")
