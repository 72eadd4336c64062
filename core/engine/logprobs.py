"""Logprobs of emitted tokens under the model's raw distribution (as vLLM returns them by default)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor


@dataclass
class TokenLogprobs:
    """The emitted token's logprob and rank (1 = most likely) and the `top` (token, logprob) pairs, most likely
    first, all of the model's raw distribution."""

    token: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def token_logprobs(logits: Tensor, tokens: Tensor | Sequence[int], num_top: Sequence[int | None]) -> list[
        TokenLogprobs | None]:
    """Logprobs of the emitted tokens under the RAW distribution log_softmax(logits) (float32), not the processed
    one, as vLLM returns by default: what the model believed, independent of temperature and truncation (a token
    sampled after top_p still gets its finite model logprob). logits [B, V]; tokens [B]; num_top[b] is the row's
    `logprobs` parameter (None: no entry for that row, N: the N most likely tokens too)."""
    want = [r for r, n in enumerate(num_top) if n is not None]
    result: list[TokenLogprobs | None] = [None] * len(num_top)
    if not want:
        return result
    dev = logits.device
    w = torch.tensor(want, device=dev)
    lp = torch.log_softmax(logits[w].float(), dim=-1)
    tok = torch.as_tensor(tokens, dtype=torch.long, device=dev).reshape(-1)[w]
    chosen = lp.gather(1, tok[:, None])
    ranks = (lp > chosen).sum(-1) + 1
    n_max = max(num_top[r] for r in want)
    top_v, top_i = lp.topk(n_max, dim=-1) if n_max else (lp[:, :0], lp[:, :0].long())
    top_v, top_i, chosen, ranks, tok = (t.cpu().tolist() for t in (top_v, top_i, chosen[:, 0], ranks, tok))
    for i, r in enumerate(want):
        n = num_top[r]
        result[r] = TokenLogprobs(tok[i], chosen[i], ranks[i], list(zip(top_i[i][:n], top_v[i][:n])))
    return result
