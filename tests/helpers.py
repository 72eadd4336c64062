"""Test helpers: tiny transformers DeepseekV3 models as the independent oracle, written in the real Hugging Face
layout, with MTP weights added the way DeepSeek's checkpoints carry them (layer num_hidden_layers)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conformance.compare import routing_margins
from core import registry
from core.dispatch import Dispatch
from core.model import Model

ROOT = Path(__file__).resolve().parent.parent

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 10000.0}


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def tiny_config(**overrides):
    from transformers import DeepseekV3Config

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16, n_group=4, topk_group=2,
              num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, rope_parameters=dict(YARN),
              max_position_embeddings=512, routed_scaling_factor=2.5, eos_token_id=1, bos_token_id=0)
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def init_weights(model, seed: int, gate_gain: float = 3.0) -> None:
    """O(1) activations, decisive routing (router logits ~ N(0, gate_gain^2)), a non-zero correction bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                gain = gate_gain if name.endswith("mlp.gate.weight") else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * gain / fan_in ** 0.5)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(0.1 * torch.randn(module.e_score_correction_bias.shape,
                                                                        generator=g))


def build_hf(directory: Path, seed: int, mtp: bool = True, **overrides):
    """Write a tiny random DeepseekV3ForCausalLM (float32) with save_pretrained, plus MTP weights; return it."""
    from transformers import DeepseekV3ForCausalLM

    cfg = tiny_config(**overrides)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    init_weights(model, seed)
    model.save_pretrained(directory)
    if mtp and cfg.num_nextn_predict_layers:
        add_mtp_weights(directory, cfg, seed + 1)
    return model


def add_mtp_weights(directory: Path, cfg, seed: int) -> None:
    """Append layer `num_hidden_layers` (the MTP module) to model.safetensors, as a MoE decoder layer."""
    from transformers import DeepseekV3ForCausalLM

    g = torch.Generator().manual_seed(seed)
    donor_cfg = cfg.__class__(**{**cfg.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 0})
    donor = DeepseekV3ForCausalLM(donor_cfg).float()
    init_weights(donor, seed)
    n, d = cfg.num_hidden_layers, cfg.hidden_size
    tensors = load_file(str(directory / "model.safetensors"))
    for name, p in donor.model.layers[0].state_dict().items():
        if name == "mlp.experts.gate_up_proj":
            inter = p.shape[1] // 2
            for e in range(p.shape[0]):
                tensors[f"model.layers.{n}.mlp.experts.{e}.gate_proj.weight"] = p[e, :inter].clone()
                tensors[f"model.layers.{n}.mlp.experts.{e}.up_proj.weight"] = p[e, inter:].clone()
        elif name == "mlp.experts.down_proj":
            for e in range(p.shape[0]):
                tensors[f"model.layers.{n}.mlp.experts.{e}.down_proj.weight"] = p[e].clone()
        else:
            tensors[f"model.layers.{n}.{name}"] = p.clone()
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.{n}.{name}.weight"] = 1.0 + 0.1 * torch.randn(d, generator=g)
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(d, 2 * d, generator=g) / (2 * d) ** 0.5
    tensors[f"model.layers.{n}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{n}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def hf_mtp(main, directory: Path):
    """transformers' MtpModel for `main`, with its weights copied from the checkpoint's MTP layer."""
    from transformers.modeling_layers import MtpModel

    tensors = load_file(str(directory / "model.safetensors"))
    n = main.config.num_hidden_layers
    p = f"model.layers.{n}."
    mtp = MtpModel(main, 1).float().eval()
    layer = mtp.layers[0]
    with torch.no_grad():
        layer.enorm.weight.copy_(tensors[p + "enorm.weight"])
        layer.hnorm.weight.copy_(tensors[p + "hnorm.weight"])
        layer.eh_proj.weight.copy_(tensors[p + "eh_proj.weight"])
        layer.post_norm.weight.copy_(tensors[p + "shared_head.norm.weight"])
        for name, param in layer.mtp_block.named_parameters():
            if name == "mlp.experts.gate_up_proj":
                param.copy_(torch.stack([torch.cat([tensors[f"{p}mlp.experts.{e}.gate_proj.weight"],
                                                    tensors[f"{p}mlp.experts.{e}.up_proj.weight"]])
                                         for e in range(param.shape[0])]))
            elif name == "mlp.experts.down_proj":
                param.copy_(torch.stack([tensors[f"{p}mlp.experts.{e}.down_proj.weight"]
                                         for e in range(param.shape[0])]))
            else:
                param.copy_(tensors[p + name])
        layer.mtp_block.mlp.gate.e_score_correction_bias.copy_(tensors[p + "mlp.gate.e_score_correction_bias"])
    return mtp


def reference_dispatch() -> Dispatch:
    ref = registry.load("cpu_ref")
    return Dispatch(ref, ref)


def load_ours(source, dtype=torch.float32, with_mtp: bool = True, ops: Dispatch | None = None) -> Model:
    return Model.load(source, ops or reference_dispatch(), torch.device("cpu"), dtype, with_mtp=with_mtp)


class GateMargins:
    """Wraps a Dispatch's moe_gate to record the smallest routing margin: between the k-th and (k+1)-th biased
    expert score, and between the kept and the best dropped group. Tiny margins make float32 comparisons flip."""

    def __init__(self, ops: Dispatch):
        self.smallest = float("inf")
        inner = ops.moe_gate

        def gate(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring="sigmoid", group_score="top2_sum"):
            if logits.shape[0]:
                margins = routing_margins(logits, bias, top_k, n_group, topk_group, scoring, group_score)
                self.smallest = min(self.smallest, float(margins.min()))
            return inner(logits, bias, top_k, n_group, topk_group, scale, renorm, scoring, group_score)

        ops.moe_gate = gate


def run_main(module: str, *args: str) -> subprocess.CompletedProcess:
    """Run a CLI's main() in this process through the same wrapper the `python -m` entry point uses: exit status,
    stdout and stderr as a subprocess would give them, without paying for a new interpreter."""
    import contextlib
    import importlib
    import io

    from core.run import run_cli as wrapper

    mod = importlib.import_module(module if module != "conformance" else "conformance.__main__")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = wrapper(mod.main, list(args))
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m <args>` in the repository root with the test interpreter."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a CLI run failed the way bad input must: exit status 2, exactly one line on stderr, no traceback,
    naming every needle. Returns that line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def golden_moe(x, gate, up, down, weights, ids):
    """The routed-expert sum in float64, token by token, slot by slot, as the contract states it: an id of -1 (an
    expert held by another rank) contributes nothing."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            xt = x[t].double()
            h = torch.nn.functional.silu(gate[e].double() @ xt) * (up[e].double() @ xt)
            out[t] += float(weights[t, j]) * (down[e].double() @ h)
    return out


CHI2_FALSE_ALARM = 1e-6


def chi2_limit(df: int, false_alarm: float = CHI2_FALSE_ALARM) -> float:
    """The chi-square quantile with upper tail `false_alarm` (bisection on the regularised upper incomplete gamma).
    1e-6, not 1e-4: the suite runs 7 chi-square tests per CI run, and with cells expected as few as 5 times Pearson's
    statistic has a heavier tail than the chi-square law: simulated on this suite's 12-token distributions (n = 20000)
    the Wilson-Hilferty 1e-4 limit was exceeded 1.4e-4 of the time (1e-3 per CI run), the exact 1e-6 limit 4.4e-6
    (3e-5 per CI run). A sampler bug moves the statistic by hundreds or more at these sample sizes."""
    a = torch.tensor(df / 2, dtype=torch.float64)
    tail = lambda x: float(torch.special.gammaincc(a, torch.tensor(x / 2, dtype=torch.float64)))
    lo, hi = 0.0, float(df) + 10.0
    while tail(hi) > false_alarm:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tail(mid) > false_alarm else (lo, mid)
    return hi


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom. Cells expected fewer than 5 times are pooled, the smallest first,
    until the pooled cell is expected at least 5 times (taking in the smallest large cells if it must): the
    chi-square approximation needs every cell at 5 or more; a pooled cell expected 0.3 times that sees 3 draws
    would alone add 24 to the sum."""
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the distribution's support was drawn"
    expected, observed = probs[support].double() * counts.sum(), counts[support].double()
    order = expected.argsort()
    expected, observed = expected[order], observed[order]
    take = 0
    while take < expected.numel() and (expected[take] < 5 or 0 < expected[:take].sum() < 5):
        take += 1
    if take > 1:
        expected = torch.cat([expected[:take].sum()[None], expected[take:]])
        observed = torch.cat([observed[:take].sum()[None], observed[take:]])
    return float(((observed - expected) ** 2 / expected).sum()), int(expected.numel()) - 1


def route_gate(ops, routes: list | None, replay: bool = False) -> None:
    """Wrap `ops.moe_gate` (a Dispatch): its results are appended to `routes`, or, with `replay`, taken from
    `routes` in call order, so a second run routes every token exactly as the first did."""
    gate, calls = ops.moe_gate, iter(range(1 << 30))

    def moe_gate(*args):
        if replay:
            return routes[next(calls)]
        out = gate(*args)
        if routes is not None:
            routes.append(out)
        return out

    ops.moe_gate = moe_gate
