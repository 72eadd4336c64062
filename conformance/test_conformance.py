"""One pytest test per conformance check (collected only by `pytest conformance ...`)."""

from __future__ import annotations

import os

import pytest
import torch

from conformance import block_checks, model_checks, op_checks
from conformance.context import FAIL, SKIP, Suite
from conformance.inputs import fixed_dtype
from core import registry
from core.backend import DTYPE_NAMES, RunMode
from core.ops import OPERATORS


def _suite(config) -> Suite:
    if not hasattr(config, "_conformance_suite"):
        mode = RunMode(interpret=config.getoption("--interpret"), simulate=config.getoption("--simulate"))
        backend, avail = registry.activate(config.getoption("--backend"), mode)
        cases = config.getoption("--cases") or ("quick" if (mode.interpret or mode.simulate) else "full")
        seed = config.getoption("--conformance-seed")
        config._conformance_suite = Suite(backend, avail, mode, cases,
                                          seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    return config._conformance_suite


def _dname(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def pytest_generate_tests(metafunc):
    levels = metafunc.config.getoption("--level").split(",")
    suite = _suite(metafunc.config)
    if "op_check" in metafunc.fixturenames:
        params = []
        if "op" in levels:
            for op, cases in op_checks.load_cases().items():
                entry = suite.manifest.operators.get(op)
                declared = [DTYPE_NAMES[d] for d in entry.dtypes if d != "float64"] if entry else [None]
                for case in cases:
                    if suite.case_set in case["sets"]:
                        fixed = fixed_dtype(op, case)
                        for d in ([fixed] if fixed else declared):
                            params.append(pytest.param((op, case, d), id=f"{op}/{case['name']}/{_dname(d) if d else 'missing'}"))
        metafunc.parametrize("op_check", params)
    if "block_check" in metafunc.fixturenames:
        params = []
        if "block" in levels:
            for name, needs in block_checks.NEEDS.items():
                for d in suite.working_dtypes(needs):
                    params.append(pytest.param((name, d), id=f"{name}/{_dname(d)}"))
        metafunc.parametrize("block_check", params)
    if "model_check" in metafunc.fixturenames:
        params = []
        if "model" in levels:
            dtypes = suite.working_dtypes([op for op in OPERATORS if op != "moe_gate"])
            for d in dtypes:
                batch = ("batch",) if model_checks.LARGE_BATCH[suite.case_set] and d == dtypes[0] else ()
                for name in ("logits", "greedy", "mtp") + batch:
                    params.append(pytest.param((name, d), id=f"{name}/{_dname(d)}"))
        metafunc.parametrize("model_check", params)


def _judge(result):
    if result.verdict == SKIP:
        pytest.skip(result.detail)
    assert result.verdict != FAIL, f"{result.name}: {result.detail}"


def test_operator(request, op_check):
    suite = _suite(request.config)
    op, case, dtype = op_check
    if op not in suite.backend.ops:
        pytest.fail(f"{op} is not implemented by {suite.backend.name} (conformance forbids fallback)")
    _judge(op_checks.check_case(suite, op, case, dtype))


def test_block(request, block_check):
    suite = _suite(request.config)
    name, dtype = block_check
    missing = [op for op in block_checks.NEEDS[name] if op not in suite.backend.ops]
    if missing:
        pytest.fail(f"{name} needs {missing}, not implemented by {suite.backend.name} (conformance forbids fallback)")
    _judge(block_checks.CHECKS[name](suite, dtype))


_levels: dict = {}


def test_model(request, model_check):
    suite = _suite(request.config)
    name, dtype = model_check
    missing = [op for op in OPERATORS if op not in suite.backend.ops]
    if missing:
        pytest.fail(f"the model level needs every operator; missing {missing}")
    if dtype not in _levels:
        _levels[dtype] = model_checks.ModelLevel(suite, dtype)
    level = _levels[dtype]
    probe = {"logits": level.logits_problem, "greedy": level.greedy_problem, "mtp": level.mtp_problem,
             "batch": level.batch_problem}[name]
    with torch.no_grad():
        _judge(level.check(name, probe, bisect=True))
