"""The trained embedded default (core/default_checkpoint, written by tools/train_default.py): it loads through our
checkpoint loader with every DeepSeek-V3 feature on; our greedy tokens equal transformers' on the shipped directory
(float32); its tokenizer and chat template work through core.engine and agree with transformers'; `core.run` without
--model uses it; the training script itself trains (a few steps on a tiny config) and reproduces the start of the
shipped run."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import read_config
from core.embedded import EMBEDDED_DIR, trained_dir
from core.engine.tokenizer import load_tokenizer
from core.fp8 import dequantize_blocks
from core.generate import Generator
from tests.helpers import load_ours, refused, run_main
from tests.tokenizer_fixtures import hf_tokenizer

PROMPT = "The assert statement"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def ours():
    return load_ours(trained_dir(), torch.float32, with_mtp=True)


def prompts() -> list[list[int]]:
    """The README's prompt and the start of a held-out document (text the model never trained on)."""
    tok = load_tokenizer(EMBEDDED_DIR)
    docs = json.loads((EMBEDDED_DIR / "heldout.json").read_text(encoding="utf-8"))["documents"]
    return [tok.encode(PROMPT)] + [tok.encode(text[:60]) for text in list(docs.values())[:1]]


def test_shipped_directory_is_a_small_fp8_checkpoint_with_every_feature(ours):
    cfg = read_config(EMBEDDED_DIR)
    assert cfg.fp8 and cfg.q_lora_rank and cfg.num_nextn_predict_layers == 1 and cfg.first_k_dense_replace == 1
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.n_shared_experts >= 1
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor > 1 and cfg.rope_interleave
    tensors = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    fp8 = {k: t for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert fp8 and all(k + "_scale_inv" in tensors for k in fp8)
    partial = [k for k, t in fp8.items() if t.shape[0] % 128 or t.shape[1] % 128]
    assert any("kv_a_proj_with_mqa" in k for k in partial) and any("experts.0.down_proj" in k for k in partial)
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.abs().max() > 0  # learned (aux-loss-free), not the zero init
    assert sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir()) < 8 << 20
    assert ours.has_mtp and ours.cfg.vocab_size == len(load_tokenizer(EMBEDDED_DIR).backend.get_vocab())


def dequantised_twin(directory) -> None:
    """The shipped weights dequantised to float32 (our core.fp8 dequantisation) without quantization_config."""
    tensors = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    out = {k: (dequantize_blocks(t, tensors[k + "_scale_inv"], torch.float32) if k + "_scale_inv" in tensors
               else t.float()) for k, t in tensors.items() if not k.endswith("_scale_inv")}
    directory.mkdir()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    config.pop("quantization_config")
    (directory / "config.json").write_text(json.dumps(config))


def assert_greedy_equal(hf, ours) -> None:
    for prompt in prompts():
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=None)[0, len(prompt):].tolist()
        got = Generator(ours).generate([prompt], NEW_TOKENS, stop_at_eos=False).output_ids[0]
        assert got == want, prompt


def test_greedy_tokens_equal_transformers_on_the_dequantised_weights(ours, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    dequantised_twin(tmp_path / "twin")
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "twin", dtype=torch.float32).eval()
    assert_greedy_equal(hf, ours)


def test_transformers_loads_the_shipped_directory_unchanged(ours):
    """transformers 5 on a CPU dequantises FP8 checkpoints at load (its FP8 quantizer needs `accelerate`). Its
    dequantiser derives the block size from the scale grid (rows // scale_rows), which is only right when every
    dimension is a multiple of 128 or below it: the shipped dimensions are chosen so, and every weight it made must
    equal ours."""
    pytest.importorskip("accelerate", reason="transformers' FP8 loader requires accelerate")
    from transformers import DeepseekV3ForCausalLM

    hf = DeepseekV3ForCausalLM.from_pretrained(EMBEDDED_DIR, dtype=torch.float32).eval()
    theirs = hf.state_dict()
    tensors = load_file(str(EMBEDDED_DIR / "model.safetensors"))
    n = hf.config.num_hidden_layers
    for key, t in tensors.items():
        if key.endswith("_scale_inv") or key.startswith(f"model.layers.{n}.") or ".experts." in key:
            continue
        want = dequantize_blocks(t, tensors.get(key + "_scale_inv"), torch.float32)
        assert torch.equal(theirs[key], want), key
    experts = theirs["model.layers.1.mlp.experts.gate_up_proj"]
    inter = experts.shape[1] // 2
    for e in (0, experts.shape[0] - 1):
        p = f"model.layers.1.mlp.experts.{e}."
        assert torch.equal(experts[e, :inter], dequantize_blocks(tensors[p + "gate_proj.weight"],
                                                                 tensors[p + "gate_proj.weight_scale_inv"],
                                                                 torch.float32))
    assert_greedy_equal(hf, ours)


def test_tokenizer_and_chat_template_work_through_the_engine_and_match_transformers():
    ours, hf = load_tokenizer(EMBEDDED_DIR), hf_tokenizer(EMBEDDED_DIR)
    ids = ours.encode(PROMPT)
    assert ids[0] == ours.bos_token_id == 0 and len(ids) < len(PROMPT)  # BPE merges, not bytes
    assert ids == hf.encode(PROMPT) and ours.decode(ids) == PROMPT
    text = "déjà vu: 你好 \x00 ✓"
    assert ours.decode(ours.encode(text)) == text
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is assert?"},
                    {"role": "assistant", "content": "A statement."}, {"role": "user", "content": "And pass?"}]
    rendered = ours.render_chat(conversation)
    assert rendered == hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is assert?<｜Assistant｜>")
    chat_ids = ours.apply_chat_template(conversation)
    assert chat_ids == hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                              return_dict=False)
    assert chat_ids[-1] == ours.token_to_id("<｜Assistant｜>") and 1 in ours.eos_token_ids


def test_core_run_without_model_uses_the_shipped_checkpoint(ours, monkeypatch):
    monkeypatch.setenv("DSV3_EMBEDDED", "trained")
    r = run_main("core.run", "--dtype", "float32", "--prompt", PROMPT, "--max-new-tokens", "12", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["model"] == str(EMBEDDED_DIR)
    prompt = load_tokenizer(EMBEDDED_DIR).encode(PROMPT)
    assert report["prompt_ids"] == prompt
    assert report["output_ids"] == Generator(ours).generate([prompt], 12).output_ids[0]
    assert report["text"] == load_tokenizer(EMBEDDED_DIR).decode(report["output_ids"]) and report["text"].strip()
    monkeypatch.setenv("DSV3_EMBEDDED", "random")
    refused(run_main("core.run", "--max-new-tokens", "1"), "DSV3_EMBEDDED", "generated")


def test_training_script_learns_on_a_tiny_config(tmp_path):
    """A few steps of tools/train_default on a tiny config: the loss falls, the correction bias moves by the
    aux-loss-free sign rule (a multiple of gamma, no gradient), and the result loads through our loader."""
    from tools import train_default

    out = tmp_path / "tiny"
    steps, gamma = 12, 0.01
    code = train_default.main(["--out", str(out), "--tiny", "--steps", str(steps), "--batch", "4", "--seq", "32",
                               "--warmup", "1", "--lr", "1e-2", "--bias-gamma", str(gamma), "--eval-every", "12",
                               "--limit-docs", "2", "--window", "64", "--threads", str(torch.get_num_threads())])
    assert code == 0
    meta = json.loads((out / "training.json").read_text())
    losses = [h["loss"] for h in meta["history"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert meta["heldout_bpb_float32"] < 8.0
    tensors = load_file(str(out / "model.safetensors"))
    bias = tensors["model.layers.1.mlp.gate.e_score_correction_bias"].double()
    k = bias / gamma
    assert bias.abs().max() > 0 and torch.allclose(k, k.round(), atol=1e-3) and k.abs().max() <= steps
    model = load_ours(out, torch.float32, with_mtp=True)
    assert model.has_mtp and Generator(model).generate([[0, 40, 41]], 4, stop_at_eos=False).output_ids[0]


def test_training_reproduces_the_shipped_run(tmp_path):
    """The shipped checkpoint's own command, stopped after 10 of its 700 steps, trains the same tokenizer byte for
    byte and reproduces the recorded loss history (init, data order, 9 AdamW steps, 9 correction-bias updates).
    On the machine that trained it the history is equal to the printed 4 decimals; 2e-4 allows another CPU's float32
    kernels. The full 700 steps take ~20 minutes: `--stop-after` is how a user checks a longer prefix."""
    from tools import train_default

    shipped = json.loads((trained_dir() / "training.json").read_text())
    argv = shlex.split(shipped["command"])[3:]  # after "python -m tools.train_default"
    for flag in ("--out", "--save-state"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
    out = tmp_path / "repro"
    threads = torch.get_num_threads()
    try:  # the shipped command sets --threads 1 (float32 sums in one order); give the suite its threads back
        assert train_default.main([*argv, "--out", str(out), "--stop-after", "10"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == (trained_dir() / "tokenizer.json").read_text(
        encoding="utf-8")
    got = json.loads((out / "training.json").read_text())["history"]
    want = [h for h in shipped["history"] if h["step"] <= 10]
    assert [h["step"] for h in got] == [h["step"] for h in want] == [1, 10]
    for g, w in zip(got, want):
        for key in ("loss", "mtp_loss"):
            assert abs(g[key] - w[key]) <= 2e-4, (g, w)
