"""Model level, on the embedded default model (every DeepSeek-V3 feature on): teacher-forced logits (relative error,
KL divergence, top-1 agreement), greedy continuations, and MTP speculative decoding against plain greedy decoding.
When a check fails, the backend's operators are tried one at a time (each alone, the rest cpu_ref in the same
numerics class) and the operators that reproduce the failure are named."""

from __future__ import annotations

import dataclasses
import zlib
from functools import lru_cache

import torch

from conformance import perplexity_checks
from conformance.compare import errors, kl_divergence
from conformance.context import FAIL, PASS, SKIP, CheckResult, Suite
from core.backend import Backend
from core.default_model import load_default
from core.dispatch import Dispatch
from core.generate import Generator
from core.model import Model
from core.ops import OPERATORS, WEIGHT_HOOK

PROMPT_LEN = 48
NEW_TOKENS = {"quick": 8, "full": 16, "gpu": 32}
MTP_NEW_TOKENS = 16  # ~25 drafts at the default's ~37% acceptance: both paths run (P(none accepted) ~ 1e-5)
LARGE_BATCH = {"quick": 0, "full": 11, "gpu": 24}
"""Prompts of PROMPT_LEN tokens prefilled in ONE batch by the batch check (in the first working dtype only, bfloat16
where declared): 11 x 48 = 528 tokens, past the largest token bucket of the in-tree tuning tables (the Triton MoE's
512-token bucket, the GEMMs' 128-row bucket), then decoded together. None in the quick set (the interpreter's time)."""
BATCH_NEW_TOKENS = 4  # the prefill's token, then decode steps of the whole batch (44 judged tokens)


@lru_cache(maxsize=1)
def _source():
    return load_default()


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(3, 259, (n - 1,), generator=g).tolist() for n in (PROMPT_LEN, 11)]


def _model(ops: Dispatch, device: torch.device, dtype: torch.dtype) -> Model:
    return Model.load(_source(), ops, device, dtype, with_mtp=True)


def isolate(suite: Suite, op: str) -> Dispatch:
    """A dispatch that takes only `op` (and its weight hook) from the backend, every other operator from cpu_ref
    in the numerics class the backend declares for it."""
    b, ref = suite.backend, suite.reference
    ops = {name: suite.reference_op(name) for name in OPERATORS}
    ops[op] = b.ops[op]
    hooks = {"prepare_linear": ref.prepare_linear, "prepare_experts": ref.prepare_experts}
    hook = WEIGHT_HOOK.get(op)
    if hook and hook in b.hooks():
        hooks[hook] = b.hooks()[hook]
    manifest = dataclasses.replace(b.manifest, operators={**ref.manifest.operators, **b.manifest.operators})
    hybrid = Backend(name=f"{b.name}[{op}]", device_type=b.device_type, dist_backend=b.dist_backend, probe=b.probe,
                     ops=ops, manifest=manifest, **hooks)
    return Dispatch(hybrid, ref)


class ModelLevel:
    def __init__(self, suite: Suite, dtype: torch.dtype):
        self.suite, self.dtype = suite, dtype
        self.dname = str(dtype).replace("torch.", "")
        self.limits = dict(suite.tolerances.model[self.dname])
        if any(suite.numerics(op) != "reference" for op in ("linear", "moe_experts")):
            self.limits.update(suite.tolerances.model["quantized"])
        self.near_tie = float(self.limits["near_tie"])
        self.prompts = _prompts(suite.seed ^ zlib.crc32(b"model"))
        self.new_tokens = NEW_TOKENS[suite.case_set]
        self.golden = _model(suite.golden_dispatch(), torch.device("cpu"), torch.float64)
        self.golden_logits = Generator(self.golden).teacher_forced_logits(self.prompts[0])
        g = torch.Generator().manual_seed(suite.seed ^ zlib.crc32(b"batch"))
        self.batch_prompts = [[0] + torch.randint(3, 259, (PROMPT_LEN - 1,), generator=g).tolist()
                              for _ in range(LARGE_BATCH[suite.case_set])]

    def _result(self, name: str, shape: str) -> CheckResult:
        return CheckResult("model", f"model/{name}/{self.dname}", name, SKIP, self.dname, shape,
                           tolerance_reason=self.limits["reason"], tolerance_source="conformance/tolerances.yaml")

    def _decisive(self, logits: torch.Tensor) -> torch.Tensor:
        top = logits.double().topk(2, dim=-1).values
        return (top[:, 0] - top[:, 1]) >= self.near_tie

    def logits_problem(self, ops: Dispatch) -> tuple[str, dict]:
        logits = Generator(_model(ops, self.suite.device, self.dtype)).teacher_forced_logits(self.prompts[0]).cpu()
        err = errors(logits, self.golden_logits)
        kl = kl_divergence(self.golden_logits, logits)
        decisive = self._decisive(self.golden_logits)
        agree = (logits.argmax(-1) == self.golden_logits.argmax(-1)) | ~decisive
        top1 = float(agree.double().mean())
        stats = {"rel": err.rel, "kl": kl, "top1": top1, "max_abs": err.max_abs, "max_rel": err.max_rel}
        bad = []
        if not err.rel <= self.limits["rel"]:
            bad.append(f"relative error {err.rel:.3g} > {self.limits['rel']}")
        if not kl <= self.limits["kl"]:
            bad.append(f"KL {kl:.3g} > {self.limits['kl']}")
        if not top1 >= self.limits["top1"]:
            bad.append(f"top-1 agreement {top1:.3f} < {self.limits['top1']}")
        return "; ".join(bad), stats

    def _agreement(self, prompts: list[list[int]], outs: list[list[int]]) -> tuple[float, int, str]:
        """(fraction of generated tokens that are golden's argmax on the sequence's own prefix, near-tie positions
        counting as agreeing; how many of those near-ties disagreed; the first real disagreement, or "")."""
        agree = total = ties = 0
        first = ""
        for index, (prompt, out) in enumerate(zip(prompts, outs)):
            golden = Generator(self.golden).teacher_forced_logits(prompt + out[:-1])[len(prompt) - 1:]
            decisive = self._decisive(golden).tolist()
            for i, (a, b, d) in enumerate(zip(out, golden.argmax(-1).tolist(), decisive)):
                total += 1
                if a == b or not d:
                    agree += 1
                    ties += a != b
                elif not first:
                    first = (f"first disagreement: sequence {index} (prompt of {len(prompt)}), token {i} is {a}, "
                             f"golden says {b}")
        return agree / total, ties, first

    def greedy_problem(self, ops: Dispatch) -> tuple[str, dict]:
        """The fraction of the backend's greedy tokens that are golden's argmax on the backend's own prefix (a
        near-tie position agrees either way)."""
        model = _model(ops, self.suite.device, self.dtype)
        outs = [Generator(model).generate([p], self.new_tokens, stop_at_eos=False).output_ids[0]
                for p in self.prompts]
        fraction, ties, first = self._agreement(self.prompts, outs)
        stats = {"greedy_agreement": fraction, "near_ties": ties}
        if fraction < self.limits["greedy"]:
            return f"greedy agreement {fraction:.3f} < {self.limits['greedy']}; {first}", stats
        return "", stats

    def batch_problem(self, ops: Dispatch) -> tuple[str, dict]:
        """Greedy decoding of many prompts in one batch (a prefill of more than 512 tokens, then decode steps of the
        whole batch), judged like `greedy_problem`: each token must be golden's argmax on the sequence's own
        prefix, near-ties either way."""
        model = _model(ops, self.suite.device, self.dtype)
        outs = Generator(model).generate(self.batch_prompts, BATCH_NEW_TOKENS, stop_at_eos=False).output_ids
        fraction, _, first = self._agreement(self.batch_prompts, outs)
        stats = {"batch_agreement": fraction, "sequences": len(outs),
                 "prefill_tokens": sum(len(p) for p in self.batch_prompts)}
        if fraction < self.limits["greedy"]:
            return f"batched greedy agreement {fraction:.3f} < {self.limits['greedy']}; {first}", stats
        return "", stats

    def verify_error(self, model: Model) -> float:
        """Relative error of a verify step's logits (two tokens per sequence in one decode pass, mla_decode with
        S = 2) against two plain decode steps' (S = 1) on the same tokens, every prompt in one batch. Tokens only
        change where a logit margin is small, so this is what catches a verify step that is wrong by a little (a
        missing causal mask between the two new tokens moved no greedy token in one try)."""
        g = torch.Generator().manual_seed(self.suite.seed ^ zlib.crc32(b"verify"))
        pairs = [torch.randint(3, 259, (2,), generator=g).tolist() for _ in self.prompts]
        gen = Generator(model)
        verify = gen.decode_logits(self.prompts, [pairs])[0]
        plain = torch.cat(gen.decode_logits(self.prompts, [[p[:1] for p in pairs], [p[1:] for p in pairs]]), dim=1)
        return errors(verify.cpu(), plain.cpu()).rel

    def mtp_problem(self, ops: Dispatch) -> tuple[str, dict]:
        """Greedy decoding with MTP drafts must emit plain greedy decoding's tokens (the default's MTP module is
        predictive, so drafts are both accepted and rejected). The verify step runs two tokens per sequence where plain
        decoding runs one, so a kernel that is not batch-invariant may round differently: a divergence is accepted
        only at a near-tie of the backend's own logits (a margin below `near_tie`). First the verify step's logits
        must equal two plain steps' within the logits tolerance (verify_error)."""
        model = _model(ops, self.suite.device, self.dtype)
        verify_rel = self.verify_error(model)
        if not verify_rel <= self.limits["rel"]:
            return (f"a verify step's logits (two tokens per sequence, mla_decode S = 2) differ from two plain decode "
                    f"steps' by {verify_rel:.3g} relative > {self.limits['rel']}"), {"verify_rel": verify_rel}
        proposed = accepted = ties = 0
        if self.suite.case_set == "quick":  # one batched plain run, one batched MTP run (the interpreter is slow)
            plains = Generator(model).generate(self.prompts, MTP_NEW_TOKENS, stop_at_eos=False).output_ids
            singles = []
        else:  # each prompt alone too
            plains = [Generator(model).generate([p], MTP_NEW_TOKENS, stop_at_eos=False).output_ids[0]
                      for p in self.prompts]
            singles = [Generator(model).generate([p], MTP_NEW_TOKENS, mtp=True, stop_at_eos=False)
                       for p in self.prompts]
        # all prompts in one batch: sequences accept and reject drafts in the same step
        batched = Generator(model).generate(self.prompts, MTP_NEW_TOKENS, mtp=True, stop_at_eos=False)
        for spec in singles + [batched]:
            proposed, accepted = proposed + spec.mtp_proposed, accepted + spec.mtp_accepted
        outputs = [(s.output_ids[0], i) for i, s in enumerate(singles)]
        outputs += [(out, i) for i, out in enumerate(batched.output_ids)]
        for got, index in outputs:
            prompt, plain = self.prompts[index], plains[index]
            if got == plain:
                continue
            i = next(j for j, (a, b) in enumerate(zip(got, plain)) if a != b)
            logits = Generator(model).teacher_forced_logits(prompt + plain[:i])[-1].double()
            top = logits.topk(2).values
            margin = float(top[0] - top[1])
            if margin >= self.near_tie:
                return (f"MTP output differs from plain greedy at token {i} (prompt of {len(prompt)}), where the "
                        f"backend's top-2 margin is {margin:.3g} >= {self.near_tie}: {got} vs {plain}"), {}
            ties += 1
        stats = {"verify_rel": verify_rel, "proposed": proposed, "accepted": accepted, "diverged_at_near_ties": ties}
        if not 0 < accepted < proposed:
            return f"the check needs both accepted and rejected drafts, got {accepted} of {proposed}", stats
        return "", stats

    def check(self, name: str, probe, bisect: bool) -> CheckResult:
        shape = f"embedded default, prompts of {[len(p) for p in self.prompts]}, {self.new_tokens} new tokens"
        r = self._result(name, shape)
        try:
            (problem, stats), r.seconds = self.suite.timed(probe, self.suite.dispatch)
        except Exception as e:
            problem, stats = f"raised {type(e).__name__}: {e}", {}
        r.rel_err, r.max_abs, r.max_rel = stats.get("rel"), stats.get("max_abs"), stats.get("max_rel")
        r.tolerance = self.limits.get("rel") if name == "logits" else None
        r.detail = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()
                             if k not in ("max_abs", "max_rel"))
        r.verdict = FAIL if problem else PASS
        if problem:
            r.detail = f"{problem} ({r.detail})" if r.detail else problem
            if bisect:
                r.culprits = self.bisect(probe)
                r.detail += ("; reproduced by " + ", ".join(r.culprits) if r.culprits
                             else "; no single operator reproduces it alone")
        return r

    def bisect(self, probe) -> list[str]:
        culprits = []
        for op in self.suite.backend.ops:
            if self.suite.backend.ops[op] is self.suite.reference_op(op):
                continue  # cpu_ref's own implementation: isolating it runs the reference alone, nothing to learn
            try:
                problem, _ = probe(isolate(self.suite, op))
            except Exception:
                problem = "raised"
            if problem:
                culprits.append(op)
        return culprits


def run(suite: Suite, bisect: bool = True) -> list[CheckResult]:
    missing = [op for op in OPERATORS if op not in suite.backend.ops]
    if missing:
        return [CheckResult("model", "model", "model", FAIL,
                            detail=f"needs every operator; {suite.backend.name} lacks {', '.join(missing)}")]
    results = []
    ops = [op for op in OPERATORS if op != "moe_gate"]  # the gate always sees float32 logits
    for dtype in suite.working_dtypes(ops):
        if str(dtype).replace("torch.", "") not in suite.tolerances.model:
            continue
        skip = suite.tolerances.lookup("linear", str(dtype).replace("torch.", ""), "reference", suite.mode_name)
        first = dtype == suite.working_dtypes(ops)[0]  # the batch check runs once, in the first (bf16) dtype
        names = ("logits", "greedy", "mtp") + (("batch",) if LARGE_BATCH[suite.case_set] and first else ())
        if skip.skip:
            for name in names:
                results.append(CheckResult("model", f"model/{name}/{str(dtype).replace('torch.', '')}", name, SKIP,
                                           str(dtype).replace("torch.", ""), detail=skip.reason))
            continue
        level = ModelLevel(suite, dtype)
        with torch.no_grad():
            results.append(level.check("logits", level.logits_problem, bisect))
            results.append(level.check("greedy", level.greedy_problem, bisect))
            results.append(level.check("mtp", level.mtp_problem, bisect))  # bisected like the others
            if "batch" in names:
                results.append(level.check("batch", level.batch_problem, bisect))
    return results + perplexity_checks.run(suite)
