"""Generation: (chunked) prefill, decode steps on the absorbed path, sampling, and greedy or sampled speculative
decoding with the MTP module.

Speculative step (one draft; deepseek_v3_semantics.md §8). The invariant at the start of a step, per sequence: the
main cache holds t_0..t_{m-1}; t_m is emitted but not cached ("pending"); the MTP cache holds its entries for
j = 1..m (entry j built from Embed[t_j] and the main hidden state h_{j-1}); `draft` is the MTP module's guess
for t_{m+1}. The main model verifies [t_m, draft] in one S = 2 decode step:
  accepted  -> emit draft and the bonus token the main model predicts after it; MTP adds entries m+1 and m+2;
  rejected  -> emit the main model's own token; the main cache forgets position m+1; MTP adds entry m+1.
The MTP module runs once per step over the verify pass's positions (Batch.with_tokens): when some drafts were
accepted, a rejected sequence also writes a placeholder entry at m+1, which the next step overwrites before any
query reads it (as it does the main cache's entry for the rejected draft).
Greedy acceptance (temperature 0) emits exactly the tokens plain greedy decoding emits. With temperature > 0 the
draft is accepted with probability min(1, p/q) and a rejected one is resampled from normalize(max(p - q, 0)), which
keeps the main model's distribution.

The cache is paged (contract v2): each sequence holds blocks from one `BlockPool` as it grows, and gives them back
the moment it is done. The pool starts with the prompts' blocks and grows (with the cache tensors, by a quarter at a
time, never past v1's worst case) when a sequence needs more, so nothing is reserved for `max_new_tokens` up
front. The MTP module's one-layer cache shares the main cache's block tables: its entries 1..m sit at positions 0..m-1, exactly as many as the main cache holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor

from core.batch import Batch, PagedCache
from core.engine.blocks import BlockPool, blocks_for
from core.errors import UserError
from core.model import Model


@dataclass
class GenerationResult:
    output_ids: list[list[int]]
    prompt_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    mtp_proposed: int = 0
    mtp_accepted: int = 0
    verify_steps: int = 0
    cache_bytes: int = 0  # peak bytes of the paged cache tensors (main + MTP)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


class Sampler:
    """Greedy at temperature 0 (first index on ties, torch.argmax's rule); otherwise an exponential race
    (argmax p / Exp(1), an exact categorical sample as in DeepSeek's generate.py) drawn from one CPU generator, so a
    seed gives the same tokens on every backend whose probabilities agree."""

    def __init__(self, temperature: float, seed: int):
        self.temperature = temperature
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: Tensor) -> Tensor:
        """softmax(logits / T), shifted by the row maximum first, so any accepted temperature gives a valid
        distribution: a tiny T puts all the mass on the maximum (greedy), never inf - inf = NaN."""
        x = logits.double().cpu()  # float64: even a subnormal T is a non-zero divisor
        x = x - x.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).min)
        return torch.softmax(x / self.temperature, dim=-1).float()

    def sample_probs(self, p: Tensor) -> list[int]:
        # An Exp(1) draw can be exactly 0; clamped, a zero-probability token can never win (0/0 would be NaN).
        race = torch.empty_like(p).exponential_(generator=self.gen).clamp_min_(torch.finfo(p.dtype).tiny)
        return (p / race).argmax(dim=-1).tolist()

    def pick(self, logits: Tensor) -> list[int]:
        if self.greedy:
            return logits.argmax(dim=-1).tolist()
        return self.sample_probs(self.probs(logits))

    def accept(self, p: Tensor, q: Tensor, draft: int) -> tuple[bool, int]:
        """Speculative sampling for one draft: (accepted, token emitted in place of the draft if not)."""
        ratio = float(p[draft] / q[draft]) if q[draft] > 0 else 0.0
        if float(torch.rand((), generator=self.gen)) < min(1.0, ratio):
            return True, draft
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        residual = residual / total if total > 0 else p
        return False, self.sample_probs(residual[None])[0]


@dataclass
class _Seq:
    prompt: list[int]
    out: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the main cache
    pending: int = -1  # emitted, not yet cached
    draft: int = -1
    draft_probs: Tensor | None = None
    done: bool = False


class Paging:
    """The block tables of a run's sequences over one growable `BlockPool`; every cache in `caches` (main, MTP)
    has the pool's size and is addressed by the same tables."""

    def __init__(self, pool: BlockPool, caches: list[PagedCache], max_blocks: int | None = None):
        """max_blocks: the most the pool ever needs (growth stops there); None: no bound."""
        self.pool, self.caches, self.max_blocks = pool, list(caches), max_blocks
        self.tables: dict[int, list[int]] = {}

    def add_cache(self, cache: PagedCache) -> None:
        cache.grow(self.pool.num_blocks)
        self.caches.append(cache)

    def reserve(self, seq: int, positions: int) -> list[int]:
        """Sequence `seq`'s block table, extended to hold `positions` positions (the pool grows when short)."""
        table = self.tables.setdefault(seq, [])
        need = self.pool.blocks_needed(positions) - len(table)
        if need > 0:
            if not self.pool.can_allocate(need):
                short = need - self.pool.num_free
                extra = max(short, -(-self.pool.num_blocks // 4))  # +25%: amortised copies, bounded waste
                if self.max_blocks is not None:
                    extra = max(short, min(extra, self.max_blocks - self.pool.num_blocks))
                self.pool.grow(extra)
                for cache in self.caches:
                    cache.grow(self.pool.num_blocks)
            table += self.pool.allocate(need)
        return table

    def release(self, seq: int) -> None:
        self.pool.free(self.tables.pop(seq, []))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


class Generator:
    def __init__(self, model: Model, prefill_chunk: int | None = None, block_size: int | None = None):
        """block_size: positions per cache block (None: the backend's preferred size; a size its manifest does
        not declare is refused in one line)."""
        self.model = model
        self.chunk = prefill_chunk
        self.cfg = model.cfg
        self.block_size = model.block_size(block_size)

    def new_paging(self, prompts: list[list[int]], max_new_tokens: int = 0) -> Paging:
        """A pool and main cache sized for the prompts (+2 positions each); both grow on demand, by a quarter at a
        time, never past what every sequence running to max_new_tokens needs (v1's reservation, block-rounded)."""
        blocks = max(sum(blocks_for(len(p) + 2, self.block_size) for p in prompts), 1)
        bound = max(sum(blocks_for(len(p) + max_new_tokens + 2, self.block_size) for p in prompts), blocks)
        return Paging(BlockPool(blocks, self.block_size), [self.model.new_cache(blocks, self.block_size)], bound)

    def check(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        vocab, limit = self.cfg.vocab_size, self.cfg.max_position_embeddings
        if max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
        for p in prompts:
            if not p:
                raise UserError("the prompt is empty")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
            if len(p) + max_new_tokens + 1 > limit:
                raise UserError(f"prompt ({len(p)} tokens) + --max-new-tokens ({max_new_tokens}) exceed "
                                f"max_position_embeddings ({limit}) of {self.cfg.source}")

    # -- prefill ---------------------------------------------------------------------------------------------------

    def _chunks(self, lengths: list[int]) -> Iterator[tuple[list[int], list[int], list[int]]]:
        """(active sequence indices, start offsets, chunk lengths) until every sequence is consumed."""
        done = [0] * len(lengths)
        step = self.chunk or max(lengths, default=0)
        while True:
            active = [b for b, n in enumerate(lengths) if done[b] < n]
            if not active:
                return
            sizes = [min(step, lengths[b] - done[b]) for b in active]
            yield active, [done[b] for b in active], sizes
            for b, n in zip(active, sizes):
                done[b] += n

    def _batch(self, paging: Paging, seqs: list[int], toks: list[list[int]], starts: list[int], decode: bool = False,
               position_offset: int = 0) -> Batch:
        tables = [paging.reserve(b, s + len(t)) for b, s, t in zip(seqs, starts, toks)]
        return Batch.build(toks, tables, starts, self.model.device, block_size=self.block_size, decode=decode,
                           position_offset=position_offset)

    def prefill(self, prompts: list[list[int]], paging: Paging) -> list[Tensor]:
        """Run the prompts through the main model (in chunks of `prefill_chunk` tokens if set); returns each
        sequence's final hidden states [n, D]. Sequence b's blocks are paging.tables[b]."""
        hidden: list[list[Tensor]] = [[] for _ in prompts]
        for active, starts, sizes in self._chunks([len(p) for p in prompts]):
            toks = [prompts[b][s:s + n] for b, s, n in zip(active, starts, sizes)]
            batch = self._batch(paging, active, toks, starts)
            h = self.model.forward(batch, paging.caches[0])
            for b, part in zip(active, h.split(sizes)):
                hidden[b].append(part)
        return [torch.cat(parts) for parts in hidden]

    def mtp_prefill(self, tokens: list[list[int]], prev_hidden: list[Tensor], paging: Paging,
                    cache: PagedCache) -> list[Tensor]:
        """Fill the MTP cache with entries j = 1..n (tokens t_1..t_n, hidden h_0..h_{n-1}); returns MTP hidden."""
        out: list[list[Tensor]] = [[] for _ in tokens]
        for active, starts, sizes in self._chunks([len(t) for t in tokens]):
            toks = [tokens[b][s:s + n] for b, s, n in zip(active, starts, sizes)]
            prev = torch.cat([prev_hidden[b][s:s + n] for b, s, n in zip(active, starts, sizes)])
            batch = self._batch(paging, active, toks, starts, position_offset=1)
            g = self.model.mtp_forward(batch, prev, cache)
            for b, part in zip(active, g.split(sizes)):
                out[b].append(part)
        return [torch.cat(parts) for parts in out]

    @torch.no_grad()
    def teacher_forced_logits(self, prompt: list[int]) -> Tensor:
        """[S, vocab] float32 logits of every prompt position."""
        self.check([prompt], 0)
        return self.model.logits(self.prefill([prompt], self.new_paging([prompt]))[0]).float()

    @torch.no_grad()
    def decode_logits(self, prompts: list[list[int]], steps: list[list[list[int]]]) -> list[Tensor]:
        """Prefill `prompts`, then run decode steps: steps[k][b] are the tokens sequence b appends in step k, all of
        them in one forward pass (two per sequence is MTP's verify step). Returns per step [B, S_k, vocab] float32
        logits, S_k tokens per sequence (the same for every sequence in a step)."""
        whole = [p + [t for step in steps for t in step[b]] for b, p in enumerate(prompts)]
        self.check(whole, 0)
        paging = self.new_paging(prompts, max(len(w) - len(p) for w, p in zip(whole, prompts)))
        self.prefill(prompts, paging)
        starts, out = [len(p) for p in prompts], []
        seqs = list(range(len(prompts)))
        for step in steps:
            batch = self._batch(paging, seqs, step, starts, decode=True)
            h = self.model.forward(batch, paging.caches[0])
            out.append(self.model.logits(h).float().view(len(prompts), len(step[0]), -1))
            starts = [s + len(t) for s, t in zip(starts, step)]
        return out

    # -- generation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 mtp: bool = False, stop_at_eos: bool = True) -> GenerationResult:
        self.check(prompts, max_new_tokens)
        if mtp and not self.model.has_mtp:
            raise UserError(f"--mtp: {self.cfg.source} has no MTP layer (num_nextn_predict_layers = "
                            f"{self.cfg.num_nextn_predict_layers}, or its weights are absent)")
        self.sampler = Sampler(temperature, seed)
        self.stop_ids = set(self.cfg.eos_token_ids) if stop_at_eos else set()
        self.max_new = max_new_tokens
        seqs = [_Seq(list(p), length=len(p)) for p in prompts]
        model = self.model
        paging = self.paging = self.new_paging(prompts, max_new_tokens)  # kept for inspection: all free at the end

        start = time.perf_counter()
        hidden = self.prefill(prompts, paging)
        first = self.sampler.pick(model.logits(torch.stack([h[-1] for h in hidden]))) if max_new_tokens else []
        for s, tok in zip(seqs, first):
            s.pending = tok
            self._emit(s, tok)
        if not max_new_tokens:
            for s in seqs:
                s.done = True
        mtp_cache = None
        if mtp and max_new_tokens:
            mtp_cache = model.new_cache(paging.pool.num_blocks, self.block_size, mtp=True)
            paging.add_cache(mtp_cache)
            g = self.mtp_prefill([s.prompt[1:] + [s.pending] for s in seqs], hidden, paging, mtp_cache)
            self._set_drafts(seqs, list(range(len(seqs))), model.logits(torch.stack([x[-1] for x in g])))
        prefill_seconds = time.perf_counter() - start

        result = GenerationResult([], sum(len(p) for p in prompts), prefill_seconds, 0, 0.0)
        start = time.perf_counter()
        while True:
            for b, s in enumerate(seqs):
                if s.done and b in paging.tables:
                    paging.release(b)  # blocks go back the moment a sequence ends
            active = [b for b, s in enumerate(seqs) if not s.done]
            if not active:
                break
            if mtp_cache is None:
                self._decode_step(seqs, active, paging)
            else:
                self._speculative_step(seqs, active, paging, mtp_cache, result)
            result.cache_bytes = max(result.cache_bytes, paging.nbytes)
        result.decode_seconds = time.perf_counter() - start
        result.cache_bytes = max(result.cache_bytes, paging.nbytes)
        result.output_ids = [s.out for s in seqs]
        result.decode_tokens = sum(max(len(s.out) - 1, 0) for s in seqs)
        return result

    def _emit(self, s: _Seq, tok: int) -> None:
        if s.done:
            return
        s.out.append(tok)
        if len(s.out) >= self.max_new or tok in self.stop_ids:
            s.done = True

    def _decode_step(self, seqs: list[_Seq], active: list[int], paging: Paging) -> None:
        batch = self._batch(paging, active, [[seqs[b].pending] for b in active], [seqs[b].length for b in active],
                            decode=True)
        nxt = self.sampler.pick(self.model.logits(self.model.forward(batch, paging.caches[0])))
        for b, tok in zip(active, nxt):
            s = seqs[b]
            s.length += 1
            s.pending = tok
            self._emit(s, tok)

    def _set_drafts(self, seqs: list[_Seq], rows: list[int], logits: Tensor) -> None:
        if self.sampler.greedy:
            for b, tok in zip(rows, logits.argmax(dim=-1).tolist()):
                seqs[b].draft = tok
            return
        q = self.sampler.probs(logits)
        for b, tok, qb in zip(rows, self.sampler.sample_probs(q), q):
            seqs[b].draft, seqs[b].draft_probs = tok, qb

    def _speculative_step(self, seqs: list[_Seq], active: list[int], paging: Paging, mtp_cache: PagedCache,
                          result: GenerationResult) -> None:
        """Verify every active sequence's [pending, draft] in one S = 2 pass, then draft the next tokens in ONE
        MTP pass over the same positions (reusing the verify batch's layout): S = 2 with tokens [draft, bonus]
        (accepted) or [correction, placeholder] (rejected; the placeholder's entry at position m+1 is overwritten
        by the next step before anything reads it, as the main cache's is), or S = 1 when every draft was rejected.
        A sequence's next draft comes from its last real entry (row 1 accepted, row 0 rejected)."""
        model = self.model
        n = len(active)
        starts = [seqs[b].length for b in active]
        batch = self._batch(paging, active, [[seqs[b].pending, seqs[b].draft] for b in active], starts, decode=True)
        h = model.forward(batch, paging.caches[0])  # [2n, D]
        logits = model.logits(h).view(n, 2, -1)
        if self.sampler.greedy:
            verdicts = logits.argmax(dim=-1).tolist()  # [[a, bonus], ...]
        else:
            p = self.sampler.probs(logits)
        mtp_tokens: list[list[int]] = []  # per row: the tokens of MTP entries m+1 and m+2 (or a placeholder)
        last: list[int] = []  # per row: 1 if the draft was accepted (next draft from entry m+2), else 0
        for i, b in enumerate(active):
            s = seqs[b]
            if self.sampler.greedy:
                ok, token = verdicts[i][0] == s.draft, verdicts[i][0]
            else:
                ok, token = self.sampler.accept(p[i, 0], s.draft_probs, s.draft)
            result.mtp_proposed += 1
            if ok:
                result.mtp_accepted += 1
                bonus = verdicts[i][1] if self.sampler.greedy else self.sampler.sample_probs(p[i, 1][None])[0]
                self._emit(s, s.draft)
                self._emit(s, bonus)
                s.length, s.pending = s.length + 2, bonus
                mtp_tokens.append([s.draft, bonus])
                last.append(1)
            else:
                self._emit(s, token)
                s.length, s.pending = s.length + 1, token
                mtp_tokens.append([token, s.draft])
                last.append(0)
        result.verify_steps += 1
        drafting = [i for i, b in enumerate(active) if not seqs[active[i]].done]
        if not drafting:
            return
        keep = 2 if any(last[i] for i in drafting) else 1
        toks = torch.tensor([t for row in mtp_tokens for t in row[:keep]], dtype=torch.int64, device=model.device)
        prev = h if keep == 2 else h.view(n, 2, -1)[:, 0].contiguous()
        g = model.mtp_forward(batch.with_tokens(toks, keep, position_offset=1), prev, mtp_cache).view(n, keep, -1)
        pick = [last[i] if keep == 2 else 0 for i in drafting]
        rows = g[torch.tensor(drafting, device=g.device), torch.tensor(pick, device=g.device)]
        self._set_drafts(seqs, [active[i] for i in drafting], model.logits(rows))
