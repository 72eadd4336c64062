"""Per-request sampling, vectorised over a batch of rows that each carry their own parameters.

One decode step of the engine, for B rows (a request may own several rows, e.g. MTP verification):

    samplers = [RequestSampler(params, prompt_ids, vocab_size), ...]        # one per request, kept across steps
    logprobs = process(logits, rows, extra)    # logits [B, V] -> processed log-probabilities [B, V] float32
    tokens = sample(logprobs, rows)            # int64 [B]: argmax for greedy rows, else an exponential race
    reason = sampler.append(token)             # updates the request's history; "stop" / "length" / None
    ok, tokens = accept(p_logprobs, q_logprobs, drafts, rows)   # speculative acceptance, one draft per row
    info = token_logprobs(logits, tokens, [s.params.logprobs for s in rows])   # raw log_softmax, top-N

`rows[i]` is the RequestSampler of row i; `extra[i]` lists tokens to treat as already emitted by that row (the
draft, when judging the bonus position of an MTP verify step), so each row is processed with its own history up to
its own position. An MTP verify step for requests R (pending token already appended, draft d_r drawn with
`sample(q, R)` from q = `process(mtp_logits, R)`):

    p = process(verify_logits [2n, V], [r for r in R for _ in (0, 1)], [e for r in R for e in ([], [d_r])])
    ok, tok = accept(p[0::2], q, drafts, R)     # tok = the draft where ok, else the replacement
    bonus = sample(p[1::2], R)                  # used for the rows where ok (draw it only for those, to save work)

Processing order (the distribution actually sampled from), each step a tensor op over the rows that need it:
  min_tokens (stop and EOS ids banned while fewer than `min_tokens` tokens are out) -> repetition penalty (prompt and
  output tokens: positive logits divided, others multiplied, as transformers and vLLM do) -> frequency and presence
  penalties (output tokens only, as OpenAI and vLLM: logit -= f * count + p * [count > 0]) -> temperature ->
  top_k (keeps every token tied with the k-th largest, as transformers and vLLM do) -> top_p (the smallest set of
  most likely tokens whose probability reaches top_p, the most likely token always kept, and tokens tied with the
  last one kept kept too, so the set never depends on token order; transformers and vLLM cut ties by sort order)
  -> min_p (keeps tokens with p >= min_p * p_max) -> log_softmax. top_k and top_p look at the TOP_PREFIX largest
  values (torch.topk) and fall back to a full sort only for rows those do not settle.

Greedy rows (temperature < GREEDY_BELOW, which includes 0; the same cut-off vLLM uses, and the floor DeepSeek's demo
puts under its temperature) get the one-hot distribution of the argmax of their penalised logits (first index on
ties, torch.argmax's rule). Sampled rows subtract their row maximum before dividing by the temperature, so every
accepted temperature yields finite, normalised log-probabilities. Logits that contain NaN or +inf, or a row with no
finite logit left, raise `InvalidLogits` naming the rows (the caller aborts those requests; no other row's result
depends on them, see `invalid_rows`).

Randomness: every request owns a CPU `torch.Generator` seeded from `SamplingParams.seed` (or from the OS when None).
A row's draws come only from its own generator and depend only on its own log-probabilities, so a seeded request
gives the same tokens whatever else is in the batch, on every backend whose probabilities agree.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch import Tensor

from core.engine.logprobs import TokenLogprobs, token_logprobs  # noqa: F401  (part of this module's API)
from core.engine.sampling_params import GREEDY_BELOW, MAX_LOGPROBS, SamplingParams  # noqa: F401  (likewise)

TOP_PREFIX = 1024  # top_k / top_p look at this many largest values first (a full sort of V only when they do not do)
_TINY, _HUGE = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


class InvalidLogits(ValueError):
    """Some rows' logits cannot be sampled from (NaN, +inf, or no finite value). `rows` lists them."""

    def __init__(self, message: str, rows: list[int]):
        super().__init__(message)
        self.rows = rows


# -- per-request state ----------------------------------------------------------------------------------------------

class RequestSampler:
    """One request's sampling state, kept by the engine for the request's lifetime: its parameters, its generator,
    its prompt and output token ids, and (only when it has penalties) its prompt-token mask and output-token counts
    as [V] tensors on the logits' device, updated one token at a time.

    The generator is a CPU torch.Generator seeded with `seed` (params.seed, or 64 random bits from the OS)."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int):
        self.params = params.validate().check_vocab(vocab_size)
        self.vocab_size = vocab_size
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.generator = torch.Generator().manual_seed(self.seed)
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self._stop_ids = params.stop_ids
        self._prompt_mask: Tensor | None = None  # bool [V]
        self._counts: Tensor | None = None  # float32 [V]

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def append(self, token: int) -> str | None:
        """Record an emitted token. Returns the finish reason it causes: "stop" (a stop or EOS token, once
        min_tokens are out), "length" (max_tokens reached) or None. Stop strings are checked elsewhere."""
        self.output_ids.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        n = len(self.output_ids)
        if token in self._stop_ids and n > self.params.min_tokens:
            return "stop"
        if self.params.max_tokens is not None and n >= self.params.max_tokens:
            return "length"
        return None

    def penalty_state(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(prompt-token mask bool [V], output-token counts float32 [V]) on `device`, built on first use."""
        if self._counts is None or self._counts.device != torch.device(device):
            self._prompt_mask = _id_mask(self.prompt_ids, self.vocab_size, device)
            self._counts = _id_counts(self.output_ids, self.vocab_size, device)
        return self._prompt_mask, self._counts


def _id_mask(ids: Sequence[int], vocab: int, device) -> Tensor:
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if ids:
        mask[torch.tensor(list(ids), dtype=torch.long, device=device)] = True
    return mask


def _id_counts(ids: Sequence[int], vocab: int, device) -> Tensor:
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    if ids:
        counts.index_add_(0, torch.tensor(list(ids), dtype=torch.long, device=device),
                          torch.ones(len(ids), dtype=torch.float32, device=device))
    return counts


# -- processing -----------------------------------------------------------------------------------------------------

def invalid_rows(logits: Tensor) -> list[int]:
    """Rows of `logits` [B, V] that cannot be sampled from: any NaN or +inf, or no finite value (one pass: the row
    maximum is NaN, +inf or -inf exactly then, since torch's max propagates NaN)."""
    return (~torch.isfinite(logits.amax(dim=-1))).nonzero().flatten().tolist()


def _raise_invalid(logits: Tensor, rows: list[int], when: str) -> None:
    nan = [r for r in rows if bool(torch.isnan(logits[r]).any())]
    inf = [r for r in rows if r not in nan and bool(torch.isposinf(logits[r]).any())]
    empty = [r for r in rows if r not in nan and r not in inf]
    parts = [f"{what} in rows {rs}" for what, rs in (("NaN", nan), ("+inf", inf), ("no finite value", empty)) if rs]
    raise InvalidLogits(f"logits {when} cannot be sampled: {'; '.join(parts)}", rows)


def _col(values: Sequence[float], device, dtype=torch.float32) -> Tensor:
    return torch.tensor(list(values), dtype=dtype, device=device)[:, None]


def _process(logits: Tensor, params: Sequence[SamplingParams], num_outputs: Sequence[int],
             penalty_rows: list[int], prompt_mask: Tensor | None, counts: Tensor | None) -> Tensor:
    """The processing pipeline (module docstring). `penalty_rows` index the rows with penalties; `prompt_mask`
    (bool) and `counts` (float32) are their [len(penalty_rows), V] histories."""
    if logits.dim() != 2 or len(params) != logits.shape[0]:
        raise ValueError(f"logits must be [B, V] with one SamplingParams per row, got {tuple(logits.shape)} "
                         f"and {len(params)} params")
    bad = invalid_rows(logits)
    if bad:
        _raise_invalid(logits, bad, "from the model")
    dev, vocab = logits.device, logits.shape[1]
    x = logits.to(torch.float32, copy=True)

    # min_tokens: ban stop and EOS ids while too few tokens are out
    ban_r, ban_t = [], []
    for r, (p, n) in enumerate(zip(params, num_outputs)):
        if n < p.min_tokens:
            ids = [t for t in p.stop_ids if t < vocab]
            ban_r += [r] * len(ids)
            ban_t += ids
    if ban_r:
        x[torch.tensor(ban_r, device=dev), torch.tensor(ban_t, device=dev)] = -math.inf
        bad = invalid_rows(x)
        if bad:
            _raise_invalid(x, bad, "after banning stop tokens until min_tokens")

    if penalty_rows:
        pr = torch.tensor(penalty_rows, device=dev)
        sub = x[pr]
        rep = _col([params[r].repetition_penalty for r in penalty_rows], dev).clamp(_TINY, _HUGE)  # 0/inf in fp32
        freq = _col([params[r].frequency_penalty for r in penalty_rows], dev)
        pres = _col([params[r].presence_penalty for r in penalty_rows], dev)
        seen = prompt_mask | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub = sub - freq * counts - pres * (counts > 0).float()
        x[pr] = sub.clamp(max=_HUGE)  # a tiny penalty may overflow a seen token to +inf: it stays the most likely
        bad = invalid_rows(x)
        if bad:  # every token seen and pushed to -inf by a huge penalty
            _raise_invalid(x, bad, "after the penalties")

    out = torch.empty_like(x)
    greedy = [r for r, p in enumerate(params) if p.greedy]
    if greedy:
        g = torch.tensor(greedy, device=dev)
        one_hot = torch.full((len(greedy), vocab), -math.inf, device=dev)
        one_hot.scatter_(1, x[g].argmax(dim=-1, keepdim=True), 0.0)
        out[g] = one_hot
    rows = [r for r, p in enumerate(params) if not p.greedy]
    if rows:
        s = torch.tensor(rows, device=dev)
        out[s] = _truncated_logprobs(x[s], [params[r] for r in rows])
    return out


def _truncated_logprobs(x: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Temperature -> top_k -> top_p -> min_p -> log_softmax for sampled rows; x [n, V] float32, finite maxima."""
    dev, vocab = x.device, x.shape[1]
    temps = _col([p.temperature for p in params], dev).clamp(max=_HUGE)  # above fp32's range: inf, and -inf/inf
    x = (x - x.amax(dim=-1, keepdim=True)) / temps  # the max is now 0
    trunc = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1]
    if len(trunc) == len(params):
        x = x.masked_fill(x < _keep_threshold(x, params), -math.inf)
    elif trunc:
        t = torch.tensor(trunc, device=dev)
        xt = x[t]
        x[t] = xt.masked_fill(xt < _keep_threshold(xt, [params[i] for i in trunc]), -math.inf)
    if any(p.min_p > 0 for p in params):
        floor = _col([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], dev)
        x = x.masked_fill(x < floor, -math.inf)
    return torch.log_softmax(x, dim=-1)


def _keep_threshold(x: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """[n, 1]: the smallest value top_k and top_p keep in each row of x [n, V] (temperature applied).

    Both are thresholds on the value, so tokens tied with the last kept one are kept too, whatever their order
    (top_k as transformers and vLLM; top_p the same way, which differs from an index-ordered cut only at exact
    ties). Rows are judged on their TOP_PREFIX largest values (torch.topk, not a full sort of V) whenever those
    hold top_k and reach top_p's mass; the others get a full sort. The result is the same either way."""
    dev, vocab = x.device, x.shape[1]
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = _col([p.top_p for p in params], dev)
    out = torch.empty(len(params), 1, device=dev)
    short = min(TOP_PREFIX, vocab)
    rows = torch.arange(len(params), device=dev)
    if short < vocab:
        fits = [i for i, p in enumerate(params) if 0 < p.top_k <= short or p.top_k >= vocab or p.top_k <= 0]
        rows = torch.tensor(fits, device=dev, dtype=torch.long)
        if fits:
            xf = x if len(fits) == len(params) else x[rows]
            thr, covered = _threshold_on(xf, xf.topk(short, dim=-1).values, ks[rows], top_p[rows])
            out[rows] = thr
            rows = rows[~covered]
        rest = sorted(set(range(len(params))) - set(fits))
        rows = torch.cat([rows, torch.tensor(rest, device=dev, dtype=torch.long)])
    if len(rows):
        xs = x[rows]
        out[rows] = _threshold_on(xs, xs.sort(dim=-1, descending=True).values, ks[rows], top_p[rows])[0]
    return out


def _threshold_on(x: Tensor, vals: Tensor, ks: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """(threshold [n, 1], covered bool [n]) from the largest values `vals` [n, K] (descending) of rows x [n, V]:
    covered says the K values settle the row (its top_k is within K, and their mass reaches top_p)."""
    big = vals.shape[1]
    kth = torch.where(ks[:, None] <= big, vals.gather(1, (ks.clamp(max=big) - 1)[:, None]), -math.inf)
    kept = x.masked_fill(x < kth, -math.inf) if bool((ks < x.shape[1]).any()) else x
    log_total = torch.logsumexp(kept, dim=-1, keepdim=True)  # normaliser of the top_k distribution
    probs = torch.exp(vals.masked_fill(vals < kth, -math.inf) - log_total)
    cum = torch.cumsum(probs, dim=-1)
    n_keep = ((cum - probs) < top_p).sum(-1, keepdim=True)  # tokens whose more likely ones have < top_p mass
    thr = torch.where(top_p < 1, torch.maximum(vals.gather(1, n_keep - 1), kth), kth)
    top_k_within = (ks <= big) | (ks >= x.shape[1])  # the k-th value is among vals, or there is no top_k
    covered = top_k_within & ((top_p[:, 0] >= 1) | (cum[:, -1] >= top_p[:, 0]))
    return thr, covered


def process_logits(logits: Tensor, params: Sequence[SamplingParams], prompt_ids: Sequence[Sequence[int]],
                   output_ids: Sequence[Sequence[int]]) -> Tensor:
    """Processed log-probabilities [B, V] float32 of logits [B, V] (any float dtype, any device), row b judged
    with `params[b]` and its history (`prompt_ids[b]`, `output_ids[b]`). The stateless form of `process`."""
    vocab, dev = logits.shape[-1], logits.device
    pen = [r for r, p in enumerate(params) if p.has_penalties]
    mask = torch.stack([_id_mask(prompt_ids[r], vocab, dev) for r in pen]) if pen else None
    counts = torch.stack([_id_counts(output_ids[r], vocab, dev) for r in pen]) if pen else None
    return _process(logits, params, [len(o) for o in output_ids], pen, mask, counts)


def process(logits: Tensor, rows: Sequence[RequestSampler], extra: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Processed log-probabilities [B, V] float32 of logits [B, V]: row b with `rows[b]`'s parameters and history,
    plus `extra[b]` (tokens counted as already emitted by that row; default none)."""
    extra = extra if extra is not None else [()] * len(rows)
    dev = logits.device
    pen = [r for r, s in enumerate(rows) if s.params.has_penalties]
    mask = counts = None
    if pen:
        states = [rows[r].penalty_state(dev) for r in pen]
        mask = torch.stack([m for m, _ in states])
        counts = torch.stack([c for _, c in states])
        ex_r = [i for i, r in enumerate(pen) for _ in extra[r]]
        if ex_r:
            ex_t = [t for r in pen for t in extra[r]]
            counts.index_put_((torch.tensor(ex_r, device=dev), torch.tensor(ex_t, device=dev)),
                              torch.ones(len(ex_r), device=dev), accumulate=True)
    num_out = [len(s.output_ids) + len(e) for s, e in zip(rows, extra)]
    return _process(logits, [s.params for s in rows], num_out, pen, mask, counts)


def greedy_tokens(logits: Tensor, rows: Sequence[RequestSampler],
                  extra: Sequence[Sequence[int]] | None = None) -> list[int] | None:
    """The tokens `sample(process(logits, rows, extra), rows)` gives, without processing, when every row is greedy
    with nothing that changes its logits first (no penalties, no min_tokens ban due: at least min_tokens out,
    counting `extra`): each row's argmax, the first maximum on ties, exactly as the one-hot `process` builds.
    Invalid rows raise InvalidLogits as `process` does. None when some row needs `process` (the caller then runs
    it). Greedy `accept` needs no draft distribution, so a greedy engine step skips processing altogether."""
    extra = extra if extra is not None else [()] * len(rows)
    if not all(s.params.greedy and not s.params.has_penalties and len(s.output_ids) + len(e) >= s.params.min_tokens
               for s, e in zip(rows, extra)):
        return None
    bad = invalid_rows(logits)
    if bad:
        _raise_invalid(logits, bad, "from the model")
    return logits.argmax(dim=-1).tolist()


# -- drawing --------------------------------------------------------------------------------------------------------

def _race(logprobs: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """Exponential race, argmax(p / E) with E ~ Exp(1) iid: an exact categorical draw per row of logprobs [n, V].

    Row i draws one E per token of its support (its finite logprobs, in token order) from generators[i] alone, on
    the CPU; the draws are then moved to the logits' device. Tokens outside the support cannot win."""
    support = torch.isfinite(logprobs)
    sizes = support.sum(-1).tolist()
    draws = torch.cat([torch.empty(n).exponential_(generator=g) for n, g in zip(sizes, generators)])
    draws = draws.to(logprobs.device).clamp_min(torch.finfo(torch.float32).tiny)  # an E of 0 would win anyway
    if sum(sizes) == logprobs.numel():  # every token of every row is possible: no scatter needed
        noise = draws.view(logprobs.shape)
    else:
        noise = torch.full_like(logprobs, math.inf).masked_scatter_(support, draws)
    return (logprobs - noise.log()).argmax(dim=-1)  # log(p / E); -inf outside the support


def sample(logprobs: Tensor, rows: Sequence[RequestSampler]) -> Tensor:
    """One token per row (int64 [B], on the logprobs' device) from processed logprobs [B, V]: the argmax for
    greedy rows (no random draw), an exponential race with the row's generator otherwise."""
    tokens = logprobs.argmax(dim=-1)
    sampled = [r for r, s in enumerate(rows) if not s.greedy]
    if sampled:
        s = torch.tensor(sampled, device=logprobs.device)
        tokens[s] = _race(logprobs[s], [rows[r].generator for r in sampled])
    return tokens


def accept(target: Tensor, draft: Tensor, draft_tokens: Tensor | Sequence[int],
           rows: Sequence[RequestSampler]) -> tuple[Tensor, Tensor]:
    """Speculative acceptance of one draft token per row.

    target, draft: processed logprobs [B, V] (p of the main model, q of the MTP module that proposed the draft,
    both processed with the row's parameters and its history up to the draft's position); draft_tokens [B].
    Returns (accepted bool [B], token int64 [B]): the draft where accepted, otherwise the replacement.

    Greedy rows accept iff the draft is the target's argmax, and the replacement is that argmax. Sampled rows
    accept with probability min(1, p/q) (one uniform from the row's generator) and otherwise draw the replacement
    from normalize(max(p - q, 0)) (from p itself if that is all zero); the emitted token is then distributed
    exactly as p. A draft that q gives no mass is rejected."""
    dev = target.device
    drafts = torch.as_tensor(draft_tokens, dtype=torch.long, device=dev).reshape(-1)
    best = target.argmax(dim=-1)
    ok = drafts == best
    tokens = best.clone()
    sampled = [r for r, s in enumerate(rows) if not s.greedy]
    if sampled:
        s = torch.tensor(sampled, device=dev)
        d = drafts[s][:, None]
        lp, lq = target[s].gather(1, d)[:, 0], draft[s].gather(1, d)[:, 0]
        u = torch.stack([torch.rand((), generator=rows[r].generator) for r in sampled]).to(dev)
        ok_s = (u < torch.exp(lp - lq)) & torch.isfinite(lq)
        ok[s] = ok_s
        tokens[s] = drafts[s]
        rejected = [r for r, a in zip(sampled, ok_s.tolist()) if not a]
        if rejected:
            j = torch.tensor(rejected, device=dev)
            p, q = target[j].exp(), draft[j].exp()
            residual = (p - q).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
            tokens[j] = _race(residual.log(), [rows[r].generator for r in rejected])
    tokens[ok] = drafts[ok]
    return ok, tokens
