"""A vendor's path as the README tells it: --help shows new-backend; --ops runs only what concerns the operators; the
scaffolded package, pip-installed into a fresh venv, is found through its entry point with its manifest shipped as
package data; the manifest is validated against its schema with one-line errors naming the key."""

from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conformance.scaffold import create, create_package
from core import registry
from core.backend import Manifest
from core.errors import ContractError
from tests.helpers import ROOT, fresh_seed, refused, run_cli, run_main


def test_help_shows_new_backend_and_the_one_operator_loop(capsys):
    from conformance.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "new-backend NAME" in text and "--package" in text and "--ops" in text and "--only" in text


def test_ops_runs_the_op_level_only_unless_block_is_asked(tmp_path, monkeypatch):
    from conformance import __main__ as cli, block_checks
    from conformance.context import PASS, CheckResult

    r = run_main("conformance", "--backend", "cpu_ref", "--ops", "apply_rope", "--cases", "quick", "--report",
                 str(tmp_path / "op"))
    assert r.returncode == 0, r.stderr
    checks = json.loads((tmp_path / "op" / "report.json").read_text())["checks"]
    assert checks and {(c["level"], c["op"]) for c in checks} == {("op", "apply_rope")}
    assert cli.parse(["--backend", "x", "--ops", "linear"]).levels == ["op"]
    assert cli.parse(["--backend", "x", "--ops", "linear", "--level", "op,block"]).levels == ["op", "block"]
    assert cli.parse(["--backend", "x"]).levels == ["op", "block", "model"]
    # asked for, the block level keeps only the blocks that run the operators
    ran = [CheckResult("block", f"block/{b}/quick/float32", b, PASS) for b in block_checks.NEEDS]
    monkeypatch.setattr(block_checks, "run", lambda suite: list(ran))
    for ops, blocks in ((["silu_and_mul"], {"moe_block"}), (["apply_rope"], {"mla_block"}),
                        (["linear"], {"mla_block", "moe_block"}), (["moe_gate"], set()), (None, set(block_checks.NEEDS))):
        got = cli.run_suite(None, ["block"], ops, echo=lambda *_: None)
        assert {r.op for r in got} == blocks, ops


def _parent_site_packages() -> list[str]:
    paths = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return sorted(p for p in paths if Path(p).is_dir())


@pytest.mark.slow
def test_scaffolded_package_installs_into_a_fresh_venv_and_is_found(tmp_path):
    """new-backend --package, then the README's out-of-tree steps: pip install the directory (offline: no deps, no
    build isolation) into a fresh venv that sees this interpreter's packages, and judge it by name."""
    if importlib.util.find_spec("venv") is None or importlib.util.find_spec("pip") is None:
        pytest.skip("venv or pip is not available to this interpreter")
    name = f"vendor{fresh_seed() % 10 ** 8}"
    made = run_main("conformance", "new-backend", name, "--package", str(tmp_path / "src"))
    assert made.returncode == 0, made.stderr
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=60)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # this interpreter's packages (torch, pip, setuptools) stay visible, after the venv's own
    Path(purelib, "zz_parent_site.pth").write_text("\n".join(_parent_site_packages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", registry.PATH_ENV, "PIP_USER")}
    builds = subprocess.run([str(python), "-c", "import setuptools.command.bdist_wheel"], capture_output=True,
                            env=env, timeout=60)
    if builds.returncode != 0:
        builds = subprocess.run([str(python), "-c", "import setuptools, wheel"], capture_output=True, env=env, timeout=60)
    if builds.returncode != 0:
        pytest.skip("no setuptools with bdist_wheel (setuptools >= 70.1, or wheel) to build the package offline")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                              "--quiet", str(tmp_path / "src")], capture_output=True, text=True, env=env, timeout=120)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    installed = Path(purelib, name)
    assert (installed / "manifest.yaml").is_file(), "the manifest must be shipped as package data"
    judged = subprocess.run([str(python), "-m", "conformance", "--backend", name, "--ops", "silu_and_mul",
                             "--cases", "quick", "--report", str(tmp_path / "rep")], cwd=ROOT, capture_output=True,
                            text=True, env=env, timeout=300)
    assert judged.returncode == 0, judged.stdout[-2000:] + judged.stderr[-2000:]
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["environment"]["backend_origin"] == f"entry point {name}"
    assert data["manifest"] == f"site-packages/{name}/manifest.yaml"
    assert data["summary"]["passed"] > 0 and data["summary"]["failed"] == 0


def test_an_installed_package_without_its_manifest_says_ship_it_as_package_data(tmp_path):
    site_dir = tmp_path / "site"
    create("nomanifest", site_dir)
    (site_dir / "nomanifest" / "manifest.yaml").unlink()
    dist = site_dir / "nomanifest-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nomanifest\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nnomanifest = nomanifest\n")
    r = run_cli("conformance", "--backend", "nomanifest", "--ops", "rms_norm", env={"PYTHONPATH": str(site_dir)})
    refused(r, "nomanifest", "no manifest.yaml", "package data")


def test_package_scaffold_refuses_a_name_that_is_already_a_module(tmp_path):
    refused(run_main("conformance", "new-backend", "json", "--package", str(tmp_path / "p")), "already importable")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    refused(run_main("conformance", "new-backend", "zed", "--package", str(tmp_path / "full")), "not an empty")


BASE = "backend: schematest\noperators:\n  rms_norm: {dtypes: [float32]}\n"


@pytest.mark.parametrize("extra, needles", [
    ("tolerances:\n  - {op: rms_norm, dtype: float32, reason: looser}\n", ["tolerances[0]", "no rtol"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float32, rtol: 1.0e-5, atol: 1.0e-3, reason: r}\n",
     ["tolerances[0].atol", "not read"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float32, rtol: big, reason: r}\n", ["tolerances[0].rtol", "'big'"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float32, rtol: 1.0e-5, reason: r, rtl: 2}\n", ["tolerances[0].rtl"]),
    ("tolerances:\n  - {op: rms_nrm, dtype: float32, rtol: 1.0e-5, reason: r}\n", ["tolerances[0].op", "rms_nrm"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float23, rtol: 1.0e-5, reason: r}\n", ["tolerances[0].dtype"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float32, rtol: 1.0e-5, reason: r, mode: fast}\n", ["tolerances[0].mode"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float32, rtol: 1.0e-5}\n", ["tolerances[0]", "no reason"]),
    ("tolerances:\n  - {op: rms_norm, dtype: float32, rtol: 1.0e-5, skip: why, reason: r}\n", ["both rtol and skip"]),
    ("tolerances: {op: rms_norm}\n", ["tolerances must be a list"]),
    ("colour: blue\n", ["unknown manifest key", "colour"]),
    ("description: [a, b]\n", ["description must be a string"]),
    ("limits: {rms_norm: 3}\n", ["limits.rms_norm", "string"]),
    ("toolchain: [torch]\n", ["toolchain must be a mapping"]),
])
def test_manifest_schema_errors_name_the_key(tmp_path, extra, needles):
    path = tmp_path / "manifest.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(ContractError) as e:
        Manifest.load(path)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "manifest.yaml" in message, message
    for needle in needles:
        assert needle in message, message


def test_manifest_operator_entry_keys_and_backend_name_are_read(tmp_path):
    path = tmp_path / "manifest.yaml"
    path.write_text("backend: schematest\noperators:\n  rms_norm: {dtypes: [float32], dtype: [bfloat16]}\n")
    with pytest.raises(ContractError, match=r"operators\.rms_norm\.dtype"):
        Manifest.load(path)
    good = BASE + "tolerances:\n  - {op: [rms_norm, mla_block], dtype: [float32], numerics: reference, mode: normal, " \
                  "rtol: 1.0e-5, multiple: 4, floor: 0, reason: measured}\n  - {op: rms_norm, dtype: bfloat16, " \
                  "skip: not judged here, reason: r}\n"
    path.write_text(good)
    assert len(Manifest.load(path).tolerances) == 2
    name = f"named{fresh_seed() % 10 ** 8}"
    create(name, tmp_path / "b")
    manifest = tmp_path / "b" / name / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace(f"backend: {name}", "backend: somebody_else"))
    os.environ[registry.PATH_ENV] = str(tmp_path / "b")
    try:
        refused(run_main("conformance", "--backend", name, "--ops", "rms_norm"), "backend:", "somebody_else", name)
    finally:
        del os.environ[registry.PATH_ENV]
