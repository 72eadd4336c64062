"""report.json, report.md and the error plot: the environment, a summary per operator and dtype, every failure with
the command that reproduces it alone, a row per check, the dispatch table. No machine paths (conformance.portable).

report.json, per check (besides conformance.context.CheckResult's fields):
    tolerance_fraction  rel_err / tolerance (how much of its absolute tolerance the check used)
    ref_multiple        rel_err / cpu_ref's rel_err on the same inputs (the relative verdict's, floored, when it
                        judged the check; else the plain ratio)
    reproduce           (failures only) the command that runs this check alone with the same seed
"""

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

from conformance import one_check, report_plot
from conformance.context import FAIL, PASS, SKIP, CheckResult, Suite
from conformance.portable import ROOT, scrub, scrub_all
from core.safe_files import write_files_atomically

PLOT_FILE = "errors.png"

LEGEND = {
    "level": "op (one operator), block (one MLA or MoE layer), model (the embedded default model), dist (ranks)",
    "operator": "the operator, block or model check judged, after PASS, FAIL (any of its checks failed) or SKIP",
    "dtype": "the working dtype (activations and outputs)",
    "checks / pass / fail / skip": "how many checks, and their verdicts (a skip always says why in its row)",
    "worst err / tol": "the largest error as a fraction of its absolute tolerance (tolerances.yaml or the manifest): "
                       "above 1 fails",
    "worst × cpu_ref": "the largest error as a multiple of cpu_ref's own error in the same dtype on the same inputs "
                       "(floored where cpu_ref is near exact)",
    "allowed × cpu_ref": "the multiple of cpu_ref's error the relative verdict allows (- where none applies)",
    "worst check": "the check with the largest err / tol",
    "verdict": "PASS, FAIL or SKIP",
    "check": "level/operator/case/dtype: give it to --only to run it alone",
    "shape": "the inputs' shapes and arguments",
    "rel err": "||got - golden||₂ / ||golden||₂ against cpu_ref in float64 (same numerics class)",
    "max abs": "max |got - golden|",
    "max rel": "max |got - golden| / max(|golden|, 1e-3·max|golden|)",
    "cpu_ref rel err": "what cpu_ref itself reaches in the same working dtype on the same inputs",
    "tolerance": "the absolute limit on rel err, with [n] pointing to its reason below",
    "err / tol": "rel err as a fraction of the tolerance: above 1 fails",
    "× cpu_ref": "rel err as a multiple of cpu_ref rel err (the relative verdict's, floored where cpu_ref is near "
                 "exact)",
    "time s": "the backend's wall time for the call (one run, synchronised)",
    "detail": "why a check failed or was skipped, or what else it measured",
}


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


def _number(v) -> float | None:
    """A report value as a float: None stays None, the string "inf" (JSON has no infinity) is infinity."""
    if v == "inf":
        return math.inf
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def tolerance_fraction(check: dict) -> float | None:
    err, tol = _number(check.get("rel_err")), _number(check.get("tolerance"))
    if err is None or tol is None or tol <= 0:
        return None
    return err / tol


def ref_multiple(check: dict) -> float | None:
    """The check's error as a multiple of cpu_ref's: the relative verdict's own (floored) when it judged the check,
    else rel_err / ref_rel_err (0 when both are exact, infinite when only cpu_ref is)."""
    given = _number(check.get("ref_multiple"))
    if given is not None:
        return given
    err, ref = _number(check.get("rel_err")), _number(check.get("ref_rel_err"))
    if err is None or ref is None:
        return None
    if ref == 0:
        return 0.0 if err == 0 else math.inf
    return err / ref


def _finite(value):
    """JSON has no infinity: an infinite error (NaN or inf in the output) is written as the string "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _worst(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def operators(checks: list[dict]) -> list[dict]:
    """One row per (level, operator, dtype): counts, the worst fraction of tolerance, the worst multiple of
    cpu_ref's error and the multiple allowed, and the check with the worst fraction."""
    groups: dict[tuple, list[dict]] = {}
    for c in checks:
        groups.setdefault((c["level"], c["op"], c.get("dtype") or "-"), []).append(c)
    rows = []
    for (level, op, dtype), cs in groups.items():
        fractions = [tolerance_fraction(c) for c in cs]
        worst_at = max(range(len(cs)), key=lambda i: -1 if fractions[i] is None else fractions[i])
        limits = [_number(c.get("ref_limit")) for c in cs]
        rows.append({"level": level, "operator": op, "dtype": dtype, "checks": len(cs),
                     "passed": sum(c["verdict"] == PASS for c in cs), "failed": sum(c["verdict"] == FAIL for c in cs),
                     "skipped": sum(c["verdict"] == SKIP for c in cs), "worst_fraction": _worst(fractions),
                     "worst_ref_multiple": _worst([ref_multiple(c) for c in cs]),
                     "ref_limit": min((v for v in limits if v is not None), default=None),
                     "worst_check": cs[worst_at]["name"] if fractions[worst_at] is not None else ""})
    return rows


def build(results: list[CheckResult], suite: Suite, seconds: float, command: str = "") -> dict:
    env = environment(suite, command)
    checks = []
    for r in results:
        c = r.to_dict()
        c["tolerance_fraction"] = tolerance_fraction(c)
        c["ref_multiple"] = ref_multiple(c)
        c.setdefault("ref_limit", None)
        if c["verdict"] == FAIL:
            c["reproduce"] = one_check.reproduce_command(env, c["name"])
        checks.append(c)
    report = {"environment": env, "summary": summary(results), "wall_seconds": round(seconds, 2),
              "dispatch": suite.dispatch.table(), "manifest": str(suite.manifest.path),
              "backend_description": suite.manifest.description, "toolchain": suite.manifest.toolchain,
              "operators": operators(checks), "checks": checks}
    return scrub_all(_finite(report))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.3g}"
    return str(v)


def _cell(text: object) -> str:
    return str(text).replace("\n", " ").replace("|", "\\|")


def _legend(columns: list[str]) -> list[str]:
    return [f"- **{c}**: {LEGEND[c]}" for c in columns]


SUMMARY_COLUMNS = ["level", "operator", "dtype", "checks / pass / fail / skip", "worst err / tol", "worst × cpu_ref",
                   "allowed × cpu_ref", "worst check"]
CHECK_COLUMNS = ["verdict", "check", "shape", "rel err", "max abs", "max rel", "cpu_ref rel err", "err / tol",
                 "× cpu_ref", "tolerance", "time s", "detail"]


def _summary_table(report: dict) -> list[str]:
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for row in report["operators"]:
        status = "**FAIL**" if row["failed"] else "PASS" if row["passed"] else "SKIP"
        lines.append(f"| {row['level']} | {status} {_cell(row['operator'])} | {row['dtype']} | {row['checks']} / "
                     f"{row['passed']} / {row['failed']} / {row['skipped']} | {_fmt(row['worst_fraction'])} | "
                     f"{_fmt(row['worst_ref_multiple'])} | {_fmt(row['ref_limit'])} | {_cell(row['worst_check'])} |")
    return lines


def _failures(report: dict) -> list[str]:
    failed = [c for c in report["checks"] if c["verdict"] == FAIL]
    if not failed:
        return []
    lines = ["", f"## Failures ({len(failed)})", "",
             "Each runs alone with the command under it (same backend, mode, case set and seed, so the same inputs; "
             "an out-of-tree backend needs the same DSV3_BACKENDS_PATH or installed package)."]
    for c in failed:
        lines += ["", f"- `{c['name']}` ({_cell(c.get('shape') or '')}): {_cell(c.get('detail') or 'failed')}", "",
                  "  ```bash", f"  {c['reproduce']}", "  ```"]
    return lines


def _plot_section(has_plot: bool) -> list[str]:
    lines = ["", "## Errors against tolerances", ""]
    if has_plot:
        return lines + [f"![error / tolerance per operator and dtype]({PLOT_FILE})", "",
                        "Each point is one check: its error as a fraction of its absolute tolerance (log scale; "
                        "above the line at 1 fails), by operator, coloured by dtype; hollow marks are cpu_ref's own "
                        "error on the same inputs."]
    return lines + [f"No plot: {report_plot.unavailable()}"]


def markdown(report: dict, comparison: list[str] | None = None, has_plot: bool = False) -> str:
    env, s = report["environment"], report["summary"]
    lines = [f"# Conformance report: `{env['backend']}` on {env.get('backend_device_name', env['device'])}", "",
             f"**{s['verdict']}**: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped of "
             f"{s['checks']} checks in {report['wall_seconds']} s; cases `{env['case_set']}`, seed {env['seed']}.",
             "", f"Command: `{env['command']}`"]
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
    lines += ["", "## Summary by operator", ""] + _summary_table(report) + [""] + _legend(SUMMARY_COLUMNS)
    lines += _failures(report)
    lines += _plot_section(has_plot)
    if comparison:
        lines += ["", "## Compared with another report", ""] + comparison
    lines += ["", "## Environment", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in env.items()]
    lines += [f"| manifest | {_cell(report.get('manifest', ''))} |",
              f"| backend description | {_cell(report.get('backend_description', ''))} |",
              f"| toolchain (manifest) | {_cell(json.dumps(report.get('toolchain') or {}, default=str))} |"]
    lines += ["", "## Dispatch", "", "| operator | implementation |", "|---|---|"]
    lines += [f"| {op} | {_cell(impl)} |" for op, impl in report["dispatch"].items()]
    reasons: dict[str, int] = {}
    for level in ("op", "block", "model", "dist"):
        rows = [c for c in report["checks"] if c["level"] == level]
        if not rows:
            continue
        lines += ["", f"## {level.capitalize()} level", "", "| " + " | ".join(CHECK_COLUMNS) + " |",
                  "|" + "---|" * len(CHECK_COLUMNS)]
        for c in rows:
            ref = ""
            if c["tolerance_reason"]:
                ref = f" [{reasons.setdefault(c['tolerance_reason'], len(reasons) + 1)}]"
            lines.append(f"| {c['verdict'].upper()} | {c['name']} | {_cell(c['shape'])} | {_fmt(c['rel_err'])} | "
                         f"{_fmt(c['max_abs'])} | {_fmt(c['max_rel'])} | {_fmt(c['ref_rel_err'])} | "
                         f"{_fmt(c.get('tolerance_fraction'))} | {_fmt(c.get('ref_multiple'))} | "
                         f"{_fmt(c['tolerance'])}{ref} | {c['seconds']:.3f} | {_cell(c['detail'])} |")
    if any(c["level"] in ("op", "block", "model", "dist") for c in report["checks"]):
        lines += ["", "Columns of the level tables:", ""] + _legend(CHECK_COLUMNS)
    if reasons:
        lines += ["", "## Tolerances used", ""] + [f"{i}. {_cell(r)}" for r, i in reasons.items()]
    return scrub("\n".join(lines) + "\n")


def write(report: dict, directory: Path, comparison: list[str] | None = None) -> None:
    """Write report.json, report.md and (when matplotlib is installed) errors.png: all or none
    (core.safe_files.write_files_atomically); a failure is one line and leaves nothing half-written."""
    png = report_plot.render(report)
    files = {"report.json": json.dumps(report, indent=2, default=str).encode(),
             "report.md": markdown(report, comparison, png is not None).encode()}
    if png is not None:
        files[PLOT_FILE] = png
    write_files_atomically(Path(directory), files, "--report")
