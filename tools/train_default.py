"""Train the embedded default: a tiny DeepSeek-V3 on Python's own help topics, written as a real Hugging Face
checkpoint directory (FP8 128x128 block weights, tokenizer, chat template, generation config).

    python -m tools.train_default --out core/default_checkpoint            # the shipped model (~15 min, 2 cores)
    python -m tools.train_default --out /tmp/t --steps 20 --tiny           # a smoke run in seconds

What is trained (plain PyTorch, float32, seeded; the same command on the same Python and torch gives the same bits):
- a byte-level BPE tokenizer (`tokenizers`) on the training topics, DeepSeek-V3's special tokens first;
- transformers' `DeepseekV3ForCausalLM` built from a small config with every DeepSeek-V3 feature on: q_lora, YaRN
  rope (interleaved, as DeepSeek's checkpoints store it), a dense first layer then DeepSeekMoE layers (sigmoid
  noaux_tc routing in groups, a shared expert, renormalised top-k weights x routed_scaling_factor);
- the routers' correction bias learned without an auxiliary loss, as DeepSeek-V3 (arXiv 2412.19437, 2.1.2) does it:
  after every step, bias_e += gamma * sign(mean load - load_e), never by gradient;
- one MTP module (DeepSeek-V3 2.2): h' = MoE decoder layer(eh_proj([enorm(Emb(t_{i+1})), hnorm(h_i)])), sharing the
  embedding and output head, trained to predict t_{i+2} with its own cross-entropy, weighted by --mtp-weight.
The held-out topics (tools.default_corpus) are scored every --eval-every steps (bits per byte); the best state is
exported. Export: experts unfused into the per-expert layout DeepSeek ships, the MTP module as layer
num_hidden_layers, every *_proj weight block-quantised to FP8 e4m3 with 128x128 scales, norms/embeddings/head/eh_proj
in bfloat16, router weight and correction bias float32. Partial edge blocks: q_lora_rank 96, kv_a rows 64 + 32 = 96,
kv_lora_rank 64 and moe_intermediate_size 64 fill less than one 128 block. Every dimension is either below 128 or a
multiple of it, because transformers 5's FP8 dequantiser derives the block size from the scale grid
(rows // scale_rows): a 192-row weight would load wrong there, silently, and the checkpoint must load in
`DeepseekV3ForCausalLM.from_pretrained` unchanged.

Shipped run (core/default_checkpoint/training.json has the command, the loss curve and the timing):
    python -m tools.train_default --out core/default_checkpoint --steps 700 --batch 16 --seq 64 --threads 1
        --save-state /tmp/state.pt      # 1377 s at 0.51 steps/s on a shared 2-core machine (load ~12)
    python -m tools.train_default --out DIR --from-state /tmp/state.pt      # re-export only
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from tools.default_corpus import split

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"

MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=384, moe_intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
             qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_group=4, topk_group=2,
             num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
             norm_topk_prob=True, num_nextn_predict_layers=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
             rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "rope_theta": 10000.0},
             bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False, initializer_range=0.02)
TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, q_lora_rank=32,
            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_group=4,
            topk_group=2, num_experts_per_tok=2)
FP8_MODULES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")
QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
GENERATION = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False, "repetition_penalty": 1.0}


# -- tokenizer ---------------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (`tokenizers`), DeepSeek-V3's special tokens at ids 0.. (BOS 0, EOS 1, pad 2, chat and tool
    markers), then the 256 byte symbols, then merges; BOS prepended by the post-processor, as DeepSeek's does."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    from core.engine.default_tokenizer import ASSISTANT, TOOL_MARKERS, USER

    specials = [BOS, EOS, PAD, USER, ASSISTANT, *TOOL_MARKERS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    return tok


def tokenizer_config() -> dict:
    """tokenizer_config.json: the default tokenizer's (DeepSeek-V3's fields and chat template)."""
    from core.engine.default_tokenizer import TOKENIZER_CONFIG

    return dict(TOKENIZER_CONFIG)


# -- model -------------------------------------------------------------------------------------------------------


class MTP(nn.Module):
    """DeepSeek-V3's MTP module (depth 1), its weights named as the checkpoint names them under layer N."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer,
            DeepseekV3RMSNorm,
        )

        d = config.hidden_size
        self.enorm = DeepseekV3RMSNorm(d, config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(d, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = DeepseekV3DecoderLayer(config, config.num_hidden_layers)  # index >= first_k_dense: MoE
        self.head_norm = DeepseekV3RMSNorm(d, config.rms_norm_eps)  # shared_head.norm

    def forward(self, embeds: Tensor, hidden: Tensor, position_embeddings, position_ids: Tensor) -> Tensor:
        """embeds [B, S, D] of t_{i+1}, hidden [B, S, D] the main model's final (normed) h_i -> [B, S, D] normed."""
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        x = self.block(x, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        x = x[0] if isinstance(x, tuple) else x
        return self.head_norm(x)


def build(overrides: dict, seed: int):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    config = DeepseekV3Config(**{**MODEL, **overrides})
    config._attn_implementation = "sdpa"
    model = DeepseekV3ForCausalLM(config).float()
    mtp = MTP(config).float()
    mtp.apply(model._init_weights)
    for module in mtp.modules():
        if hasattr(module, "weight") and "RMSNorm" in type(module).__name__:
            nn.init.ones_(module.weight)
    return config, model, mtp


def routers(model: nn.Module, mtp: nn.Module) -> list[nn.Module]:
    return [m for m in [*model.modules(), *mtp.modules()] if hasattr(m, "e_score_correction_bias")]


class LoadCounter:
    """Counts, per router, how many tokens chose each expert in the current step (forward hooks)."""

    def __init__(self, gates: list[nn.Module]):
        self.gates = gates
        self.counts = [torch.zeros(g.e_score_correction_bias.numel()) for g in gates]
        for i, g in enumerate(gates):
            g.register_forward_hook(lambda _m, _in, out, i=i: self.add(i, out[2]))

    def add(self, i: int, ids: Tensor) -> None:
        if torch.is_grad_enabled():
            self.counts[i] += torch.bincount(ids.flatten(), minlength=self.counts[i].numel()).float()

    def update_bias(self, gamma: float) -> float:
        """bias += gamma * sign(mean load - load), then zero the counts; returns the worst max/mean load."""
        worst = 0.0
        with torch.no_grad():
            for g, c in zip(self.gates, self.counts):
                g.e_score_correction_bias += gamma * torch.sign(c.mean() - c)
                worst = max(worst, float(c.max() / c.mean().clamp(min=1)))
                c.zero_()
        return worst


def losses(model, mtp, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(main cross-entropy of t_{i+1}, MTP cross-entropy of t_{i+2}) on tokens [B, S], mean nats per token."""
    b, s = tokens.shape
    inner = model.model
    positions = torch.arange(s)[None].expand(b, s)
    hidden = inner(input_ids=tokens, position_ids=positions).last_hidden_state  # final-normed, as DeepSeek feeds it
    logits = model.lm_head(hidden)
    main = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    pos = positions[:, 1:]
    rope = inner.rotary_emb(hidden, pos)
    g = mtp(inner.embed_tokens(tokens[:, 1:]), hidden[:, :-1], rope, pos)  # row j: t_{j+1} and h_j
    mtp_logits = model.lm_head(g[:, :-1])  # predicts t_{j+2}
    extra = nn.functional.cross_entropy(mtp_logits.flatten(0, 1), tokens[:, 2:].flatten())
    return main, extra


# -- data and evaluation -----------------------------------------------------------------------------------------


def stream(tok, docs: list[str]) -> Tensor:
    """BOS doc EOS BOS doc EOS ... as one int64 tensor."""
    ids: list[int] = []
    for d in docs:
        ids += tok.encode(d).ids + [1]
    return torch.tensor(ids)


def pieces(tok, text: str, window: int) -> list[list[int]]:
    """A document cut into pieces of at most window - 1 tokens, each scored after BOS (the perplexity protocol)."""
    ids = tok.encode(text, add_special_tokens=False).ids
    return [[0] + ids[i:i + window - 1] for i in range(0, len(ids), window - 1)]


@torch.no_grad()
def bits_per_byte(model, tok, docs: list[str], window: int) -> float:
    nats, nbytes = 0.0, 0
    for d in docs:
        nbytes += len(d.encode())
        for p in pieces(tok, d, window):
            logits = model(input_ids=torch.tensor([p])).logits[0, :-1]
            nats += float(nn.functional.cross_entropy(logits, torch.tensor(p[1:]), reduction="sum"))
    return nats / math.log(2) / nbytes


def unigram_bits_per_byte(train_ids: Tensor, tok, docs: list[str], vocab: int) -> float:
    """The scale: a unigram model of the training tokens (add-one smoothing) on the held-out tokens."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log2()
    bits = sum(-float(logp[tok.encode(d, add_special_tokens=False).ids].sum()) for d in docs)
    return bits / sum(len(d.encode()) for d in docs)


# -- export ------------------------------------------------------------------------------------------------------


def hf_tensors(model, mtp, config) -> dict[str, Tensor]:
    """float32 weights under DeepSeek-V3's checkpoint names (per-expert layout, MTP as layer N)."""
    out: dict[str, Tensor] = {}

    def add(prefix: str, name: str, p: Tensor) -> None:
        if name.endswith("mlp.experts.gate_up_proj"):
            base, inter = prefix + name[:-len("gate_up_proj")], p.shape[1] // 2
            for e in range(p.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = p[e, :inter]
                out[f"{base}{e}.up_proj.weight"] = p[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            base = prefix + name[:-len("down_proj")]
            for e in range(p.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = p[e]
        else:
            out[prefix + name] = p

    for name, p in model.state_dict().items():
        add("", name, p)
    n = config.num_hidden_layers
    for name, p in mtp.state_dict().items():
        if name.startswith("block."):
            add(f"model.layers.{n}.", name[len("block."):], p)
        else:
            add(f"model.layers.{n}.", {"head_norm.weight": "shared_head.norm.weight"}.get(name, name), p)
    out[f"model.layers.{n}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
    out[f"model.layers.{n}.shared_head.head.weight"] = out["lm_head.weight"]
    return {k: v.detach().float().clone() for k, v in out.items()}


def stored(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """As DeepSeek stores them: FP8 codes + weight_scale_inv for *_proj weights, float32 router and bias,
    bfloat16 for everything else."""
    from core.fp8 import quantize_blocks

    out: dict[str, Tensor] = {}
    for name, w in tensors.items():
        module = name.rsplit(".", 2)[-2]
        if name.endswith(".weight") and module in FP8_MODULES:
            out[name], out[name[:-len("weight")] + "weight_scale_inv"] = quantize_blocks(w)
        elif name.endswith(("e_score_correction_bias", "mlp.gate.weight")):
            out[name] = w.float()
        else:
            out[name] = w.to(torch.bfloat16)
    return out


def export(directory: Path, model, mtp, config, tok, heldout: dict[str, str], meta: dict) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    for key in ("_attn_implementation_autoset", "transformers_version", "dtype", "torch_dtype", "output_attentions",
                "output_hidden_states", "return_dict", "use_cache", "_name_or_path", "id2label", "label2id",
                "chunk_size_feed_forward", "problem_type", "is_encoder_decoder", "output_router_logits"):
        cfg.pop(key, None)
    cfg.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", torch_dtype="bfloat16",
               scoring_func="sigmoid", topk_method="noaux_tc", quantization_config=QUANTIZATION)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = stored(hf_tensors(model, mtp, config))
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), ensure_ascii=False, indent=2)
                                                     + "\n", encoding="utf-8")
    (directory / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
    (directory / "heldout.json").write_text(json.dumps({"window": meta["window"], "documents": heldout},
                                                       ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (directory / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.train_default", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="lambda of the MTP loss (DeepSeek-V3: 0.3, then 0.1)")
    p.add_argument("--bias-gamma", type=float, default=5e-3, help="correction-bias update speed (DeepSeek-V3: 0.001 "
                   "over 14.8T tokens; larger here, for a run of a thousand steps)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--window", type=int, default=256, help="held-out scoring: tokens per piece, BOS included")
    p.add_argument("--seed", type=int, default=20241226)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke tests)")
    p.add_argument("--limit-docs", type=int, help="train on the first N topics only (smoke tests)")
    p.add_argument("--save-state", type=Path, help="also save the exported float32 state here (torch.save)")
    p.add_argument("--from-state", type=Path, help="skip training: export this --save-state file")
    p.add_argument("--stop-after", type=int, help="a reproducibility check: run the --steps schedule only this far "
                   "and write only tokenizer.json and training.json (its history must equal the full run's)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    train_docs, held_docs = split()
    train_list = list(train_docs.values())[:args.limit_docs]
    overrides = dict(TINY) if args.tiny else {}
    vocab = overrides.get("vocab_size", MODEL["vocab_size"])
    tok = train_tokenizer(train_list, vocab)
    ids = stream(tok, train_list)
    if args.limit_docs:  # smoke runs: score the first 2000 characters of one held-out topic
        first = next(iter(held_docs))
        held_docs = {first: held_docs[first][:2000]}
    held = list(held_docs.values())
    config, model, mtp = build(overrides, args.seed)
    gates = routers(model, mtp)
    counter = LoadCounter(gates)
    n_params = sum(p.numel() for p in [*model.parameters(), *mtp.parameters()])
    print(f"tokens: train {ids.numel()} (vocab {vocab}, {sum(len(d.encode()) for d in train_list) / ids.numel():.2f} "
          f"bytes/token), held-out topics {list(held_docs)}; parameters {n_params / 1e6:.2f}M", flush=True)
    params = [p for p in [*model.parameters(), *mtp.parameters()] if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    unigram = unigram_bits_per_byte(ids, tok, held, vocab)
    best = (float("inf"), 0, None)
    history = []
    start = time.time()
    saved = torch.load(args.from_state, weights_only=False) if args.from_state is not None else None
    if saved is not None:
        best = (saved["meta"]["heldout_bpb_float32"], saved["meta"]["best_step"], saved["state"])
        args.steps = 0
    last = min(args.steps, args.stop_after) if args.stop_after is not None else args.steps
    for step in range(1, last + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, ids.numel() - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s:s + args.seq] for s in starts.tolist()])
        model.train(), mtp.train()
        main_loss, mtp_loss = losses(model, mtp, batch)
        loss = main_loss + args.mtp_weight * mtp_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        imbalance = counter.update_bias(args.bias_gamma)
        if step % 10 == 0 or step == 1:
            rate = step / (time.time() - start)
            print(f"step {step:5d}  loss {main_loss.item():.3f}  mtp {mtp_loss.item():.3f}  lr {lr:.2e}  "
                  f"max/mean load {imbalance:.2f}  {rate:.2f} steps/s", flush=True)
            history.append({"step": step, "loss": round(main_loss.item(), 4), "mtp_loss": round(mtp_loss.item(), 4)})
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            bpb = bits_per_byte(model, tok, held, args.window)
            print(f"step {step:5d}  held-out {bpb:.4f} bits/byte (unigram {unigram:.4f})", flush=True)
            history[-1]["heldout_bpb"] = round(bpb, 4)
            if bpb < best[0]:
                snapshot = {**model.state_dict(), **{"mtp." + k: v for k, v in mtp.state_dict().items()}}
                best = (bpb, step, {k: v.clone() for k, v in snapshot.items()})
    elapsed = time.time() - start
    if last < args.steps:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tokenizer.json").write_text(tok.to_str(), encoding="utf-8")
        (args.out / "training.json").write_text(json.dumps({"steps": args.steps, "stopped_after": last,
                                                            "history": history}, indent=2) + "\n")
        print(f"stopped after step {last} of {args.steps}; wrote {args.out}", flush=True)
        return 0
    state = best[2]
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("mtp.")})
    mtp.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("mtp.")})
    meta = {"command": "python -m tools.train_default " + " ".join(argv if argv is not None else sys.argv[1:]),
            "python": platform.python_version(), "torch": torch.__version__, "seed": args.seed,
            "steps": args.steps, "best_step": best[1], "heldout_bpb_float32": round(best[0], 4),
            "unigram_bpb": round(unigram, 4), "train_tokens": ids.numel(), "parameters": n_params,
            "seconds": round(elapsed, 1), "steps_per_s": round(args.steps / max(elapsed, 1e-9), 3),
            "window": args.window,
            "heldout_topics": list(held_docs), "history": history}
    if saved is not None:
        meta = saved["meta"]
    if args.save_state is not None:
        torch.save({"state": state, "meta": meta}, args.save_state)
    export(args.out, model, mtp, config, tok, held_docs, meta)
    print(f"best held-out {best[0]:.4f} bits/byte at step {best[1]} (unigram {unigram:.4f}); {elapsed:.0f} s, "
          f"{args.steps / max(elapsed, 1e-9):.2f} steps/s; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
