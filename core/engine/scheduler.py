"""The scheduler: which requests run in the next forward pass, which of their tokens, and in which cache slots.

One step (`schedule()` then the model runner then `update()`):
  1. decodes: every running, fully prefilled request computes its pending token (plus its k MTP drafts:
     S = 1 + k positions, the same S for all), oldest first, before any prefill, so decodes are never starved;
  2. running requests still prefilling (a long prompt, or a preempted request recomputing) continue, oldest first,
     in chunks under the token budget that is left;
  3. waiting requests are admitted first come first served (preempted ones sit at the front of the queue) while
     the budget, `max_num_seqs` and the free blocks allow; the first that cannot start stops admission.
Blocks are allocated as positions are needed (a verify step's draft positions included) and given back the moment
a request finishes, is aborted, or a rejected draft leaves a block empty. When a running request cannot get the
blocks it needs, it preempts the most recently arrived running request (itself, if it is that one): recompute mode,
the victim's blocks are freed, its `num_computed` goes back to 0, its generated tokens are kept, and it waits at the
front of the queue to recompute prompt + outputs. The oldest running request can always grow (a request that needs
more blocks than the whole pool is refused when added), so every request finishes.

The scheduler only moves `num_computed` forward in `update()`, after the model has run; between `schedule()` and
`update()` a plan is in flight and `schedule()` refuses to run again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from core.engine.blocks import BlockPool, blocks_for
from core.engine.request import FinishReason, Request, RequestStatus
from core.errors import UserError


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's part of the step: `token_ids` go to cache positions `start .. start + len - 1`.

    `block_table` (a copy) covers every position 0 .. end-1; `slot_mapping[i]` is the flat cache slot
    (`block * block_size + row`) that token i writes. For a decode, `token_ids[1:]` are the draft tokens to verify.
    `samples` says the model must return sampled token(s) for this sequence (always for a decode; for a prefill only
    on the chunk that reaches the request's last token, whose logits give its next token)."""

    request: Request
    start: int
    token_ids: list[int]
    block_table: list[int]
    slot_mapping: list[int]
    samples: bool
    decode: bool  # a decode (pending token + drafts, on the absorbed path) rather than a prefill chunk

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        """Cache length after this step, before any draft is rejected."""
        return self.start + len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


@dataclass
class StepPlan:
    """What one forward pass computes. Batch order: `decodes` first (each adds `decode_width` = S tokens), then
    `prefills` (chunks of any length). `preempted` lost their cache in this step (drop any per-request state)."""

    block_size: int
    decode_width: int
    decodes: list[ScheduledSeq] = field(default_factory=list)
    prefills: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(frozen=True)
class StepResult:
    """What the model runner returns for one sequence with `samples=True`.

    `token_ids`: the emitted tokens. A plain decode or a final prefill chunk emits one; a verify step with k drafts
    emits a + 1, where the first a equal the first a drafts (accepted) and the last is the model's own token (the
    bonus token, or the correction of the first rejected draft). `draft_token_ids`: the MTP guesses for the tokens
    after the last emitted one (exactly k of them when the scheduler runs with `num_spec_tokens = k`)."""

    token_ids: list[int]
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class RequestUpdate:
    """One request's news from a step: tokens appended to its output (after stop/length truncation), and whether
    it finished (then `request.finish_reason` says why and its blocks are already free)."""

    request: Request
    new_token_ids: list[int]
    finished: bool


class Scheduler:
    """Continuous batching with chunked prefill and recompute preemption over a `BlockPool`.

    max_num_batched_tokens: tokens per forward pass (decodes + prefill chunks); must hold every decode's S tokens.
    max_num_seqs: requests admitted (running) at once, so at most that many sequences per pass. num_spec_tokens: k MTP drafts per decode (0: plain decoding).
    """

    def __init__(self, pool: BlockPool, max_num_batched_tokens: int, max_num_seqs: int, num_spec_tokens: int = 0):
        if max_num_seqs < 1 or num_spec_tokens < 0:
            raise UserError(f"scheduler: max_num_seqs must be >= 1 and num_spec_tokens >= 0, got {max_num_seqs}, "
                            f"{num_spec_tokens}")
        width = 1 + num_spec_tokens
        if max_num_batched_tokens < max_num_seqs * width:
            raise UserError(f"scheduler: max_num_batched_tokens ({max_num_batched_tokens}) must hold one decode step "
                            f"of every sequence: max_num_seqs ({max_num_seqs}) x {width} tokens")
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.num_spec_tokens = num_spec_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in arrival order
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._arrivals = 0
        self._in_flight: StepPlan | None = None

    # -- requests in and out ---------------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def get(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def add(self, request: Request) -> None:
        """Queue a new request (FCFS). Refuses, in one line, an id in use or a request that could never fit."""
        rid = request.request_id
        if rid in self.requests:
            raise UserError(f"request {rid!r}: this id is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed or request.output_token_ids:
            raise UserError(f"request {rid!r}: only a new request can be added (status {request.status.value})")
        need = blocks_for(request.max_cache_positions(self.num_spec_tokens), self.block_size)
        if need > self.pool.num_blocks:
            raise UserError(f"request {rid!r}: prompt ({len(request.prompt_token_ids)} tokens) + max_tokens "
                            f"({request.max_tokens}) need {need} cache blocks of {self.block_size} positions; "
                            f"the whole cache has {self.pool.num_blocks}")
        request.arrival = self._arrivals
        self._arrivals += 1
        if request.max_tokens == 0:  # nothing to generate: done before it touches the cache
            request.finish_reason = FinishReason.LENGTH
            request.status = RequestStatus.FINISHED
            return
        self.requests[rid] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Cancel a request (waiting or running) and free its blocks at once. None if it is unknown or finished."""
        return self.finish(request_id, FinishReason.ABORT)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """Finish a request for a reason decided outside (ABORT, or STOP when the engine matched a stop string)."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        request.finish_reason = reason
        self._retire(request)
        return request

    def _retire(self, request: Request) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.pool.free(request.block_table)
        request.block_table = []
        request.draft_token_ids = []
        request.status = RequestStatus.FINISHED
        del self.requests[request.request_id]

    # -- one step --------------------------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Choose the next step's work (see the module docstring). An empty plan means nothing can run now."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() called again before update() of the previous plan")
        width = 1 + self.num_spec_tokens
        chosen: dict[str, int] = {}  # request id -> tokens this step, in scheduling order
        preempted: list[Request] = []

        # 1. decodes, oldest first. A victim may already be chosen (a newer decode); it is unchosen.
        for request in [r for r in self.running if self._is_decode(r)]:
            if request.status is RequestStatus.RUNNING and self._grow(request, width, preempted, chosen):
                chosen[request.request_id] = width

        # 2. running requests still prefilling, oldest first, as much as the budget and the blocks allow.
        for request in [r for r in self.running if not self._is_decode(r)]:
            budget = self.max_num_batched_tokens - sum(chosen.values())
            if budget <= 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue
            got = self._grow(request, min(request.num_uncomputed, budget), preempted, chosen, partial=True)
            if got:
                chosen[request.request_id] = got

        # 3. admit waiting requests, first come first served; they never preempt, and one preempted in this very
        #    step waits for the next.
        budget = self.max_num_batched_tokens - sum(chosen.values())
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            chunk = min(request.num_uncomputed, budget, self.pool.num_free * self.block_size)
            if chunk <= 0 or request in preempted:
                break
            self.waiting.popleft()
            request.block_table = self.pool.allocate(blocks_for(chunk, self.block_size))
            request.status = RequestStatus.RUNNING
            self._insert_running(request)
            chosen[request.request_id] = chunk
            budget -= chunk

        plan = StepPlan(self.block_size, width, preempted=preempted)
        for rid, n in chosen.items():
            seq = self._seq(self.requests[rid], n)
            (plan.decodes if seq.decode else plan.prefills).append(seq)
        self._in_flight = plan
        return plan

    def _grow(self, request: Request, want: int, preempted: list[Request], chosen: dict[str, int],
              partial: bool = False) -> int:
        """Make room in the cache for `want` more positions of a running request (all of them, or with `partial`
        at least one, as many as fit), preempting the most recently arrived running requests while it does not fit.
        Returns the positions granted (0 if the request preempted itself)."""
        if want <= 0:
            return 0
        while True:
            have = len(request.block_table) * self.block_size - request.num_computed
            room = have + self.pool.num_free * self.block_size
            grant = min(want, room) if partial else (want if room >= want else 0)
            if grant > 0:
                extra = blocks_for(request.num_computed + grant, self.block_size) - len(request.block_table)
                request.block_table += self.pool.allocate(max(extra, 0))
                return grant
            victim = self.running[-1]
            self._preempt(victim)
            chosen.pop(victim.request_id, None)
            preempted.append(victim)
            if victim is request:
                return 0

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.pool.free(request.block_table)
        request.block_table = []
        request.num_computed = 0
        request.draft_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        # Victims go newest first, so putting each at the front keeps the queue in arrival order.
        self.waiting.appendleft(request)

    def _insert_running(self, request: Request) -> None:
        i = len(self.running)
        while i > 0 and self.running[i - 1].arrival > request.arrival:
            i -= 1
        self.running.insert(i, request)

    def _is_decode(self, request: Request) -> bool:
        """Decoding, with its k drafts when speculating. A request that has only its last token to compute but no
        drafts (a recompute whose last chunk is one token) runs that token as a prefill chunk, which samples it
        and gets its drafts."""
        return request.is_decoding and len(request.draft_token_ids) == self.num_spec_tokens

    def _seq(self, request: Request, n: int) -> ScheduledSeq:
        start, decode = request.num_computed, self._is_decode(request)
        if decode:
            tokens = request.token_slice(start, start + 1) + list(request.draft_token_ids)
        else:
            tokens = request.token_slice(start, start + n)
        bs, table = self.block_size, list(request.block_table)
        slots = [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        return ScheduledSeq(request, start, tokens, table, slots, decode or start + n == request.num_tokens, decode)

    def update(self, plan: StepPlan, results: dict[str, StepResult]) -> list[RequestUpdate]:
        """Apply the model's results for `plan`: move `num_computed` forward, append sampled tokens, forget the
        positions of rejected drafts (freeing a block that became empty), finish requests (max_tokens, stop token,
        EOS unless ignore_eos) and free their blocks. Requests aborted while the plan was in flight are skipped.
        Returns one RequestUpdate per request that emitted tokens or finished, in batch order."""
        if plan is not self._in_flight:
            raise RuntimeError("update() must be given the plan of the last schedule()")
        self._in_flight = None
        live = [seq for seq in plan.seqs if seq.request.status is RequestStatus.RUNNING]  # not aborted meanwhile
        for seq in live:
            if seq.samples:
                self._check_result(seq, results.get(seq.request_id))
        updates: list[RequestUpdate] = []
        for seq in live:
            request = seq.request
            if not seq.samples:
                request.num_computed = seq.end
                continue
            result = results[seq.request_id]
            emitted, drafts = list(result.token_ids), list(result.draft_token_ids)
            proposed = seq.token_ids[1:] if seq.decode else []
            accepted = len(emitted) - 1
            request.num_drafts_proposed += len(proposed)
            request.num_drafts_accepted += accepted
            # A prefill chunk caches all its tokens; a verify step keeps the pending token and the accepted drafts.
            request.num_computed = seq.end if not proposed else seq.start + 1 + accepted
            kept = request.append_output(emitted)
            if request.finish_reason is not None:
                self._retire(request)
                updates.append(RequestUpdate(request, kept, True))
                continue
            request.draft_token_ids = drafts
            keep = blocks_for(request.num_computed, self.block_size)
            if len(request.block_table) > keep:
                self.pool.free(request.block_table[keep:])
                request.block_table = request.block_table[:keep]
            updates.append(RequestUpdate(request, kept, False))
        return updates

    def _check_result(self, seq: ScheduledSeq, result: StepResult | None) -> None:
        """Refuse, before anything changes, a result that breaks the runner's side of the contract (a bug)."""
        rid = seq.request_id
        if result is None:
            raise ValueError(f"no sampled tokens for request {rid!r}, which the plan asked to sample")
        if len(result.draft_token_ids) not in (0, self.num_spec_tokens):
            raise ValueError(f"request {rid!r}: {len(result.draft_token_ids)} draft tokens returned; the scheduler "
                             f"runs with num_spec_tokens = {self.num_spec_tokens}")
        emitted, proposed = list(result.token_ids), (seq.token_ids[1:] if seq.decode else [])
        accepted = len(emitted) - 1
        if not 0 <= accepted <= len(proposed) or emitted[:accepted] != proposed[:accepted]:
            raise ValueError(f"request {rid!r}: emitted tokens {emitted} do not follow the drafts {proposed} of its "
                             f"verify step")
