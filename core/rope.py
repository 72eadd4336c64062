"""Rotary position embedding parameters: plain, linear and YaRN scaling, as DeepSeek-V3 and transformers define them.

For YaRN (deepseek_v3_semantics.md §4): frequencies blend between base and base/factor over a ramp whose ends are
floor/ceil of the correction dimensions for beta_fast and beta_slow; cos/sin are multiplied by
`mscale(factor, mscale) / mscale(factor, mscale_all_dim)` (1.0 for V3); the softmax scale is multiplied by
`mscale(factor, mscale_all_dim) ** 2` (0.1352337788608801 for V3 in all). YaRN never depends on the sequence length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.errors import CheckpointError
from core.safe_files import quote_value

SUPPORTED = ("default", "linear", "yarn")
MAX_THETA = 1e12
MAX_FACTOR = 1e4
MAX_ORIGINAL_POSITIONS = 1 << 24
MAX_BETA = 1e6
MAX_MSCALE = 1e3


def _real(source: str, key: str, value: Any, low: float, high: float, low_ok: bool) -> float:
    """A finite number in (low, high] (or [low, high] with `low_ok`), else a CheckpointError naming field and value."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not (low <= value if low_ok else low < value) or value > high):
        name = key if key.startswith("rope") else f"rope {key}"
        raise CheckpointError(f"{source}: {name} must be a finite number in {'[' if low_ok else '('}{low:g}, "
                              f"{high:g}], got {quote_value(value)}")
    return float(value)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str
    theta: float
    dim: int  # qk_rope_head_dim
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float = 1.0  # cos/sin multiplier
    truncate: bool = True

    @staticmethod
    def from_hf(d: dict, dim: int, max_positions: int, source: str) -> "RopeConfig":
        params = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise CheckpointError(f"{source}: rope_parameters must be an object")
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        if not isinstance(rope_type, str) or rope_type not in SUPPORTED:
            raise CheckpointError(f"{source}: rope type {quote_value(rope_type)} is not supported "
                                  f"({', '.join(SUPPORTED)})")
        theta = _real(source, "rope_theta", theta, 1.0, MAX_THETA, False)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{source}: partial_rotary_factor is not supported for MLA")
        if rope_type == "default":
            return RopeConfig("default", float(theta), dim)
        # transformers gives a top-level original_max_position_embeddings priority over the one inside rope_scaling
        original = d.get("original_max_position_embeddings", params.get("original_max_position_embeddings",
                                                                        max_positions))
        factor = params.get("factor")
        if (isinstance(original, bool) or not isinstance(original, int)
                or not 1 <= original <= MAX_ORIGINAL_POSITIONS):
            raise CheckpointError(f"{source}: original_max_position_embeddings must be an integer in "
                                  f"[1, {MAX_ORIGINAL_POSITIONS}], got {quote_value(original)}")
        if factor is None and rope_type == "yarn":
            factor = max_positions / original
        factor = _real(source, "factor", factor, 0.0, MAX_FACTOR, False)
        if rope_type == "linear":
            return RopeConfig("linear", float(theta), dim, float(factor))
        limits = {"beta_fast": (0.0, MAX_BETA, False), "beta_slow": (0.0, MAX_BETA, False),
                  "mscale": (0.0, MAX_MSCALE, True), "mscale_all_dim": (0.0, MAX_MSCALE, True),
                  "attention_factor": (0.0, MAX_MSCALE, False)}
        for key, (low, high, low_ok) in limits.items():
            value = params.get(key)
            if value is not None and not (key.startswith("beta") and value == 0):  # 0: the default, as before
                _real(source, key, value, low, high, low_ok)
        if not isinstance(params.get("truncate", True), bool):
            raise CheckpointError(f"{source}: rope truncate must be true or false, got "
                                  f"{quote_value(params.get('truncate'))}")
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # transformers' rule
            if mscale and mscale_all:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            else:
                attention_factor = yarn_mscale(factor)
        return RopeConfig(
            "yarn", float(theta), dim, float(factor), original,
            float(params.get("beta_fast") or 32), float(params.get("beta_slow") or 1),
            mscale, mscale_all, float(attention_factor), bool(params.get("truncate", True)),
        )

    def to_hf(self) -> dict[str, Any]:
        if self.rope_type == "default":
            return {"rope_theta": self.theta}
        p: dict[str, Any] = {"type": self.rope_type, "factor": self.factor}
        if self.rope_type == "yarn":
            p.update(original_max_position_embeddings=self.original_max_position_embeddings,
                     beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            if self.mscale is not None:
                p["mscale"] = self.mscale
            if self.mscale_all_dim is not None:
                p["mscale_all_dim"] = self.mscale_all_dim
        return {"rope_theta": self.theta, "rope_scaling": p}

    @property
    def softmax_scale_factor(self) -> float:
        """Multiplier of qk_head_dim**-0.5 (transformers applies it to any scaled rope type with mscale_all_dim)."""
        if self.rope_type != "default" and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale_all_dim) ** 2
        return 1.0

    def inv_freq(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """[dim/2] inverse frequencies, computed with transformers' float32 arithmetic (float64 if asked)."""
        exponent = torch.arange(0, self.dim, 2, dtype=torch.int64).to(dtype) / self.dim
        pos_freqs = self.theta ** exponent
        if self.rope_type == "default":
            return 1.0 / pos_freqs
        if self.rope_type == "linear":
            return 1.0 / pos_freqs / self.factor
        low, high = self._correction_range()
        if low == high:
            high += 0.001
        ramp = ((torch.arange(self.dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)
        extrapolation = 1 - ramp
        return 1.0 / (self.factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation

    def _correction_range(self) -> tuple[float, float]:
        def dim_for(rotations: float) -> float:
            return self.dim * math.log(self.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(self.theta))

        low, high = dim_for(self.beta_fast), dim_for(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, self.dim - 1)


class RotaryTable:
    """cos/sin for any positions, on the model's device: `[T, P/2]` in float32 (float64 for float64 models)."""

    def __init__(self, rope: RopeConfig, device: torch.device, dtype: torch.dtype):
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.inv_freq = rope.inv_freq(self.dtype).to(device)
        self.factor = rope.attention_factor

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        angles = positions.to(self.dtype)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.factor, angles.sin() * self.factor
