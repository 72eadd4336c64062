"""The backend descriptor and its manifest.

A backend is a directory `backends/NAME/` (or an installed package named by an entry point) whose `__init__.py`
defines `BACKEND = Backend(...)` and whose `manifest.yaml` declares what it implements:

    backend: NAME
    description: one line
    operators:                       # every operator the code implements, and nothing else
      rms_norm: {dtypes: [bfloat16, float32]}
      linear:   {dtypes: [bfloat16], weights: [float8_e4m3fn, bfloat16], numerics: w8a8, scale_fmts: [ue8m0]}
    limits:                          # optional: inputs an operator hands to cpu_ref, visibly
      moe_gate: "only 256 routed experts; other counts run on cpu_ref"
    nondeterministic:                # optional: operators whose repeated runs may differ, with the reason
      moe_experts: "atomic adds in the combine"
    tolerances:                      # optional overrides of conformance/tolerances.yaml, each with a reason
      - {op: linear, dtype: bfloat16, rtol: 0.03, reason: "..."}    # rtol bounds ||got-golden||/||golden||;
                                     # also numerics, mode, multiple, floor, or skip: "why" instead of rtol
    toolchain:                       # versions this backend was tested with, and where
      tested: [{torch: 2.13.0, device: "..."}]
    cache:                           # optional: the paged latent cache its mla_decode takes (contract v2)
      block_sizes: [16, 64, 128]     # a list of positive ints, or "any" (the default when absent)
      preferred: 64                  # optional: the block size used when the user names none (default: 16 if
                                     # taken, else the smallest declared)

The schema (core/manifest_schema.py) refuses unknown keys and wrong types with one line naming the key. `backend` must
be the descriptor's name; `description` and `toolchain` are shown in conformance reports.
`scale_fmts` lists the activation-scale formats (core.config.SCALE_FORMATS, from a checkpoint's
quantization_config.scale_fmt) the operator implements in `Backend.scale_fmt_ops` (see SCALE_FORMAT_CLASSES).

Operators absent from the manifest fall back to cpu_ref on the backend's own device (printed in the dispatch table,
refused under --strict). Registration fails if the code and the manifest disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import ContractError, UserError
from core.manifest_schema import check_manifest
from core.ops import OPERATORS, PREPARE_HOOKS, WEIGHT_HOOK, check_signature
from core.safe_files import MAX_MANIFEST_BYTES, quote_name, quote_value, read_yaml_file

NUMERICS_CLASSES = ("reference", "w8a8", "w8a8_fnuz", "w8a8_int8", "w8a8_ue8m0", "w8a8_fnuz_ue8m0")
"""`reference`: weights dequantised exactly, activations in the working dtype. `w8a8`: activations quantised per
token per 128 channels to e4m3fn (s = max(amax, 1e-4)/448) before a block-scaled FP8 GEMM; `w8a8_fnuz`: the same
with e4m3fnuz and 240 (AMD MI300); `w8a8_int8`: int8 weights per output channel and int8 activations per token
(Ascend A2/A3, which have no FP8; see backends/cpu_ref/linear_int8.py). `w8a8_ue8m0`, `w8a8_fnuz_ue8m0`: w8a8 and
w8a8_fnuz with every activation scale rounded up to a power of two (DeepSeek-V3.1's scale_fmt "ue8m0"); a model
runs them only on the layers where a UE8M0 checkpoint asks for them (SCALE_FORMAT_CLASSES)."""

SCALE_FORMAT_CLASSES = {"ue8m0": {"w8a8": "w8a8_ue8m0", "w8a8_fnuz": "w8a8_fnuz_ue8m0"}}
"""scale_fmt -> {numerics class -> the class an operator of that class runs in on a layer with activation scales in
that format}. A class absent here has no FP8 activation scales for the format to apply to (`reference`: activations
are not quantised, as in DeepSeek's own bf16 path; `w8a8_int8`: int8 per-token scales) and runs unchanged."""

SCALED_OPERATORS = ("linear", "moe_experts")
"""The operators whose numerics depend on the activation-scale format."""

DTYPE_NAMES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
}


@dataclass(frozen=True)
class RunMode:
    """How a backend is asked to run. `interpret`: Triton kernels through the Triton interpreter on the CPU.
    `simulate`: a vendor library replaced by its documented-semantics emulation (for CI without the hardware)."""

    interpret: bool = False
    simulate: bool = False


@dataclass(frozen=True)
class Availability:
    """What a backend's probe says: whether it can run here, on which torch device, and if not, why."""

    ok: bool
    reason: str = ""
    device: torch.device | None = None
    environment: dict[str, str] = field(default_factory=dict)  # toolkit, driver, device name: for reports
    numerics: dict[str, str] = field(default_factory=dict)  # per-device override of the manifest's numerics class

    @staticmethod
    def no(reason: str) -> "Availability":
        return Availability(False, reason)


@dataclass(frozen=True)
class Limited:
    """An operator implementation with documented input limits: `supports(*args)` returns None when the backend
    handles the call, or a short reason when it must go to cpu_ref. Such calls are counted and shown in the
    dispatch table; they are a declared property of the hardware library, never a reaction to an exception."""

    impl: Callable
    supports: Callable[..., str | None]


@dataclass(frozen=True)
class OperatorEntry:
    dtypes: tuple[str, ...]
    numerics: str = "reference"
    weights: tuple[str, ...] = ()
    scale_fmts: tuple[str, ...] = ()


DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class CacheSpec:
    """The manifest's `cache` entry: which paged-cache block sizes the backend's mla_decode takes."""

    block_sizes: tuple[int, ...] | None = None  # None: any block size
    preferred: int | None = None

    def takes(self, block_size: int) -> bool:
        return self.block_sizes is None or block_size in self.block_sizes

    def describe(self) -> str:
        return "any" if self.block_sizes is None else ", ".join(map(str, self.block_sizes))

    def default(self) -> int:
        if self.preferred is not None:
            return self.preferred
        if self.takes(DEFAULT_BLOCK_SIZE):
            return DEFAULT_BLOCK_SIZE
        return min(self.block_sizes)

    @staticmethod
    def parse(data: Any, where: str) -> "CacheSpec":
        if data is None:
            return CacheSpec()
        if not isinstance(data, dict) or set(data) - {"block_sizes", "preferred"}:
            raise ContractError(f"{where}: 'cache' must be a mapping with keys block_sizes (a list or \"any\") "
                                f"and optional preferred")
        sizes = data.get("block_sizes", "any")
        if sizes == "any":
            spec = CacheSpec(None, data.get("preferred"))
        else:
            if (not isinstance(sizes, list) or not sizes
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)):
                raise ContractError(f"{where}: cache.block_sizes must be \"any\" or a non-empty list of positive "
                                    f"ints, got {sizes!r}")
            spec = CacheSpec(tuple(sorted(set(sizes))), data.get("preferred"))
        p = spec.preferred
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1 or not spec.takes(p)):
            raise ContractError(f"{where}: cache.preferred {p!r} is not one of cache.block_sizes ({spec.describe()})")
        return spec


@dataclass(frozen=True)
class Manifest:
    path: Path
    backend: str
    description: str
    operators: dict[str, OperatorEntry]
    limits: dict[str, str]
    nondeterministic: dict[str, str]
    tolerances: tuple[dict, ...]
    toolchain: dict[str, Any]
    cache: CacheSpec = CacheSpec()

    @staticmethod
    def load(path: Path) -> "Manifest":
        where = quote_name(str(path))
        data = read_yaml_file(path, MAX_MANIFEST_BYTES, error=ContractError, what=f"{where} (manifest)")
        if not isinstance(data, dict):
            raise ContractError(f"{where}: the manifest must be a mapping")
        check_manifest(data, where, tuple(DTYPE_NAMES), NUMERICS_CLASSES)  # keys and types (core/manifest_schema.py)
        ops = data.get("operators") or {}
        if not isinstance(ops, dict):
            raise ContractError(f"{where}: 'operators' must map operator names to entries")
        entries = {}
        for name, entry in ops.items():
            if not isinstance(name, str) or name not in OPERATORS:
                raise ContractError(f"{where}: operators.{quote_name(name)} is not an operator of the contract")
            entry = entry or {}
            if not isinstance(entry, dict):
                raise ContractError(f"{where}: operators.{name} must be a mapping like {{dtypes: [bfloat16]}}")
            for key in ("dtypes", "weights", "scale_fmts"):
                if not isinstance(entry.get(key, []), list):
                    raise ContractError(f"{where}: operators.{name}.{key} must be a list")
            dtypes = tuple(entry.get("dtypes", ()))
            for d in dtypes + tuple(entry.get("weights", ())):
                if not isinstance(d, str) or d not in DTYPE_NAMES:
                    raise ContractError(f"{where}: operators.{name}: unknown dtype {quote_value(d)}")
            numerics = entry.get("numerics", "reference")
            if not isinstance(numerics, str) or numerics not in NUMERICS_CLASSES:
                raise ContractError(f"{where}: operators.{name}.numerics must be one of {NUMERICS_CLASSES}")
            if not dtypes:
                raise ContractError(f"{where}: operators.{name} declares no dtypes")
            scale_fmts = tuple(entry.get("scale_fmts", ()))
            for fmt in scale_fmts:
                if fmt not in SCALE_FORMAT_CLASSES or name not in SCALED_OPERATORS:
                    raise ContractError(f"{where}: operators.{name}.scale_fmts: {quote_value(fmt)} is not an "
                                        f"activation-scale format of {name} (formats {sorted(SCALE_FORMAT_CLASSES)} "
                                        f"apply to {', '.join(SCALED_OPERATORS)})")
            entries[name] = OperatorEntry(dtypes, numerics, tuple(entry.get("weights", ())), scale_fmts)
        tolerances = tuple(data.get("tolerances") or ())
        for t in tolerances:
            if not isinstance(t, dict) or not {"op", "dtype", "reason"} <= set(t) or not str(t["reason"]).strip():
                raise ContractError(f"{where}: every tolerance override needs op, dtype and a reason: {quote_value(t)}")
        for key in ("limits", "nondeterministic", "toolchain"):
            if not isinstance(data.get(key) or {}, dict):
                raise ContractError(f"{where}: {key} must be a mapping")
        if not isinstance(data.get("tolerances") or [], list):
            raise ContractError(f"{where}: tolerances must be a list")
        for key in ("limits", "nondeterministic"):
            for name in data.get(key) or {}:
                if not isinstance(name, str) or name not in entries:
                    raise ContractError(f"{where}: {key}.{quote_name(name)} names an operator the manifest does "
                                        f"not declare")
        return Manifest(
            path=path,
            backend=str(data.get("backend", path.parent.name)),
            description=str(data.get("description", "")),
            operators=entries,
            limits=dict(data.get("limits") or {}),
            nondeterministic=dict(data.get("nondeterministic") or {}),
            tolerances=tolerances,
            toolchain=dict(data.get("toolchain") or {}),
            cache=CacheSpec.parse(data.get("cache"), where),
        )


@dataclass
class Backend:
    """The descriptor every backend exports as `BACKEND`.

    name:          the name users pass to --backend.
    device_type:   the torch device type it runs on ("cpu", "cuda", "npu").
    dist_backend:  its torch.distributed backend ("gloo", "nccl", "hccl").
    probe:         RunMode -> Availability. Imports vendor packages only when called; when it says no, the reason
                   names what is missing (package, version, device) and how to get it.
    ops:           operator name -> implementation (or `Limited`); only operators of core.ops.OPERATORS.
    prepare_linear, prepare_experts: the weight hooks (None: cpu_ref's, whose formats are core.ops.LinearWeight
                   and ExpertWeights).
    prepare_mla:   optional (core.ops.prepare_mla): the dtype MLA decode's absorbed kv_b halves are kept and
                   multiplied in (None: the working dtype, core.ops.keep_mla).
    communicator:  optional: ProcessGroup -> an object with all_reduce(x), all_gather(x, dim), all_to_all(x, splits)
                   and describe() (core.parallel.comm.Communicator), e.g. a custom all-reduce; None: torch.distributed
                   on `dist_backend` (core.parallel.comm.TorchDistributed).
    scale_fmt_ops: optional: activation-scale format -> {operator -> implementation}, the operator in the class
                   SCALE_FORMAT_CLASSES gives its own (e.g. {"ue8m0": {"linear": ..., "moe_experts": ...}} for a
                   w8a8 backend); declared per operator under `scale_fmts` in the manifest.
    manifest:      attached by discovery from the backend's manifest.yaml.
    """

    name: str
    device_type: str
    dist_backend: str
    probe: Callable[[RunMode], Availability]
    ops: dict[str, Callable | Limited]
    prepare_linear: Callable | None = None
    prepare_experts: Callable | None = None
    prepare_mla: Callable | None = None
    communicator: Callable | None = None
    scale_fmt_ops: dict[str, dict[str, Callable]] = field(default_factory=dict)
    manifest: Manifest | None = None
    origin: str = ""  # where discovery found it: a directory or an entry point

    def hooks(self) -> dict[str, Callable]:
        return {k: v for k, v in (("prepare_linear", self.prepare_linear),
                                  ("prepare_experts", self.prepare_experts)) if v is not None}

    def validate(self) -> None:
        """Raise ContractError when the code and the manifest disagree or a signature breaks the contract."""
        where = str(self.manifest.path) if self.manifest else self.name
        optional = [("prepare_mla", self.prepare_mla)] if self.prepare_mla is not None else []
        for name, impl in list(self.ops.items()) + list(self.hooks().items()) + optional:
            fn = impl.impl if isinstance(impl, Limited) else impl
            problem = check_signature(name, fn)
            if problem:
                raise ContractError(f"backend {self.name}: {problem}")
        if self.manifest is None:
            raise ContractError(f"backend {self.name}: no manifest.yaml")
        if self.manifest.backend != self.name:
            raise ContractError(f"{where}: backend: {quote_value(self.manifest.backend)} is not the descriptor's name "
                                f"{quote_value(self.name)}")
        declared, coded = set(self.manifest.operators), set(self.ops)
        if declared != coded:
            missing, extra = sorted(declared - coded), sorted(coded - declared)
            raise ContractError(
                f"{where}: manifest and code disagree: declared but not implemented {missing}, "
                f"implemented but not declared {extra}"
            )
        for op, hook in WEIGHT_HOOK.items():
            if hook in self.hooks() and op not in self.ops:
                raise ContractError(f"backend {self.name}: defines {hook} but not {op}, which consumes its output")
        for name in self.ops:
            if isinstance(self.ops[name], Limited) and name not in self.manifest.limits:
                raise ContractError(f"{where}: {name} has input limits in code; describe them under 'limits'")
        declared_fmts = {(fmt, op) for op, e in self.manifest.operators.items() for fmt in e.scale_fmts}
        coded_fmts = {(fmt, op) for fmt, table in self.scale_fmt_ops.items() for op in table}
        if declared_fmts != coded_fmts:
            raise ContractError(f"{where}: scale_fmts in the manifest {sorted(declared_fmts)} and scale_fmt_ops in "
                                f"the code {sorted(coded_fmts)} disagree")
        for fmt, op in coded_fmts:
            fn = self.scale_fmt_ops[fmt][op]
            if isinstance(fn, Limited):
                raise ContractError(f"backend {self.name}: scale_fmt_ops[{fmt!r}][{op!r}] must be a plain "
                                    f"implementation (input limits would need a cpu_ref stand-in for the backend's "
                                    f"own weight format)")
            problem = check_signature(op, fn)
            if problem:
                raise ContractError(f"backend {self.name}: scale_fmt {fmt}: {problem}")
        assert set(PREPARE_HOOKS) == {"prepare_linear", "prepare_experts"}


def choose_block_size(backend: Backend, requested: int | None) -> int:
    """The paged-cache block size for `backend`: `requested` when its manifest's cache.block_sizes takes it (a
    backend without its own mla_decode takes any, as cpu_ref does), its preferred size when None; otherwise a
    one-line UserError naming the option and the sizes the backend takes."""
    spec = backend.manifest.cache if backend.manifest is not None and "mla_decode" in backend.ops else CacheSpec()
    if requested is None:
        return spec.default()
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise UserError(f"--block-size must be a positive integer, got {requested!r}")
    if not spec.takes(requested):
        raise UserError(f"--block-size {requested}: backend {backend.name} takes block sizes {spec.describe()}")
    return requested
