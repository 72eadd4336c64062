"""Discovery and per-operator dispatch: a backend that implements some operators runs with the rest on cpu_ref and
the table says so; --strict refuses it naming the missing operators; code and manifest must agree; out-of-tree
backends are found through an entry point or $DSV3_BACKENDS_PATH without touching core."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from core import registry
from core.backend import RunMode
from core.dispatch import Dispatch
from core.errors import ContractError, UserError
from core.ops import OPERATORS, keep_mla
from tests.helpers import run_cli, run_main

PARTIAL = '''
from core.backend import Availability, Backend, Limited
from backends.cpu_ref import OPS
import torch

CALLS = {"rms_norm": 0, "linear": 0, "moe_gate": 0}

def rms_norm(x, weight, eps):
    CALLS["rms_norm"] += 1
    return OPS["rms_norm"](x, weight, eps)

def linear(x, w):
    CALLS["linear"] += 1
    return OPS["linear"](x, w)

def moe_gate(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring="sigmoid", group_score="top2_sum"):
    CALLS["moe_gate"] += 1
    return OPS["moe_gate"](logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score)

def only_many_tokens(logits, *args):
    return None if logits.shape[0] >= 4 else "fewer than 4 tokens"

BACKEND = Backend(name="{name}", device_type="cpu", dist_backend="gloo",
                  probe=lambda mode: Availability(True, device=torch.device("cpu")),
                  ops={"rms_norm": rms_norm, "linear": linear, "moe_gate": Limited(moe_gate, only_many_tokens)})
'''
PARTIAL_MANIFEST = '''
backend: {name}
operators:
  rms_norm: {dtypes: [float32, bfloat16]}
  linear: {dtypes: [float32, bfloat16]}
  moe_gate: {dtypes: [float32]}
limits:
  moe_gate: "batches of fewer than 4 tokens go to cpu_ref"
'''


def write_backend(root, name, code=PARTIAL, manifest=PARTIAL_MANIFEST):
    d = root / name
    d.mkdir(parents=True)
    (d / "__init__.py").write_text(textwrap.dedent(code.replace("{name}", name)))
    (d / "manifest.yaml").write_text(textwrap.dedent(manifest.replace("{name}", name)))
    return d


@pytest.fixture
def extra_root(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.PATH_ENV, str(tmp_path))
    return tmp_path


def test_partial_backend_falls_back_visibly(extra_root):
    write_backend(extra_root, "halfref")
    result = run_main("core.run", "--backend", "halfref", "--max-new-tokens", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    table = report["dispatch"]
    assert set(table) == set(OPERATORS)
    assert table["rms_norm"] == "halfref" and table["linear"] == "halfref"
    for op in ("add_rms_norm", "apply_rope", "attention_prefill", "mla_decode", "moe_experts", "silu_and_mul"):
        assert table[op].startswith("cpu_ref (fallback"), table[op]
    assert "cpu_ref for inputs outside its limits" in table["moe_gate"] and "calls so far" in table["moe_gate"]
    assert "fallback" in result.stdout  # the printed table says it too
    calls = sys.modules["dsv3_external_backends.halfref"].CALLS
    assert calls["rms_norm"] > 0 and calls["linear"] > 0 and calls["moe_gate"] > 0


def test_strict_refuses_naming_the_missing_operators(extra_root):
    write_backend(extra_root, "halfstrict")
    result = run_main("core.run", "--backend", "halfstrict", "--strict")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "--strict" in line
    for op in ("add_rms_norm", "apply_rope", "attention_prefill", "mla_decode", "moe_experts", "silu_and_mul"):
        assert op in line
    assert "rms_norm," not in line.replace("add_rms_norm", "")


def test_code_and_manifest_must_agree(extra_root):
    write_backend(extra_root, "liar", manifest=PARTIAL_MANIFEST.replace("limits:", "  silu_and_mul: {dtypes: [float32]}\nlimits:"))
    with pytest.raises(ContractError, match="declared but not implemented \\['silu_and_mul'\\]"):
        registry.load("liar")
    result = run_main("core.run", "--backend", "liar")
    assert result.returncode == 2 and "manifest.yaml" in result.stderr


def test_bad_signature_is_a_contract_error(extra_root):
    code = PARTIAL.replace("def linear(x, w):", "def linear(x):").replace("OPS[\"linear\"](x, w)", "x")
    write_backend(extra_root, "badsig", code=code)
    with pytest.raises(ContractError, match="linear"):
        registry.load("badsig")


def test_prepare_mla_is_optional_and_signature_checked(extra_root):
    """Without the hook the absorbed weights stay as they are (keep_mla); a backend's own hook is used; a hook with
    the wrong signature is refused like an operator."""
    write_backend(extra_root, "nomla")
    assert Dispatch(registry.load("nomla"), registry.load("cpu_ref")).prepare_mla is keep_mla
    code = PARTIAL + "\ndef prepare_mla(w_uk, w_uv):\n    return w_uk.double(), w_uv.double()\n" \
        "BACKEND.prepare_mla = prepare_mla\n"
    write_backend(extra_root, "widemla", code=code)
    ops = Dispatch(registry.load("widemla"), registry.load("cpu_ref"))
    assert ops.prepare_mla.__name__ == "prepare_mla" and ops.prepare_mla is not keep_mla
    write_backend(extra_root, "badmla", code=code.replace("def prepare_mla(w_uk, w_uv):", "def prepare_mla(w_uk):")
                  .replace("w_uk.double(), w_uv.double()", "w_uk, w_uk"))
    with pytest.raises(ContractError, match="prepare_mla"):
        registry.load("badmla")


def test_unavailable_backend_says_why_and_what_is_available(extra_root):
    code = PARTIAL.replace('probe=lambda mode: Availability(True, device=torch.device("cpu"))',
                           'probe=lambda mode: Availability.no("no Frobnicator card found (driver frob.ko not loaded)")')
    write_backend(extra_root, "frob", code=code)
    with pytest.raises(UserError) as e:
        registry.activate("frob", RunMode())
    msg = str(e.value)
    assert "frob.ko" in msg and "available here:" in msg and "cpu_ref" in msg


def test_reference_dispatch_has_no_fallbacks():
    ref = registry.load("cpu_ref")
    ops = Dispatch(ref, ref, strict=True)
    assert ops.fallbacks == [] and set(ops.table().values()) == {"cpu_ref"}


def test_entry_point_backend_is_discovered(tmp_path):
    """An out-of-tree package declaring the entry point is found and run, with no file of this repo touched."""
    site = tmp_path / "site"
    write_backend(site, "vendorx")
    dist = site / "vendorx-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vendorx\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\nvendorx = vendorx\n")
    env = {"PYTHONPATH": str(site)}
    listing = run_cli("core.run", "--list-backends", env=env)
    assert listing.returncode == 0 and "vendorx" in listing.stdout and "entry point" in listing.stdout
    result = run_cli("core.run", "--backend", "vendorx", "--max-new-tokens", "2", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["dispatch"]["linear"] == "vendorx"
