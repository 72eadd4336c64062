"""The engine: the one generation loop that `core.run` and `core.serve` share.

Each `step()` asks the scheduler for a plan (decodes first, then prefill chunks, under a token budget, over the
paged latent cache), runs it as one mixed forward pass, samples every sequence that reached a sampling position with
its own parameters and generator, runs the MTP module to draft the next token when speculating, hands the results
back to the scheduler, and turns the new tokens into text deltas (incremental detokenisation, stop strings).

Speculative decoding (one MTP draft, deepseek_v3_semantics.md §8) in continuous batches. The MTP layer's cache
entry for index j holds (token t_{j+1}, main hidden h_j), so it has exactly as many entries as the main cache and
shares its block tables. A decode step verifies [pending, draft] (S = 2); the verdict comes from
`sampling.accept` on the processed distributions, so it is exact for every sampling setting; accepted drafts add
the bonus token. Afterwards the MTP module runs over the same positions with the tokens that are now known and
drafts the next token from its last entry.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from core.batch import Batch, PagedCache
from core.engine.blocks import BlockPool, blocks_in_budget
from core.engine.request import FinishReason, Request
from core.engine.sampling import (RequestSampler, SamplingParams, TokenLogprobs, accept, greedy_tokens, invalid_rows,
                                  process, sample, token_logprobs)
from core.engine.scheduler import ScheduledSeq, Scheduler, StepPlan, StepResult
from core.engine.stop import stop_conditions
from core.engine.text_stream import TextStream
from core.errors import UserError
from core.model import Model

GiB = 1 << 30


@dataclass
class EngineConfig:
    """How the engine lays out its cache and batches.

    block_size: cache positions per block (None: the backend's preferred size).
    kv_cache_memory: bytes for the latent cache (main layers and the MTP layer together). None: the smaller of
      `kv_cache_fraction` of the device's free memory and what `max_num_seqs` full-length sequences could use
      (or `max_cache_positions`, when the caller knows every request up front).
    max_num_seqs: sequences running at once. max_num_batched_tokens: tokens per forward pass (prefill chunks fill
      what decodes leave). max_model_len: prompt + output limit (None: the config's max_position_embeddings).
    """

    block_size: int | None = None
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.5
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    mtp: bool = False
    max_cache_positions: int | None = None  # with no budget given: never allocate more positions than this


@dataclass
class RequestOutput:
    """A request's state after a step. `new_token_ids`/`new_text` are what this step added (for streaming);
    `token_ids`/`text` everything so far. `finish_reason`: "stop", "length" or "abort" once finished; `stop_reason`
    the stop string or token id that ended it (None for EOS or length)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    new_logprobs: list[TokenLogprobs] | None = None
    drafts_proposed: int = 0
    drafts_accepted: int = 0
    error: str | None = None  # why the engine ended it (finish_reason "abort"), e.g. non-finite logits
    time_to_first_token: float | None = None
    seconds: float = 0.0


@dataclass
class _State:
    """What the engine keeps per request beside the scheduler's `Request`."""

    sampler: RequestSampler
    stream: TextStream
    arrival: float
    first_token: float | None = None
    draft_logprobs: Tensor | None = None  # q of the pending draft, [V] processed log-probabilities
    logprobs: list[TokenLogprobs] | None = None
    finished_text: bool = False


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    peak_blocks_used: int = 0
    preemptions: int = 0
    drafts_proposed: int = 0
    drafts_accepted: int = 0


def free_device_memory(device: torch.device) -> int:
    """Free bytes on `device`: the device module's `mem_get_info` where torch has one for it (cuda, npu, xpu...),
    else the host's available memory (the CPU)."""
    module = getattr(torch, device.type, None)
    info = getattr(module, "mem_get_info", None)
    if info is not None and device.type != "cpu":
        return int(info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Engine:
    """Continuous batching over one model. `add()` requests, call `step()` until `has_unfinished` is False (or use
    `run()` / `stream()`); `abort()` frees a request's blocks at once."""

    def __init__(self, model: Model, tokenizer, config: EngineConfig | None = None,
                 eos_token_ids: frozenset[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.config = c = config or EngineConfig()
        cfg = model.cfg
        if c.mtp and not model.has_mtp:
            raise UserError(f"--mtp: {cfg.source} has no MTP layer (num_nextn_predict_layers = "
                            f"{cfg.num_nextn_predict_layers}, or its weights are absent)")
        self.max_model_len = c.max_model_len or cfg.max_position_embeddings
        if not 1 <= self.max_model_len <= cfg.max_position_embeddings:
            raise UserError(f"--max-model-len must be in [1, {cfg.max_position_embeddings}] "
                            f"(max_position_embeddings of {cfg.source}), got {self.max_model_len}")
        self.block_size = model.block_size(c.block_size)
        layers = cfg.num_hidden_layers + (1 if c.mtp else 0)
        bytes_per_token = layers * cfg.latent_width * torch.finfo(model.dtype).bits // 8
        budget = c.kv_cache_memory
        if budget is None:
            positions = c.max_num_seqs * (self.max_model_len + 2)
            if c.max_cache_positions is not None:  # what the requests known up front can use (core.run)
                positions = min(positions, c.max_cache_positions)
            want = (positions + c.max_num_seqs * self.block_size) * bytes_per_token  # + a last block per sequence
            budget = min(int(free_device_memory(model.device) * c.kv_cache_fraction), want)
        num_blocks = blocks_in_budget(budget, self.block_size, bytes_per_token)
        self.bytes_per_token = bytes_per_token
        self.pool = BlockPool(num_blocks, self.block_size)
        self.cache: PagedCache = model.new_cache(num_blocks, self.block_size)
        self.mtp_cache: PagedCache | None = model.new_cache(num_blocks, self.block_size, mtp=True) if c.mtp else None
        self.scheduler = Scheduler(self.pool, max(c.max_num_batched_tokens, c.max_num_seqs * (2 if c.mtp else 1)),
                                   c.max_num_seqs, num_spec_tokens=1 if c.mtp else 0)
        self.eos_token_ids = frozenset(eos_token_ids if eos_token_ids is not None else cfg.eos_token_ids)
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._states: dict[str, _State] = {}
        # Under torchrun the server makes every rank use rank 0's samples (core.serve.ranks): called with this
        # rank's sampled values of a step ((emitted, failed) after sampling, the draft token list after drafting),
        # it returns the values to use instead. None: this process's own samples.
        self.share_samples: Callable[[Any], Any] | None = None

    # -- requests --------------------------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def cache_bytes(self) -> int:
        return self.pool.num_blocks * self.block_size * self.bytes_per_token

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate a request before it is queued; returns its max_tokens. One-line UserErrors name the field."""
        vocab = self.model.cfg.vocab_size
        if not prompt_ids:
            raise UserError("the prompt is empty")
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        room = self.max_model_len - len(prompt_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise UserError(f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the context "
                            f"length ({self.max_model_len} tokens)")
        return max_tokens

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; returns its id."""
        params = params.validate()
        max_tokens = self.check(prompt_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(rid, list(prompt_ids), max_tokens, stop_token_ids=frozenset(params.stop_token_ids or ()),
                          eos_token_ids=self.eos_token_ids, ignore_eos=params.ignore_eos, sampling=params)
        sampler = RequestSampler(params, prompt_ids, self.model.cfg.vocab_size)
        conditions = stop_conditions(params.stop or (), params.stop_token_ids or (), self.eos_token_ids,
                                     params.ignore_eos)
        stream = TextStream(self.tokenizer, prompt_ids, conditions) if self.tokenizer is not None else None
        state = _State(sampler, stream, time.perf_counter(), logprobs=[] if params.logprobs is not None else None)
        request.sampler_state = state
        self.scheduler.add(request)
        self._states[rid] = state
        self.stats.prompt_tokens += len(prompt_ids)
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are free when this returns. False if it is unknown or already finished."""
        request = self.scheduler.abort(request_id)
        self._states.pop(request_id, None)
        return request is not None

    # -- one step --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass of the scheduler's plan; returns the requests that produced tokens or finished."""
        plan = self.scheduler.schedule()
        for request in plan.preempted:
            request.sampler_state.draft_logprobs = None
            self.stats.preemptions += 1
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, self.pool.num_used)
        if plan.is_empty:
            self.scheduler.update(plan, {})
            return []
        self.stats.steps += 1
        batch, hidden = self._forward(plan)
        emitted, raw_rows, failed = self._sample(plan, hidden)
        for rid in failed:  # ended now; update() skips them
            self.scheduler.finish(rid, FinishReason.ABORT)
        drafts = self._draft(plan, batch, hidden, emitted) if self.mtp_cache is not None else {}
        results = {rid: StepResult(toks, drafts.get(rid, [])) for rid, toks in emitted.items()}
        updates = self.scheduler.update(plan, results)
        outputs = [self._failure(rid, message) for rid, message in failed.items()]
        for u in updates:
            out = self._output(u.request, u.new_token_ids, raw_rows.get(u.request.request_id, []), u.finished)
            if out is not None:
                outputs.append(out)
        return outputs

    def _batch(self, seqs: list[ScheduledSeq], tokens: list[list[int]], num_decode: int, offset: int = 0) -> Batch:
        return Batch.build(tokens, [s.block_table for s in seqs], [s.start for s in seqs], self.model.device,
                           block_size=self.block_size, num_decode=num_decode, position_offset=offset)

    def _forward(self, plan: StepPlan) -> tuple[Batch, Tensor]:
        """The step's batch and its final hidden states [T, D]."""
        seqs = plan.seqs
        batch = self._batch(seqs, [s.token_ids for s in seqs], len(plan.decodes))
        return batch, self.model.forward(batch, self.cache)

    def _sample(self, plan: StepPlan, hidden: Tensor
                ) -> tuple[dict[str, list[int]], dict[str, list], dict[str, str]]:
        """Sampled tokens per request id, the raw logits rows behind each emitted token (for logprobs), and the
        requests whose logits cannot be sampled (NaN or infinite: a broken model or kernel), with why; only those
        end, the rest of the batch goes on."""
        rows, kinds, seqs = [], [], []  # hidden row(s) per sampling sequence
        offset = 0
        for s in plan.seqs:
            if s.samples:
                seqs.append(s)
                if s.decode and len(s.token_ids) == 2:
                    rows += [offset, offset + 1]
                    kinds.append("verify")
                else:
                    rows.append(offset + s.length - 1)
                    kinds.append("plain")
            offset += s.length
        emitted: dict[str, list[int]] = {}
        raw: dict[str, list[Tensor]] = {}
        failed: dict[str, str] = {}
        if not seqs:
            return emitted, raw, failed
        logits = self.model.logits(hidden[torch.tensor(rows, device=hidden.device)]).float()
        first_row = list(itertools.accumulate([0] + [2 if k == "verify" else 1 for k in kinds]))[:-1]
        bad = set(invalid_rows(logits))
        for i, s in enumerate(seqs):
            if bad & {first_row[i], first_row[i] + (1 if kinds[i] == "verify" else 0)}:
                failed[s.request_id] = (f"request {s.request_id!r}: the model produced NaN or infinite logits at "
                                        f"position {s.end - 1} (non-finite weights, or a faulty backend kernel)")
        plain = [i for i, k in enumerate(kinds) if k == "plain" and seqs[i].request_id not in failed]
        verify = [i for i, k in enumerate(kinds) if k == "verify" and seqs[i].request_id not in failed]
        if plain:
            samplers = [seqs[i].request.sampler_state.sampler for i in plain]
            lg = logits[[first_row[i] for i in plain]]
            tokens = greedy_tokens(lg, samplers)
            if tokens is None:
                tokens = sample(process(lg, samplers), samplers).tolist()
            for i, tok, row in zip(plain, tokens, lg):
                emitted[seqs[i].request_id] = [tok]
                raw[seqs[i].request_id] = [row]
        if verify:
            states = [seqs[i].request.sampler_state for i in verify]
            samplers = [st.sampler for st in states]
            drafts = [seqs[i].token_ids[1] for i in verify]
            l0 = logits[[first_row[i] for i in verify]]
            l1 = logits[[first_row[i] + 1 for i in verify]]
            best = greedy_tokens(l0, samplers)  # every row greedy, nothing to process: the argmax decides
            bonus: dict[int, int] = {}
            if best is not None:
                first = best
                ok_rows = [j for j, (d, b) in enumerate(zip(drafts, best)) if d == b]
                if ok_rows:
                    bonus = dict(zip(ok_rows, l1[ok_rows].argmax(dim=-1).tolist()))  # min_tokens: one more is out
            else:
                p0 = process(l0, samplers)
                q = torch.stack([st.draft_logprobs if st.draft_logprobs is not None else p0[j]
                                 for j, st in enumerate(states)])
                ok, first = accept(p0, q, drafts, samplers)
                ok_rows = [j for j, a in enumerate(ok.tolist()) if a]
                if ok_rows:
                    sub = [samplers[j] for j in ok_rows]
                    p1 = process(l1[ok_rows], sub, [[drafts[j]] for j in ok_rows])
                    bonus = dict(zip(ok_rows, sample(p1, sub).tolist()))
            for j, i in enumerate(verify):
                rid = seqs[i].request_id
                self.stats.drafts_proposed += 1
                if j in bonus:
                    self.stats.drafts_accepted += 1
                    emitted[rid], raw[rid] = [drafts[j], bonus[j]], [l0[j], l1[j]]
                else:
                    emitted[rid], raw[rid] = [int(first[j])], [l0[j]]
        if self.share_samples is not None:
            emitted, failed = self.share_samples((emitted, failed))
        for s in seqs:
            for tok in emitted.get(s.request_id, ()):
                s.request.sampler_state.sampler.append(tok)
        return emitted, raw, failed

    def _draft(self, plan: StepPlan, batch: Batch, hidden: Tensor, emitted: dict[str, list[int]]
               ) -> dict[str, list[int]]:
        """Run the MTP module over this step's positions; returns the next draft of every sequence that sampled.

        One MTP pass in the usual case: a verified decode adds MTP entries for [draft, bonus] (accepted) or
        [correction] (rejected); when a step has both, a rejected one also gets a placeholder second entry at its
        verified position m+1 (token: the rejected draft, hidden: its verify row), so every decode adds two and all
        share one pass. Like the main cache's entry for the rejected draft, the placeholder is overwritten by the
        next step before anything reads it; the next draft comes from the last real entry. When the pass covers the
        step's sequences exactly as the forward did, it reuses that batch's layout and hidden rows."""
        model, offset = self.model, 0
        decodes, prefills = [], []  # (seq, MTP tokens, hidden rows, index of the entry that drafts)
        for s in plan.seqs:
            rows = list(range(offset, offset + s.length))
            offset += s.length
            if s.samples and s.request_id not in emitted:  # ended this step (non-finite logits)
                continue
            if s.decode:
                toks = emitted[s.request_id]  # [draft, bonus] (accepted) or [correction]
                decodes.append((s, toks, rows, len(toks) - 1))
            else:
                last = emitted[s.request_id][:1] if s.samples else s.request.token_slice(s.end, s.end + 1)
                prefills.append((s, s.request.token_slice(s.start + 1, s.end) + last, rows, s.length - 1))
        width = max((len(e[1]) for e in decodes), default=0)
        decodes = [(s, toks + list(s.token_ids[len(toks):width]), rows[:width], at)  # placeholders (see above)
                   for s, toks, rows, at in decodes]
        entries = decodes + prefills
        draft_rows: dict[str, Tensor] = {}
        if entries:
            tokens = [t for e in entries for t in e[1]]
            token_ids = torch.tensor(tokens, dtype=torch.int64, device=batch.tokens.device)
            if len(entries) == len(plan.seqs) and len(tokens) == batch.tokens.shape[0]:  # the forward's layout
                mb, prev = batch.with_tokens(token_ids, position_offset=1), hidden
            elif len(entries) == len(plan.seqs) and batch.decode and 0 < width < batch.new_per_seq:  # all rejected
                mb = batch.with_tokens(token_ids, keep=width, position_offset=1)
                prev = hidden.view(batch.num_seqs, batch.new_per_seq, -1)[:, :width].reshape(-1, hidden.shape[-1])
            else:
                mb = self._batch([e[0] for e in entries], [e[1] for e in entries], len(decodes), offset=1)
                prev = hidden[torch.tensor([r for e in entries for r in e[2]], device=hidden.device)]
            g = model.mtp_forward(mb, prev, self.mtp_cache)
            start = 0
            for s, toks, _, at in entries:
                if s.samples:
                    draft_rows[s.request_id] = g[start + at]
                start += len(toks)
        if not draft_rows:
            return {}
        ids = list(draft_rows)
        states = [self.scheduler.get(rid).sampler_state for rid in ids]
        samplers = [st.sampler for st in states]
        logits = model.logits(torch.stack([draft_rows[r] for r in ids])).float()
        tokens = greedy_tokens(logits, samplers)  # greedy acceptance needs no draft distribution q
        q: Tensor | list[None] = [None] * len(ids)
        if tokens is None:
            q = process(logits, samplers)
            tokens = sample(q, samplers).tolist()
        if self.share_samples is not None:
            tokens = self.share_samples(tokens)
        for st, qi in zip(states, q):
            st.draft_logprobs = qi
        return {rid: [tok] for rid, tok in zip(ids, tokens)}

    # -- outputs ---------------------------------------------------------------------------------------------------

    def _failure(self, request_id: str, message: str) -> RequestOutput:
        state = self._states.pop(request_id)
        request = state.sampler
        return RequestOutput(request_id, list(request.prompt_ids), list(request.output_ids),
                             state.stream.text if state.stream is not None else "", [], "", True, "abort",
                             error=message, seconds=time.perf_counter() - state.arrival)

    def _output(self, request: Request, new_ids: list[int], raw_rows: list[Tensor], finished: bool
                ) -> RequestOutput | None:
        state: _State | None = self._states.get(request.request_id)
        if state is None:
            return None
        now = time.perf_counter()
        if new_ids and state.first_token is None:
            state.first_token = now
        self.stats.output_tokens += len(new_ids)
        new_lp = None
        if state.logprobs is not None and new_ids:
            k = state.sampler.params.logprobs
            new_lp = token_logprobs(torch.stack(raw_rows[:len(new_ids)]), new_ids, [k] * len(new_ids))
            state.logprobs += new_lp
        text, stop_reason, kept = "", None, len(new_ids)
        if state.stream is not None:
            for n, tok in enumerate(new_ids):
                delta, done = state.stream.step(tok)
                text += delta
                if done:
                    kept = n + 1
                    break
            if state.stream.finished and not finished:  # a stop string the scheduler cannot see
                request.output_token_ids[len(request.output_token_ids) - len(new_ids) + kept:] = []
                self.scheduler.finish(request.request_id, FinishReason.STOP)
                finished = True
            elif finished and not state.stream.finished:
                text += state.stream.finish()
            if state.stream.reason == "stop_string":
                stop_reason = state.stream.matched
        if finished and stop_reason is None and request.finish_reason is FinishReason.STOP:
            last = request.output_token_ids[-1] if request.output_token_ids else None
            stop_reason = last if last in request.stop_token_ids else None
        if finished:
            self._states.pop(request.request_id, None)
        return RequestOutput(
            request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids), text=state.stream.text if state.stream is not None else "",
            new_token_ids=new_ids[:kept], new_text=text, finished=finished,
            finish_reason=request.finish_reason.value if finished and request.finish_reason else None,
            stop_reason=stop_reason, logprobs=state.logprobs, new_logprobs=new_lp[:kept] if new_lp else new_lp,
            drafts_proposed=request.num_drafts_proposed, drafts_accepted=request.num_drafts_accepted,
            time_to_first_token=None if state.first_token is None else state.first_token - state.arrival,
            seconds=now - state.arrival)

    # -- loops -----------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, RequestOutput]:
        """Step until every queued request has finished; the final output of each, by request id."""
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished:
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return final

    def stream(self, request_ids: set[str] | None = None) -> Iterator[RequestOutput]:
        """Step until the given requests (default: all) have finished, yielding every output as it comes."""
        waiting = set(request_ids) if request_ids is not None else None
        while self.has_unfinished and (waiting is None or waiting):
            for out in self.step():
                if waiting is None or out.request_id in waiting:
                    yield out
                    if out.finished and waiting is not None:
                        waiting.discard(out.request_id)
