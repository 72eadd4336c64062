"""Property-based fuzzing (issue 11) of the three parsers a downloaded checkpoint reaches first: config.json
(ModelConfig), the shard index (DirectoryCheckpoint) and the safetensors header. For every generated hostile input
the only acceptable outcomes are success or a CheckpointError whose message is one line with no control
characters; any other exception fails. Bounded for CI: derandomized (the same examples every run, no example
database), a fixed number of examples per target, well under a minute on 2 cores. `EXAMPLES_RUN` counts them."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from core.checkpoint import DirectoryCheckpoint, read_safetensors_header
from core.config import ModelConfig
from core.default_model import DEFAULT_CONFIG
from core.errors import CheckpointError
from core.safe_files import one_line, parse_json

SMALL = {**DEFAULT_CONFIG, "num_hidden_layers": 1, "vocab_size": 300}
# DSV3_FUZZ_EXAMPLES raises the count for a longer local run (DSV3_FUZZ_RANDOM=1: fresh examples each run).
N_EXAMPLES = int(os.environ.get("DSV3_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=N_EXAMPLES, deadline=None, derandomize=not os.environ.get("DSV3_FUZZ_RANDOM"), database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
EXAMPLES_RUN: Counter = Counter()

hostile_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["../x.safetensors", "/etc/passwd", "a\nerror: forged", "\x00", "\u2028", "C:\\x", "..",
                     "sub/../../x", "model.safetensors", "\x1b[2J", ""]),
)
numbers = st.one_of(
    st.integers(min_value=-2 ** 70, max_value=2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2 ** 31, 2 ** 63, 1e-300, 1e300, True, False]),
)
scalars = st.one_of(numbers, hostile_text, st.none(), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(hostile_text, inner, max_size=4)), max_leaves=12)


def accept_or_one_line(fn, target: str):
    EXAMPLES_RUN[target] += 1
    try:
        return fn()
    except CheckpointError as e:
        message = str(e)
        assert message and one_line(message) == message, repr(message)
        return None


# -- config.json -------------------------------------------------------------------------------------------------

config_keys = st.sampled_from(sorted(set(SMALL) | {"rope_scaling", "rope_theta", "text_config", "eos_token_id",
                                                    "original_max_position_embeddings", "model_type"}))
rope_keys = st.sampled_from(["type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                             "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta"])


@FUZZ
@given(changes=st.dictionaries(config_keys, values, max_size=4), rope=st.dictionaries(rope_keys, values, max_size=3))
def test_fuzz_config_fields(changes, rope):
    data = {**SMALL, **changes}
    if rope and isinstance(data.get("rope_scaling"), dict):
        data["rope_scaling"] = {**data["rope_scaling"], **rope}
    cfg = accept_or_one_line(lambda: ModelConfig.from_dict(data, "config.json"), "config")
    if cfg is not None:  # what is accepted is usable: finite scales, a rotary table without NaN
        assert math.isfinite(cfg.softmax_scale) and cfg.softmax_scale > 0
        assert math.isfinite(cfg.rms_norm_eps) and cfg.rms_norm_eps > 0
        assert torch.isfinite(cfg.rope.inv_freq()).all() and math.isfinite(cfg.rope.attention_factor)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200),
                     st.builds(lambda v: json.dumps(v).encode(), values),
                     st.builds(lambda n, c: c * n, st.integers(0, 3000), st.sampled_from([b"[", b"{\"a\":", b"\""]))))
def test_fuzz_config_bytes(raw):
    def parse():
        data = parse_json(raw, "config.json")
        if not isinstance(data, dict):
            raise CheckpointError("config.json: expected a JSON object")
        return ModelConfig.from_dict(data, "config.json")

    accept_or_one_line(parse, "config bytes")


# -- the shard index ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index_dir():
    d = Path(tempfile.mkdtemp(prefix="fuzz-index-"))
    (d / "config.json").write_text(json.dumps(SMALL))
    save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(d / "one.safetensors"))
    save_file({"c": torch.ones(1)}, str(d / "two.safetensors"))
    yield d
    shutil.rmtree(d)


shard_names = st.one_of(hostile_text, st.sampled_from(["one.safetensors", "two.safetensors", "./one.safetensors"]))
tensor_names = st.one_of(hostile_text, st.sampled_from(["a", "b", "c"]))


@FUZZ
@given(weight_map=st.one_of(st.dictionaries(tensor_names, shard_names, max_size=5), values),
       extra=st.dictionaries(hostile_text, values, max_size=2),
       mangle=st.one_of(st.none(), st.tuples(st.integers(0, 400), st.binary(max_size=8))))
def test_fuzz_index(index_dir, weight_map, extra, mangle):
    raw = json.dumps({**extra, "weight_map": weight_map}).encode()
    if mangle is not None:  # splice random bytes in
        at, junk = mangle
        raw = raw[:at] + junk + raw[at + len(junk):]
    (index_dir / "model.safetensors.index.json").write_bytes(raw)
    ckpt = accept_or_one_line(lambda: DirectoryCheckpoint(index_dir), "index")
    if ckpt is not None:
        for name in ckpt.names():
            accept_or_one_line(lambda: ckpt.read(name), "index read")


# -- safetensors headers -----------------------------------------------------------------------------------------

dtypes = st.one_of(st.sampled_from(["F32", "BF16", "F8_E4M3", "I64", "U8", "BOOL", "F64"]), hostile_text)
entries = st.fixed_dictionaries({
    "dtype": dtypes,
    "shape": st.one_of(st.lists(st.integers(-2, 40), max_size=3), values),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 300), min_size=2, max_size=2), values),
})


@FUZZ
@given(header=st.one_of(st.dictionaries(tensor_names, entries, max_size=4), values, st.binary(max_size=60)),
       data=st.binary(max_size=300), length=st.one_of(st.none(), st.integers(0, 2 ** 64 - 1)))
def test_fuzz_safetensors_header(header, data, length):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
        infos = accept_or_one_line(lambda: read_safetensors_header(path, "x.safetensors"), "safetensors")
        if infos:  # a header we accept is one safetensors itself can read, tensor by tensor
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for name, info in infos.items():
                    t = f.get_tensor(name)
                    assert tuple(t.shape) == info.shape


def test_fuzz_examples_were_run():
    """Runs last in this file: every target saw its examples (the count is in the report of issue 11)."""
    print(f"fuzz examples run: {dict(EXAMPLES_RUN)}")
    for target in ("config", "config bytes", "index", "safetensors"):
        assert EXAMPLES_RUN[target] >= min(100, N_EXAMPLES // 2), EXAMPLES_RUN
