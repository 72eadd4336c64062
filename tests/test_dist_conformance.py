"""The `dist` level names the sharded layer that breaks: a backend whose moe_experts reads an id of -1 as Python's
last element (a bug invisible in one process, where no id is -1) fails at 2 ranks in the all_reduce combine mode,
and the layer bisection names the first MoE layer; the all_to_all mode (k = 1 dispatch, no -1 ids) passes."""

from __future__ import annotations

import torch

from conformance import dist_checks
from conformance.context import FAIL, PASS, Suite
from conformance.dist_trace import first_difference
from core import registry
from core.backend import RunMode
from tests.helpers import ROOT, fresh_seed

WRAPPING_BACKEND = '''
import torch
from backends import cpu_ref
from backends.cpu_ref import moe
from core.backend import Backend


def moe_experts(x, experts, weights, ids):
    """ids of -1 index the last local expert, as Python's negative indexing would."""
    return moe.moe_experts(x, experts, weights, torch.where(ids < 0, ids + experts.gate.shape[0], ids))


BACKEND = Backend(name="minus_one_wraps", device_type="cpu", dist_backend="gloo", probe=cpu_ref.probe,
                  ops={**cpu_ref.OPS, "moe_experts": moe_experts}, prepare_linear=cpu_ref.prepare_linear,
                  prepare_experts=cpu_ref.prepare_experts)
'''


def test_first_difference_names_the_first_layer_in_call_order():
    g = torch.Generator().manual_seed(fresh_seed())
    want = {f"{i:03d} layer {i}": torch.randn(3, 4, generator=g) for i in range(4)}
    got = {k: v.clone() for k, v in want.items()}
    assert first_difference(got, want, 1e-5) is None
    got["002 layer 2"] += 1.0
    got["003 layer 3"] += 1.0
    layer, rel = first_difference(got, want, 1e-5)
    assert layer == "layer 2" and rel > 1e-2
    del got["001 layer 1"]
    assert first_difference(got, want, 1e-5) == ("layer 1", float("inf"))


def test_dist_level_names_the_sharded_layer_that_breaks(tmp_path, monkeypatch):
    d = tmp_path / "minus_one_wraps"
    d.mkdir()
    (d / "__init__.py").write_text(WRAPPING_BACKEND)
    manifest = (ROOT / "backends" / "cpu_ref" / "manifest.yaml").read_text()
    (d / "manifest.yaml").write_text(manifest.replace("backend: cpu_ref", "backend: minus_one_wraps"))
    monkeypatch.setenv(registry.PATH_ENV, str(tmp_path))
    backend, avail = registry.activate("minus_one_wraps")
    suite = Suite(backend, avail, RunMode(), "quick", fresh_seed())
    results = {r.name: r for r in dist_checks.model_checks(suite, [2])}
    broken, fine = results["dist/model/2-ranks/all_reduce"], results["dist/model/2-ranks/all_to_all+mtp"]
    assert broken.verdict == FAIL and fine.verdict == PASS, (broken.detail, fine.detail)
    assert broken.culprits == ["layer 1 MoE (routed experts and shared expert split)"], broken.detail
    assert "first sharded layer that differs from one process: layer 1 MoE" in broken.detail
