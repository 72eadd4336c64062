"""Per-operator dispatch: the backend's implementation where it has one, cpu_ref's (on the backend's device) where
it does not, and a table that says which is which.

Fallback is decided once, when the dispatch is built, from what the backend declares; it is never a reaction to an
exception. `strict=True` refuses a backend that leaves any operator to the reference.

`Dispatch.scaled(scale_fmt)` is the same dispatch for the layers of a checkpoint whose activation scales come in
another format (DeepSeek-V3.1's "ue8m0"): linear and moe_experts in the numerics class that format gives theirs
(core.backend.SCALE_FORMAT_CLASSES), every other operator unchanged; the table says what it chose.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from core.backend import (
    NUMERICS_CLASSES,
    SCALE_FORMAT_CLASSES,
    SCALED_OPERATORS,
    Backend,
    Limited,
)
from core.errors import ContractError, UserError
from core.ops import OPERATORS, PREPARE_HOOKS, WEIGHT_HOOK, keep_mla


@dataclass
class Route:
    """How one operator is served."""

    op: str
    source: str  # backend name that serves it
    fallback: bool  # True when the backend lacks it and cpu_ref serves it
    numerics: str = "reference"
    limit: str = ""  # the declared limit, for Limited operators
    limited_calls: Counter = field(default_factory=Counter)  # reason -> calls that went to cpu_ref
    scaled: str = ""  # what serves the layers with another activation-scale format (Dispatch.scaled)

    def describe(self) -> str:
        text = self.source
        if self.fallback:
            text += " (fallback: not implemented by the backend)"
        if self.numerics != "reference":
            text += f" [{self.numerics}]"
        if self.limit:
            n = sum(self.limited_calls.values())
            text += f"; cpu_ref for inputs outside its limits ({self.limit})"
            if n:
                text += f": {n} call{'s' if n != 1 else ''} so far"
        if self.scaled:
            text += f"; {self.scaled}"
        return text


class Dispatch:
    """The operators and weight hooks the model calls, resolved for one backend.

    Attributes named after every operator and hook of core.ops are plain callables.
    """

    def __init__(self, backend: Backend, reference: Backend, strict: bool = False,
                 numerics: dict[str, str] | None = None):
        """`numerics`: the probe's per-device numerics classes (Availability.numerics), overriding the manifest's."""
        self.backend = backend
        self.reference = reference
        missing = [op for op in OPERATORS if op not in backend.ops]
        if strict and missing:
            raise UserError(
                f"backend '{backend.name}' does not implement {', '.join(missing)}; "
                f"--strict forbids falling back to {reference.name}"
            )
        self.routes: dict[str, Route] = {}
        manifest = backend.manifest
        per_device = numerics or {}
        unknown = {v for v in per_device.values() if v not in NUMERICS_CLASSES}
        if unknown:
            raise ContractError(f"backend {backend.name}: its probe names unknown numerics classes {sorted(unknown)}")
        for op in OPERATORS:
            if op in backend.ops:
                impl = backend.ops[op]
                cls = per_device.get(op) or (manifest.operators[op].numerics if manifest else "reference")
                route = Route(op, backend.name, False, cls)
                if isinstance(impl, Limited):
                    route.limit = manifest.limits.get(op, "") if manifest else "declared limits"
                    impl = _limited(impl, reference.ops[op], route.limited_calls,
                                    f"{backend.name}'s {op}" if strict else None)
            else:
                impl = reference.ops[op]
                route = Route(op, reference.name, True)
            self.routes[op] = route
            setattr(self, op, impl)
        for op, hook in WEIGHT_HOOK.items():
            own = op in backend.ops and hook in backend.hooks()
            setattr(self, hook, (backend if own else reference).hooks()[hook])
        self.prepare_mla = backend.prepare_mla or keep_mla  # optional hook; the reference keeps the working dtype
        assert all(callable(getattr(self, h)) for h in PREPARE_HOOKS)
        self._scaled: dict[str, ScaledOps] = {}

    def scaled(self, scale_fmt: str | None) -> Dispatch | ScaledOps:
        """The operators for layers whose activation scales are in `scale_fmt` (None: this dispatch itself).

        linear and moe_experts of a class with FP8 activation scales (w8a8, w8a8_fnuz) run the backend's
        implementation of the class SCALE_FORMAT_CLASSES names (Backend.scale_fmt_ops); a class without them
        (reference, w8a8_int8) runs unchanged, which the table says. A backend whose FP8-activation class lacks the
        format is refused in one line: its prepared weights are its own, so cpu_ref cannot stand in."""
        if scale_fmt is None:
            return self
        if scale_fmt in self._scaled:
            return self._scaled[scale_fmt]
        if scale_fmt not in SCALE_FORMAT_CLASSES:
            raise UserError(f"activation scale format {scale_fmt!r} is not one of {sorted(SCALE_FORMAT_CLASSES)}")
        own = self.backend.scale_fmt_ops.get(scale_fmt, {})
        impls: dict[str, Callable] = {}
        for op in SCALED_OPERATORS:
            route = self.routes[op]
            target = SCALE_FORMAT_CLASSES[scale_fmt].get(route.numerics)
            if target is None:
                route.scaled = f"scale_fmt {scale_fmt} does not apply to numerics class {route.numerics}"
                continue
            if op not in own:
                raise UserError(f"backend {self.backend.name}: {op} runs numerics class {route.numerics} but does not "
                                f"implement the checkpoint's activation scale format {scale_fmt} "
                                f"(quantization_config.scale_fmt; manifest operators.{op}.scale_fmts)")
            impls[op] = own[op]
            route.scaled = f"[{target}] on layers with {scale_fmt} activation scales"
        self._scaled[scale_fmt] = ScaledOps(self, scale_fmt, impls)
        return self._scaled[scale_fmt]

    @property
    def fallbacks(self) -> list[str]:
        return [op for op, r in self.routes.items() if r.fallback]

    def table(self) -> dict[str, str]:
        """operator -> a one-line description of what serves it (the `dispatch` key of --json)."""
        return {op: route.describe() for op, route in self.routes.items()}

    def format_table(self) -> str:
        width = max(len(op) for op in self.routes)
        lines = [f"{'operator'.ljust(width)}  implementation"]
        lines += [f"{op.ljust(width)}  {text}" for op, text in self.table().items()]
        return "\n".join(lines)


class ScaledOps:
    """A Dispatch seen from the layers with another activation-scale format: `linear` and `moe_experts` as
    Dispatch.scaled chose them, every other attribute the dispatch's own (looked up at call time)."""

    def __init__(self, dispatch: Dispatch, scale_fmt: str, impls: dict[str, Callable]):
        self.dispatch, self.scale_fmt = dispatch, scale_fmt
        self.__dict__.update(impls)

    def __getattr__(self, name: str):
        return getattr(self.dispatch, name)


def _limited(entry: Limited, reference: Callable, calls: Counter, strict_name: str | None) -> Callable:
    """Run the backend's implementation within its declared limits, cpu_ref outside them (counted), or under
    --strict refuse an input outside them."""
    impl, supports = entry.impl, entry.supports

    def run(*args, **kwargs):
        reason = supports(*args, **kwargs)
        if reason is None:
            return impl(*args, **kwargs)
        if strict_name:
            raise UserError(f"{strict_name} cannot take this input ({reason}); --strict forbids falling back to cpu_ref")
        calls[reason] += 1
        return reference(*args, **kwargs)

    run.__name__ = getattr(impl, "__name__", "limited")
    return run
