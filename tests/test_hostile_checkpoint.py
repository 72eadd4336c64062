"""Hostile checkpoints (issue 11): containment, regular files only, honest one-line messages, bounded parsing of
every JSON/YAML and safetensors header, checked config values, non-finite weights found at load."""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import DirectoryCheckpoint, read_safetensors_header
from core.config import ModelConfig
from core.default_model import DEFAULT_CONFIG, checkpoint_tensors, float_state_dict, write_checkpoint
from core.errors import CheckpointError, UserError
from core.safe_files import quote_name, read_json_file, read_yaml_file
from tests.helpers import load_ours, refused, run_main

SMALL = {**DEFAULT_CONFIG, "num_hidden_layers": 1, "vocab_size": 300}


@pytest.fixture(scope="module")
def tensors():
    return checkpoint_tensors(float_state_dict(SMALL, seed=11))


@pytest.fixture
def ckpt(tensors, tmp_path):
    d = tmp_path / "ckpt"
    write_checkpoint(d, tensors, SMALL)
    return d


@pytest.fixture
def sharded(tensors, tmp_path):
    d = tmp_path / "sharded"
    write_checkpoint(d, tensors, SMALL, shards=2)
    return d


def one_line_error(fn, kind=UserError) -> str:
    with pytest.raises(kind) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message and "\r" not in message, message
    return message




def rewrite_index(d, change):
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def in_thread(fn, seconds=20):
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the loader blocked"
    return out


# -- containment -------------------------------------------------------------------------------------------------

def test_index_names_outside_the_directory_are_refused(sharded, tmp_path):
    shard = next(iter(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))
    outside = tmp_path / "outside.safetensors"
    shutil.copy(sharded / shard, outside)
    for name, needle in (("../outside.safetensors", "'..'"), (str(outside), "absolute"),
                         ("sub/../../outside.safetensors", "'..'")):
        rewrite_index(sharded, lambda m: m.update({"model.norm.weight": name}))
        msg = one_line_error(lambda: DirectoryCheckpoint(sharded), CheckpointError)
        assert needle in msg and "model.safetensors.index.json" in msg
    os.symlink(outside, sharded / "link.safetensors")
    rewrite_index(sharded, lambda m: m.update({"model.norm.weight": "link.safetensors"}))
    assert "outside the checkpoint" in one_line_error(lambda: DirectoryCheckpoint(sharded), CheckpointError)


def test_symlinked_config_leaving_the_directory_is_refused(ckpt, tmp_path):
    (tmp_path / "elsewhere.json").write_text(json.dumps(SMALL))
    (ckpt / "config.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", ckpt / "config.json")
    refused(run_main("core.run", "--model", str(ckpt), "--prompt-ids", "0,5"), "config.json", "outside")


def test_hugging_face_cache_symlink_farm_stays_allowed(ckpt, tmp_path):
    repo = tmp_path / "models--acme--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(ckpt.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(f, blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / f.name)
    src = DirectoryCheckpoint(snapshot)
    assert src.root == repo.resolve() and src.has("model.norm.weight")
    p = torch.randint(3, 300, (6,)).tolist()
    from core.generate import Generator
    assert torch.equal(Generator(load_ours(snapshot)).teacher_forced_logits(p),
                       Generator(load_ours(ckpt)).teacher_forced_logits(p))


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json"])
def test_fifo_is_refused_before_any_read(ckpt, victim):
    (ckpt / victim).unlink()
    os.mkfifo(ckpt / victim)
    out = in_thread(lambda: DirectoryCheckpoint(ckpt))
    assert isinstance(out.get("error"), CheckpointError), out
    assert "FIFO" in str(out["error"]) and victim in str(out["error"])


def test_fifo_tokenizer_config_is_refused(ckpt):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 3, "[UNK]": 4}, unk_token="[UNK]")).save(str(ckpt / "tokenizer.json"))
    os.mkfifo(ckpt / "tokenizer_config.json")
    from core.tokenizer import for_checkpoint
    out = in_thread(lambda: for_checkpoint(ckpt, 0))
    assert isinstance(out.get("error"), UserError) and "FIFO" in str(out["error"]), out


def test_duplicate_and_conflicting_index_entries(sharded):
    path = sharded / "model.safetensors.index.json"
    text = path.read_text()
    shard = json.loads(text)["weight_map"]["model.norm.weight"]
    path.write_text(text.replace('"weight_map": {', f'"weight_map": {{"model.norm.weight": "{shard}", ', 1))
    assert "duplicate key 'model.norm.weight'" in one_line_error(lambda: DirectoryCheckpoint(sharded), CheckpointError)
    # the same tensor stored in two shards
    index = json.loads(text)
    other = [f for f in set(index["weight_map"].values()) if f != shard][0]
    t = load_file(str(sharded / other))
    t["model.norm.weight"] = torch.ones(SMALL["hidden_size"])
    save_file(t, str(sharded / other))
    path.write_text(text)
    assert "in both" in one_line_error(lambda: DirectoryCheckpoint(sharded), CheckpointError)


# -- honest messages ---------------------------------------------------------------------------------------------

def test_names_from_files_cannot_add_a_line(sharded, ckpt):
    forged = "x.safetensors\nerror: everything is fine"
    rewrite_index(sharded, lambda m: m.update({"model.norm.weight": forged}))
    line = refused(run_main("core.run", "--model", str(sharded), "--prompt-ids", "0,5"), "\\n", "everything")
    assert line.startswith("error: ")
    (ckpt / "config.json").write_text(json.dumps({**SMALL, "model_type": "evil\r\nerror: forged\x1b[2J"}))
    refused(run_main("core.run", "--model", str(ckpt), "--prompt-ids", "0,5"), "\\r\\n", "\\x1b")
    t = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps(SMALL))
    t["model.norm.weight\nerror: ok"] = t.pop("model.norm.weight")
    save_file(t, str(ckpt / "model.safetensors"))
    refused(run_main("core.run", "--model", str(ckpt), "--prompt-ids", "0,5"), "'model.norm.weight'", "missing")
    assert quote_name("a\u2028b\x85c") == "'a\\u2028b\\x85c'"


# -- bounded resources -------------------------------------------------------------------------------------------

def test_oversized_and_deeply_nested_json_and_yaml(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * (5 << 20) + b'"}')
    assert "exceeds the limit" in one_line_error(lambda: read_json_file(big))
    deep = tmp_path / "deep.json"
    deep.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    assert "levels deep" in one_line_error(lambda: read_json_file(deep))
    yml = tmp_path / "m.yaml"
    yml.write_text("a: " + "[" * 5000 + "]" * 5000)
    assert "levels deep" in one_line_error(lambda: read_yaml_file(yml))
    yml.write_text("a: &x [1, 2]\nb: [*x, *x, *x]\n")
    assert "anchors" in one_line_error(lambda: read_yaml_file(yml))


def write_raw_safetensors(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


@pytest.mark.parametrize("header,data,length,needle", [
    ({}, b"", 1 << 62, "header length"),
    (b"[" * 100 + b"]" * 100, b"", None, "levels deep"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, None, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}}, b"\0" * 16, None, "shape"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 16, None, "needs 16 bytes"),
    ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0", None, "dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "shape"),
])
def test_safetensors_header_numbers_checked_before_use(tmp_path, header, data, length, needle):
    path = tmp_path / "x.safetensors"
    write_raw_safetensors(path, header, data, length)
    assert needle in one_line_error(lambda: read_safetensors_header(path, "x.safetensors"), CheckpointError)


def test_shape_checked_from_the_header_before_the_tensor_is_read(ckpt, monkeypatch):
    (ckpt / "config.json").write_text(json.dumps({**SMALL, "hidden_size": SMALL["hidden_size"] * 2}))

    def never(self, name):
        raise AssertionError(f"read {name} before checking its shape")

    monkeypatch.setattr(DirectoryCheckpoint, "read", never)
    assert "shape" in one_line_error(lambda: load_ours(ckpt), CheckpointError)


def test_an_io_error_while_reading_is_one_line_naming_the_shard(ckpt, monkeypatch):
    """Tensors are read with pread at the validated offsets (no memory map, whose failures are SIGBUS)."""
    import errno

    import core.checkpoint

    def failing_disk(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(core.checkpoint.os, "preadv", failing_disk)
    refused(run_main("core.run", "--model", str(ckpt), "--prompt-ids", "0,5"), "model.safetensors",
            "Input/output error")


def test_a_shard_cut_short_after_its_header_was_checked_is_one_line(ckpt):
    source = DirectoryCheckpoint(ckpt)  # every header validated against the file as it was
    shard = ckpt / "model.safetensors"
    with open(shard, "r+b") as f:  # another process truncates the file: a mapped read would be SIGBUS
        f.truncate(shard.stat().st_size // 2)
    msg = one_line_error(lambda: [source.read(n) for n in source.names()], CheckpointError)
    assert "model.safetensors" in msg and "cut short" in msg


def test_pread_reads_exactly_what_safetensors_reads(ckpt):
    def same_bytes(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
            a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))

    source = DirectoryCheckpoint(ckpt)
    want = load_file(str(ckpt / "model.safetensors"))
    for name in source.names():
        assert same_bytes(source.read(name), want[name]), name
        if want[name].dim() == 2 and want[name].shape[1] > 3:
            assert same_bytes(source.read_slice(name, 1, 1, 3), want[name][:, 1:3]), name
            assert same_bytes(source.read_slice(name, 0, 1, 2), want[name][1:2]), name


# -- config values -----------------------------------------------------------------------------------------------

YARN = DEFAULT_CONFIG["rope_scaling"]


@pytest.mark.parametrize("change,needle", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"), ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"), ({"rope_theta": float("inf")}, "rope_theta"),
    ({"rope_theta": 1e300}, "rope_theta"), ({"hidden_size": True}, "hidden_size"),
    ({"vocab_size": 10 ** 30}, "vocab_size"), ({"max_position_embeddings": 2 ** 40}, "max_position_embeddings"),
    ({"qk_rope_head_dim": 1 << 30}, "qk_rope_head_dim"), ({"num_hidden_layers": 10 ** 6}, "num_hidden_layers"),
    ({"eos_token_id": 300}, "eos_token_id"), ({"bos_token_id": 999}, "bos_token_id"),
    ({"rope_scaling": {**YARN, "beta_fast": float("nan")}}, "beta_fast"),
    ({"rope_scaling": {**YARN, "beta_slow": -1}}, "beta_slow"),
    ({"rope_scaling": {**YARN, "mscale": -20.0}}, "mscale"),
    ({"rope_scaling": {**YARN, "mscale_all_dim": float("inf")}}, "mscale_all_dim"),
    ({"rope_scaling": {**YARN, "factor": float("nan")}}, "factor"),
    ({"rope_scaling": {**YARN, "original_max_position_embeddings": 0}}, "original_max_position_embeddings"),
    ({"rope_scaling": {**YARN, "original_max_position_embeddings": 2.5}}, "original_max_position_embeddings"),
])
def test_every_numeric_field_checked_for_type_finiteness_and_range(change, needle):
    msg = one_line_error(lambda: ModelConfig.from_dict({**SMALL, **change}, "config.json"), CheckpointError)
    assert needle in msg and "config.json" in msg


def test_nan_in_config_json_refused_through_the_cli(ckpt):
    (ckpt / "config.json").write_text(json.dumps({**SMALL, "rms_norm_eps": float("nan")}))  # writes NaN
    refused(run_main("core.run", "--model", str(ckpt), "--prompt-ids", "0,5"), "rms_norm_eps", "nan")


@pytest.mark.parametrize("name,poison", [
    ("model.norm.weight", lambda t: t.index_fill_(0, torch.tensor([3]), float("nan"))),
    ("model.layers.0.self_attn.o_proj.weight_scale_inv", lambda t: t.fill_(float("inf"))),
    ("model.layers.1.mlp.experts.2.down_proj.weight",
     lambda t: t.view(torch.uint8).view(-1)[5:6].fill_(0x7F) and t),  # an e4m3fn NaN code
])
def test_non_finite_weights_found_at_load_and_named(tensors, tmp_path, name, poison):
    t = {k: v.clone() for k, v in tensors.items()}
    assert name in t
    poison(t[name])
    write_checkpoint(tmp_path, t, SMALL)
    msg = one_line_error(lambda: load_ours(tmp_path), CheckpointError)
    assert quote_name(name.replace("_scale_inv", "")) in msg or quote_name(name) in msg, msg
    assert "NaN or infinite" in msg
    from core.model import Model
    from tests.helpers import reference_dispatch
    Model.load(tmp_path, reference_dispatch(), torch.device("cpu"), torch.float32, check_weights=False)


def test_no_check_weights_flag_on_the_cli(tensors, tmp_path):
    t = dict(tensors)
    t["model.norm.weight"] = torch.full_like(t["model.norm.weight"], float("inf"))
    write_checkpoint(tmp_path, t, SMALL)
    refused(run_main("core.run", "--model", str(tmp_path), "--prompt-ids", "0,5", "--max-new-tokens", "1"),
            "'model.norm.weight'", "--no-check-weights")
    # Unchecked, the weights load; the infinite norm weight then makes the logits NaN, which the engine refuses
    # to sample from: one line naming the request, not a token drawn from NaN.
    unchecked = run_main("core.run", "--model", str(tmp_path), "--prompt-ids", "0,5", "--max-new-tokens", "1",
                         "--no-check-weights")
    refused(unchecked, "NaN or infinite logits")
    assert "model.norm.weight" not in unchecked.stderr, "the load check was skipped"
