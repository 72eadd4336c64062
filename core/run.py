"""`python -m core.run`: generate with a DeepSeek-V3-class model on any backend, through the engine.

    python -m core.run                                      # the embedded default, cpu_ref, bfloat16, greedy
    python -m core.run --model DIR --backend cuda --prompt "Hello" --max-new-tokens 64 --stream
    python -m core.run --chat [--system TEXT]               # interactive, multi-turn, through the chat template
    python -m core.run --input-file prompts.txt|.jsonl [--output-file out.jsonl]   # a batch, outputs as JSONL
    python -m core.run --plan 8,16                          # memory per rank from config.json, loads nothing
    torchrun --nproc-per-node N -m core.run ...             # tensor + expert parallel over N ranks (core.parallel)

Sampling defaults come from the checkpoint's generation_config.json (greedy without one), then from the flags. Bad
input ends with one line on stderr naming what is wrong and exit status 2 (set DSV3_DEBUG=1 for tracebacks); the
cheap checks (tokenizer, prompt length, output paths) run before any weight is read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator

import torch

from core import registry
from core.backend import RunMode, choose_block_size
from core.engine.options import (OneLineParser, add_engine_options, add_model_options, check_engine_options,
                                 engine_config, resolve_backend)
from core.errors import ContractError, UserError
from core.parallel import launch
from core.run_inputs import (DEFAULT_PROMPT, parse_ids, parse_prompt_ids, prepare_jobs,  # noqa: F401
                             sampling_overrides, system_messages)
from core.safe_files import StagedFile, check_output_target, one_line, quote_name

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m core.run", description="Generate with a DeepSeek-V3-class model.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model and backend")
    add_model_options(m)
    m.add_argument("--list-backends", action="store_true", help="list discovered backends and whether they run here")
    m.add_argument("--plan", metavar="N[,N...]", help="print parameters, weight bytes per rank for N ranks and "
                   "latent-cache bytes per token from config.json alone, and exit (reads no weights)")

    i = p.add_argument_group("input and output")
    g = i.add_mutually_exclusive_group()
    g.add_argument("--prompt", help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    g.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin (/reset, /exit)")
    g.add_argument("--input-file", type=Path, help="a text file (one prompt per line) or JSONL ({\"prompt\": ...} or "
                   "{\"messages\": [...]} per line); outputs are JSONL")
    i.add_argument("--output-file", type=Path, help="with --input-file: write the JSONL here (default: stdout)")
    i.add_argument("--system", help="system prompt for --chat (and for text prompts with --use-chat-template)")
    i.add_argument("--use-chat-template", action="store_true", help="wrap --prompt / --input-file text lines in the "
                   "chat template as one user message")
    i.add_argument("--stream", action="store_true", help="print text as it is generated")
    i.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    i.add_argument("--logits-out", type=Path, help="write float32 teacher-forced prompt logits [S, V] here")

    s = p.add_argument_group("sampling (defaults: generation_config.json, else greedy)")
    s.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=32,
                   help="tokens to generate at most")
    s.add_argument("--min-tokens", type=int, help="tokens to generate before EOS or a stop token may end it")
    s.add_argument("--temperature", type=float, help="0 is greedy")
    s.add_argument("--top-p", type=float, help="nucleus sampling: keep the most likely tokens up to this mass")
    s.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 or -1: all)")
    s.add_argument("--min-p", type=float, help="keep tokens with p >= min_p * p_max")
    s.add_argument("--repetition-penalty", type=float, help="> 1 discourages prompt and output tokens")
    s.add_argument("--frequency-penalty", type=float, help="[-2, 2], per occurrence in the output")
    s.add_argument("--presence-penalty", type=float, help="[-2, 2], once per token present in the output")
    s.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    s.add_argument("--stop-token-ids", help="comma-separated token ids that end generation")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    s.add_argument("--seed", type=int, default=0, help="random seed of every request")
    s.add_argument("--logprobs", type=int, help="return the sampled token's logprob and the N most likely (0-20)")

    e = p.add_argument_group("engine")
    add_engine_options(e)
    e.add_argument("--prefill-chunk", type=int, help="prefill at most N tokens per step (sets the per-step budget)")
    e.add_argument("--moe-combine", default="all_reduce", choices=["all_reduce", "all_to_all"],
                   help="under torchrun: combine routed experts by all_reduce of partial sums or all_to_all dispatch")
    args = p.parse_args(argv)
    if args.temperature is not None and (not math.isfinite(args.temperature) or args.temperature < 0):
        raise UserError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 <= args.seed < 2 ** 63:
        raise UserError(f"--seed must be in [0, 2^63), got {args.seed}")
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_engine_options(args)
    resolve_backend(args)
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        raise UserError(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.logits_out is not None and args.logits_out.suffix != ".safetensors":
        raise UserError(f"--logits-out: {quote_name(str(args.logits_out))} must end in .safetensors")
    if args.output_file is not None and args.input_file is None:
        raise UserError("--output-file goes with --input-file")
    return args


def list_backends(mode: RunMode) -> str:
    """One line per discovered backend: available, unavailable (why), or broken (its error, in one line)."""
    lines = []
    for name, found in sorted(registry.discover().items()):
        try:
            avail = registry.probe(registry.load(name), mode)
            state = f"available on {avail.device}" if avail.ok else f"unavailable: {one_line(avail.reason)}"
        except (UserError, ContractError) as e:
            state = f"broken: {one_line(e)}"
        lines.append(f"{one_line(name):10s} {state}  [{one_line(found.origin)}]")
    return "\n".join(lines)


def stage_logits(path: Path, logits: torch.Tensor) -> StagedFile:
    """Write the logits under a temporary name beside `path`; the caller commits it once the run succeeded."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    staged = StagedFile(path, "--logits-out")
    staged.write_with(lambda tmp: save_file({"logits": logits.contiguous().cpu()}, tmp), (SafetensorError,))
    return staged


def main(argv: list[str] | None = None) -> int:
    from core.checkpoint import read_config
    from core.default_model import load_default
    from core.engine.llm import default_sampling
    from core.tokenizer import for_checkpoint

    args = parse_args(argv)
    mode = RunMode(interpret=args.interpret, simulate=args.simulate)
    if args.model is None and not args.list_backends:
        from core.embedded import embedded_model_dir

        args.model = embedded_model_dir()  # None: the generated model (DSV3_EMBEDDED=generated)
    if args.list_backends:
        print(list_backends(mode))
        return 0
    cfg = load_default().config if args.model is None else read_config(args.model)
    if args.plan is not None:
        from core.plan import format_plan, plan

        worlds = parse_ids(args.plan, "--plan")
        if not worlds or min(worlds) < 1:
            raise UserError(f"--plan: rank counts must be >= 1, got {args.plan!r}")
        print(format_plan(plan(cfg), worlds, "fp8" if cfg.fp8 else "bf16", "bfloat16", None))
        return 0

    # Cheap checks, before any weight is read.
    tokenizer = for_checkpoint(args.model)
    params = default_sampling(args.model, **sampling_overrides(args))
    if args.output_file is not None:
        check_output_target(args.output_file, "--output-file")
    if args.logits_out is not None:
        check_output_target(args.logits_out, "--logits-out")
    jobs = prepare_jobs(args, tokenizer, cfg)
    limit = args.max_model_len or cfg.max_position_embeddings
    where = "--max-model-len" if args.max_model_len else f"max_position_embeddings of {cfg.source}"
    for ids, _ in jobs:
        if len(ids) + args.max_new_tokens > limit:
            raise UserError(f"prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) exceed the "
                            f"context length ({limit} tokens, {where})")
    backend, avail = registry.activate(args.backend, mode)  # an unavailable backend fails here, before the weights
    choose_block_size(backend, args.block_size)  # so does a block size its mla_decode does not take

    par = launch.from_environment(backend, avail.device, args.moe_combine, args.strict)  # one process: no-op
    try:
        if args.chat and par.world_size > 1:
            raise UserError("--chat reads the terminal of one process; under torchrun use --prompt or --input-file")
        return run(args, params, jobs, tokenizer, par)
    finally:
        launch.shutdown()


def run(args: argparse.Namespace, params, jobs, tokenizer, par) -> int:
    """Load (each rank its shard) and generate; under torchrun every rank runs the same engine on the same inputs
    (logits are all-gathered, so greedy or seeded sampling picks the same tokens everywhere), and a failure on any
    rank ends every rank with the same one line (`par.agree`)."""
    from core.engine.llm import LLM

    config = engine_config(args, args.prefill_chunk)
    if jobs:  # every request is known: the cache never needs more than they can use (each block partly empty)
        config.max_cache_positions = sum(len(ids) + args.max_new_tokens + 2 for ids, _ in jobs)
    llm = par.agree("loading", lambda: LLM(
        args.model, backend=args.backend, dtype=args.dtype, strict=args.strict, interpret=args.interpret,
        simulate=args.simulate, engine=config, tokenizer=tokenizer, check_weights=not args.no_check_weights,
        parallel=par))
    if args.chat:
        return chat_loop(llm, params, args)
    if args.input_file is not None:
        return par.agree("generation", lambda: run_batch(llm, params, jobs, args, par))
    return par.agree("generation", lambda: run_one(llm, params, jobs[0][0], args, par))


# -- the three ways to run -----------------------------------------------------------------------------------------

def run_one(llm, params, prompt_ids: list[int], args: argparse.Namespace, par) -> int:
    from core.generate import Generator

    staged = None
    if args.logits_out is not None:
        logits = Generator(llm.model).teacher_forced_logits(prompt_ids)  # every rank: the forward is collective
        staged = stage_logits(args.logits_out, logits) if par.is_first else None
    try:
        code = _generate_one(llm, params, prompt_ids, args, par)
        if staged is not None:
            staged.commit()  # renamed into place only after the run succeeded
    finally:
        if staged is not None:
            staged.discard()  # nothing left behind by a failed run (a no-op after the commit)
    return code


def _generate_one(llm, params, prompt_ids: list[int], args: argparse.Namespace, par) -> int:
    if args.max_new_tokens == 0:
        final = None
    else:
        final = None
        for out in llm.stream(prompt_ids, params):
            if args.stream and out.new_text:
                print(out.new_text, end="", flush=True)
            final = out
        if args.stream:
            print()
        if final is not None and final.error:
            raise UserError(final.error)
    output = final.token_ids if final is not None else []
    text = final.text if final is not None else ""
    ttft = final.time_to_first_token if final is not None else None
    prefill_tps = len(prompt_ids) / ttft if ttft else 0.0
    decode_s = (final.seconds - ttft) if final is not None and ttft else 0.0
    decode_tps = (len(output) - 1) / decode_s if decode_s > 0 and len(output) > 1 else 0.0
    cfg, dtype = llm.model.cfg, llm.model.dtype
    report = {
        "backend": llm.backend.name,
        "device": str(llm.device),
        "world_size": par.world_size,
        "communicator": par.comm.describe(),
        "moe_combine": args.moe_combine,
        "dtype": args.dtype,
        "model": str(args.model) if args.model else "embedded default",
        "dispatch": llm.ops.table(),
        "prompt_ids": prompt_ids,
        "output_ids": output,
        "text": text if llm.tokenizer is not None else None,
        "finish_reason": final.finish_reason if final is not None else "length",
        "prefill_tokens_per_s": round(prefill_tps, 2),
        "decode_tokens_per_s": round(decode_tps, 2),
        "load_seconds": round(llm.load_seconds, 3),
        "latent_cache_bytes_per_token_per_layer": cfg.latent_width * torch.finfo(dtype).bits // 8,
        "cache_block_size": llm.engine.block_size,
        "cache_bytes": llm.engine.cache_bytes,
        "cache_peak_bytes_used": llm.engine.stats.peak_blocks_used * llm.engine.block_size * llm.engine.bytes_per_token,
        "interpret": args.interpret,
        "simulate": args.simulate,
        "notes": llm.model.w.notes,
    }
    if final is not None and final.logprobs is not None:
        report["logprobs"] = [{"token": t.token, "logprob": t.logprob, "top": t.top} for t in final.logprobs]
    if args.mtp:
        proposed, accepted = (final.drafts_proposed, final.drafts_accepted) if final is not None else (0, 0)
        report["mtp"] = {"proposed": proposed, "accepted": accepted,
                         "acceptance": round(accepted / proposed, 4) if proposed else None}
    if args.logits_out is not None:
        report["logits_out"] = str(args.logits_out)

    choice = f" ({args.backend_choice})" if args.backend_choice else ""
    print(f"backend {llm.backend.name}{choice} on {llm.device} ({args.dtype}); model: {report['model']}")
    print(llm.ops.format_table())
    if par.world_size > 1:
        print(f"parallel: {par.comm.describe()}, MoE combine {args.moe_combine}")
    for note in llm.model.w.notes:
        print(f"note: {note}")
    print(f"prompt: {len(prompt_ids)} tokens; generated {len(output)} tokens")
    print(f"output ids: {output}")
    if llm.tokenizer is not None:
        print(f"text: {text!r}")
    line = f"prefill {prefill_tps:.1f} tokens/s, decode {decode_tps:.1f} tokens/s"
    if args.mtp:
        line += f", MTP accepted {report['mtp']['accepted']}/{report['mtp']['proposed']} drafts"
    print(line)
    if args.json:
        print(json.dumps(report))
    return 0


def run_batch(llm, params, jobs, args: argparse.Namespace, par) -> int:
    """Every request of --input-file in one continuous batch; one JSON line per request, in input order."""
    per_request = [params.merged(**{k: v for k, v in extra.items() if k != "id"}) for _, extra in jobs]
    outs = llm.generate([ids for ids, _ in jobs], per_request)
    errors = [(n, o.error) for n, o in enumerate(outs) if o.error]
    for n, error in errors:
        print(f"error: input {n + 1}: {one_line(error)}", file=sys.stderr)
    lines = []
    for n, ((ids, extra), out) in enumerate(zip(jobs, outs)):
        lines.append(json.dumps({"id": extra.get("id", n), "prompt_ids": ids, "output_ids": out.token_ids,
                                 "text": out.text if llm.tokenizer is not None else None,
                                 "finish_reason": out.finish_reason, **({"error": out.error} if out.error else {})},
                                ensure_ascii=False))
    body = "\n".join(lines) + "\n"
    if args.output_file is None:
        sys.stdout.write(body)
    elif par.is_first:
        with StagedFile(args.output_file, "--output-file") as staged:
            staged.write(body.encode("utf-8"))
            staged.commit()
        print(f"wrote {len(lines)} outputs to {args.output_file}", file=sys.stderr)
    return 2 if errors else 0


def input_lines(prompt: str) -> Iterator[str]:
    while True:
        if sys.stdin.isatty():
            print(prompt, end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def chat_loop(llm, params, args: argparse.Namespace) -> int:
    """Multi-turn chat on stdin: each line is a user turn; the reply streams to stdout, then a blank line.
    `/reset` forgets the history (the system prompt stays), `/exit` or end of input ends."""
    history = system_messages(args.system)
    print(f"chat with {args.model or 'the embedded default'} on {llm.backend.name} ({args.dtype}); "
          "/reset clears the history, /exit ends", file=sys.stderr)
    for line in input_lines("> "):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            history = system_messages(args.system)
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        for out in llm.stream(params=params, messages=history):
            print(out.new_text, end="", flush=True)
            reply = out.text
        print("\n", flush=True)
        history.append({"role": "assistant", "content": reply})
    return 0


def run_cli(main_fn, argv: list[str] | None = None) -> int:
    """Run a CLI entry point: user errors become one line on stderr and exit status 2."""
    try:
        return main_fn(argv)
    except (UserError, ContractError) as e:
        if os.environ.get("DSV3_DEBUG"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)  # exactly one line, whatever a message holds
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run_cli(main))
