"""One generation request as the scheduler sees it: its tokens, how many of them are in the cache, its blocks.

The scheduler only ever moves `num_computed` forward (or back to 0 when the request is preempted), the way vLLM v1's
scheduler moves `num_computed_tokens`: the tokens still to compute are `all_token_ids[num_computed:]`. A request
that has been fully prefilled and is decoding has exactly one token not in the cache, the last one it emitted
(the "pending" token of `core/generate.py`); a decode step computes it (plus the MTP draft tokens, if any) and
samples the next one.

Speculative decoding (MTP): after each sampled token the model runner may attach `draft_token_ids` (k guesses for the
next tokens). A verify step computes `[pending, *drafts]` (S = 1 + k positions); if the first `a` drafts are accepted
the model emits `a + 1` tokens and `a + 1` of the S positions stay valid in the cache, the rest are forgotten.
The MTP module's own cache holds exactly as many entries as the main cache, so it uses the same block table.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from core.errors import UserError


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not yet admitted; holds no blocks
    RUNNING = "running"  # admitted: prefilling in chunks, or decoding
    PREEMPTED = "preempted"  # was running; its blocks were taken back; waits at the front of the queue to recompute
    FINISHED = "finished"  # see `finish_reason`; holds no blocks


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token, EOS (unless ignore_eos), or a stop string the engine matched
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # cancelled by the caller


@dataclass(eq=False)
class Request:
    """A prompt and what has been generated for it so far.

    `prompt_token_ids` and `output_token_ids` are lists of int token ids; `block_table` lists the cache blocks that
    hold positions 0 .. num_computed-1 (position t lives in block `block_table[t // block_size]`, row
    `t % block_size`). `sampling`, `sampler_state` and `detok_state` are opaque slots for the engine (sampling
    parameters, a per-request generator, the incremental detokeniser); the scheduler never reads them.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    stop_token_ids: frozenset[int] = frozenset()
    eos_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    sampling: Any = None
    sampler_state: Any = None
    detok_state: Any = None
    # -- set by the scheduler ---------------------------------------------------------------------------------------
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    arrival: int = -1
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    draft_token_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    num_drafts_proposed: int = 0
    num_drafts_accepted: int = 0

    def __post_init__(self) -> None:
        self.prompt_token_ids = list(self.prompt_token_ids)
        self.stop_token_ids = frozenset(self.stop_token_ids)
        self.eos_token_ids = frozenset(self.eos_token_ids)
        if not self.prompt_token_ids:
            raise UserError(f"request {self.request_id!r}: the prompt is empty")
        if self.max_tokens < 0:
            raise UserError(f"request {self.request_id!r}: max_tokens must be >= 0, got {self.max_tokens}")

    # -- token bookkeeping ------------------------------------------------------------------------------------------

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`all_token_ids[start:end]` without building the whole list (a step touches only its new tokens)."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens not yet in the cache (drafts not counted)."""
        return self.num_tokens - self.num_computed

    @property
    def is_decoding(self) -> bool:
        """Fully prefilled: only the last emitted token is missing from the cache."""
        return bool(self.output_token_ids) and self.num_computed == self.num_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def max_cache_positions(self, num_spec_tokens: int) -> int:
        """The most cache positions this request can ever hold at once: every token but the last emitted one, plus
        the draft positions of a verify step made when one output token was still to come."""
        if self.max_tokens == 0:
            return 0
        return len(self.prompt_token_ids) + self.max_tokens - 1 + num_spec_tokens

    def append_output(self, tokens: list[int]) -> list[int]:
        """Append sampled tokens until one finishes the request (max_tokens, a stop token, EOS unless ignore_eos);
        tokens after that one are dropped. Returns the tokens kept."""
        kept: list[int] = []
        for tok in tokens:
            if self.finish_reason is not None:
                break
            self.output_token_ids.append(tok)
            kept.append(tok)
            if tok in self.stop_token_ids or (tok in self.eos_token_ids and not self.ignore_eos):
                self.finish_reason = FinishReason.STOP
            elif len(self.output_token_ids) >= self.max_tokens:
                self.finish_reason = FinishReason.LENGTH
        return kept
