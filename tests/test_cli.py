"""`python -m core.run`: the JSON report, --logits-out, tokenisation, sampling with a seed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from core.default_model import load_default
from core.generate import Generator
from core.tokenizer import ByteTokenizer
from tests.helpers import ROOT, load_ours, run_cli, run_main

KEYS = {"backend", "device", "dispatch", "prompt_ids", "output_ids", "text", "prefill_tokens_per_s",
        "decode_tokens_per_s"}


def report(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_run_as_a_user_types_it():
    """The README's first command, in a fresh interpreter: no arguments at all."""
    result = run_cli("core.run")
    assert result.returncode == 0, result.stderr
    assert "decode" in result.stdout and "tokens/s" in result.stdout
    # no accelerator on the CI machine: the fast cpu backend is the default, and the output says why
    assert "backend cpu (default: no accelerator here) on cpu" in result.stdout


def test_json_report_has_the_documented_keys():
    r = report(run_main("core.run", "--prompt", "hello", "--max-new-tokens", "5", "--json"))
    assert KEYS <= set(r)
    assert r["backend"] == "cpu" and r["device"] == "cpu"  # the default without an accelerator
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


# -- the engine's CLI: chat, batch input, streaming, help -----------------------------------------------------------

def test_chat_keeps_history_and_streams_each_reply():
    """Driven through stdin as a user would pipe it; every reply is what the engine gives the same conversation."""
    from core.engine.engine import EngineConfig
    from core.engine.llm import LLM
    from core.engine.sampling import SamplingParams

    turns = ["Hello there", "/reset", "Hi", "And again"]
    proc = subprocess.run([sys.executable, "-m", "core.run", "--chat", "--system", "Be brief.", "--dtype", "float32",
                           "--max-new-tokens", "6", "--ignore-eos"], input="\n".join(turns) + "\n/exit\n",
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    replies = proc.stdout.split("\n\n")[:3]
    llm = LLM(dtype="float32", engine=EngineConfig(max_num_seqs=4))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    system = [{"role": "system", "content": "Be brief."}]
    first = llm.chat(system + [{"role": "user", "content": "Hello there"}], params)[0].text
    history = system + [{"role": "user", "content": "Hi"}]
    second = llm.chat(history, params)[0].text
    history += [{"role": "assistant", "content": second}, {"role": "user", "content": "And again"}]
    third = llm.chat(history, params)[0].text
    assert replies == [first, second, third]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_input_file_of_20_prompts_gives_jsonl_in_order(tmp_path, kind):
    from core.engine.engine import EngineConfig
    from core.engine.llm import LLM
    from core.engine.sampling import SamplingParams

    prompts = [f"prompt number {i} " + "x" * (i % 7) for i in range(20)]
    src = tmp_path / f"in.{kind}"
    if kind == "txt":
        src.write_text("\n".join(prompts) + "\n")
    else:
        src.write_text("\n".join(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": p}]})
                                 for i, p in enumerate(prompts)) + "\n")
    out = tmp_path / "out.jsonl"
    r = run_main("core.run", "--input-file", str(src), "--output-file", str(out), "--dtype", "float32",
                 "--max-new-tokens", "4", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 20 and all(len(row["output_ids"]) == 4 for row in rows)
    llm = LLM(dtype="float32", engine=EngineConfig(max_num_seqs=4))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in (0, 7, 19):
        ids = llm.encode(prompts[i]) if kind == "txt" else llm.encode_chat([{"role": "user", "content": prompts[i]}])
        assert rows[i]["prompt_ids"] == ids
        assert rows[i]["output_ids"] == llm.generate([ids], params)[0].token_ids
    if kind == "jsonl":
        assert [row["id"] for row in rows] == [f"r{i}" for i in range(20)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "out.jsonl"])


def test_stream_prints_the_same_text_as_json():
    args = ("--dtype", "float32", "--max-new-tokens", "10", "--ignore-eos", "--prompt", "Stream me")
    streamed = run_main("core.run", *args, "--stream")
    final = report(run_main("core.run", *args, "--json"))
    assert streamed.returncode == 0
    assert streamed.stdout.startswith(final["text"] + "\n")


def test_bad_inputs_fail_before_the_weights_load(tmp_path):
    cases = [
        (("--input-file", str(tmp_path / "missing.txt")), "--input-file"),
        (("--prompt", "x", "--max-new-tokens", "5000"), "exceed the context length"),
        (("--prompt", "x", "--top-p", "0"), "top_p"),
        (("--output-file", str(tmp_path / "o.jsonl")), "--output-file goes with --input-file"),
        (("--prompt", "x", "--logits-out", str(tmp_path / "nodir" / "l.safetensors")), "does not exist"),
        (("--prompt", "x", "--kv-cache-memory", "lots"), "--kv-cache-memory"),
    ]
    for args, needle in cases:
        r = run_main("core.run", *args)
        assert r.returncode == 2 and needle in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)


def test_help_has_a_line_for_every_option():
    r = subprocess.run([sys.executable, "-m", "core.run", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0
    for option in ("--chat", "--system", "--input-file", "--stream", "--top-p", "--top-k", "--min-p", "--stop",
                   "--repetition-penalty", "--frequency-penalty", "--presence-penalty", "--logprobs",
                   "--kv-cache-memory", "--block-size", "--max-num-seqs", "--plan", "--mtp", "--json"):
        assert f"\n  {option}" in r.stdout, option
    assert "(default: 32)" in r.stdout
