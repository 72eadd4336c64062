"""The model `core.run`, `core.serve` and `core.engine.llm.LLM` use without `--model`: the embedded default.

By default that is the tiny DeepSeek-V3 trained on Python's help topics and shipped in the package as a real Hugging
Face checkpoint directory (`core/default_checkpoint/`, written by `tools/train_default.py`), loaded through the same
loader as a user's checkpoint. With the environment variable DSV3_EMBEDDED=generated it is instead the model
`core.default_model` generates from a seed (random weights, byte-level ids, every feature on with decisive routing):
the deterministic fixture the tests and the op/block/model conformance levels are built on.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import CheckpointError, UserError

EMBEDDED_DIR = Path(__file__).resolve().parent / "default_checkpoint"
ENV = "DSV3_EMBEDDED"
CHOICES = ("trained", "generated")
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def embedded_choice() -> str:
    """`trained` (the default) or `generated`, from DSV3_EMBEDDED."""
    choice = os.environ.get(ENV, "trained") or "trained"
    if choice not in CHOICES:
        raise UserError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    return choice


def trained_dir() -> Path:
    """The shipped checkpoint directory; a one-line error naming the missing file if the package lacks it."""
    for name in FILES:
        if not (EMBEDDED_DIR / name).is_file():
            raise CheckpointError(f"the embedded default {EMBEDDED_DIR / name} is missing (reinstall the package with "
                                  f"its data, pass --model DIR, or set {ENV}=generated)")
    return EMBEDDED_DIR


def embedded_model_dir() -> Path | None:
    """The directory to load when no --model is given, or None for the generated model (core.default_model)."""
    return trained_dir() if embedded_choice() == "trained" else None
