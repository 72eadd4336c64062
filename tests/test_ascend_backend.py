"""The ascend backend as a whole: its descriptor and probe, the CLI with and without --simulate, and whole-model
runs against cpu_ref. Weights are dequantised to bf16 at load on Ascend (no FP8 on A2/A3), so against the FP8
checkpoint the logits differ by that rounding; against the same checkpoint converted to bf16 (what the adapter
actually multiplies) a float32 run must agree to float32 accuracy."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from backends.ascend import availability, runtime
from core import registry
from core.backend import Limited, RunMode
from core.checkpoint import MemoryCheckpoint
from core.config import ModelConfig
from core.default_model import DEFAULT_CONFIG, checkpoint_tensors, float_state_dict, load_default
from core.dispatch import Dispatch
from core.fp8 import dequantize_blocks
from core.generate import Generator
from core.model import Model
from tests.ascend_support import rel_err, simulated  # noqa: F401 (autouse fixture)
from tests.helpers import ROOT, run_cli

HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None
CPU = torch.device("cpu")


def test_descriptor_and_manifest_agree():
    backend = registry.load("ascend")
    assert (backend.name, backend.device_type, backend.dist_backend) == ("ascend", "npu", "hccl")
    limited = {op for op, impl in backend.ops.items() if isinstance(impl, Limited)}
    assert limited == {"attention_prefill", "mla_decode", "moe_gate"} == set(backend.manifest.limits)
    assert backend.manifest.toolchain["targets"]["torch_npu"].startswith("2.14.0")


def test_simulation_says_so():
    avail = registry.load("ascend").probe(RunMode(simulate=True))
    if HAS_TORCH_NPU:
        pytest.skip("torch_npu is installed: --simulate runs on the real library")
    assert avail.ok and avail.device == CPU
    assert avail.environment["device_name"] == "simulation: torch_npu emulation (no Ascend hardware)"
    assert runtime.is_emulation()


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_without_torch_npu_the_probe_explains_and_suggests_simulate():
    avail = registry.load("ascend").probe(RunMode())
    assert not avail.ok and "torch_npu is not installed" in avail.reason and "--simulate" in avail.reason


def test_torch_npu_version_pairing():
    assert availability.pairing_problem("2.5.1+cpu", "2.5.1.post1") is None
    assert availability.pairing_problem("2.14.0", "2.14.0") is None
    problem = availability.pairing_problem("2.13.0+cpu", "2.5.1")
    assert problem and "torch-npu==2.13.0" in problem


FAKE_TORCH_NPU = {
    "version mismatch": ("2.5.1", "__version__ = '2.5.1'\n", "does not match torch"),
    "import fails": (None, "raise ImportError('libhccl.so: cannot open shared object file')\n",
                     "import torch_npu failed: libhccl.so"),
    "no device": (None, "__version__ = 'x'\nclass npu:\n    is_available = staticmethod(lambda: False)\n"
                        "    device_count = staticmethod(lambda: 0)\n", "no NPU device is visible"),
    "operators missing": (None, "__version__ = 'x'\nclass npu:\n    is_available = staticmethod(lambda: True)\n"
                                "    device_count = staticmethod(lambda: 1)\n", "lacks npu_rms_norm"),
}


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
@pytest.mark.parametrize("case", list(FAKE_TORCH_NPU))
def test_the_probe_explains_a_broken_torch_npu(case, tmp_path, monkeypatch):
    version, source, expected = FAKE_TORCH_NPU[case]
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text(source)
    if version:
        info = tmp_path / f"torch_npu-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch_npu\nVersion: {version}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    try:
        for mode in (RunMode(), RunMode(simulate=True)):
            avail = availability.probe(mode)
            assert not avail.ok and expected in avail.reason, avail.reason
        assert "emulation only where torch_npu is not installed" in avail.reason
    finally:
        sys.modules.pop("torch_npu", None)


def test_the_handle_refuses_calls_before_a_probe():
    with runtime.using(None), pytest.raises(RuntimeError, match="before the backend's probe"):
        runtime.torch_npu.npu_rms_norm


# -- the command line --------------------------------------------------------------------------------------------


def _run_json(*args: str) -> dict:
    proc = run_cli("core.run", *args, "--max-new-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed: --simulate would use the real library")
def test_cli_simulated_float32_matches_cpu_ref(tmp_path):
    ours = _run_json("--backend", "ascend", "--simulate", "--dtype", "float32", "--logits-out",
                     str(tmp_path / "ascend.safetensors"))
    ref = _run_json("--backend", "cpu_ref", "--dtype", "float32", "--logits-out", str(tmp_path / "ref.safetensors"))
    assert ours["backend"] == "ascend" and ours["simulate"] is True
    assert all(text.startswith("ascend") for text in ours["dispatch"].values()), ours["dispatch"]
    limited = {op for op, text in ours["dispatch"].items() if "cpu_ref for inputs outside its limits" in text}
    assert limited == {"attention_prefill", "mla_decode", "moe_gate"}, "FIA has no float32; the NPU gate wants 256"
    assert ours["prompt_ids"] == ref["prompt_ids"]
    assert ours["output_ids"] == ref["output_ids"], "greedy tokens agree despite the bf16 weights"
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "ascend.safetensors"))["logits"].double()
    b = load_file(str(tmp_path / "ref.safetensors"))["logits"].double()
    kl = torch.nn.functional.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
    assert float(kl) < 0.02, "bf16 weight rounding only (measured ~2e-3)"


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed: --simulate would use the real library")
def test_strict_refuses_inputs_outside_the_declared_limits():
    proc = run_cli("core.run", "--backend", "ascend", "--simulate", "--dtype", "float32", "--strict",
                   "--max-new-tokens", "2")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "--strict" in lines[0] and "float16/bfloat16" in lines[0]


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_cli_without_simulate_fails_in_one_line():
    proc = run_cli("core.run", "--backend", "ascend", "--max-new-tokens", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch_npu" in lines[0] and "--simulate" in lines[0], proc.stderr


# -- whole model, in process -------------------------------------------------------------------------------------


def _bf16_checkpoint(source: MemoryCheckpoint) -> MemoryCheckpoint:
    """The same model with every FP8 weight replaced by its bfloat16 dequantisation (DeepSeek's fp8_cast_bf16)."""
    tensors = dict(source.tensors)
    for name in [n for n in tensors if n.endswith("_scale_inv")]:
        weight = name[: -len("_scale_inv")]
        tensors[weight] = dequantize_blocks(tensors[weight], tensors.pop(name), torch.bfloat16)
    return MemoryCheckpoint(source.config, tensors, source.description + " (bf16)")


def _logits_and_tokens(source, backend_name: str, dtype: torch.dtype, prompt: list[int], new: int):
    reference = registry.load("cpu_ref")
    backend = registry.load(backend_name)
    ops = Dispatch(backend, reference)  # declared-limit calls go to cpu_ref, counted in ops.routes
    model = Model.load(source, ops, CPU, dtype, with_mtp=False)
    gen = Generator(model, None)
    return gen.teacher_forced_logits(prompt), gen.generate([prompt], new, 0.0, 0).output_ids[0], ops


# bfloat16: two bf16 implementations differ by routing flips (MoE routing is discontinuous), ~0.1 on this model;
# 0.3 is conformance/tolerances.yaml's calibrated model-level bound for bfloat16.
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 0.3)])
def test_default_model_equals_cpu_ref_on_the_bf16_weights_it_uses(dtype, rel):
    source = load_default()
    prompt = [0, 71, 104, 104, 115, 86, 104, 104, 110]
    ours, our_ids, ops = _logits_and_tokens(source, "ascend", dtype, prompt, 3)
    ref, ref_ids, _ = _logits_and_tokens(_bf16_checkpoint(source), "cpu_ref", dtype, prompt, 3)
    assert rel_err(ours, ref) < rel, f"{dtype}: {rel_err(ours, ref):.3g}"
    if dtype == torch.bfloat16:
        assert ops.routes["attention_prefill"].limited_calls == {}, "bf16 prefill runs on FIA"
        assert ops.routes["mla_decode"].limited_calls == {}, "bf16 decode runs on FIA"


def test_a_256_expert_model_routes_through_npu_moe_gating_top_k():
    config = {**DEFAULT_CONFIG, "hidden_size": 128, "intermediate_size": 192, "moe_intermediate_size": 32,
              "num_hidden_layers": 2, "n_routed_experts": 256, "n_group": 8, "topk_group": 4,
              "num_experts_per_tok": 8, "num_nextn_predict_layers": 0, "vocab_size": 256}
    source = MemoryCheckpoint(ModelConfig.from_dict(config, "256 experts"),
                              checkpoint_tensors(float_state_dict(config, seed=7), fp8=False), "256 experts, bf16")
    prompt = list(range(2, 12))
    ours, our_ids, ops = _logits_and_tokens(source, "ascend", torch.float32, prompt, 2)
    ref, ref_ids, _ = _logits_and_tokens(source, "cpu_ref", torch.float32, prompt, 2)
    assert ops.routes["moe_gate"].limited_calls == {}, "every gate call ran on the NPU operator"
    assert our_ids == ref_ids and rel_err(ours, ref) < 1e-5


def test_a_kimi_k2_shaped_model_takes_the_384_expert_gating_kernel():
    """Kimi-K2's routing (384 experts in one group, top-8, sigmoid, renormalised, x2.827) at model level: every gate
    call runs npu_moe_gating_top_k's 384-expert mode (recorded: x (T, 384), group_count 1, k 8, sigmoid,
    routed_scaling_factor 2.827), none goes to cpu_ref, and tokens and logits equal cpu_ref's in float32."""
    from tests.ascend_support import Recorder, using

    config = {**DEFAULT_CONFIG, "model_type": "kimi_k2", "hidden_size": 128, "intermediate_size": 192,
              "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 8, "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
              "num_experts_per_tok": 8, "routed_scaling_factor": 2.827, "num_nextn_predict_layers": 0,
              "vocab_size": 256}
    source = MemoryCheckpoint(ModelConfig.from_dict(config, "Kimi-K2-shaped"),
                              checkpoint_tensors(float_state_dict(config, seed=11), fp8=False), "384 experts, bf16")
    prompt = list(range(2, 12))
    rec = Recorder()
    with using(rec):
        ours, our_ids, ops = _logits_and_tokens(source, "ascend", torch.float32, prompt, 2)
    ref, ref_ids, _ = _logits_and_tokens(source, "cpu_ref", torch.float32, prompt, 2)
    gate_calls = [(args, kw) for name, args, kw in rec.calls if name == "npu_moe_gating_top_k"]
    moe_layers = config["num_hidden_layers"] - config["first_k_dense_replace"]
    assert len(gate_calls) == moe_layers * 3, "prefill, teacher forcing and one decode step per MoE layer"
    for args, kw in gate_calls:
        assert args[0].shape[1] == 384 and args[1] == 8
        assert (kw["group_count"], kw["k_group"], kw["norm_type"], kw["renorm"]) == (1, 1, 1, 0)
        assert kw["routed_scaling_factor"] == pytest.approx(2.827)
    assert ops.routes["moe_gate"].limited_calls == {}, "no gate call went to cpu_ref"
    assert our_ids == ref_ids and rel_err(ours, ref) < 1e-5


# -- the W8A8 int8 descriptor ------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_w8a8_descriptor():
    env = {"DSV3_BACKENDS_PATH": str(ROOT / "backends" / "ascend" / "variants")}
    proc = run_cli("core.run", "--backend", "ascend_w8a8", "--simulate", "--dtype", "bfloat16",
                   "--max-new-tokens", "4", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "[w8a8_int8]" in report["dispatch"]["linear"] and len(report["output_ids"]) == 4


@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here")
def test_v31_ue8m0_checkpoint_on_ascend_says_the_format_does_not_apply(tmp_path):
    """A V3.1 checkpoint (scale_fmt ue8m0) runs on ascend_w8a8: A2/A3 have no FP8, so its int8 per-token activation
    scales stay as they are, and the dispatch table says the format does not apply (the declared limit)."""
    from core.default_model import DEFAULT_CONFIG, float_state_dict, write_checkpoint

    config = {**DEFAULT_CONFIG, "num_hidden_layers": 2, "num_nextn_predict_layers": 0,
              "quantization_config": {**DEFAULT_CONFIG["quantization_config"], "scale_fmt": "ue8m0"}}
    write_checkpoint(tmp_path, checkpoint_tensors(float_state_dict(config, seed=5)), config)
    env = {"DSV3_BACKENDS_PATH": str(ROOT / "backends" / "ascend" / "variants")}
    proc = run_cli("core.run", "--backend", "ascend_w8a8", "--simulate", "--model", str(tmp_path), "--dtype",
                   "bfloat16", "--prompt-ids", "0,71,104,104", "--max-new-tokens", "2", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    dispatch = json.loads(proc.stdout.strip().splitlines()[-1])["dispatch"]
    for op in ("linear", "moe_experts"):
        assert dispatch[op].endswith("[w8a8_int8]; scale_fmt ue8m0 does not apply to numerics class w8a8_int8"), dispatch
