"""Model level, perplexity: bits per byte of the trained embedded default (core/default_checkpoint, loaded through
the checkpoint loader) on its held-out text, with the backend's operators against cpu_ref's in the same working
dtype and numerics class. A real model's loss is where a small systematic error (a mis-scaled rope, a dropped
expert, a wrong edge block) shows even when random-weight logits look alike.

The held-out text is shipped beside the weights (`heldout.json`: Python help topics the model never saw, cut out by
tools/default_corpus.py). Protocol, the same as tools/train_default.py's: each document is tokenised without
special tokens and cut into pieces of at most `window - 1` tokens; every piece is scored after a BOS; bits per byte
= the summed negative log2-likelihood of the pieces' tokens / the documents' UTF-8 bytes. The quick case set scores
the first QUICK_PIECES pieces (the Triton interpreter is slow), full and gpu every piece.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from conformance.context import FAIL, PASS, SKIP, CheckResult, Suite
from core.dispatch import Dispatch
from core.generate import Generator
from core.model import Model

QUICK_PIECES = 2
TOLERANCE_SOURCE = "conformance/tolerances.yaml"


@dataclass(frozen=True)
class HeldOut:
    pieces: tuple[tuple[int, ...], ...]  # each [BOS, t_1 .. t_n]
    nbytes: int  # UTF-8 bytes of the text the pieces' tokens spell


def checkpoint_dir() -> Path:
    from core.embedded import trained_dir

    return trained_dir()


@lru_cache(maxsize=4)
def held_out(directory: Path, max_pieces: int | None = None) -> HeldOut:
    """The held-out pieces of `directory`'s heldout.json, tokenised by its own tokenizer (core.engine.tokenizer);
    with `max_pieces`, the first that many. Bytes are counted per token (a byte-level BPE symbol is one byte), so a
    piece that ends inside a multi-byte character is counted exactly."""
    from core.engine.tokenizer import load_tokenizer

    data = json.loads((directory / "heldout.json").read_text(encoding="utf-8"))
    window = int(data["window"])
    tok = load_tokenizer(directory)
    pieces, nbytes = [], 0
    for text in data["documents"].values():
        ids = tok.encode(text, add_special_tokens=False)
        for i in range(0, len(ids), window - 1):
            if max_pieces is not None and len(pieces) == max_pieces:
                return HeldOut(tuple(pieces), nbytes)
            part = ids[i:i + window - 1]
            pieces.append((tok.bos_token_id, *part))
            nbytes += sum(len(tok.id_to_token(t)) for t in part)  # byte-level BPE: one symbol per byte
    return HeldOut(tuple(pieces), nbytes)


def bits_per_byte(model: Model, data: HeldOut) -> float:
    """Summed -log2 p(token) of every piece's tokens (teacher-forced, float32 log-softmax) / data.nbytes."""
    nats = 0.0
    gen = Generator(model)
    for piece in data.pieces:
        logits = gen.teacher_forced_logits(list(piece))[:-1].double().cpu()
        target = torch.tensor(piece[1:])
        nats -= float(logits.log_softmax(-1).gather(1, target[:, None]).sum())
    return nats / math.log(2) / data.nbytes


def measure(ops: Dispatch, device: torch.device, dtype: torch.dtype, data: HeldOut, directory: Path) -> float:
    model = Model.load(directory, ops, device, dtype, with_mtp=False)
    with torch.no_grad():
        return bits_per_byte(model, data)


def run(suite: Suite) -> list[CheckResult]:
    """One `model/perplexity/<dtype>` result per working dtype with a perplexity row in the tolerance table."""
    ops = ["rms_norm", "add_rms_norm", "apply_rope", "linear", "silu_and_mul", "attention_prefill", "moe_experts"]
    numerics = suite.numerics("linear")
    results = []
    try:
        directory = checkpoint_dir()
    except Exception as e:
        return [CheckResult("model", "model/perplexity", "perplexity", FAIL, detail=str(e))]
    data = held_out(directory, QUICK_PIECES if suite.case_set == "quick" else None)
    shape = f"trained default, {len(data.pieces)} held-out pieces, {sum(len(p) - 1 for p in data.pieces)} tokens"
    for dtype in suite.working_dtypes(ops):
        dname = str(dtype).replace("torch.", "")
        tol = suite.tolerances.lookup("perplexity", dname, numerics, suite.mode_name)
        r = CheckResult("model", f"model/perplexity/{dname}", "perplexity", SKIP, dname, shape,
                        tolerance=tol.rtol, tolerance_reason=tol.reason,
                        tolerance_source=tol.source or TOLERANCE_SOURCE)
        if tol.skip:
            r.detail = tol.reason
            results.append(r)
            continue
        try:
            want, _ = suite.timed(measure, suite.golden_dispatch(), torch.device("cpu"), dtype, data, directory)
            got, r.seconds = suite.timed(measure, suite.dispatch, suite.device, dtype, data, directory)
        except Exception as e:
            r.verdict, r.detail = FAIL, f"raised {type(e).__name__}: {e}"
            results.append(r)
            continue
        r.rel_err = abs(got - want) / want
        r.verdict = PASS if r.rel_err <= tol.rtol else FAIL
        r.detail = (f"{got:.4f} bits/byte, cpu_ref ({numerics}) {want:.4f}: relative difference {r.rel_err:.3g}"
                    + ("" if r.verdict == PASS else f" > {tol.rtol}"))
        results.append(r)
    return results
