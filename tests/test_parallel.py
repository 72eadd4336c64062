"""Tensor + expert parallelism (core.parallel) on this CPU machine: gloo, ranks on 127.0.0.1, launched by the test
(torchrun, or one process per rank with torchrun's environment variables), every launch bounded by a timeout and its
process group killed on the way out.

Against one process: float32 greedy tokens identical for 32 new tokens and teacher-forced logits within 1e-5
relative, on the embedded default (FP8) and on a transformers-written checkpoint; --mtp (speculative decoding gives
the plain greedy tokens); both MoE combine modes; two launchers with --nnodes 2 on loopback; a rank that fails to
load (a shard only rank 1 reads is unreadable) ends the run in under 30 s with one line. In-process: the pieces
(identity communicator, shard plan, sliced FP8 loading exact or refused under --strict, vocabulary lookup)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import MemoryCheckpoint
from core.default_model import load_default
from core.errors import UserError
from core.fp8 import dequantize_blocks, quantize_blocks
from core.parallel import ShardPlan, SingleProcess, Span
from core.parallel.loading import Split, read_weight_split
from core.parallel.vocab import masked_lookup
from tests.helpers import ROOT, build_hf, fresh_seed

NEW_TOKENS = 32
PROMPT = "5,6,7,8,9,10,11"
LAUNCH_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "60"}
    env.pop("DSV3_DEBUG", None)
    return {**env, **(extra or {})}


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int, str, str]]:
    """Wait for every process (each leads its own process group); kill all of them on timeout or error."""
    deadline = time.monotonic() + timeout
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return out


def _spawn(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def run_ranks(n: int, *args: str, timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
    """`python -m core.run ARGS` as n ranks with the environment torchrun gives them; [(status, stdout, stderr)]."""
    port = free_port()
    procs = [_spawn([sys.executable, "-m", "core.run", *args],
                    _env({"WORLD_SIZE": str(n), "RANK": str(r), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}))
             for r in range(n)]
    return _wait(procs, timeout)


def torchrun(nodes: int, per_node: int, *args: str, timeout: float = LAUNCH_TIMEOUT) -> list[tuple[int, str, str]]:
    """One `torchrun ... -m core.run ARGS` launcher per simulated node, all on the loopback address."""
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    procs = [_spawn([*launcher, "--nnodes", str(nodes), "--node-rank", str(node), "--nproc-per-node", str(per_node),
                     "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "core.run", *args], _env())
             for node in range(nodes)]
    return _wait(procs, timeout)


def single(*args: str) -> tuple[int, str, str]:
    return _wait([_spawn([sys.executable, "-m", "core.run", *args], _env())], LAUNCH_TIMEOUT)[0]


def report(result: tuple[int, str, str]) -> dict:
    status, out, err = result
    assert status == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def gen_args(tmp: Path, tag: str, *extra: str) -> list[str]:
    return ["--dtype", "float32", "--prompt-ids", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--ignore-eos",
            "--json", "--logits-out", str(tmp / f"{tag}.safetensors"), *extra]


def logits(tmp: Path, tag: str) -> torch.Tensor:
    return load_file(str(tmp / f"{tag}.safetensors"))["logits"]


def assert_same_run(tmp: Path, got: dict, want: dict, tag: str, want_tag: str) -> None:
    assert got["output_ids"] == want["output_ids"], "greedy tokens differ from one process"
    a, b = logits(tmp, tag), logits(tmp, want_tag)
    assert a.shape == b.shape
    rel = float((a.double() - b.double()).norm() / b.double().norm())
    assert rel < 1e-5, f"logits {rel:.3g} relative from one process"


# -- whole runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("par-default")
    return tmp, report(single(*gen_args(tmp, "one")))


def test_default_fp8_on_disk_two_ranks_all_reduce_equals_one_process(default_single):
    """The embedded default written as a sharded FP8 checkpoint: each rank reads its slices from the files."""
    from core.default_model import DEFAULT_CONFIG, checkpoint_tensors, float_state_dict, write_checkpoint

    tmp, one = default_single
    write_checkpoint(tmp / "fp8", checkpoint_tensors(float_state_dict()), DEFAULT_CONFIG, shards=3)
    results = run_ranks(2, *gen_args(tmp, "two", "--model", str(tmp / "fp8")))
    assert [s for s, _, _ in results] == [0, 0]
    assert results[1][1] == "" and results[1][2] == "", "only rank 0 prints"
    two = report(results[0])
    assert two["world_size"] == 2 and two["moe_combine"] == "all_reduce"
    assert any("dequantised" in n for n in two["notes"]), "splits that cut FP8 blocks are named"
    assert_same_run(tmp, two, one, "two", "one")


def test_default_four_ranks_all_to_all_with_mtp_under_torchrun(default_single):
    tmp, one = default_single
    results = torchrun(1, 4, *gen_args(tmp, "four", "--moe-combine", "all_to_all", "--mtp"))
    four = report(results[0])
    assert four["world_size"] == 4 and four["moe_combine"] == "all_to_all"
    assert four["mtp"]["proposed"] > 0, "MTP drafted tokens"
    assert_same_run(tmp, four, one, "four", "one")  # speculative decoding changes nothing in the tokens


def test_two_launchers_nnodes_2_on_loopback(default_single):
    tmp, one = default_single
    results = torchrun(2, 1, *gen_args(tmp, "nodes"))
    assert [s for s, _, _ in results] == [0, 0], results[1][2][-2000:]
    assert_same_run(tmp, report(results[0]), one, "nodes", "one")


def test_transformers_bf16_checkpoint_two_ranks_both_combines_and_mtp(tmp_path):
    """transformers writes the checkpoint; its tensors are then stored in bfloat16 (the FP8 case is the default)."""
    build_hf(tmp_path / "ckpt", fresh_seed())
    path = tmp_path / "ckpt" / "model.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(str(path)).items()},
              str(path), metadata={"format": "pt"})
    model = ["--model", str(tmp_path / "ckpt")]
    one = report(single(*gen_args(tmp_path, "one", *model)))
    a2a = run_ranks(2, *gen_args(tmp_path, "a2a", *model, "--moe-combine", "all_to_all", "--mtp"))
    assert_same_run(tmp_path, report(a2a[0]), one, "a2a", "one")
    ar = run_ranks(2, *gen_args(tmp_path, "ar", *model))
    assert_same_run(tmp_path, report(ar[0]), one, "ar", "one")


def test_a_rank_that_cannot_load_ends_every_rank_with_one_line(tmp_path):
    """Layer 1's experts 8..15, which only rank 1 reads, hold a NaN (every shard header is valid, so rank 0 loads
    its part without error): rank 1 fails its load check, and every rank ends with the same one line."""
    ckpt = tmp_path / "ckpt"
    build_hf(ckpt, fresh_seed(), mtp=False)
    tensors = load_file(str(ckpt / "model.safetensors"))
    theirs = sorted(k for k in tensors if any(f"layers.1.mlp.experts.{e}." in k for e in range(8, 16)))
    poisoned = next(k for k in theirs if k.endswith("down_proj.weight"))
    tensors[poisoned] = tensors[poisoned].clone()
    tensors[poisoned].view(-1)[3] = float("nan")
    save_file({k: v for k, v in tensors.items() if k not in theirs}, str(ckpt / "model-00001.safetensors"))
    save_file({k: tensors[k] for k in theirs}, str(ckpt / "model-00002.safetensors"))
    (ckpt / "model.safetensors").unlink()
    index = {k: "model-00002.safetensors" if k in theirs else "model-00001.safetensors" for k in tensors}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    start = time.monotonic()
    results = run_ranks(2, "--dtype", "float32", "--prompt-ids", "5,6", "--max-new-tokens", "2",
                        "--model", str(ckpt), timeout=120)
    elapsed = time.monotonic() - start
    assert [s for s, _, _ in results] == [2, 2], "every rank exits with the same status"
    lines = [line for _, out, err in results for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "rank 1" in lines[0] and "model-00002.safetensors" in lines[0] and poisoned in lines[0], lines[0]
    assert elapsed < 30, f"took {elapsed:.1f} s"


# -- the pieces, in process ------------------------------------------------------------------------------------------


def test_single_process_communicator_is_the_identity():
    comm = SingleProcess()
    x = torch.randn(3, 5)
    assert comm.all_reduce(x) is x and comm.all_gather(x, -1) is x and comm.all_to_all(x, [3]) is x
    with pytest.raises(ValueError):
        comm.all_to_all(x, [1, 2])


def test_shard_plan_covers_everything_once_and_refuses_what_does_not_divide():
    cfg = load_default().config
    for n in (1, 2, 4):
        plans = [ShardPlan.for_rank(cfg, r, n) for r in range(n)]
        for field, total in (("heads", cfg.num_attention_heads), ("experts", cfg.n_routed_experts),
                             ("vocab", cfg.vocab_size), ("dense_inter", cfg.intermediate_size)):
            spans = [getattr(p, field) for p in plans]
            assert [s.start for s in spans] == [i * total // n for i in range(n)] and spans[-1].stop == total
    with pytest.raises(UserError, match="num_attention_heads = 4 does not divide over 3 ranks"):
        ShardPlan.for_rank(cfg, 0, 3)


def _fp8_source(g, rows, cols):
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64).float()
    codes, scale = quantize_blocks(w)
    src = MemoryCheckpoint(load_default().config, {"w.weight": codes, "w.weight_scale_inv": scale}, "mem")
    return src, codes, scale


@pytest.mark.parametrize("dim", [0, 1])
def test_sliced_fp8_loading_keeps_blocks_or_dequantises_exactly(dim):
    g = torch.Generator().manual_seed(fresh_seed())
    rows, cols = 320, 384
    src, codes, scale = _fp8_source(g, rows, cols)
    exact = dequantize_blocks(codes, scale, torch.float32)
    total = (rows, cols)[dim]
    aligned = Span(128, 256, total)
    notes: list[str] = []
    w, s = read_weight_split(src, "w.weight", (rows, cols), Split(dim, aligned, 5), torch.float32, False, notes)
    assert w.dtype == torch.float8_e4m3fn and s is not None and not notes, "aligned split keeps FP8 codes"
    assert torch.equal(dequantize_blocks(w, s, torch.float32), exact.narrow(dim, 128, 128))
    cut = Span(64, 192, total)
    w, s = read_weight_split(src, "w.weight", (rows, cols), Split(dim, cut, 5), torch.float32, False, notes)
    assert s is None and w.dtype == torch.float32 and len(notes) == 1 and "w.weight" in notes[0]
    assert torch.equal(w, exact.narrow(dim, 64, 128)), "a cut block is dequantised exactly"
    with pytest.raises(UserError, match="--strict: w.weight"):
        read_weight_split(src, "w.weight", (rows, cols), Split(dim, cut, 5), torch.float32, True, [])


def test_vocab_parallel_lookup_sums_to_the_whole_table():
    g = torch.Generator().manual_seed(fresh_seed())
    table = torch.randn(12, 4, generator=g)
    tokens = torch.randint(0, 12, (9,), generator=g)
    parts = [masked_lookup(table[lo:lo + 4], tokens, lo) for lo in (0, 4, 8)]
    assert torch.equal(sum(parts), table[tokens])
