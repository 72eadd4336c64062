"""One sequence's output text as it streams: detokenise each generated token incrementally, end the sequence on EOS
(unless `ignore_eos`), a stop token id or a stop string, and release only text that can no longer be part of a stop
string. The engine makes one `TextStream` per request and calls `step` with every token it samples."""

from __future__ import annotations

from collections.abc import Sequence

from core.engine.detokenize import Decoder, IncrementalDetokenizer
from core.engine.stop import StopConditions, StopMatcher, token_stop_reason


class TextStream:
    """`step(token_id) -> (text, finished)`; `finish() -> text` when the sequence ends for another reason (length).
    After the end: `reason` is "eos", "stop_token", "stop_string" (with `matched`) or "length", and `text` holds
    everything released. A token that ends the sequence by id contributes no text (its earlier held text does)."""

    def __init__(self, tok: Decoder, prompt_ids: Sequence[int], conditions: StopConditions,
                 skip_special_tokens: bool = True):
        self.conditions = conditions
        self.detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens)
        self.matcher = StopMatcher(conditions.stop, conditions.include_stop)
        self.finished = False
        self.reason: str | None = None
        self.text = ""

    @property
    def matched(self) -> str | None:
        return self.matcher.matched

    def _release(self, delta: str, end: bool) -> str:
        emit, stopped = self.matcher.feed(delta)
        if stopped:
            self.finished, self.reason = True, "stop_string"
        elif end:
            emit += self.matcher.flush()
            self.finished = True
        self.text += emit
        return emit

    def step(self, token_id: int) -> tuple[str, bool]:
        """Take one generated token: (text safe to stream now, whether the sequence is finished)."""
        if self.finished:
            return "", True
        reason = token_stop_reason(self.conditions, token_id)
        if reason is not None:
            emit = self._release(self.detok.finish(), end=True)
            self.reason = self.reason or reason
            return emit, True
        emit = self._release(self.detok.step(token_id), end=False)
        return emit, self.finished

    def finish(self) -> str:
        """The sequence ended without a stop (max tokens): release everything still held."""
        if self.finished:
            return ""
        emit = self._release(self.detok.finish(), end=True)
        self.reason = self.reason or "length"
        return emit
