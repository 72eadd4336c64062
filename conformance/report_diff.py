"""`--compare OTHER/report.json`: what changed between two reports, knowing about seeds.

Every check draws its inputs from the run's seed, so errors are comparable only between runs with the same seed
(and case set). With the same seed: verdicts, and errors that moved (more than ERROR_RATIO and by more than
FRACTION_STEP of the tolerance). With different seeds the inputs differ and so do raw errors, by chance: only
verdicts, and fractions of tolerance that moved by more than SEED_FRACTION_STEP (reported as headroom, never as a
regression), are compared."""

from __future__ import annotations

import math
from pathlib import Path

from conformance.context import FAIL, PASS, SKIP
from core.errors import UserError
from core.safe_files import MAX_REPORT_BYTES, one_line, quote_name, quote_value, read_json_file

MAX_CHECKS = 100_000
ERROR_RATIO = 1.1  # same seed: an error that moved by more than this factor ...
FRACTION_STEP = 0.02  # ... and by more than this fraction of its tolerance has changed
SEED_FRACTION_STEP = 0.3  # different seeds: a fraction of tolerance that moved this much is worth a look


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


def _is_number(v, inf_ok: bool = True) -> bool:
    if inf_ok and v == "inf":
        return True
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


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
    need(isinstance(env.get("case_set", ""), str), "environment.case_set must be a string")
    seed = env.get("seed")
    need(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), "environment.seed must be an integer")
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
        for key in ("rel_err", "tolerance"):
            v = c.get(key)
            need(v is None or _is_number(v, key == "rel_err"),
                 f"checks[{i}].{key} {quote_value(v)} is not a non-negative number" +
                 (", \"inf\"" if key == "rel_err" else "") + " or null")


def _value(v) -> float | None:
    return math.inf if v == "inf" else v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _fraction(c: dict) -> float | None:
    err, tol = _value(c.get("rel_err")), _value(c.get("tolerance"))
    return err / tol if err is not None and tol else None


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if math.isfinite(v) else "inf"


def same_inputs(current: dict, other: dict) -> bool:
    """Whether the two runs drew the same inputs: the same seed and the same case set."""
    a, b = current["environment"], other["environment"]
    return a.get("seed") is not None and a.get("seed") == b.get("seed") and a.get("case_set") == b.get("case_set")


def _change(a: dict, b: dict, same: bool) -> str:
    """What moved between check `b` (other) and `a` (this run), or ''."""
    if a["verdict"] != b["verdict"]:
        if b["verdict"] == PASS and a["verdict"] == FAIL:
            return "**regression**: now fails" + (f" ({_cell(a.get('detail'))})" if a.get("detail") else "")
        if b["verdict"] == FAIL and a["verdict"] == PASS:
            return "fixed: now passes"
        return f"verdict {b['verdict']} -> {a['verdict']}"
    fa, fb = _fraction(a), _fraction(b)
    if same:
        ea, eb = _value(a.get("rel_err")), _value(b.get("rel_err"))
        if ea is None or eb is None or ea == eb:
            return ""
        ratio = math.inf if min(ea, eb) == 0 else max(ea, eb) / min(ea, eb)
        step = abs(fa - fb) if fa is not None and fb is not None and math.isfinite(fa - fb) else math.inf
        if ratio > ERROR_RATIO and step > FRACTION_STEP:
            word = "error up" if ea > eb else "error down"
            return f"{word} {_fmt(eb)} -> {_fmt(ea)} (of tolerance {_fmt(fb)} -> {_fmt(fa)}; same inputs)"
        return ""
    if fa is not None and fb is not None and abs(fa - fb) > SEED_FRACTION_STEP:
        return (f"of tolerance {_fmt(fb)} -> {_fmt(fa)} (different inputs: headroom moved, not a regression "
                f"unless it recurs with the same seed)")
    return ""


def _group(name: str) -> str:
    """level/operator of a check name (op/rms_norm/unaligned/bfloat16 -> op/rms_norm)."""
    return "/".join(name.split("/")[:2])


def compare(current: dict, other: dict) -> list[str]:
    """Markdown lines: the other report, whether the inputs were the same, and a row per check that changed.
    `other` has passed validate(); every value taken from it is shown through _cell."""
    mine = {c["name"]: c for c in current["checks"]}
    theirs = {c["name"]: c for c in other["checks"]}
    o_env, env = other["environment"], current["environment"]
    same = same_inputs(current, other)
    lines = [f"Other: `{_cell(o_env['backend'])}` on {_cell(o_env.get('backend_device_name') or o_env['device'])}, "
             f"commit {_cell(o_env['commit'])}, cases {_cell(o_env.get('case_set', '?'))}, seed "
             f"{_cell(o_env.get('seed', '?'))}: {_cell(other['summary']['verdict'])} "
             f"({other['summary']['passed']} passed, {other['summary']['failed']} failed).", ""]
    if same:
        lines += ["Same seed and case set: the same inputs, so verdicts and errors are compared (an error that moved "
                  f"by more than {ERROR_RATIO}x and by more than {FRACTION_STEP} of its tolerance is listed).", ""]
    else:
        lines += [f"Different inputs (seed {_cell(o_env.get('seed', '?'))}, cases {_cell(o_env.get('case_set', '?'))} "
                  f"there; seed {env.get('seed')}, cases {env.get('case_set')} here): raw errors vary with the inputs, "
                  f"so only verdicts and fractions of tolerance that moved by more than {SEED_FRACTION_STEP} are "
                  f"listed. To compare errors, run again with --seed {_cell(o_env.get('seed', '?'))} --cases "
                  f"{_cell(o_env.get('case_set', '?'))}.", ""]
    rows = []
    scope = {_group(n) for n in mine} & {_group(n) for n in theirs}
    outside = [n for n in set(mine) ^ set(theirs) if _group(n) not in scope]
    if outside:
        lines += [f"{len(outside)} check(s) of operators only one report ran (e.g. a run with --ops or --only) are "
                  f"left out.", ""]
    for name in sorted((set(mine) | set(theirs)) - set(outside)):
        a, b = mine.get(name), theirs.get(name)
        if a is None or b is None:
            rows.append(f"| {_cell(name)} | {'-' if b is None else b['verdict']} | "
                        f"{'-' if a is None else a['verdict']} | only in one report |")
            continue
        change = _change(a, b, same)
        if change:
            rows.append(f"| {_cell(name)} | {b['verdict']} | {a['verdict']} | {change} |")
    if not rows:
        return lines + ["No check changed verdict" + (", and no error moved." if same else
                                                      ", and no fraction of tolerance moved by that much.")]
    return lines + ["| check | other | this | change |", "|---|---|---|---|"] + rows
