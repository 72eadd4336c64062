"""`python -m conformance new-backend NAME [--dir DIR | --package DIR]`: write backends/NAME/ (or DIR/NAME/) with a
descriptor, a manifest and one file per operator delegating to the reference, so it passes conformance at once; then
replace operators one at a time. With --package, DIR is a pip-installable project around that directory: a
pyproject.toml declaring the entry point core.registry reads and shipping manifest.yaml as package data."""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

from core.errors import UserError
from core.ops import OPERATORS, PREPARE_HOOKS

DESCRIPTOR = '''\
"""The {name} backend (scaffolded by `python -m conformance new-backend {name}`).

Every operator starts as a call to the reference (backends/cpu_ref). Replace them one at a time with your own
kernels in ops/<operator>.py and watch `python -m conformance --backend {name} --ops <operator>` turn green.
"""

from __future__ import annotations

import torch

from core.backend import Availability, Backend, RunMode
{imports}
from .weights import prepare_experts, prepare_linear


def probe(mode: RunMode) -> Availability:
    """Say whether {name} can run here, on which torch device, and if not, why (package, driver, device).

    Import your vendor package here, not at module level, so that listing backends never needs it."""
    return Availability(True, device=torch.device("cpu"), environment={{"device_name": "CPU (scaffold)"}})


BACKEND = Backend(
    name="{name}",
    device_type="cpu",  # your torch device type, e.g. "cuda", "xpu", "npu", "privateuseone"
    dist_backend="gloo",  # your torch.distributed backend
    probe=probe,
    ops={{
{ops}
    }},
    prepare_linear=prepare_linear,
    prepare_experts=prepare_experts,
)
'''

OP_FILE = '''\
"""{name}: `{op}` (contract: core/ops.py; specification: backends/cpu_ref).

Replace the body with your implementation; keep the signature."""

from backends.cpu_ref import OPS


def {op}({params}):
    return OPS["{op}"]({args})
'''

WEIGHTS_FILE = '''\
"""Weight preparation for {name}: turn checkpoint tensors into what your `linear` and `moe_experts` consume.

The reference keeps FP8 codes and their 128x128 block scales (core.ops.LinearWeight / ExpertWeights). Change both
the hook and its operator together: conformance prepares weights with your hook and calls your operator."""

from backends.cpu_ref import prepare_experts as _reference_experts
from backends.cpu_ref import prepare_linear as _reference_linear


def prepare_linear(weight, scale_inv):
    return _reference_linear(weight, scale_inv)


def prepare_experts(gate, gate_scale, up, up_scale, down, down_scale):
    return _reference_experts(gate, gate_scale, up, up_scale, down, down_scale)
'''


def manifest(name: str) -> str:
    lines = [f"backend: {name}", f'description: "{name}, scaffolded; every operator still delegates to cpu_ref"',
             "operators:"]
    for op in OPERATORS:
        dtypes = "[float32]" if op == "moe_gate" else "[float32, bfloat16]"  # the router's logits are float32
        lines.append(f"  {op}: {{dtypes: {dtypes}}}")
    lines += ["cache: {block_sizes: any}   # paged-cache block sizes your mla_decode takes, e.g. [16, 64, 128]",
              "toolchain:",
              "  tested: []   # add {torch: ..., your_toolkit: ..., device: ...} for every setup conformance passed on"]
    return "\n".join(lines) + "\n"


PYPROJECT = """\
# The {name} backend for deepseek-v3-portable, as a package of its own (scaffolded by
# `python -m conformance new-backend {name} --package DIR`). Install with `pip install DIR`; the backend is then
# discovered through the entry point below and judged with `python -m conformance --backend {name}`.
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "The {name} backend for deepseek-v3-portable"
requires-python = ">=3.10"
dependencies = ["deepseek-v3-portable"]

[project.entry-points."{group}"]
{name} = "{name}"

[tool.setuptools]
packages = ["{name}", "{name}.ops"]

[tool.setuptools.package-data]
# core.registry reads manifest.yaml beside the package's __init__.py: without it the backend does not register.
{name} = ["manifest.yaml"]
"""


def _signature(op: str) -> tuple[str, str]:
    import inspect

    params = list(inspect.signature(OPERATORS[op]).parameters)
    return ", ".join(params), ", ".join(params)


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise UserError(f"new-backend: '{name}' is not a valid backend name (lower-case letters, digits, _)")


def create(name: str, root: Path | None = None) -> Path:
    """Write the backend directory root/NAME (root: the in-tree backends/) and return it."""
    _check_name(name)
    root = root or Path(__file__).resolve().parent.parent / "backends"
    target = root / name
    if target.exists():
        raise UserError(f"new-backend: {target} already exists")
    from core import registry

    if name in registry.discover():
        raise UserError(f"new-backend: a backend named '{name}' is already installed ({registry.discover()[name].origin})")
    (target / "ops").mkdir(parents=True)
    (target / "ops" / "__init__.py").write_text(f'"""{name}: one file per operator."""\n')
    for op in OPERATORS:
        params, args = _signature(op)
        (target / "ops" / f"{op}.py").write_text(OP_FILE.format(name=name, op=op, params=params, args=args))
    (target / "weights.py").write_text(WEIGHTS_FILE.format(name=name))
    imports = "\n".join(f"from .ops.{op} import {op}" for op in OPERATORS)
    ops = "\n".join(f'        "{op}": {op},' for op in OPERATORS)
    (target / "__init__.py").write_text(DESCRIPTOR.format(name=name, imports=imports, ops=ops))
    (target / "manifest.yaml").write_text(manifest(name))
    assert set(PREPARE_HOOKS) == {"prepare_linear", "prepare_experts"}
    return target


def create_package(name: str, directory: Path) -> Path:
    """Write a pip-installable project in `directory` (which must not exist or be empty): pyproject.toml with the
    entry point `NAME = "NAME"` in core.registry's group and manifest.yaml as package data, and the backend
    directory directory/NAME. Returns the backend directory."""
    from core import registry

    _check_name(name)
    if importlib.util.find_spec(name) is not None:
        raise UserError(f"new-backend --package: a module named '{name}' is already importable here, so the entry "
                        f"point {name} = \"{name}\" would load it instead; choose another name")
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"new-backend --package: {directory} exists and is not an empty directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"new-backend --package: cannot create {directory} ({e.strerror or e})") from None
    target = create(name, directory)
    (directory / "pyproject.toml").write_text(PYPROJECT.format(name=name, dist=f"dsv3-backend-{name.replace('_', '-')}",
                                                               group=registry.ENTRY_POINT_GROUP))
    return target
