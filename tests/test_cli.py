"""`python -m core.run`: the JSON report, --logits-out, tokenisation, sampling with a seed."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from core.default_model import load_default
from core.generate import Generator
from core.tokenizer import ByteTokenizer
from tests.helpers import load_ours, run_cli, run_main

KEYS = {"backend", "device", "dispatch", "prompt_ids", "output_ids", "text", "prefill_tokens_per_s",
        "decode_tokens_per_s"}


def report(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_run_as_a_user_types_it():
    """The README's first command, in a fresh interpreter: no arguments at all."""
    result = run_cli("core.run")
    assert result.returncode == 0, result.stderr
    assert "cpu_ref" in result.stdout and "decode" in result.stdout and "tokens/s" in result.stdout


def test_json_report_has_the_documented_keys():
    r = report(run_main("core.run", "--prompt", "hello", "--max-new-tokens", "5", "--json"))
    assert KEYS <= set(r)
    assert r["backend"] == "cpu_ref" and r["device"] == "cpu"
    assert r["prompt_ids"] == ByteTokenizer().encode("hello")
    assert len(r["output_ids"]) == 5 and isinstance(r["text"], str)
    assert r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["latent_cache_bytes_per_token_per_layer"] == (128 + 32) * 2


def test_logits_out_holds_float32_teacher_forced_logits(tmp_path):
    out = tmp_path / "logits.safetensors"
    ids = [0] + torch.randint(3, 259, (17,)).tolist()
    r = report(run_main("core.run", "--dtype", "float32", "--prompt-ids", ",".join(map(str, ids)),
                        "--max-new-tokens", "1", "--logits-out", str(out), "--json"))
    logits = load_file(str(out))["logits"]
    assert logits.dtype == torch.float32 and logits.shape == (len(ids), 512)
    want = Generator(load_ours(load_default())).teacher_forced_logits(ids)
    assert torch.allclose(logits, want, rtol=1e-5, atol=1e-5)
    assert r["output_ids"][0] == int(logits[-1].argmax())
    assert [p.name for p in tmp_path.iterdir()] == ["logits.safetensors"], "no temporary file left behind"


def test_sampling_is_seeded():
    args = ("--max-new-tokens", "12", "--temperature", "1.0", "--json", "--prompt-ids", "0,40,41,42")
    a = report(run_main("core.run", *args, "--seed", "3"))["output_ids"]
    b = report(run_main("core.run", *args, "--seed", "3"))["output_ids"]
    others = {tuple(report(run_main("core.run", *args, "--seed", str(s)))["output_ids"]) for s in (4, 5, 6)}
    assert a == b, "the same seed gives the same tokens"
    assert len(others | {tuple(a)}) > 1, "other seeds do not all give the same 12 sampled tokens"


def test_prefill_chunk_gives_the_same_tokens():
    args = ("--dtype", "float32", "--max-new-tokens", "8", "--json")
    assert report(run_main("core.run", *args))["output_ids"] == \
        report(run_main("core.run", *args, "--prefill-chunk", "5"))["output_ids"]


def test_list_backends_shows_cpu_ref():
    r = run_main("core.run", "--list-backends")
    assert r.returncode == 0 and "cpu_ref" in r.stdout and "available on cpu" in r.stdout
