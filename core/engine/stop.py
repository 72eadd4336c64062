"""When a sequence stops: stop strings matched on the detokenised text, stop token ids, and EOS.

`StopMatcher` is fed the text deltas of `IncrementalDetokenizer` and matches stop strings on the text itself, so a
stop string split over several tokens (or sharing a token with other text) is found. It never lets a streamed client
see part of a stop string: the longest tail of the text that could still begin a stop string is held back until
the next delta shows whether it does. On a match, the text up to the stop string is released (with it, if
`include_stop`) and the matcher is done. Of several stop strings, the one that completes first in the text wins
(the longer of two ending together), so the result does not depend on how the text was cut into deltas.
`StopConditions` holds a request's settings, `token_stop_reason` the token-level ones (EOS unless `ignore_eos`, stop
token ids); `core.engine.text_stream` puts them together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.errors import UserError


class StopMatcher:
    """Stop strings matched on streamed text. `feed(delta) -> (emit, stopped)`; `flush()` at the end of a sequence
    that stopped for another reason releases the held tail."""

    def __init__(self, stop_strings: Sequence[str] = (), include_stop: bool = False):
        for s in stop_strings:
            if not isinstance(s, str) or not s:
                raise UserError(f"stop strings must be non-empty strings, got {s!r:.80}")
        self.stops = tuple(dict.fromkeys(stop_strings))
        self.include_stop = include_stop
        self.held = ""  # text not yet released: a tail that could be the start of a stop string
        self.stopped = False
        self.matched: str | None = None  # the stop string found

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def feed(self, delta: str) -> tuple[str, bool]:
        """Take the next text delta; returns (text safe to release now, whether a stop string has appeared)."""
        if self.stopped:
            return "", True
        text = self.held + delta
        first = None  # the match that completes first (then the longer one): what a character stream would see
        for s in self.stops:
            i = text.find(s)
            if i >= 0 and (first is None or (i + len(s), i) < (first[0] + len(first[1]), first[0])):
                first = (i, s)
        if first is not None:
            i, s = first
            self.stopped, self.matched, self.held = True, s, ""
            return text[:i + len(s)] if self.include_stop else text[:i], True
        keep = self._held_tail(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held tail, released because the sequence ended without completing a stop string."""
        out, self.held = self.held, ""
        return "" if self.stopped else out


@dataclass(frozen=True)
class StopConditions:
    """A request's stop settings. `eos_token_ids` come from the tokenizer (and config); `ignore_eos` generates past
    them; `stop_token_ids` always stop; `stop` are stop strings."""

    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    include_stop: bool = False


def token_stop_reason(conditions: StopConditions, token_id: int) -> str | None:
    """Why this token id ends the sequence ("eos" or "stop_token"), or None."""
    if token_id in conditions.eos_token_ids and not conditions.ignore_eos:
        return "eos"
    if token_id in conditions.stop_token_ids:
        return "stop_token"
    return None


def stop_conditions(stop: Iterable[str] = (), stop_token_ids: Iterable[int] = (),
                    eos_token_ids: Iterable[int] = (), ignore_eos: bool = False,
                    include_stop: bool = False) -> StopConditions:
    return StopConditions(tuple(stop), frozenset(int(i) for i in stop_token_ids),
                          frozenset(int(i) for i in eos_token_ids), ignore_eos, include_stop)
