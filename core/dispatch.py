"""Per-operator dispatch: the backend's implementation where it has one, cpu_ref's (on the backend's device) where
it does not, and a table that says which is which.

Fallback is decided once, when the dispatch is built, from what the backend declares; it is never a reaction to an
exception. `strict=True` refuses a backend that leaves any operator to the reference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from core.backend import NUMERICS_CLASSES, Backend, Limited
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
