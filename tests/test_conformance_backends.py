"""Every in-tree backend passes conformance on this CPU-only machine, in a fresh interpreter as a user runs it:
cpu_ref and cpu on the default (full) case set, ascend against the torch_npu emulation, cuda and rocm through the Triton
interpreter. The reports must say how they ran."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli

RUNS = {
    "cpu_ref": ["--backend", "cpu_ref"],
    "cpu": ["--backend", "cpu"],
    "ascend-simulate": ["--backend", "ascend", "--simulate"],
    "cuda-interpret": ["--backend", "cuda", "--interpret"],
    "rocm-interpret": ["--backend", "rocm", "--interpret", "--level", "op,block"],
}


@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_backend_passes_conformance(run, tmp_path):
    result = run_cli("conformance", *RUNS[run], "--report", str(tmp_path), timeout=1200)
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [c["name"] + ": " + c["detail"] for c in report["checks"] if c["verdict"] == "fail"]
    assert result.returncode == 0 and not failed, failed or result.stderr
    env, summary = report["environment"], report["summary"]
    assert summary["passed"] > 30 and set(summary["by_level"]) >= {"op", "block"}
    assert env["triton_interpreter"] == ("--interpret" in RUNS[run])
    assert env["simulation"] == ("--simulate" in RUNS[run])
    markdown = (tmp_path / "report.md").read_text()
    if "--simulate" in RUNS[run]:
        assert "emulation of the vendor library" in markdown
    if "--interpret" in RUNS[run]:
        assert "Triton interpreter on the CPU" in markdown
        skipped = [c for c in report["checks"] if c["verdict"] == "skip"]
        assert skipped and all(c["dtype"] in ("bfloat16", "float16") and c["detail"] for c in skipped)
