"""Loading checkpoints: FP8 block weights equal their exact dequantisation, sharded equals single-file, the
embedded default round-trips through disk, and every malformed input is refused with one line naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.default_model import (DEFAULT_CONFIG, checkpoint_tensors, float_state_dict, load_default,
                                write_checkpoint)
from core.generate import Generator
from tests.helpers import load_ours, refused, run_cli, run_main

SMALL = {**DEFAULT_CONFIG, "num_hidden_layers": 2, "vocab_size": 300}


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp8")
    write_checkpoint(d, checkpoint_tensors(float_state_dict(SMALL, seed=7)), SMALL)
    return d


def prompt(n=20, vocab=300):
    return torch.randint(3, vocab, (n,)).tolist()


def test_fp8_checkpoint_equals_its_dequantised_bf16_twin(fp8_dir, tmp_path):
    """The loader keeps FP8 codes and block scales (incl. partial edge blocks) and cpu_ref dequantises them
    exactly: a float32 checkpoint holding float(w) * scale gives the same logits to float32 rounding."""
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)  # 160 rows
    deq = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:  # element by element block, written independently of core.fp8
            scale, out = tensors[name + "_scale_inv"], t.float()
            for i in range(0, t.shape[0], 128):
                for j in range(0, t.shape[1], 128):
                    out[i:i + 128, j:j + 128] *= float(scale[i // 128, j // 128])
            deq[name] = out
        else:
            deq[name] = t.float()
    config = {k: v for k, v in SMALL.items() if k != "quantization_config"}
    write_checkpoint(tmp_path, deq, config)
    p = prompt()
    a = Generator(load_ours(fp8_dir)).teacher_forced_logits(p)
    b = Generator(load_ours(tmp_path)).teacher_forced_logits(p)
    assert float((a - b).norm() / b.norm()) < 1e-6


def test_sharded_checkpoint_equals_single_file(fp8_dir, tmp_path):
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    write_checkpoint(tmp_path, tensors, SMALL, shards=3)
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    p = prompt()
    a = Generator(load_ours(fp8_dir)).teacher_forced_logits(p)
    b = Generator(load_ours(tmp_path)).teacher_forced_logits(p)
    assert torch.equal(a, b)


def test_default_model_written_to_disk_loads_identically(tmp_path):
    src = load_default()
    write_checkpoint(tmp_path, src.tensors, DEFAULT_CONFIG, shards=2)
    p = prompt(12, 512)
    a = Generator(load_ours(src)).generate([p], 6, mtp=True, stop_at_eos=False).output_ids
    b = Generator(load_ours(tmp_path)).generate([p], 6, mtp=True, stop_at_eos=False).output_ids
    assert a == b


def test_default_model_is_deterministic_and_has_every_feature():
    a, b = load_default(), load_default()
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k].view(torch.uint8) if a.tensors[k].dtype == torch.float8_e4m3fn
                           else a.tensors[k], b.tensors[k].view(torch.uint8) if b.tensors[k].dtype ==
                           torch.float8_e4m3fn else b.tensors[k]) for k in a.tensors)
    cfg, t = a.config, a.tensors
    assert cfg.q_lora_rank and cfg.rope.rope_type == "yarn" and cfg.rope.softmax_scale_factor > 1
    assert cfg.n_group > 1 and cfg.topk_group < cfg.n_group and cfg.first_k_dense_replace >= 1
    assert cfg.num_nextn_predict_layers == 1 and f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight" in t
    bias = t["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and float(bias.abs().min()) > 0
    kv_a = t["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == torch.float8_e4m3fn and kv_a.shape[0] % 128 != 0, "a partial edge block"
    assert t["model.layers.0.mlp.gate_proj.weight"].shape[0] % 128 != 0


# -- bad input: one line on stderr naming the problem, exit status 2, no traceback ---------------------------------




def run_model(d, *extra):
    return run_main("core.run", "--model", str(d), "--prompt-ids", "0,5,6", "--max-new-tokens", "2", *extra)


@pytest.fixture
def ckpt(fp8_dir, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(fp8_dir, d)
    return d


def test_missing_directory_and_config(tmp_path):
    refused(run_model(tmp_path / "nope"), "nope", "no such checkpoint directory")
    refused(run_model(tmp_path), "config.json", "not found")


def test_malformed_and_inconsistent_config(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    refused(run_model(ckpt), "config.json", "invalid JSON", "line 1")
    for change, needle in [({"n_group": 5}, "n_group"), ({"topk_group": 9, "n_group": 4}, "topk_group"),
                           ({"num_experts_per_tok": 40}, "num_experts_per_tok"), ({"hidden_size": "big"}, "hidden_size"),
                           ({"model_type": "llama"}, "model_type"), ({"hidden_act": "gelu"}, "hidden_act"),
                           ({"rope_scaling": {"type": "longrope", "factor": 2}}, "rope type"),
                           ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
                            "weight_block_size"),
                           ({"qk_rope_head_dim": 31}, "qk_rope_head_dim")]:
        (ckpt / "config.json").write_text(json.dumps({**SMALL, **change}))
        refused(run_model(ckpt), "config.json", needle)


def test_malformed_rope_and_quantisation_fields(ckpt):
    for change, needle in [({"rope_scaling": {**SMALL["rope_scaling"], "beta_fast": "x"}}, "beta_fast"),
                           ({"rope_scaling": {**SMALL["rope_scaling"], "mscale": "x"}}, "mscale"),
                           ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}},
                            "weight_block_size")]:
        (ckpt / "config.json").write_text(json.dumps({**SMALL, **change}))
        refused(run_model(ckpt), "config.json", needle)


def test_top_level_original_max_position_embeddings_wins_as_in_transformers(ckpt):
    from core.config import ModelConfig

    cfg = ModelConfig.from_dict({**SMALL, "original_max_position_embeddings": 1024})
    assert cfg.rope.original_max_position_embeddings == 1024


def test_unreadable_files_and_paths(ckpt, tmp_path, monkeypatch):
    import os

    real = os.open

    def deny(path, *a, **k):  # the tests run as root, which chmod cannot stop: deny at the system call
        if str(path).endswith("config.json"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    refused(run_model(ckpt), "config.json", "cannot read")
    monkeypatch.undo()
    refused(run_model(ckpt / "model.safetensors"), "no such checkpoint directory")
    refused(run_main("core.run", "--logits-out", str(tmp_path / "file.txt" / "x.safetensors")), "--logits-out")
    refused(run_main("core.run", "--seed", str(2 ** 70)), "--seed")
    refused(run_main("core.run", "--temperature", "nan"), "--temperature")


def test_float_weight_that_kept_its_fp8_scales(ckpt):
    path = ckpt / "model.safetensors"
    t = load_file(str(path))
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    t[name] = t[name].float()  # cast without applying the block scales: every weight would be wrong
    save_file(t, str(path))
    refused(run_model(ckpt), name, "_scale_inv")


def test_malformed_tokenizer_config(ckpt):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 3, "[UNK]": 4}, unk_token="[UNK]")).save(str(ckpt / "tokenizer.json"))
    for content in ("[1]", b"\xff\xfe"):
        target = ckpt / "tokenizer_config.json"
        target.write_bytes(content.encode() if isinstance(content, str) else content)
        refused(run_main("core.run", "--model", str(ckpt), "--prompt", "a", "--max-new-tokens", "1"),
                "tokenizer_config.json")


def test_config_that_disagrees_with_the_tensors(ckpt):
    (ckpt / "config.json").write_text(json.dumps({**SMALL, "kv_lora_rank": 64}))
    refused(run_model(ckpt), "model.safetensors", "kv_a_proj_with_mqa", "shape")


def test_truncated_corrupt_and_empty_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    for content, needle in [(data[: len(data) // 2], "model.safetensors"), (b"\x08" + data[1:64], "model.safetensors"),
                            (b"", "model.safetensors")]:
        (ckpt / "model.safetensors").write_bytes(content)
        refused(run_model(ckpt), needle, "safetensors")


def test_missing_misshapen_and_wrongly_typed_tensors(ckpt):
    path = ckpt / "model.safetensors"
    base = load_file(str(path))
    cases = [
        ("model.layers.1.mlp.experts.3.up_proj.weight", None, "is missing"),
        ("model.layers.0.self_attn.o_proj.weight_scale_inv", None, "is missing"),
        ("model.norm.weight", torch.ones(255, dtype=torch.bfloat16), "shape [255]"),
        ("model.layers.0.input_layernorm.weight", torch.ones(256, dtype=torch.int32), "dtype int32"),
    ]
    for name, replacement, needle in cases:
        t = dict(base)
        if replacement is None:
            del t[name]
        else:
            t[name] = replacement
        save_file(t, str(path))
        refused(run_model(ckpt), name.replace("_scale_inv", ""), needle)


def test_shard_named_by_the_index_but_absent(fp8_dir, tmp_path):
    write_checkpoint(tmp_path, load_file(str(fp8_dir / "model.safetensors")), SMALL, shards=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    refused(run_model(tmp_path), "model.safetensors.index.json", "model-00002-of-00003.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": 3}')
    refused(run_model(tmp_path), "model.safetensors.index.json", "weight_map")


def test_index_pointing_at_the_wrong_shard(fp8_dir, tmp_path):
    write_checkpoint(tmp_path, load_file(str(fp8_dir / "model.safetensors")), SMALL, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = [f for f in set(index["weight_map"].values()) if f != index["weight_map"][name]][0]
    index["weight_map"][name] = other
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(run_model(tmp_path), "model.safetensors.index.json", name, "lacks it")


def test_unknown_and_unavailable_backends():
    line = refused(run_main("core.run", "--backend", "tpu9000"), "unknown backend 'tpu9000'", "available")
    assert "cpu_ref" in line


def test_out_of_range_ids_lengths_and_options():
    refused(run_cli("core.run", "--prompt-ids", "0,5,99999"), "99999", "vocabulary")
    for args, needles in [(("--prompt-ids", "0,-3"), ("-3",)), (("--prompt-ids", "1,x"), ("--prompt-ids",)),
                          (("--prompt-ids", ""), ("empty",)), (("--max-new-tokens", "5000"), ("max_position_embeddings",)),
                          (("--max-new-tokens", "-1"), ("--max-new-tokens",)), (("--dtype", "float8"), ("--dtype",)),
                          (("--temperature", "-1"), ("--temperature",)),
                          (("--prompt", "a", "--prompt-ids", "1"), ("not allowed with",)),
                          (("--logits-out", "/nonexistent-dir/x.safetensors"), ("/nonexistent-dir",))]:
        refused(run_main("core.run", *args), *needles)


def test_mtp_requested_without_mtp_weights(ckpt):
    t = {k: v for k, v in load_file(str(ckpt / "model.safetensors")).items() if not k.startswith("model.layers.2.")}
    save_file(t, str(ckpt / "model.safetensors"))
    refused(run_model(ckpt, "--mtp"), "--mtp", "no MTP")
    assert run_model(ckpt).returncode == 0, "without --mtp the same checkpoint runs"


def test_nothing_half_written_on_failure(tmp_path):
    out = tmp_path / "logits.safetensors"
    refused(run_cli("core.run", "--prompt-ids", "0,99999", "--logits-out", str(out)), "vocabulary")
    assert list(tmp_path.iterdir()) == []
