"""Backend discovery: `backends/*/` directories with a manifest, extra directories named in $DSV3_BACKENDS_PATH,
and installed packages that declare an entry point in the group `deepseek_v3_portable.backends`.

Core never imports a particular backend by name; it lists what is there and imports the one asked for.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from core.backend import Availability, Backend, Manifest, RunMode
from core.errors import BackendBroken, BackendUnavailable, ContractError, UserError
from core.safe_files import one_line, quote_name

ENTRY_POINT_GROUP = "deepseek_v3_portable.backends"
PATH_ENV = "DSV3_BACKENDS_PATH"
REFERENCE = "cpu_ref"
CPU_DEFAULT = "cpu"  # the fast CPU backend: the default where no accelerator is present (cpu_ref stays the judge)


@dataclass(frozen=True)
class Found:
    """A backend discovery found but has not imported yet."""

    name: str
    origin: str  # a directory, or "entry point <value>"
    directory: Path | None = None  # for directory backends
    entry_point: importlib.metadata.EntryPoint | None = None


def _in_tree_root() -> Path:
    return Path(__file__).resolve().parent.parent / "backends"


def _search_dirs() -> list[Path]:
    dirs = [_in_tree_root()]
    for part in os.environ.get(PATH_ENV, "").split(os.pathsep):
        if part:
            dirs.append(Path(part).resolve())
    return dirs


def discover() -> dict[str, Found]:
    """Every backend that could be loaded, by name. Directory backends shadow entry points of the same name."""
    found: dict[str, Found] = {}
    try:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception:  # a broken installed distribution must not hide the in-tree backends
        eps = ()
    for ep in eps:
        found[ep.name] = Found(ep.name, f"entry point {ep.value}", entry_point=ep)
    for root in reversed(_search_dirs()):  # in-tree last, so it wins
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if d.is_dir() and (d / "manifest.yaml").is_file() and (d / "__init__.py").is_file():
                found[d.name] = Found(d.name, str(d), directory=d)
    return found


def _import_directory(found: Found) -> ModuleType:
    d = found.directory
    assert d is not None
    if d.parent == _in_tree_root():
        return importlib.import_module(f"backends.{found.name}")
    module_name = f"dsv3_external_backends.{found.name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    if "dsv3_external_backends" not in sys.modules:
        pkg = ModuleType("dsv3_external_backends")
        pkg.__path__ = []
        sys.modules["dsv3_external_backends"] = pkg
    spec = importlib.util.spec_from_file_location(module_name, d / "__init__.py", submodule_search_locations=[str(d)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


_loaded: dict[str, Backend] = {}


def load(name: str) -> Backend:
    """Import, attach the manifest to, and validate the backend `name`. Raises UserError naming what exists."""
    if name in _loaded:
        return _loaded[name]
    found = discover()
    if name not in found:
        raise UserError(f"unknown backend {quote_name(name)}; available: "
                        f"{', '.join(quote_name(n) for n in sorted(found)) or 'none'}")
    f = found[name]
    try:
        if f.directory is not None:
            module = _import_directory(f)
            obj = getattr(module, "BACKEND", None)
            manifest_path = f.directory / "manifest.yaml"
        else:
            obj = f.entry_point.load()
            module = obj if isinstance(obj, ModuleType) else importlib.import_module(f.entry_point.module)
            if isinstance(obj, ModuleType):
                obj = getattr(obj, "BACKEND", None)
            manifest_path = Path(module.__file__).resolve().parent / "manifest.yaml"
    except (Exception, SystemExit) as e:  # a plugin's import may raise anything: it is broken, not us
        raise BackendBroken(f"backend {quote_name(name)} ({one_line(f.origin)}) is broken: it raised "
                            f"{type(e).__name__} while importing: {one_line(e)}") from None
    if not isinstance(obj, Backend):
        raise ContractError(f"backend '{name}' ({f.origin}) does not define BACKEND = core.backend.Backend(...)")
    if obj.name != name:
        raise ContractError(f"backend found as '{name}' ({f.origin}) calls itself '{obj.name}'")
    if f.entry_point is not None and not manifest_path.is_file():
        raise ContractError(f"backend {quote_name(name)} ({one_line(f.origin)}): its package has no manifest.yaml "
                            f"beside {quote_name(Path(module.__file__).name)}; ship it as package data "
                            f"([tool.setuptools.package-data] {f.entry_point.module.split('.')[0]} = "
                            f"[\"manifest.yaml\"]; python -m conformance new-backend NAME --package DIR writes it)")
    obj.manifest = Manifest.load(manifest_path)
    obj.origin = f.origin
    obj.validate()
    _loaded[name] = obj
    return obj


def probe(backend: Backend, mode: RunMode = RunMode()) -> Availability:
    """Run a backend's availability probe; a probe that raises (or returns something else) is a BackendBroken."""
    try:
        avail = backend.probe(mode)
    except (Exception, SystemExit) as e:
        raise BackendBroken(f"backend {quote_name(backend.name)} ({one_line(backend.origin)}) is broken: its probe "
                            f"raised {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(avail, Availability):
        raise BackendBroken(f"backend {quote_name(backend.name)} ({one_line(backend.origin)}) is broken: its probe "
                            f"returned {type(avail).__name__}, not core.backend.Availability")
    return avail


def activate(name: str, mode: RunMode = RunMode()) -> tuple[Backend, Availability]:
    """Load `name` and run its probe; raise BackendUnavailable saying why and what else is available."""
    backend = load(name)
    avail = probe(backend, mode)
    if not avail.ok:
        others = []
        for other in sorted(discover()):
            if other == name:
                continue
            try:
                if probe(load(other), RunMode()).ok:
                    others.append(other)
            except (UserError, ContractError):
                continue
        raise BackendUnavailable(
            f"backend {quote_name(name)} is unavailable: {one_line(avail.reason)}; available here: "
            f"{', '.join(others) or 'none'}"
        )
    return backend, avail


def default_backend() -> tuple[str, str]:
    """The backend to use when none is named, and why: `cpu` on a machine without an accelerator (where it is
    discovered), else the reference. Device-neutral: asks torch.accelerator, never a vendor."""
    if torch.accelerator.is_available():
        where = torch.accelerator.current_accelerator()
        return REFERENCE, f"default: an accelerator ({where}) is present, name its backend"
    if CPU_DEFAULT in discover():
        return CPU_DEFAULT, "default: no accelerator here"
    return REFERENCE, f"default: no accelerator here and no '{CPU_DEFAULT}' backend"
