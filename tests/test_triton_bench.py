"""The benchmark scripts' CPU smoke mode (`--interpret --tiny`): they run end to end through the Triton
interpreter and write their JSON and markdown reports naming the device. Timings are not checked (meaningless on
the CPU); on a GPU the same scripts run the DeepSeek-V3 shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from tests.triton_support import INTERPRETER

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="the smoke mode is for machines without a GPU")


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), "--interpret", "--tiny", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_bench_ops_smoke(tmp_path):
    result = run_script("bench_ops.py", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("ops-*.json")).read_text())
    assert report["meta"]["device"] == "CPU (Triton interpreter)" and report["meta"]["copy_gbps"] > 0
    ops = {row["op"] for row in report["rows"]}
    assert ops == {"rms_norm", "add_rms_norm", "silu_and_mul", "apply_rope", "moe_gate", "linear", "moe_experts",
                   "mla_decode", "attention_prefill"}
    assert all(row["ms"] > 0 and row["speedup"] is not None for row in report["rows"])
    assert next(tmp_path.glob("ops-*.md")).read_text().startswith("# bench_ops")


def test_bench_decode_smoke(tmp_path):
    result = run_script("bench_decode.py", "--batches", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("decode-*.json")).read_text())
    (row,) = report["rows"]
    assert row["extra"]["tokens_per_s"] > 0 and row["extra"]["ref_tokens_per_s"] > 0 and row["speedup"] > 0


def test_bench_ops_refuses_an_unavailable_backend_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ops.py"), "--backend", "cuda", "--tiny",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--interpret" in result.stderr and len(result.stderr.strip().splitlines()) == 1
