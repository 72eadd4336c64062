"""Conformance reports people act on: a per-operator summary with a legend, every failure with a command that
reproduces it alone (and does), the error plot (or how to get it), JUnit XML, a --compare that knows about seeds,
and no machine paths anywhere in a report."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conformance import report, report_diff
from conformance.scaffold import create
from core import registry
from tests.helpers import fresh_seed, refused, run_main

PLANTED_RMS_NORM = "from conformance.planted_bugs import rms_norm_fixed_eps as rms_norm\n"


@pytest.fixture
def buggy(tmp_path, monkeypatch) -> str:
    """A scaffolded out-of-tree backend (unique name) whose rms_norm carries a planted bug (a fixed epsilon)."""
    name = f"acme{fresh_seed() % 10 ** 8}"
    create(name, tmp_path / "backends")
    (tmp_path / "backends" / name / "ops" / "rms_norm.py").write_text(PLANTED_RMS_NORM)
    monkeypatch.setenv(registry.PATH_ENV, str(tmp_path / "backends"))
    return name


def _machine_paths(tmp_path: Path) -> list[str]:
    home = os.path.expanduser("~")
    return [p for p in {str(tmp_path), str(tmp_path.resolve()), home, str(report.ROOT)} if p not in ("", "/")]


def _assert_portable(tmp_path: Path, *files: Path) -> None:
    for f in files:
        text = f.read_text()
        for p in _machine_paths(tmp_path):
            assert p not in text, f"{f.name} holds the machine path {p}"


def test_failure_is_summarised_and_reproduced_alone(buggy, tmp_path):
    seed = fresh_seed()
    rep, xml = tmp_path / "rep", tmp_path / "junit.xml"
    r = run_main("conformance", "--backend", buggy, "--ops", "rms_norm,silu_and_mul", "--cases", "quick",
                 "--seed", str(seed), "--report", str(rep), "--junit", str(xml))
    assert r.returncode == 1, r.stderr
    data = json.loads((rep / "report.json").read_text())
    assert set(data["summary"]["by_level"]) == {"op"}, "--ops runs the op level only"
    failed = [c for c in data["checks"] if c["verdict"] == "fail"]
    assert failed and {c["op"] for c in failed} == {"rms_norm"}
    rows = {(o["operator"], o["dtype"]): o for o in data["operators"]}
    assert rows[("rms_norm", "float32")]["failed"] >= 1 and rows[("silu_and_mul", "float32")]["failed"] == 0
    assert rows[("rms_norm", "float32")]["worst_fraction"] > 1 >= rows[("silu_and_mul", "float32")]["worst_fraction"]
    for c in failed:
        assert f"--seed {seed}" in c["reproduce"] and c["reproduce"].endswith(f"--only {c['name']}")
        assert c["tolerance_fraction"] == pytest.approx(c["rel_err"] / c["tolerance"])

    md = (rep / "report.md").read_text()
    summary_at, failures_at, details_at = md.index("## Summary by operator"), md.index("## Failures"), md.index("## Op level")
    assert summary_at < failures_at < details_at, "the summary and the failures open the report"
    for column in report.SUMMARY_COLUMNS + report.CHECK_COLUMNS:
        assert f"- **{column}**: " in md, f"no legend for column {column}"
    assert all(c["reproduce"] in md for c in failed)

    # the printed command runs that check alone, on the same inputs, and fails the same way
    target = failed[-1]
    argv = shlex.split(target["reproduce"])
    assert argv[:3] == ["python", "-m", "conformance"]
    again = run_main("conformance", *argv[3:], "--report", str(tmp_path / "alone"))
    assert again.returncode == 1, again.stdout + again.stderr
    alone = json.loads((tmp_path / "alone" / "report.json").read_text())
    assert [(c["name"], c["verdict"]) for c in alone["checks"]] == [(target["name"], "fail")]
    assert alone["checks"][0]["rel_err"] == pytest.approx(target["rel_err"], rel=1e-9)

    # JUnit: one testcase per check, failures with their message and the command
    root = ET.parse(xml).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(data["checks"]) and root.get("failures") == str(len(failed))
    failures = {tc.get("name"): tc.find("failure") for tc in cases if tc.find("failure") is not None}
    assert set(failures) == {c["name"] for c in failed}
    assert failures[target["name"]].get("message") == target["detail"]
    assert target["reproduce"] in failures[target["name"]].text

    _assert_portable(tmp_path, rep / "report.json", rep / "report.md", tmp_path / "alone" / "report.md", xml)
    assert data["environment"]["backend_origin"] == f"${registry.PATH_ENV}/{buggy}"


def test_only_refuses_names_no_run_has(tmp_path):
    for name, needle in (("op/flash/x/float32", "not an operator"), ("nonsense", "not a check name"),
                         ("dist/model/golden", "N-ranks")):
        refused(run_main("conformance", "--backend", "cpu_ref", "--only", name), "--only", needle)
    refused(run_main("conformance", "--backend", "cpu_ref", "--cases", "quick", "--only", "op/rms_norm/nosuch/float32"),
            "--only", "no check named")
    refused(run_main("conformance", "--backend", "cpu_ref", "--only", "op/rms_norm/unaligned/float32", "--ops",
                     "rms_norm"), "--only")
    refused(run_main("conformance", "--backend", "cpu_ref", "--junit", str(tmp_path)), "--junit")


def _run(tmp_path, name: str, seed: int, *extra: str) -> dict:
    r = run_main("conformance", "--backend", "cpu_ref", "--ops", "silu_and_mul", "--cases", "quick", "--seed",
                 str(seed), "--report", str(tmp_path / name), *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((tmp_path / name / "report.json").read_text())


def test_plot_is_embedded_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")
    _run(tmp_path, "rep", fresh_seed())
    png = (tmp_path / "rep" / report.PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert f"]({report.PLOT_FILE})" in (tmp_path / "rep" / "report.md").read_text()


def test_without_matplotlib_the_report_says_how_to_get_the_plot(tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    _run(tmp_path, "rep", fresh_seed())
    md = (tmp_path / "rep" / "report.md").read_text()
    assert not (tmp_path / "rep" / report.PLOT_FILE).exists()
    assert "No plot: matplotlib is not installed" in md and "deepseek-v3-portable[plot]" in md
    assert f"]({report.PLOT_FILE})" not in md
    before = json.loads((tmp_path / "rep" / "report.json").read_text())
    monkeypatch.undo()  # matplotlib back, if this interpreter has it: the plot is drawn from report.json alone
    drawn = run_main("conformance.render", str(tmp_path / "rep"))
    assert drawn.returncode == 0, drawn.stderr
    assert json.loads((tmp_path / "rep" / "report.json").read_text()) == before
    md = (tmp_path / "rep" / "report.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "rep" / report.PLOT_FILE).is_file() and f"]({report.PLOT_FILE})" in md
    else:
        assert "no plot" in drawn.stdout and "No plot: matplotlib is not installed" in md
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "report.json").write_text('{"checks": []}')
    refused(run_main("conformance.render", str(tmp_path / "junk")), "not a conformance report")


def test_compare_between_real_runs_knows_about_seeds(tmp_path):
    seed = fresh_seed()
    _run(tmp_path, "a", seed)
    _run(tmp_path, "same", seed, "--compare", str(tmp_path / "a" / "report.json"))
    same = (tmp_path / "same" / "report.md").read_text()
    assert "Same seed and case set" in same and "No check changed verdict, and no error moved." in same
    _run(tmp_path, "other", seed ^ 1, "--compare", str(tmp_path / "a" / "report.json"))
    other = (tmp_path / "other" / "report.md").read_text()
    assert "Different inputs" in other and f"--seed {seed}" in other
    assert "error up" not in other and "regression" not in other


def _report(seed: int, checks: list[tuple[str, str, float]]) -> dict:
    return {"environment": {"backend": "x", "device": "cpu", "commit": "c", "seed": seed, "case_set": "quick"},
            "summary": {"verdict": "PASS", "passed": len(checks), "failed": 0},
            "checks": [{"name": n, "verdict": v, "rel_err": e, "tolerance": 1e-2, "detail": ""} for n, v, e in checks]}


def test_compare_rules_same_and_different_seeds():
    before = _report(1, [("op/a/c/bfloat16", "pass", 1e-3), ("op/b/c/bfloat16", "pass", 1e-3),
                         ("op/c/c/bfloat16", "fail", 5e-2), ("op/d/c/bfloat16", "pass", 1e-3)])
    noisy = [("op/a/c/bfloat16", "pass", 3e-3), ("op/b/c/bfloat16", "fail", 2e-2), ("op/c/c/bfloat16", "pass", 1e-3),
             ("op/d/c/bfloat16", "pass", 6e-3)]
    report_diff.validate(before, "test")
    same = "\n".join(report_diff.compare(_report(1, noisy), before))
    assert "error up 0.001 -> 0.003" in same and "**regression**" in same and "fixed" in same
    assert "error up 0.001 -> 0.006" in same
    other = "\n".join(report_diff.compare(_report(2, noisy), before))
    assert "**regression**" in other and "fixed" in other
    assert "error up" not in other and "op/a/c/bfloat16" not in other, "a seed's noise is not a change"
    assert "op/d/c/bfloat16" in other and "headroom" in other  # 0.1 -> 0.6 of its tolerance: worth a look
    unchanged = "\n".join(report_diff.compare(_report(1, [(n, v, e) for n, v, e in
                                                          [(c["name"], c["verdict"], c["rel_err"]) for c in before["checks"]]]), before))
    assert "No check changed verdict, and no error moved." in unchanged
    subset = "\n".join(report_diff.compare(_report(1, noisy[:1]), before))
    assert "3 check(s) of operators only one report ran" in subset and "op/b/c/bfloat16" not in subset
    missing = "\n".join(report_diff.compare(_report(1, noisy[:1] + [("op/a/d/float32", "pass", 1e-3)]), before))
    assert "op/a/d/float32 | - | pass | only in one report" in missing


def test_summary_prefers_the_relative_verdicts_own_multiple():
    """When the check carries ref_multiple and ref_limit (the relative verdict judged it), the summary shows those;
    otherwise the multiple is rel_err / ref_rel_err (0 when both are exact, infinite when only cpu_ref is)."""
    def check(name, err, ref, **extra):
        return {"level": "op", "op": "linear", "dtype": "bfloat16", "name": name, "verdict": "pass", "rel_err": err,
                "ref_rel_err": ref, "tolerance": 1e-2, **extra}

    assert report.ref_multiple(check("a", 4e-3, 2e-3)) == pytest.approx(2.0)
    assert report.ref_multiple(check("a", 0.0, 0.0)) == 0.0
    assert report.ref_multiple(check("a", 1e-9, 0.0)) == float("inf")
    assert report.ref_multiple(check("a", "inf", 1e-3)) == float("inf")
    assert report.ref_multiple(check("a", 4e-3, 2e-3, ref_multiple=1.5)) == 1.5
    rows = report.operators([check("a", 4e-3, 2e-3, ref_multiple=1.5, ref_limit=4.0),
                             check("b", 6e-3, 1e-3, ref_multiple=3.0, ref_limit=4.0), check("c", 1e-3, None)])
    assert len(rows) == 1
    row = rows[0]
    assert row["worst_ref_multiple"] == 3.0 and row["ref_limit"] == 4.0 and row["worst_check"] == "b"
    assert row["worst_fraction"] == pytest.approx(0.6) and row["checks"] == 3 and row["passed"] == 3
