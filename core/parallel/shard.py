"""The shard plan: which slice of every split weight a rank holds (ARCHITECTURE.md, "Parallelism"; the layout of
DeepSeek's inference/model.py).

    attention      heads [h0, h1): q_b_proj (or q_proj) and kv_b_proj rows of those heads, o_proj columns of
                   them; q_a_proj, kv_a_proj_with_mqa and their norms replicated (every rank keeps the whole
                   latent cache)
    dense MLP      intermediate rows [i0, i1) of gate_proj/up_proj, the same columns of down_proj
    shared experts the same split of their (n_shared * moe_intermediate) rows
    routed experts whole experts [e0, e1) (expert parallel); the router and its bias replicated
    vocabulary     rows [v0, v1) of embed_tokens and lm_head

Every split is contiguous and even: a dimension that does not divide by the world size is refused with one line
naming the field and the degrees that divide it.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.config import ModelConfig
from core.errors import UserError


def divisors(n: int, limit: int = 1024) -> list[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@dataclass(frozen=True)
class Span:
    """[start, stop) of a dimension of `total`."""

    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.total

    def scaled(self, unit: int) -> "Span":
        """The same split in units `unit` times larger (heads -> rows of a per-head weight)."""
        return Span(self.start * unit, self.stop * unit, self.total * unit)


def even_split(total: int, rank: int, world: int, what: str) -> Span:
    if total % world:
        raise UserError(f"{what} = {total} does not divide over {world} ranks; world sizes that fit: "
                        f"{', '.join(map(str, divisors(total, 64)))}")
    n = total // world
    return Span(rank * n, (rank + 1) * n, total)


@dataclass(frozen=True)
class ShardPlan:
    rank: int
    world_size: int
    heads: Span
    dense_inter: Span
    shared_inter: Span | None
    experts: Span
    vocab: Span

    @staticmethod
    def for_rank(cfg: ModelConfig, rank: int, world_size: int) -> "ShardPlan":
        """The plan of `rank` in a world of `world_size` (1: everything whole)."""
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts if cfg.n_shared_experts else 0
        return ShardPlan(
            rank=rank,
            world_size=world_size,
            heads=even_split(cfg.num_attention_heads, rank, world_size, "num_attention_heads"),
            dense_inter=even_split(cfg.intermediate_size, rank, world_size, "intermediate_size")
            if cfg.first_k_dense_replace or not cfg.n_routed_experts else Span(0, cfg.intermediate_size,
                                                                                  cfg.intermediate_size),
            shared_inter=even_split(shared, rank, world_size, "moe_intermediate_size * n_shared_experts")
            if shared else None,
            experts=even_split(cfg.n_routed_experts, rank, world_size, "n_routed_experts")
            if cfg.n_routed_experts else Span(0, 0, 0),
            vocab=even_split(cfg.vocab_size, rank, world_size, "vocab_size"),
        )

    @property
    def single(self) -> bool:
        return self.world_size == 1

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: heads [{self.heads.start}, {self.heads.stop}), experts "
                f"[{self.experts.start}, {self.experts.stop}), vocab [{self.vocab.start}, {self.vocab.stop})")
