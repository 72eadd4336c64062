"""`LLM`: the Python API on the engine, for scripts and for `core.run`.

    from core.engine.llm import LLM
    from core.engine.sampling import SamplingParams

    llm = LLM()                                              # the embedded default, default backend, bfloat16
    llm = LLM("/path/to/DeepSeek-V3", backend="cuda", mtp=True)
    outs = llm.generate(["Hello", "The assert statement"], SamplingParams(temperature=0.6, top_p=0.95, max_tokens=64))
    outs = llm.chat([[{"role": "user", "content": "Hi"}]])   # through the checkpoint's chat template
    for delta in llm.stream("Hello", SamplingParams(max_tokens=32)):
        print(delta.new_text, end="", flush=True)

Defaults for sampling come from the checkpoint's generation_config.json (DeepSeek-V3: temperature 0.6, top_p 0.95),
then from what the caller passes; without a temperature there (or without the file) the default is greedy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from core import registry
from core.backend import RunMode
from core.dispatch import Dispatch
from core.engine.engine import Engine, EngineConfig, RequestOutput
from core.engine.sampling import SamplingParams
from core.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

Prompt = str | Sequence[int]


class LLM:
    """A loaded model and its engine. `model`: a checkpoint directory, or None for the embedded default
    (core.embedded); `backend`:
    None picks what core.run picks (core.registry.default_backend)."""

    def __init__(self, model: str | Path | None = None, *, backend: str | None = None, dtype: str = "bfloat16",
                 strict: bool = False, interpret: bool = False, simulate: bool = False,
                 engine: EngineConfig | None = None, tokenizer: Any = "auto", check_weights: bool = True,
                 parallel: Any = None):
        from core.default_model import load_default
        from core.model import Model
        from core.tokenizer import for_checkpoint

        if dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
        if model is None:
            from core.embedded import embedded_model_dir

            model = embedded_model_dir()  # the trained default; None: the generated one (DSV3_EMBEDDED=generated)
        self.model_dir = Path(model) if model is not None else None
        mode = RunMode(interpret=interpret, simulate=simulate)
        if backend is None:  # as core.run and core.serve choose: cpu without an accelerator, else the reference
            backend = registry.default_backend()[0]
        self.backend, avail = registry.activate(backend, mode)
        self.ops = Dispatch(self.backend, registry.load(registry.REFERENCE), strict=strict, numerics=avail.numerics)
        self.device = avail.device
        self.engine_config = engine or EngineConfig()
        self.tokenizer = for_checkpoint(self.model_dir) if tokenizer == "auto" else tokenizer
        t0 = time.perf_counter()
        source = load_default() if self.model_dir is None else self.model_dir
        if parallel is not None:  # core.parallel.Parallel: this rank's shard, on its own device
            self.device = parallel.device or self.device
        progress = None
        if parallel is not None:
            from core.parallel.launch import load_progress

            progress = load_progress(parallel)  # rank 0's loading progress on a terminal
        self.model = Model.load(source, self.ops, self.device, DTYPES[dtype], with_mtp=self.engine_config.mtp,
                                check_weights=check_weights, parallel=parallel, progress=progress)
        self.load_seconds = time.perf_counter() - t0
        eos = set(self.model.cfg.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.engine = Engine(self.model, self.tokenizer, self.engine_config, frozenset(eos))

    # -- sampling defaults -----------------------------------------------------------------------------------------

    def sampling(self, **overrides: Any) -> SamplingParams:
        """generation_config.json's defaults (greedy without one), then `overrides` (None = not given)."""
        return default_sampling(self.model_dir, **overrides)

    # -- prompts ---------------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise UserError(f"{self.model_dir} has no tokenizer.json: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise UserError(f"{self.model_dir} has no tokenizer.json, so no chat template")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    # -- generation ------------------------------------------------------------------------------------------------

    def _submit(self, prompts: list[list[int]], params: SamplingParams | Sequence[SamplingParams] | None
                ) -> list[str]:
        if params is None or isinstance(params, SamplingParams):
            params = [params or self.sampling()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(params)} sampling parameter sets")
        for ids, p in zip(prompts, params):  # every check before anything is queued
            self.engine.check(ids, p.validate())
        return [self.engine.add(ids, p) for ids, p in zip(prompts, params)]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for one prompt or many (text, or token ids), all in one continuous batch; outputs in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = self._submit([self.encode(p) for p in prompts], params)
        final = self.engine.run()
        return [final[i] for i in ids]

    def chat(self, conversations: Any, params: SamplingParams | Sequence[SamplingParams] | None = None
             ) -> list[RequestOutput]:
        """Generate the assistant's reply to one conversation (a list of {role, content}) or to several."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        ids = self._submit([self.encode_chat(c) for c in conversations], params)
        final = self.engine.run()
        return [final[i] for i in ids]

    def stream(self, prompt: Prompt | None = None, params: SamplingParams | None = None, *,
               messages: Any = None) -> Iterator[RequestOutput]:
        """One request, its outputs as they come (`new_text`, `new_token_ids`); the last has `finished` set."""
        ids = self.encode_chat(messages) if messages is not None else self.encode(prompt)
        (rid,) = self._submit([ids], params)
        try:
            yield from self.engine.stream({rid})
        finally:
            self.engine.abort(rid)  # a consumer that stops early frees the request's blocks


def default_sampling(model_dir: Path | None, **overrides: Any) -> SamplingParams:
    """Sampling defaults of a checkpoint: greedy, unless its generation_config.json sets a temperature (and not
    `do_sample: false`), with its top_p, top_k, min_p and repetition penalty; then `overrides` (None = not given).
    DeepSeek-V3's own file sets temperature 0.6 and top_p 0.95; the one transformers writes by default sets none,
    so such a checkpoint decodes greedily, as transformers' generate() does."""
    config = model_dir / "generation_config.json" if model_dir is not None else None
    greedy = SamplingParams(temperature=0.0)
    if config is not None and os.path.lexists(config):
        return SamplingParams.from_generation_config(config, base=greedy, **overrides)
    return greedy.merged(**overrides)
