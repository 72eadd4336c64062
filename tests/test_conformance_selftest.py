"""The conformance suite proves its own power: every planted bug fails it, with the right operator named, while
the unmodified reference passes; a scaffolded backend is discovered, passes, and fails naming the operator broken
in it; an out-of-tree package with the entry point is judged the same way."""

from __future__ import annotations

import json

import pytest
import torch

from conformance import block_checks, model_checks, op_checks
from conformance.__main__ import run_suite
from conformance.context import FAIL, PASS, Suite
from conformance.planted_bugs import LEGITIMATE, PLANTED, buggy_backend
from core import registry
from core.backend import RunMode
from tests.helpers import fresh_seed, run_cli, run_main

ISSUE_12_CLASSES = {
    # a statistic, softmax or combine in the 16-bit working dtype: inside the absolute rows, caught relatively
    "rms_norm_statistic_in_working_dtype": "numerics",
    "prefill_softmax_in_working_dtype": "numerics",
    "experts_combine_in_working_dtype": "numerics",
    # a stated invariant broken while golden stays close
    "add_rms_norm_normalises_unrounded_sum": "invariant",
    # wrong only past a tile boundary
    "linear_tail_tile_drops_partial_k": "tile",
    "prefill_keys_capped_at_128": "tile",
    # wrong only when an optional argument is absent (no correction bias, no block scales)
    "gate_without_bias_skips_groups": "optional",
    "linear_float_weight_in_bfloat16": "optional",
}
TILE_CASES = ("65", "129", "257", "over-128")
OPTIONAL_CASES = ("no-bias", "v2-", "router-fp32", "bf16-weight", "bfloat16-weight")

CAUGHT_AT_MODEL_LEVEL = ["rope_on_interleaved_pairs", "gate_bias_in_weights", "gate_not_renormalised",
                         "linear_fp8_scales_transposed", "silu_on_up_half", "prefill_yarn_scale_missing"]


def failing_ops(results) -> set[str]:
    return {r.op for r in results if r.verdict == FAIL}


def test_reference_passes_every_level():
    backend, avail = registry.activate("cpu_ref")
    suite = Suite(backend, avail, RunMode(), "quick", fresh_seed())
    results = run_suite(suite, ["op", "block", "model"], echo=lambda *_: None)
    assert failing_ops(results) == set(), [r.detail for r in results if r.verdict == FAIL]
    assert sum(r.verdict == PASS for r in results) > 90


@pytest.mark.parametrize("bug", sorted(set(PLANTED) - set(ISSUE_12_CLASSES)))  # those: their own test below
def test_planted_bug_fails_and_is_named(bug):
    backend, avail = buggy_backend(bug)
    seed = fresh_seed()
    suite = Suite(backend, avail, RunMode(), "quick", seed)
    results = op_checks.run(suite) + run_suite(suite, ["block"], echo=lambda *_: None)
    op = PLANTED[bug][0]
    named = {r.op for r in results if r.verdict == FAIL and r.level == "op"}
    assert named == {op}, f"{bug}: op level named {named}, expected {op} (seed {seed})"




def test_relative_rows_cover_every_operator_and_overrides_replace_them():
    """Every operator and block has a relative row (or an explicit `none`) with a reason in every 16-bit and float32
    dtype; a manifest override of the absolute row replaces it by its own multiple or by none, and may waive the
    rounded-once invariant; the floor makes an exact case (cpu_ref's error 0) finite."""
    from conformance.tolerances import ToleranceTable
    from core.ops import OPERATORS

    table = ToleranceTable()
    for op in [*OPERATORS, "mla_block", "moe_block"]:
        for dtype in ("bfloat16", "float32") if op != "moe_gate" else ("float32",):
            rel = table.relative(op, dtype)
            assert rel is not None and rel.multiple > 1 and rel.floor > 0 and len(rel.reason) > 20, (op, dtype)
    assert table.relative("linear", "float32", "w8a8") is None
    assert table.relative("mla_block", "bfloat16", "w8a8_fnuz") is None
    rel = table.relative("rms_norm", "bfloat16")
    assert rel.ratio(0.0, 0.0) == 0.0 and rel.ratio(rel.floor, 0.0) == rel.multiple
    assert rel.ratio(3e-3, 1e-3) == pytest.approx(3.0)
    ascend = ToleranceTable(registry.load("ascend").manifest)
    assert ascend.relative("linear", "float32") is None  # an override without a multiple
    override = ascend.relative("linear", "bfloat16")
    assert override.multiple == 2.5 and override.source == "ascend/manifest.yaml"
    assert ascend.rounding_fraction("add_rms_norm", "bfloat16") is None  # rounded_once: false
    assert ascend.rounding_fraction("rms_norm", "bfloat16") == 0.01


@pytest.mark.parametrize("bug", sorted(ISSUE_12_CLASSES))
def test_issue_12_bug_classes_are_caught_by_their_mechanism(bug):
    """Each class of bug that used to slip through fails its operator's quick checks, for the right reason: the
    numeric ones only through the relative verdict (every failing error is inside its absolute row), the broken
    invariant through the rounding check, the tile and optional-argument bugs only in the cases that reach them."""
    backend, avail = buggy_backend(bug)
    seed = fresh_seed()
    op = PLANTED[bug][0]
    results = op_checks.run(Suite(backend, avail, RunMode(), "quick", seed), [op])
    failed = [r for r in results if r.verdict == FAIL]
    assert failed and {r.op for r in failed} == {op}, f"{bug}: not caught (seed {seed})"
    kind = ISSUE_12_CLASSES[bug]
    names = [r.name for r in failed]
    if kind in ("numerics", "invariant"):
        assert all(r.rel_err <= r.tolerance for r in failed), f"{bug}: the absolute rows alone catch it: {names}"
        needle = "cpu_ref's own" if kind == "numerics" else "rounding:"
        assert any(needle in r.detail for r in failed), [r.detail for r in failed]
    elif kind == "tile":
        assert all(any(t in n.split("/")[2] for t in TILE_CASES) for n in names), names
    else:
        assert all(any(t in n.split("/")[2] for t in OPTIONAL_CASES) for n in names), names


@pytest.mark.parametrize("variant", sorted(LEGITIMATE))
def test_legitimate_variants_pass(variant):
    """Implementations that round where the contract allows (flash attention's P, the SwiGLU product between the
    expert GEMMs, another float32 reduction order) are never failed by the relative verdict or the invariants."""
    backend, avail = buggy_backend(variant)
    seed = fresh_seed()
    results = op_checks.run(Suite(backend, avail, RunMode(), "quick", seed), [LEGITIMATE[variant][0]])
    failed = [f"{r.name}: {r.detail}" for r in results if r.verdict == FAIL]
    assert not failed and any(r.verdict == PASS for r in results), f"seed {seed}: {failed}"


def test_relative_verdict_at_block_level():
    """A bf16 statistic in rms_norm fails the MLA block relative to cpu_ref's own error, inside the absolute row."""
    backend, avail = buggy_backend("rms_norm_statistic_in_working_dtype")
    suite = Suite(backend, avail, RunMode(), "quick", fresh_seed())
    with torch.no_grad():
        result = block_checks.check_mla(suite, torch.bfloat16)
    assert result.verdict == FAIL and result.rel_err <= result.tolerance, result.detail
    assert result.ref_multiple > result.ref_limit and "cpu_ref's own" in result.detail


@pytest.mark.parametrize("bug", CAUGHT_AT_MODEL_LEVEL)
def test_model_level_bisection_names_the_operator(bug):
    backend, avail = buggy_backend(bug)
    suite = Suite(backend, avail, RunMode(), "quick", fresh_seed())
    level = model_checks.ModelLevel(suite, torch.float32)
    with torch.no_grad():
        result = level.check("logits", level.logits_problem, bisect=True)
    assert result.verdict == FAIL, result.detail
    assert result.culprits == [PLANTED[bug][0]], result.detail


def test_model_level_mtp_check_is_bisected_to_the_operator():
    """A verify step without its causal mask (mla_decode wrong only at S = 2) fails the model level's MTP check in
    float32 -- its verify logits differ from two plain steps' -- and the bisection names mla_decode (cpu_ref passes
    the whole check in test_conformance_backends)."""
    backend, avail = buggy_backend("decode_verify_without_causal_mask")
    level = model_checks.ModelLevel(Suite(backend, avail, RunMode(), "quick", fresh_seed()), torch.float32)
    with torch.no_grad():
        result = level.check("mtp", level.mtp_problem, bisect=True)
    assert result.verdict == FAIL and "verify step" in result.detail, result.detail
    assert result.culprits == ["mla_decode"], result.detail


def test_scaffolded_backend_is_discovered_passes_and_names_a_broken_operator(tmp_path):
    env = {registry.PATH_ENV: str(tmp_path)}
    made = run_cli("conformance", "new-backend", "acme", "--dir", str(tmp_path), env=env)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "acme" / "ops" / "mla_decode.py").is_file()
    ok = run_cli("conformance", "--backend", "acme", "--cases", "quick", "--level", "op,block",
                 "--report", str(tmp_path / "ok"), env=env)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["summary"]["failed"] == 0 and report["dispatch"]["rms_norm"] == "acme"
    op_file = tmp_path / "acme" / "ops" / "silu_and_mul.py"
    op_file.write_text(op_file.read_text().replace('return OPS["silu_and_mul"](x)', 'return OPS["silu_and_mul"](x) * 1.01'))
    bad = run_cli("conformance", "--backend", "acme", "--cases", "quick", "--level", "op",
                  "--report", str(tmp_path / "bad"), "--compare", str(tmp_path / "ok" / "report.json"), env=env)
    assert bad.returncode == 1
    report = json.loads((tmp_path / "bad" / "report.json").read_text())
    assert report["summary"]["failed_ops"] == ["silu_and_mul"]
    markdown = (tmp_path / "bad" / "report.md").read_text()
    assert "Compared with another report" in markdown and "op/silu_and_mul" in markdown


def test_scaffold_refuses_bad_names(tmp_path):
    for name, needle in (("Bad-Name", "not a valid backend name"), ("cpu_ref", "already")):
        r = run_main("conformance", "new-backend", name, "--dir", str(tmp_path))
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_out_of_tree_package_is_judged(tmp_path):
    from conformance.scaffold import create

    site = tmp_path / "site"
    create("vendory", site)
    dist = site / "vendory-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vendory\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nvendory = vendory\n")
    r = run_cli("conformance", "--backend", "vendory", "--cases", "quick", "--level", "op",
                "--report", str(tmp_path / "rep"), env={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    env = json.loads((tmp_path / "rep" / "report.json").read_text())["environment"]
    assert env["backend"] == "vendory" and "entry point" in env["backend_origin"]


def test_cli_refuses_bad_options(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    not_a_report = tmp_path / "r.json"
    not_a_report.write_text('{"checks": []}')
    for args, needle in ((["--backend", "cpu_ref", "--report", str(a_file)], "not a directory"),
                         (["--backend", "cpu_ref", "--compare", str(not_a_report)], "not a conformance report"),
                         (["--backend", "cpu_ref", "--seed", str(2 ** 40)], "--seed"),
                         (["new-backend", "zed", "--dir", str(a_file)], "not a directory"),
                         (["--backend", "cpu_ref", "--level", "op,chip"], "--level"),
                         (["--backend", "cpu_ref", "--ops", "rms_norm,flash"], "--ops"),
                         (["--backend", "nonesuch"], "unknown backend"),
                         (["--backend", "cpu_ref", "--compare", "/nonexistent.json"], "--compare")):
        r = run_main("conformance", *args)
        assert r.returncode == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
