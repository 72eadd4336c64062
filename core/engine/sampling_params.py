"""What one request asks of the sampler (`SamplingParams`): OpenAI / vLLM names, ranges and one-line validation,
and the defaults a checkpoint's generation_config.json gives (`SamplingParams.from_generation_config`)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from core.engine.generation_config import sampling_defaults, short_repr
from core.errors import CheckpointError, UserError

GREEDY_BELOW = 1e-5  # temperatures below this are greedy
MAX_LOGPROBS = 20  # the most top logprobs a request may ask for (OpenAI's limit)
_INT64_MIN, _UINT64_MAX = -(2 ** 63), 2 ** 64 - 1  # the seeds torch.Generator.manual_seed takes


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """What one request asks of the sampler (OpenAI / vLLM names and ranges).

    top_k 0 or -1 means off; max_tokens None means until EOS or the context ends; stop strings are matched on the
    detokenised text elsewhere (carried and validated here); logprobs None means none, N in 0..20 means the sampled
    token's logprob and the N most likely tokens of the raw distribution; eos_token_ids come from the model or its
    generation_config.json and stop a request unless ignore_eos."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.eos_token_ids, list):
            self.eos_token_ids = tuple(self.eos_token_ids)

    # -- derived ----------------------------------------------------------------------------------------------------

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def stop_ids(self) -> frozenset[int]:
        """Token ids that end the request: stop_token_ids, and the EOS ids unless ignore_eos."""
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(self.eos_token_ids))

    # -- checks -----------------------------------------------------------------------------------------------------

    def validate(self, source: str = "", error: type[UserError] = UserError) -> "SamplingParams":
        """Raise `error` (one line: `source: field must be ..., got value`) on the first bad field; return self."""
        prefix = f"{source}: " if source else ""

        def bad(name: str, rule: str) -> None:
            raise error(f"{prefix}{name} must be {rule}, got {short_repr(getattr(self, name))}")

        def real(name: str, ok, rule: str) -> None:
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or not ok(v):
                bad(name, rule)

        real("temperature", lambda v: v >= 0, "a finite number >= 0 (0 is greedy)")
        real("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "an integer >= 1, or 0 or -1 for no limit")
        real("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        real("repetition_penalty", lambda v: v > 0, "a finite number > 0 (1 is none)")
        real("frequency_penalty", lambda v: -2 <= v <= 2, "a number in [-2, 2]")
        real("presence_penalty", lambda v: -2 <= v <= 2, "a number in [-2, 2]")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", "an integer >= 1 (or None for no limit)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise error(f"{prefix}min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "a list of non-empty strings")
        for name in ("stop_token_ids", "eos_token_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
                bad(name, "a list of token ids (integers >= 0)")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "true or false")
        if self.seed is not None and (not _is_int(self.seed) or not _INT64_MIN <= self.seed <= _UINT64_MAX):
            bad("seed", f"an integer in [{_INT64_MIN}, {_UINT64_MAX}] (or None for a random one)")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] (or None for none)")
        return self

    def check_vocab(self, vocab_size: int) -> "SamplingParams":
        """Raise UserError if a stop or EOS token id is outside [0, vocab_size); return self."""
        for name in ("stop_token_ids", "eos_token_ids"):
            out = [t for t in getattr(self, name) if t >= vocab_size]
            if out:
                raise UserError(f"{name} {short_repr(out)} are outside the vocabulary [0, {vocab_size})")
        return self

    # -- construction -----------------------------------------------------------------------------------------------

    def merged(self, **overrides: Any) -> "SamplingParams":
        """A copy with the given fields replaced; a None value means "not given" and keeps this one's value.
        Unknown names raise UserError. The result is validated."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise UserError(f"unknown sampling option {short_repr(unknown[0])} (known: {', '.join(sorted(known))})")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validate()

    @classmethod
    def from_generation_config(cls, source: str | os.PathLike | dict | None = None,
                               base: "SamplingParams | None" = None, **overrides: Any) -> "SamplingParams":
        """Three layers, each overriding the one before: `base` (default SamplingParams(); the engine passes
        SamplingParams(eos_token_ids=model config's eos ids)), then a checkpoint's generation_config.json (a file,
        a checkpoint directory, or a parsed dict; None for none), then the explicit `overrides` (CLI flags or
        request fields; None = not given).

        A bad value in the file raises CheckpointError naming the file and field; a bad override, UserError."""
        base = base if base is not None else cls()
        if source is not None:
            defaults, name = sampling_defaults(source)
            try:
                base = replace(base, **defaults)
            except TypeError as e:  # cannot happen for the mapped names; kept as a one-line error regardless
                raise CheckpointError(f"{name}: {e}") from None
            base.validate(name, CheckpointError)
        return base.merged(**overrides)
