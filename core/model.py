"""The DeepSeek-V3 graph: embedding, MLA + (dense MLP | DeepSeekMoE) decoder layers, final norm, LM head, and the
multi-token-prediction module. Device-neutral: every computation is an operator of core.ops (dispatched to the
selected backend) or plain tensor code.

    h = Embed[tokens]
    for each layer:  h = h + MLA(rms_norm(h));  h = h + FFN(rms_norm(h))      (FFN: MLP for the first k, else MoE)
    logits = lm_head(rms_norm(h))
    MTP:  g = Layer_N(eh_proj(cat(enorm(Embed[t_j]), hnorm(h_{j-1}))));  draft logits = lm_head(head_norm(g))

The latent cache is paged (core.batch.PagedCache, contract v2): new latents are written through the batch's slot
mapping. Prefill sequences run MLA naively (their cached latents gathered through their block tables, expanded to
keys and values by kv_b, `attention_prefill`); decode sequences run it absorbed (`mla_decode` over the block table,
W_UK folded into the query and W_UV into the output). One batch may mix both: decode sequences first, then
prefill chunks; only attention splits, every other computation runs once over all tokens.

Parallelism (core.parallel) lives in the weights and the communicator, not in the graph: a rank holds some heads,
intermediate channels, experts and vocabulary rows, and the graph sums or gathers partial results with
`comm.all_reduce` (after o_proj, the dense MLP, the routed + shared experts, the embedding lookup) and
`comm.all_gather` (the LM head's vocabulary slices). With one process every collective is the identity.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from core.backend import choose_block_size
from core.batch import Batch, PagedCache
from core.checkpoint import DirectoryCheckpoint, TensorSource
from core.config import ModelConfig
from core.dispatch import Dispatch
from core.parallel import Parallel
from core.parallel.vocab import masked_lookup
from core.rope import RotaryTable
from core.weights import MLP, MTP, Attention, Layer, Linear, MoE, WeightLoader, Weights


class Model:
    def __init__(self, cfg: ModelConfig, weights: Weights, ops: Dispatch, device: torch.device, dtype: torch.dtype,
                 parallel: Parallel | None = None):
        self.cfg, self.w, self.ops, self.device, self.dtype = cfg, weights, ops, device, dtype
        self.parallel = parallel or Parallel()
        self.comm = self.parallel.comm
        # DeepSeek-V3.1 (quantization_config.scale_fmt "ue8m0"): its inference code rounds activation scales up to
        # powers of two in the plain `Linear` layers only: q_a, kv_a and the routed experts (q_b, kv_b, o, the dense
        # MLP and the shared experts are Column/RowParallelLinear, which do not pass scale_fmt). The same layers of
        # the MTP module follow the same rule. Only numerics classes that quantise activations to FP8 change.
        self.scaled_ops = ops.scaled(cfg.scale_fmt)
        self.routed_experts = self.parallel.routed_experts(self.scaled_ops)  # this rank's share of the expert sum
        self.rope = RotaryTable(cfg.rope, device, dtype)
        self.eps = cfg.rms_norm_eps
        self.router_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    @staticmethod
    def load(source: TensorSource | Path | str, ops: Dispatch, device: torch.device,
             dtype: torch.dtype = torch.bfloat16, with_mtp: bool = True, check_weights: bool = True,
             parallel: Parallel | None = None, progress=None) -> "Model":
        """Load `source`; with `parallel` over several ranks, only this rank's slices (core.parallel). `progress`:
        called with one line of text after each layer (bytes read, seconds). `check_weights`: refuse a checkpoint
        holding NaN or infinite weights (checked on the device)."""
        parallel = parallel or Parallel()
        if not hasattr(source, "config"):
            source = DirectoryCheckpoint(Path(source))
        with torch.no_grad():
            weights = WeightLoader(source, ops, device, dtype, parallel.plan(source.config), parallel.strict,
                                   progress, check_finite=check_weights).load(with_mtp)
        return Model(source.config, weights, ops, device, dtype, parallel)

    @property
    def has_mtp(self) -> bool:
        return self.w.mtp is not None

    def block_size(self, requested: int | None = None) -> int:
        """The cache block size to use: `requested` if the backend's mla_decode takes it (else a one-line
        UserError naming the sizes it takes), or its preferred size when None."""
        return choose_block_size(self.ops.backend, requested)

    def new_cache(self, num_blocks: int, block_size: int, mtp: bool = False) -> PagedCache:
        """A zeroed paged cache of `num_blocks` blocks of `block_size` positions, for every layer (mtp: the MTP
        module's one layer). `block_size` must be one the backend takes (see `block_size`)."""
        layers = 1 if mtp else self.cfg.num_hidden_layers
        return PagedCache(layers, num_blocks, self.block_size(block_size), self.cfg.latent_width, self.dtype,
                          self.device)

    # -- operators with the layer's parameters ---------------------------------------------------------------------

    def _linear(self, x: Tensor, lin: Linear, ops=None) -> Tensor:
        y = (ops or self.ops).linear(x, lin.weight)
        return y if lin.bias is None else y + lin.bias

    def _mlp(self, m: MLP, x: Tensor) -> Tensor:
        if m.gate_up is not None:
            gate_up = self._linear(x, m.gate_up)
        else:
            gate_up = torch.cat([self._linear(x, m.gate), self._linear(x, m.up)], dim=-1)
        return self._linear(self.ops.silu_and_mul(gate_up), m.down)

    def _moe(self, m: MoE, x: Tensor) -> Tensor:
        c = self.cfg
        logits = self._linear(x.to(self.router_dtype), m.router)
        n_group, topk_group = c.gate_groups
        weights, ids = self.ops.moe_gate(logits, m.bias, c.num_experts_per_tok, n_group, topk_group,
                                         c.routed_scaling_factor, c.norm_topk_prob, c.scoring_func, c.group_score)
        y = self.routed_experts(x, m.experts, m.local_experts, weights, ids)  # moe_experts over this rank's experts
        if m.shared is not None:
            y = y + self._mlp(m.shared, x)
        return self.comm.all_reduce(y)

    @staticmethod
    def _absorb(x: Tensor, w: Tensor) -> Tensor:
        """Per-head matmul with an absorbed kv_b half: x [T, H, K] working dtype, w [H, N, K] (per head a linear
        weight, in the dtype the backend's prepare_mla chose) -> [T, H, N] contiguous in x.dtype: one batched matmul
        over heads, rounded once. Weights in [H, N, K] read through a transposed view: torch's CPU bfloat16 bmm runs
        3-4x faster that way than from [H, K, N]; float32 runs the same either way."""
        y = torch.bmm(x.transpose(0, 1).to(w.dtype), w.transpose(1, 2))  # [H, T, N]
        return x.new_empty(x.shape[0], x.shape[1], w.shape[1]).copy_(y.transpose(0, 1))

    def _attention(self, a: Attention, x: Tensor, batch: Batch, cache: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        c, ops = self.cfg, self.ops
        t, h = x.shape[0], a.w_uk.shape[0]  # the heads this rank holds
        nope, pe, r, v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.kv_lora_rank, c.v_head_dim
        if a.q is not None:
            q = self._linear(x, a.q)
        else:
            q = self._linear(ops.rms_norm(self._linear(x, a.q_a, self.scaled_ops), a.q_a_norm, self.eps), a.q_b)
        q = q.view(t, h, nope + pe)
        q_nope, q_pe = q[..., :nope], ops.apply_rope(q[..., nope:], cos, sin)
        kv = self._linear(x, a.kv_a, self.scaled_ops)
        latent = ops.rms_norm(kv[:, :r], a.kv_a_norm, self.eps)
        k_pe = ops.apply_rope(kv[:, None, r:], cos, sin)[:, 0]
        cache.view(-1, cache.shape[-1])[batch.slot_mapping] = torch.cat([latent, k_pe], dim=-1)
        o = q_nope.new_empty(t, h, v)
        nd, td = batch.num_decode, batch.num_decode_tokens
        if nd:  # absorbed path over the block table
            s = batch.new_per_seq
            q_lat = self._absorb(q_nope[:td], a.w_uk).view(nd, s, h, r)
            o_lat = ops.mla_decode(q_lat, q_pe[:td].view(nd, s, h, pe), cache,
                                   batch.block_table[:nd], batch.lens[:nd], c.softmax_scale)
            o[:td] = self._absorb(o_lat.view(td, h, r), a.w_uv)
        if nd < batch.num_seqs:  # naive path: every cached key of every prefill sequence, through its block table
            keys = cache.view(-1, cache.shape[-1])[batch.key_slots]  # [Tk, R+P]
            tk = keys.shape[0]
            kv_full = self._linear(keys[:, :r], a.kv_b).view(tk, h, nope + v)
            k = torch.cat([kv_full[..., :nope], keys[:, None, r:].expand(tk, h, pe)], dim=-1)
            o[td:] = ops.attention_prefill(torch.cat([q_nope[td:], q_pe[td:]], dim=-1), k, kv_full[..., nope:],
                                           batch.prefill_cu_q, batch.prefill_cu_k, c.softmax_scale)
        return self.comm.all_reduce(self._linear(o.reshape(t, h * v), a.o))

    def _layer(self, layer: Layer, h: Tensor, residual: Tensor, batch: Batch, cache: Tensor, cos: Tensor,
               sin: Tensor, next_norm: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder layer on normed input h; returns (next layer's normed input, residual stream)."""
        a = self._attention(layer.attn, h, batch, cache, cos, sin)
        h, residual = self.ops.add_rms_norm(a, residual, layer.post_norm, self.eps)
        f = self._moe(layer.ffn, h) if isinstance(layer.ffn, MoE) else self.comm.all_reduce(self._mlp(layer.ffn, h))
        return self.ops.add_rms_norm(f, residual, next_norm, self.eps)

    # -- the model -------------------------------------------------------------------------------------------------

    def embed(self, tokens: Tensor) -> Tensor:
        """[T] token ids -> [T, D] embeddings (vocabulary parallel: this rank's rows, summed over ranks)."""
        return self.comm.all_reduce(masked_lookup(self.w.embed, tokens, self.w.vocab_start))

    def forward(self, batch: Batch, cache: PagedCache) -> Tensor:
        """Hidden states after the final norm, [T, D], writing the batch's latents into `cache`."""
        x = self.embed(batch.tokens)
        cos, sin = self.rope(batch.positions)
        layers = self.w.layers
        h, residual = self.ops.rms_norm(x, layers[0].input_norm, self.eps), x
        for i, layer in enumerate(layers):
            next_norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.norm
            h, residual = self._layer(layer, h, residual, batch, cache.layers[i], cos, sin, next_norm)
        return h

    def logits(self, hidden: Tensor) -> Tensor:
        """[T, D] final hidden states -> [T, vocab] logits in the working dtype."""
        return self.comm.all_gather(self._linear(hidden, self.w.lm_head), dim=-1)

    def mtp_forward(self, batch: Batch, prev_hidden: Tensor, cache: PagedCache) -> Tensor:
        """The MTP module on tokens t_j (batch.tokens) and the main model's final hidden states h_{j-1}
        (prev_hidden, [T, D]); returns its hidden states after shared_head.norm, ready for `logits`."""
        m: MTP = self.w.mtp
        e = self.ops.rms_norm(self.embed(batch.tokens), m.enorm, self.eps)
        x = self._linear(torch.cat([e, self.ops.rms_norm(prev_hidden, m.hnorm, self.eps)], dim=-1), m.eh_proj)
        cos, sin = self.rope(batch.positions)
        h = self.ops.rms_norm(x, m.layer.input_norm, self.eps)
        g, _ = self._layer(m.layer, h, x, batch, cache.layers[0], cos, sin, m.head_norm)
        return g
