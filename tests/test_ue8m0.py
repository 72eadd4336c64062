"""DeepSeek-V3.1's FP8 activation-scale format (quantization_config.scale_fmt "ue8m0"): the per-token, per-128-channel
activation scale rounded UP to a power of two before the FP8 cast, on the layers where DeepSeek's own inference code
applies it (its plain `Linear`s: q_a, kv_a and the routed experts; weight scales are read as published).

- the quantiser (core.fp8) against a float64 golden: scales exact powers of two, >= the plain scale and < twice it,
  codes reproduced by an exact float64 scaling; the float32 log2 pitfall it avoids;
- the Triton quantiser (interpreter on the CPU) bit for bit equal to it, e4m3fn and e4m3fnuz;
- Dispatch.scaled: classes with FP8 activation scales switch to their ue8m0 variant, others run unchanged and say so;
- a tiny V3.1-style checkpoint (transformers-written weights, FP8 block-quantised, scale_fmt ue8m0): the flag changes
  the W8A8 run, only on q_a, kv_a and the routed experts; the cuda kernels (interpreter) match cpu_ref's emulation;
  the reference class (DeepSeek's bf16 path) is unchanged by it;
- the conformance ue8m0 cases have teeth: the plain W8A8 class fails them.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from tests.triton_support import INTERPRETER  # noqa: I001  (sets the interpreter mode first)
from backends import cpu_ref
from core import registry
from core.backend import Backend, RunMode
from core.dispatch import Dispatch
from core.errors import UserError
from core.fp8 import E4M3_MAX, quantize_activation, round_up_to_power_of_two
from core.generate import Generator
from core.model import Model
from tests.helpers import GateMargins, build_hf, fresh_seed, route_gate

FNUZ_MAX = 240.0
CPU = torch.device("cpu")


# -- the quantiser against float64 ---------------------------------------------------------------------------------


def activations(g: torch.Generator, tokens: int, k: int, fp8_max: float = E4M3_MAX) -> torch.Tensor:
    """Rows whose magnitudes span 1e-7 (below the 1e-4 amax floor) to 1e3, one row whose scale is exactly a power
    of two (amax = fp8_max * 2^-7), float32."""
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    x *= torch.pow(10.0, torch.empty(tokens, 1, dtype=torch.float64).uniform_(-7, 3, generator=g))
    x[0] = x[0] / x[0, :128].abs().max() * (fp8_max * 2.0 ** -7)
    return x.float()


def golden_power_of_two(s: float) -> float:
    """2^ceil(log2 s) for a positive float, from Python's exact frexp in float64."""
    mantissa, exponent = math.frexp(s)
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


@pytest.mark.parametrize("fp8_dtype,fp8_max", [(torch.float8_e4m3fn, E4M3_MAX), (torch.float8_e4m3fnuz, FNUZ_MAX)])
def test_ue8m0_activation_quantiser_against_float64(fp8_dtype, fp8_max):
    g = torch.Generator().manual_seed(fresh_seed())
    x = activations(g, 24, 384, fp8_max)
    q, s = quantize_activation(x, fp8_dtype=fp8_dtype, fp8_max=fp8_max, ue8m0=True)
    _, plain = quantize_activation(x, fp8_dtype=fp8_dtype, fp8_max=fp8_max)
    x64 = x.double().view(24, 3, 128)
    plain64 = x64.abs().amax(-1).clamp_min(1e-4) / fp8_max  # the float32 division is correctly rounded:
    assert torch.equal(plain.double(), plain64.float().double())  # equal to float64's, rounded once
    want = torch.tensor([[golden_power_of_two(v) for v in row] for row in plain.double().tolist()],
                        dtype=torch.float64)
    assert torch.equal(s.double(), want), "scales are the plain scales rounded up to powers of two"
    assert bool((s >= plain).all()) and bool((s < 2 * plain).all())
    assert s[0, 0] == plain[0, 0] == 2.0 ** -7, "a power of two stays as it is"
    assert bool((s != plain).any()), "the draw must contain scales the rounding changes"
    scaled = x64 / s.double()[..., None]  # exact: dividing by a power of two
    assert float(scaled.abs().max()) <= fp8_max, "no code saturates: |x / s| <= fp8_max by construction"
    want_q = scaled.view(24, 384).to(fp8_dtype)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), "codes = RNE(x / s), computed exactly"
    back = q.double().view(24, 3, 128) * s.double()[..., None]
    assert bool(((back - x64).abs() <= x64.abs() / 16 + s.double()[..., None] * 2.0 ** -9).all()), "codes reproduce x"


def test_round_up_is_exact_where_a_float32_log2_is_not():
    """s = 2^k (1 + 2^-23): a float32 log2 rounds to k, so exp2(ceil(log2 s)) = 2^k < s (DeepSeek's kernel formula
    in float32); the frexp form rounds up to 2^(k+1) as the format's definition asks."""
    ks = torch.tensor([-20, -13, -8, -3, 2, 5], dtype=torch.float32)
    just_above = torch.exp2(ks) * (1 + 2.0 ** -23)
    exact = torch.exp2(ks)
    got = round_up_to_power_of_two(torch.cat([just_above, exact]))
    assert torch.equal(got, torch.cat([exact * 2, exact]))
    naive = torch.exp2(torch.ceil(torch.log2(just_above)))
    assert bool((naive < just_above).any()), "the pitfall this guards against is real on this torch"


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_triton_quantiser_ue8m0_is_bit_exact(fp8_dtype):
    from backends.triton_kernels.quant import quantize_activation as triton_quantize

    fp8_max = E4M3_MAX if fp8_dtype == torch.float8_e4m3fn else FNUZ_MAX
    g = torch.Generator().manual_seed(fresh_seed())
    x = activations(g, 7, 300, fp8_max)  # a ragged last group (300 = 2 * 128 + 44)
    device = CPU if INTERPRETER else torch.device("cuda")
    q, s = triton_quantize(x.to(device), fp8_dtype, None, ue8m0=True)
    want_q, want_s = quantize_activation(x, fp8_dtype=fp8_dtype, fp8_max=fp8_max, ue8m0=True)
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(q.cpu().view(torch.uint8), want_q.view(torch.uint8))
    _, plain_s = triton_quantize(x.to(device), fp8_dtype, None)
    assert not torch.equal(plain_s.cpu(), want_s), "without the flag the scales are the plain ones"


@pytest.mark.parametrize("block_n", [128, 64])
def test_triton_moe_experts_ue8m0_on_both_quantisation_paths(block_n):
    """The SwiGLU output is quantised in the gate_up kernel's epilogue when BLOCK_N is 128, by the act-quant kernel
    otherwise: both paths take the ue8m0 flag (float32, against cpu_ref's w8a8_ue8m0 emulation)."""
    from backends.triton_kernels.moe import moe_experts, prepare_experts
    from core.fp8 import quantize_blocks

    g = torch.Generator().manual_seed(fresh_seed())
    e, inter, hidden, tokens, top_k = 4, 192, 256, 9, 2
    stacks = [quantize_blocks(torch.randn(*shape, generator=g) / shape[-1] ** 0.5)
              for shape in ((e, inter, hidden), (e, inter, hidden), (e, hidden, inter))]
    args = [t for pair in stacks for t in pair]
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    device = CPU if INTERPRETER else torch.device("cuda")
    cfg = {"dot_fp32": True, "buckets": [{"BLOCK_M": 16, "gate_up": {"BLOCK_N": block_n, "BLOCK_K": 128},
                                          "down": {"BLOCK_N": 128, "BLOCK_K": 128}}]}
    prepared = prepare_experts(*[t.to(device) for t in args])
    got = moe_experts(x.to(device), prepared, weights.to(device), ids.to(device), cfg=cfg, ue8m0=True).cpu()
    ref = registry.load("cpu_ref").prepare_experts(*args)
    want = cpu_ref.NUMERICS["w8a8_ue8m0"]["moe_experts"](x, ref, weights, ids)
    plain = cpu_ref.NUMERICS["w8a8"]["moe_experts"](x, ref, weights, ids)
    assert rel(got, want) < 1e-5 and rel(plain, want) > 1e-3, (rel(got, want), rel(plain, want))


# -- Dispatch.scaled -----------------------------------------------------------------------------------------------


def emulation(numerics: str = "w8a8", counts: Counter | None = None) -> Dispatch:
    """cpu_ref running a W8A8 class, with its ue8m0 variant as the backend's scale_fmt_ops (calls counted)."""
    ref = registry.load("cpu_ref")
    variant = cpu_ref.NUMERICS[f"{numerics}_ue8m0"]

    def counted(op):
        def run(*args):
            if counts is not None:
                counts[op] += 1
            return variant[op](*args)
        return run

    backend = Backend(name=f"cpu_ref-{numerics}", device_type="cpu", dist_backend="gloo", probe=ref.probe,
                      ops=dict(cpu_ref.NUMERICS[numerics]), prepare_linear=ref.prepare_linear,
                      prepare_experts=ref.prepare_experts,
                      scale_fmt_ops={"ue8m0": {op: counted(op) for op in ("linear", "moe_experts")}})
    return Dispatch(backend, ref, numerics={"linear": numerics, "moe_experts": numerics})


def test_scaled_dispatch_switches_only_fp8_activation_classes():
    ops = emulation()
    assert ops.scaled(None) is ops
    scaled = ops.scaled("ue8m0")
    assert scaled.linear is not ops.linear and scaled.moe_experts is not ops.moe_experts
    assert scaled.rms_norm is ops.rms_norm and scaled.moe_gate is ops.moe_gate
    assert ops.table()["linear"] == "cpu_ref-w8a8 [w8a8]; [w8a8_ue8m0] on layers with ue8m0 activation scales"
    ref = registry.load("cpu_ref")
    plain = Dispatch(ref, ref)
    same = plain.scaled("ue8m0")
    assert same.linear is plain.linear and same.moe_experts is plain.moe_experts
    assert plain.table()["linear"] == "cpu_ref; scale_fmt ue8m0 does not apply to numerics class reference"
    without = Backend(name="w8a8-only", device_type="cpu", dist_backend="gloo", probe=ref.probe,
                      ops=dict(cpu_ref.NUMERICS["w8a8"]), prepare_linear=ref.prepare_linear,
                      prepare_experts=ref.prepare_experts)
    with pytest.raises(UserError, match="does not implement the checkpoint's activation scale format ue8m0"):
        Dispatch(without, ref, numerics={"linear": "w8a8"}).scaled("ue8m0")


@pytest.mark.parametrize("name", ["cuda", "rocm"])
def test_triton_backends_declare_ue8m0(name):
    backend = registry.load(name)  # registration validates manifest scale_fmts against scale_fmt_ops
    assert {op for op, e in backend.manifest.operators.items() if "ue8m0" in e.scale_fmts} == {"linear", "moe_experts"}
    assert set(backend.scale_fmt_ops["ue8m0"]) == {"linear", "moe_experts"}


def test_manifest_scale_fmts_are_checked(tmp_path):
    """A manifest's scale_fmts must name a known format on linear or moe_experts, and agree with the code."""
    import dataclasses

    from core.backend import Manifest
    from core.errors import ContractError

    cuda = registry.load("cuda")
    with pytest.raises(ContractError, match="scale_fmts in the manifest .* and scale_fmt_ops in the code"):
        dataclasses.replace(cuda, scale_fmt_ops={}).validate()
    for entry, needle in (("rms_norm: {dtypes: [float32], scale_fmts: [ue8m0]}", "rms_norm.scale_fmts"),
                          ("linear: {dtypes: [float32], numerics: w8a8, scale_fmts: [e8m0]}", "linear.scale_fmts")):
        path = tmp_path / "manifest.yaml"
        path.write_text(f"backend: x\noperators:\n  {entry}\n")
        with pytest.raises(ContractError, match=needle):
            Manifest.load(path)


# -- a tiny V3.1-style checkpoint ----------------------------------------------------------------------------------

PROMPT_LEN = 12  # the interpreter is slow
V31_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
             "scale_fmt": "ue8m0"}


def v31_checkpoints(root, seed: int):
    """(ue8m0 directory, plain twin): transformers-written float32 weights, every 2-D *_proj weight FP8
    block-quantised (core.fp8.quantize_blocks, as DeepSeek ships them), config with V3.1's quantization_config; the
    twin has the same tensors and no scale_fmt."""
    from safetensors.torch import load_file, save_file

    from core.fp8 import quantize_blocks

    src = root / "src"
    build_hf(src, seed, mtp=False, num_nextn_predict_layers=0)
    tensors = {}
    for key, t in load_file(str(src / "model.safetensors")).items():
        if key.endswith("_proj.weight") and t.dim() == 2:
            tensors[key], tensors[key[:-len("weight")] + "weight_scale_inv"] = quantize_blocks(t)
        else:
            tensors[key] = t
    config = json.loads((src / "config.json").read_text())
    out = []
    for name, quant in (("v31", V31_QUANT), ("plain", {k: v for k, v in V31_QUANT.items() if k != "scale_fmt"})):
        d = root / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**config, "quantization_config": quant}))
        out.append(d)
    return out


def teacher_forced(directory, ops: Dispatch, prompt: list[int], routes: list | None = None,
                   replay: bool = False) -> torch.Tensor:
    """Prompt logits (float32); moe_gate results appended to `routes`, or with `replay` taken from it in order."""
    route_gate(ops, routes, replay)
    model = Model.load(directory, ops, CPU, torch.float32, with_mtp=False)
    return Generator(model).teacher_forced_logits(prompt)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def v31(tmp_path_factory):
    """A V3.1-style checkpoint, its plain twin and a prompt whose routing (cpu_ref, reference class) is decisive."""
    for _ in range(5):
        seed = fresh_seed()
        ue8m0_dir, plain_dir = v31_checkpoints(tmp_path_factory.mktemp("v31"), seed)
        prompt = torch.randint(2, 96, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed)).tolist()
        ops = emulation()
        margins = GateMargins(ops)
        teacher_forced(ue8m0_dir, ops, prompt)
        if margins.smallest >= 1e-4:
            return ue8m0_dir, plain_dir, prompt, seed
    pytest.fail("could not draw a model with decisive routing in 5 tries")


def test_v31_config_selects_ue8m0_on_q_a_kv_a_and_routed_experts(v31):
    """The W8A8 run of the V3.1 checkpoint uses the ue8m0 operators exactly 2 times per layer (q_a, kv_a) and once
    per MoE layer (the routed experts), and its logits differ from the same weights without scale_fmt."""
    ue8m0_dir, plain_dir, prompt, seed = v31
    counts: Counter = Counter()
    ops = emulation(counts=counts)
    model = Model.load(ue8m0_dir, ops, CPU, torch.float32, with_mtp=False)
    assert model.cfg.scale_fmt == "ue8m0" and model.cfg.fp8
    got = Generator(model).teacher_forced_logits(prompt)
    layers, dense = model.cfg.num_hidden_layers, model.cfg.first_k_dense_replace
    forwards = 1  # teacher_forced_logits: one prefill of the whole prompt
    assert counts == {"linear": 2 * layers * forwards, "moe_experts": (layers - dense) * forwards}, counts
    plain_ops = emulation(counts=counts)
    plain = teacher_forced(plain_dir, plain_ops, prompt)
    assert counts["linear"] == 2 * layers, "the twin without scale_fmt never calls the ue8m0 operators"
    assert "ue8m0" not in plain_ops.table()["linear"]
    assert rel(got, plain) > 1e-3, f"seed {seed}: the flag must change a W8A8 run ({rel(got, plain):.2e})"


def test_v31_reference_class_is_unchanged_by_the_flag(v31):
    """DeepSeek's own default path (weights dequantised, bf16 GEMMs) never quantises activations: cpu_ref's
    reference class gives the same logits with and without scale_fmt, and its table says the format does not apply."""
    ue8m0_dir, plain_dir, prompt, _ = v31
    ref = registry.load("cpu_ref")
    ops = Dispatch(ref, ref)
    got = teacher_forced(ue8m0_dir, ops, prompt)
    want = teacher_forced(plain_dir, Dispatch(ref, ref), prompt)
    assert torch.equal(got, want)
    assert "scale_fmt ue8m0 does not apply to numerics class reference" in ops.table()["moe_experts"]


def test_v31_cuda_kernels_match_cpu_ref_ue8m0_emulation(v31):
    """The cuda backend (Triton interpreter here, the GPU on a GPU machine) on the V3.1 checkpoint: every call of its
    ue8m0 operators (q_a, kv_a, the routed experts) is within float32 reordering of cpu_ref's w8a8_ue8m0 emulation
    on the same inputs, and the run is far from its own run of the plain twin (routing replayed).

    Calls are compared one by one, not the logits: a 1e-7 reordering difference upstream can move an activation
    across an FP8 rounding boundary in a later W8A8 layer, a legitimate jump of one code (up to 6%) that end-to-end
    comparison would blame on the ue8m0 operators."""
    import dataclasses

    ue8m0_dir, plain_dir, prompt, seed = v31
    backend, _ = registry.activate("cuda", RunMode(interpret=INTERPRETER))
    calls: list = []

    def recorded(op, kernel):
        def run(*args):
            out = kernel(*args)
            calls.append((op, args, out))
            return out
        return run

    kernels = backend.scale_fmt_ops["ue8m0"]
    recording = dataclasses.replace(backend, scale_fmt_ops={"ue8m0": {op: recorded(op, k) for op, k in
                                                                      kernels.items()}})
    ops = Dispatch(recording, registry.load("cpu_ref"), strict=True)
    routes: list = []
    ours = teacher_forced(ue8m0_dir, ops, prompt, routes)
    assert ops.table()["linear"] == "cuda [w8a8]; [w8a8_ue8m0] on layers with ue8m0 activation scales"
    cfg = json.loads((ue8m0_dir / "config.json").read_text())
    layers, dense = cfg["num_hidden_layers"], cfg["first_k_dense_replace"]
    assert Counter(op for op, _, _ in calls) == {"linear": 2 * layers, "moe_experts": layers - dense}
    variant = cpu_ref.NUMERICS["w8a8_ue8m0"]
    for i, (op, args, out) in enumerate(calls):
        assert rel(out, variant[op](*args)) < 1e-5, f"seed {seed}: call {i} ({op}) differs from the emulation"
    without = teacher_forced(plain_dir, Dispatch(backend, registry.load("cpu_ref"), strict=True), prompt, routes,
                             replay=True)
    assert rel(ours, without) > 1e-3, f"seed {seed}: scale_fmt ue8m0 had no effect on the cuda run"


# -- conformance cases have teeth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("op,case_name", [("linear", "ue8m0-partial-blocks"), ("linear", "v3.1-ue8m0-q_a"),
                                          ("moe_experts", "ue8m0-fp8-partial-blocks")])
def test_conformance_ue8m0_cases_fail_the_plain_w8a8_class(op, case_name):
    """A kernel that ignored the format (plain w8a8 scales) would fail the case's float32 tolerance: cpu_ref's plain
    emulation is farther from the w8a8_ue8m0 golden than the tolerance the case is judged with."""
    from conformance.inputs import Hooks, build
    from conformance.op_checks import load_cases
    from conformance.tolerances import ToleranceTable

    case = next(c for c in load_cases()[op] if c["name"] == case_name)
    assert case["scale_fmt"] == "ue8m0"
    inputs = build(op, case, torch.Generator().manual_seed(fresh_seed()))
    ref = registry.load("cpu_ref")
    hooks = Hooks(ref.prepare_linear, ref.prepare_experts)
    golden = cpu_ref.NUMERICS["w8a8_ue8m0"][op](*inputs.make(torch.float32, torch.float64, CPU, hooks))
    plain = cpu_ref.NUMERICS["w8a8"][op](*inputs.make(torch.float32, torch.float32, CPU, hooks))
    ue8m0 = cpu_ref.NUMERICS["w8a8_ue8m0"][op](*inputs.make(torch.float32, torch.float32, CPU, hooks))
    tol = ToleranceTable(ref.manifest).lookup(op, "float32", "w8a8_ue8m0").rtol
    assert rel(ue8m0, golden) <= tol
    assert rel(plain, golden) > 3 * tol, f"{rel(plain, golden):.2e} vs tolerance {tol}"
