"""report.json and report.md: the environment, a row per check, the dispatch table and a summary; and the
difference between two reports (--compare)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import torch

from conformance.context import FAIL, PASS, SKIP, CheckResult, Suite

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


def compare(current: dict, other: dict) -> list[str]:
    """What changed between two reports: verdicts, checks present in only one, errors that moved by > 2x."""
    mine = {c["name"]: c for c in current["checks"]}
    theirs = {c["name"]: c for c in other["checks"]}
    o_env = other["environment"]
    lines = [f"Other: `{o_env['backend']}` on {o_env.get('backend_device_name', o_env['device'])}, "
             f"commit {o_env['commit']}, {other['summary']['verdict']} "
             f"({other['summary']['passed']} passed, {other['summary']['failed']} failed).", ""]
    rows = []
    for name in sorted(set(mine) | set(theirs)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            rows.append(f"| {name} | {'-' if b is None else b['verdict']} | {'-' if a is None else a['verdict']} | only in one report |")
            continue
        moved = ""
        numbers = all(isinstance(c["rel_err"], (int, float)) for c in (a, b))
        if numbers and min(a["rel_err"], b["rel_err"]) > 0:
            ratio = a["rel_err"] / b["rel_err"]
            if ratio > 2 or ratio < 0.5:
                moved = f"error {_fmt(b['rel_err'])} -> {_fmt(a['rel_err'])}"
        if a["verdict"] != b["verdict"] or moved:
            rows.append(f"| {name} | {b['verdict']} | {a['verdict']} | {moved} |")
    if not rows:
        return lines + ["No check changed verdict, and no error moved by more than 2x."]
    return lines + ["| check | other | this | change |", "|---|---|---|---|"] + rows


def write(report: dict, directory: Path, comparison: list[str] | None = None) -> None:
    """Write report.json and report.md atomically (a failure leaves no half-written report)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)),
                       ("report.md", markdown(report, comparison))):
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, directory / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
