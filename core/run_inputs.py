"""The requests of `python -m core.run`, built and checked before any weight is read: prompts from the command
line or an input file (text, or JSONL of prompts or chat messages with per-request sampling fields), encoded with
the checkpoint's tokenizer, and the sampling overrides the flags give."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.errors import UserError

DEFAULT_PROMPT = "DeepSeek-V3 runs on every accelerator"


def parse_prompt_ids(text: str) -> list[int]:
    return parse_ids(text, "--prompt-ids")


def parse_ids(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UserError(f"{option}: expected comma-separated integers, got {text!r}") from None


def read_input_file(path: Path) -> list[dict[str, Any]]:
    """Requests from a text file (one prompt per non-empty line) or JSONL (objects with "prompt" or "messages",
    optionally "max_tokens", "temperature", ... as OpenAI names them)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"--input-file: cannot read {path} ({e.strerror or e})") from None
    text = data.decode("utf-8", errors="replace")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"--input-file: {path} holds no prompt")
    if path.suffix != ".jsonl":
        return [{"prompt": line} for _, line in lines]
    out = []
    for n, line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--input-file: {path} line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise UserError(f"--input-file: {path} line {n}: expected an object with either \"prompt\" or "
                            "\"messages\"")
        out.append(obj)
    return out


REQUEST_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                  "presence_penalty", "stop", "stop_token_ids", "ignore_eos", "seed", "logprobs", "min_tokens"}


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_new_tokens or None, min_tokens=args.min_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                frequency_penalty=args.frequency_penalty, presence_penalty=args.presence_penalty, stop=args.stop,
                stop_token_ids=parse_ids(args.stop_token_ids, "--stop-token-ids") if args.stop_token_ids else None,
                ignore_eos=args.ignore_eos or None, seed=args.seed, logprobs=args.logprobs)


def prepare_jobs(args: argparse.Namespace, tokenizer, cfg) -> list[tuple[list[int], dict[str, Any]]]:
    """(prompt ids, per-request overrides) of every request, encoded now so a bad prompt fails before loading."""
    def need_tokenizer(what: str):
        if tokenizer is None:
            raise UserError(f"{what}: {args.model} has no tokenizer.json; pass --prompt-ids")

    def text_prompt(text: str) -> list[int]:
        need_tokenizer("--prompt")
        if args.use_chat_template:
            return tokenizer.apply_chat_template(system_messages(args.system) + [{"role": "user", "content": text}])
        return tokenizer.encode(text)

    jobs: list[tuple[list[int], dict[str, Any]]] = []
    if args.chat:
        need_tokenizer("--chat")
        tokenizer.require_chat_template()
        return jobs
    if args.input_file is not None:
        for n, obj in enumerate(read_input_file(args.input_file), 1):
            unknown = sorted(set(obj) - REQUEST_FIELDS - {"prompt", "messages", "id"})
            if unknown:
                raise UserError(f"--input-file: request {n}: unknown field {unknown[0]!r}")
            if "messages" in obj:
                need_tokenizer("--input-file")
                ids = tokenizer.apply_chat_template(obj["messages"])
            elif isinstance(obj["prompt"], list):
                ids = [int(t) for t in obj["prompt"]]
            else:
                ids = text_prompt(str(obj["prompt"]))
            jobs.append((ids, {k: v for k, v in obj.items() if k in REQUEST_FIELDS | {"id"}}))
    elif args.prompt_ids is not None:
        jobs.append((parse_prompt_ids(args.prompt_ids), {}))
    else:
        jobs.append((text_prompt(args.prompt if args.prompt is not None else DEFAULT_PROMPT), {}))
    vocab = cfg.vocab_size
    for ids, _ in jobs:
        if not ids:
            raise UserError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise UserError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    return jobs


def system_messages(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []
