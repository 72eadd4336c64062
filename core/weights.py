"""Loading a checkpoint's tensors into the model's weights, through the backend's prepare hooks.

Names follow the Hugging Face DeepSeek-V3 layout (deepseek_v3_semantics.md §9). FP8 tensors keep their codes and
`weight_scale_inv` blocks; the backend decides what to make of them. The interleaved rope rows of `q_b_proj` (or
`q_proj`) and `kv_a_proj_with_mqa` are permuted to half layout here, once, so no operator sees interleaved pairs.
The permutation stays inside one 128-row scale block for every DeepSeek-V3 shape; a toy shape whose rope rows
straddle a block boundary is dequantised to the working dtype instead (stated, never silent: see `notes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from core.checkpoint import FLOAT_DTYPES, FP8_DTYPES, TensorSource, check_tensor
from core.config import ModelConfig
from core.dispatch import Dispatch
from core.errors import CheckpointError
from core.safe_files import quote_name
from core.fp8 import dequantize_blocks, scale_grid
from core.ops import FP8_BLOCK
from core.parallel.loading import Split, read_checked, read_weight_split
from core.parallel.shard import ShardPlan, Span


@dataclass
class Linear:
    weight: object  # what the backend's prepare_linear returned
    bias: Tensor | None = None


@dataclass
class Attention:
    q_a: Linear | None  # None without q_lora (then q is set)
    q_a_norm: Tensor | None
    q_b: Linear | None
    q: Linear | None
    kv_a: Linear
    kv_a_norm: Tensor
    kv_b: Linear  # expands cached latents for the naive prefill
    w_uk: Tensor  # [H, R, qk_nope] absorbed into the query for decode (dtype: the backend's prepare_mla)
    w_uv: Tensor  # [H, v_head, R] absorbed into the output for decode (same dtype as w_uk)
    o: Linear


@dataclass
class MLP:
    gate_up: Linear | None  # gate and up fused when their rows can be concatenated
    gate: Linear | None
    up: Linear | None
    down: Linear


@dataclass
class MoE:
    router: Linear  # float32 (float64 for float64 models)
    bias: Tensor | None  # e_score_correction_bias, float32
    experts: object  # what prepare_experts returned
    shared: MLP | None
    local_experts: Span | None = None  # the routed experts this rank holds (None: all of them)


@dataclass
class Layer:
    input_norm: Tensor
    attn: Attention
    post_norm: Tensor
    ffn: MLP | MoE


@dataclass
class MTP:
    enorm: Tensor
    hnorm: Tensor
    eh_proj: Linear
    layer: Layer
    head_norm: Tensor


@dataclass
class Weights:
    embed: Tensor
    layers: list[Layer]
    norm: Tensor
    lm_head: Linear
    mtp: MTP | None
    notes: list[str] = field(default_factory=list)
    vocab_start: int = 0  # first vocabulary row of `embed` and `lm_head` on this rank (vocabulary parallel)


def rope_half_permutation(p: int) -> list[int]:
    """Interleaved pairs (x0,x1),(x2,x3).. -> half layout (x0,x2,..,x1,x3,..)."""
    return list(range(0, p, 2)) + list(range(1, p, 2))


def nonfinite_flag(t: Tensor) -> Tensor:
    """A 0-d bool tensor on `t`'s device: whether `t` holds a NaN or an infinity (FP8 e4m3fn codes: a NaN code,
    found bitwise without widening the tensor). Nothing is synchronised here."""
    if t.dtype == torch.float8_e4m3fn:
        return ((t.view(torch.uint8) & 0x7F) == 0x7F).any()
    if t.dtype == torch.float8_e4m3fnuz:
        return (t.view(torch.uint8) == 0x80).any()
    if t.is_floating_point():
        return ~torch.isfinite(t).all()
    return torch.zeros((), dtype=torch.bool, device=t.device)


class WeightLoader:
    """Reads, checks and prepares every weight through the backend's prepare hooks. `shard` (core.parallel): the
    slices this rank keeps (None: everything); `strict` refuses a split that would cut FP8 scale blocks. With
    `check_finite` (the default) every tensor is checked for NaN and infinity on the device, where it already is,
    after its conversion to the working dtype (so an overflow of the cast is found too); the flags are gathered and
    read once at the end of `load`, which names the first bad tensor in load order."""

    def __init__(self, source: TensorSource, ops: Dispatch, device: torch.device, dtype: torch.dtype,
                 shard: ShardPlan | None = None, strict: bool = False,
                 progress: Callable[[str], None] | None = None, check_finite: bool = True):
        self.src, self.ops, self.device, self.dtype = source, ops, device, dtype
        self.cfg: ModelConfig = source.config
        self.notes: list[str] = []
        self.shard = shard or ShardPlan.for_rank(self.cfg, 0, 1)
        self.strict = strict
        self.progress = progress  # called after each layer with "layer i/n: X MiB read in Y s"
        self.bytes_read = 0
        self._started = time.perf_counter()
        self.check_finite = check_finite
        self._flags: list[tuple[str, Tensor]] = []

    def _watch(self, name: str, t: Tensor | None) -> None:
        if self.check_finite and t is not None:
            self._flags.append((name, nonfinite_flag(t)))

    def check_weights(self) -> None:
        """Raise a CheckpointError naming the first tensor that held a NaN or an infinity (one device sync)."""
        if not self._flags:
            return
        bad = torch.stack([f for _, f in self._flags]).cpu().tolist()
        names = [n for (n, _), b in zip(self._flags, bad) if b]
        self._flags.clear()
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            where = self.src.where(names[0]) if self.src.has(names[0]) else self.src.description
            raise CheckpointError(f"{where}: tensor {quote_name(names[0])} holds "
                                  f"NaN or infinite values{more} (skip this check with --no-check-weights)")

    # -- single tensors ------------------------------------------------------------------------------------------

    def tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype | None = None,
               split: Split | None = None) -> Tensor:
        if split is not None and not split.span.whole:
            t = read_checked(self.src, name, shape, split, FLOAT_DTYPES)
        else:
            t = check_tensor(self.src, name, shape, FLOAT_DTYPES)
        self.bytes_read += t.numel() * t.element_size()
        t = t.to(device=self.device, dtype=dtype or self.dtype)
        self._watch(name, t)
        return t

    def raw_weight(self, name: str, shape: tuple[int, int],
                   split: Split | None = None) -> tuple[Tensor, Tensor | None]:
        """(weight, scale_inv) as stored: FP8 codes with their block scales, or a float weight; with `split`, this
        rank's slice only (core.parallel.loading)."""
        if split is not None and not split.span.whole:
            w, scale = read_weight_split(self.src, name, shape, split, self.dtype, self.strict, self.notes)
            self._count(w, scale)
            return w, scale
        w = check_tensor(self.src, name, shape, FLOAT_DTYPES + FP8_DTYPES)
        if w.dtype not in FP8_DTYPES:
            if self.src.has(name + "_scale_inv"):
                raise CheckpointError(
                    f"{self.src.where(name)}: tensor '{name}' is {str(w.dtype).replace('torch.', '')} but has a "
                    f"'{name}_scale_inv': FP8 codes cast without their block scales? (dequantise, then drop the scales)")
            self._count(w, None)
            return w, None
        scale = check_tensor(self.src, name + "_scale_inv", scale_grid(*shape), (torch.float32,))
        self._count(w, scale)
        return w, scale

    def _count(self, w: Tensor, scale: Tensor | None) -> None:
        self.bytes_read += w.numel() * w.element_size() + (0 if scale is None else scale.numel() * 4)

    def _layer_done(self, i: int, total: int) -> None:
        if self.progress is not None:
            self.progress(f"layer {i + 1}/{total}: {self.bytes_read / 2 ** 20:.1f} MiB read in "
                          f"{time.perf_counter() - self._started:.1f} s")

    def linear(self, prefix: str, shape: tuple[int, int], rope_rows: list[tuple[int, int]] = (),
               float_weight_dtype: torch.dtype | None = None, split: Split | None = None) -> Linear:
        """`shape` is the checkpoint's (full) shape; `split` the slice this rank keeps; `rope_rows` are (start,
        length) in the rows kept."""
        w, scale = self.raw_weight(prefix + ".weight", shape, split)
        bias = None
        if self.cfg.attention_bias and prefix.rsplit(".", 1)[-1] in ("q_a_proj", "kv_a_proj_with_mqa", "o_proj"):
            bias = self.tensor(prefix + ".bias", (shape[0],))
            if split is not None and split.dim == 1 and split.span.start != 0:
                bias = torch.zeros_like(bias)  # a column split sums partial outputs: one rank adds the bias
        if rope_rows and self.cfg.rope_interleave:
            w, scale, bias = self._permute_rope_rows(prefix, w, scale, bias, rope_rows)
        return self.prepared(w, scale, bias, float_weight_dtype, name=prefix + ".weight")

    def prepared(self, w: Tensor, scale: Tensor | None, bias: Tensor | None = None,
                 float_weight_dtype: torch.dtype | None = None, name: str = "") -> Linear:
        if scale is None:
            w = w.to(float_weight_dtype or self.dtype)
        w = w.to(self.device)
        scale = scale.to(self.device) if scale is not None else None
        if name:
            self._watch(name, w)
            self._watch(name + "_scale_inv", scale)
        return Linear(self.ops.prepare_linear(w, scale), bias)

    def _permute_rope_rows(self, prefix, w, scale, bias, rope_rows):
        perm = torch.arange(w.shape[0])
        for start, length in rope_rows:
            perm[start:start + length] = start + torch.tensor(rope_half_permutation(length))
        if scale is not None and any(start // FP8_BLOCK != (start + length - 1) // FP8_BLOCK
                                     for start, length in rope_rows):
            self.notes.append(f"{prefix}: rope rows straddle a 128-row scale block; dequantised to "
                              f"{str(self.dtype).replace('torch.', '')} at load")
            w, scale = dequantize_blocks(w, scale, self.dtype), None
        w = w[perm]
        return w, scale, (bias[perm.to(bias.device)] if bias is not None else None)

    # -- blocks --------------------------------------------------------------------------------------------------

    def attention(self, p: str) -> Attention:
        c = self.cfg
        d, heads, r, pe = c.hidden_size, c.num_attention_heads, c.kv_lora_rank, c.qk_rope_head_dim
        qk, nope, v = c.qk_head_dim, c.qk_nope_head_dim, c.v_head_dim
        mine = self.shard.heads  # tensor parallel: this rank's heads
        h = mine.size
        q_rope_rows = [(i * qk + nope, pe) for i in range(h)]
        q_a = q_a_norm = q_b = q = None
        if c.q_lora_rank:
            q_a = self.linear(p + "q_a_proj", (c.q_lora_rank, d))
            q_a_norm = self.tensor(p + "q_a_layernorm.weight", (c.q_lora_rank,))
            q_b = self.linear(p + "q_b_proj", (heads * qk, c.q_lora_rank), q_rope_rows,
                              split=Split(0, mine.scaled(qk), heads))
        else:
            q = self.linear(p + "q_proj", (heads * qk, d), q_rope_rows, split=Split(0, mine.scaled(qk), heads))
        kv_a = self.linear(p + "kv_a_proj_with_mqa", (r + pe, d), [(r, pe)])
        kv_w, kv_scale = self.raw_weight(p + "kv_b_proj.weight", (heads * (nope + v), r),
                                         Split(0, mine.scaled(nope + v), heads))
        dense = dequantize_blocks(kv_w, kv_scale, self.dtype).to(self.device).view(h, nope + v, r)
        w_uk, w_uv = self.ops.prepare_mla(dense[:, :nope].transpose(1, 2).contiguous(), dense[:, nope:].contiguous())
        return Attention(
            q_a=q_a, q_a_norm=q_a_norm, q_b=q_b, q=q, kv_a=kv_a,
            kv_a_norm=self.tensor(p + "kv_a_layernorm.weight", (r,)),
            kv_b=self.prepared(kv_w, kv_scale, name=p + "kv_b_proj.weight"),
            w_uk=w_uk, w_uv=w_uv,
            o=self.linear(p + "o_proj", (d, heads * v), split=Split(1, mine.scaled(v), heads)),
        )

    def mlp(self, p: str, inter: int, mine: Span | None = None) -> MLP:
        """Gate/up rows and down columns `mine` of the `inter` intermediate channels (None: all)."""
        d = self.cfg.hidden_size
        mine = mine or Span(0, inter, inter)
        rows, cols = Split(0, mine, inter), Split(1, mine, inter)
        gate_w, gate_s = self.raw_weight(p + "gate_proj.weight", (inter, d), rows)
        up_w, up_s = self.raw_weight(p + "up_proj.weight", (inter, d), rows)
        down = self.linear(p + "down_proj", (d, inter), split=cols)
        if (gate_s is None) == (up_s is None) and (gate_s is None or mine.size % FP8_BLOCK == 0):
            fused_s = None if gate_s is None else torch.cat([gate_s, up_s])
            return MLP(self.prepared(torch.cat([gate_w, up_w]), fused_s, name=p + "{gate,up}_proj.weight"),
                       None, None, down)
        return MLP(None, self.prepared(gate_w, gate_s, name=p + "gate_proj.weight"),
                   self.prepared(up_w, up_s, name=p + "up_proj.weight"), down)

    def experts(self, p: str) -> object:
        c = self.cfg
        d, inter = c.hidden_size, c.moe_intermediate_size
        parts: dict[str, list] = {k: [] for k in ("gate", "up", "down")}
        for e in range(self.shard.experts.start, self.shard.experts.stop):  # expert parallel: whole experts
            for kind, shape in (("gate", (inter, d)), ("up", (inter, d)), ("down", (d, inter))):
                parts[kind].append(self.raw_weight(f"{p}experts.{e}.{kind}_proj.weight", shape))
        stacked = []
        for kind in ("gate", "up", "down"):
            ws = [w for w, _ in parts[kind]]
            scales = [s for _, s in parts[kind]]
            if len({w.dtype for w in ws}) != 1 or len({s is None for s in scales}) != 1:
                raise CheckpointError(f"{self.src.description}: the experts' {kind}_proj weights of {p[:-1]} "
                                      f"mix FP8 and float tensors")
            w = torch.stack(ws)
            w = (w if scales[0] is not None else w.to(self.dtype)).to(self.device)
            s = torch.stack(scales).to(self.device) if scales[0] is not None else None
            if self.check_finite:
                for i, e in enumerate(range(self.shard.experts.start, self.shard.experts.stop)):  # per expert, on
                    self._watch(f"{p}experts.{e}.{kind}_proj.weight", w[i])        # the device: names the tensor
                    self._watch(f"{p}experts.{e}.{kind}_proj.weight_scale_inv", None if s is None else s[i])
            stacked += [w, s]
        return self.ops.prepare_experts(*stacked)

    def moe(self, p: str) -> MoE:
        c = self.cfg
        router_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        router = self.linear(p + "gate", (c.n_routed_experts, c.hidden_size), float_weight_dtype=router_dtype)
        bias_name = p + "gate.e_score_correction_bias"
        bias = self.tensor(bias_name, (c.n_routed_experts,), router_dtype) if self.src.has(bias_name) else None
        shared = None
        if c.n_shared_experts:
            shared = self.mlp(p + "shared_experts.", c.moe_intermediate_size * c.n_shared_experts,
                              self.shard.shared_inter)
        local = None if self.shard.experts.whole else self.shard.experts
        return MoE(router, bias, self.experts(p), shared, local)

    def layer(self, i: int, moe: bool) -> Layer:
        p = f"model.layers.{i}."
        d = self.cfg.hidden_size
        return Layer(
            input_norm=self.tensor(p + "input_layernorm.weight", (d,)),
            attn=self.attention(p + "self_attn."),
            post_norm=self.tensor(p + "post_attention_layernorm.weight", (d,)),
            ffn=self.moe(p + "mlp.") if moe else self.mlp(p + "mlp.", self.cfg.intermediate_size,
                                                            self.shard.dense_inter),
        )

    def mtp(self) -> MTP | None:
        c = self.cfg
        n = c.num_hidden_layers
        if c.num_nextn_predict_layers < 1:
            return None
        if c.num_nextn_predict_layers > 1:
            self.notes.append(f"{self.src.description}: num_nextn_predict_layers is {c.num_nextn_predict_layers}; "
                              f"speculative decoding uses the first MTP depth (layer {n}) only")
        p, d = f"model.layers.{n}.", c.hidden_size
        if not any(self.src.has(p + k) for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight")):
            self.notes.append(f"{self.src.description}: no MTP weights (model.layers.{n}.*); --mtp is unavailable")
            return None
        return MTP(
            enorm=self.tensor(p + "enorm.weight", (d,)),
            hnorm=self.tensor(p + "hnorm.weight", (d,)),
            eh_proj=self.linear(p + "eh_proj", (d, 2 * d)),
            layer=self.layer(n, moe=c.n_routed_experts > 0),  # the MTP block is MoE (HF: first_k_dense_replace=0)
            head_norm=self.tensor(p + "shared_head.norm.weight", (d,)),
        )

    def load(self, with_mtp: bool = True) -> Weights:
        c = self.cfg
        vocab = Split(0, self.shard.vocab, c.vocab_size)  # vocabulary parallel
        embed = self.tensor("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), split=vocab)
        head_name = "model.embed_tokens" if c.tie_word_embeddings else "lm_head"
        lm_head = self.linear(head_name, (c.vocab_size, c.hidden_size), split=vocab)
        layers = []
        for i in range(c.num_hidden_layers):
            layers.append(self.layer(i, c.is_moe_layer(i)))
            self._layer_done(i, c.num_hidden_layers)
        norm = self.tensor("model.norm.weight", (c.hidden_size,))
        mtp = self.mtp() if with_mtp else None
        self.check_weights()
        return Weights(embed, layers, norm, lm_head, mtp, self.notes, self.shard.vocab.start)
