"""Sharded loading: a rank reads only its slice of a split weight (safetensors `get_slice`), FP8 scale blocks
included, so its host memory follows its shard.

A split whose boundaries fall on 128-row/column block edges (or the tensor's end) keeps the FP8 codes and takes the
matching rows or columns of `weight_scale_inv`. A split that cuts a 128x128 scale block cannot keep one scale per
block, so that one weight is dequantised exactly for this rank (codes x their block's scale, in float32; float64
for float64 models), and the load report names it; `--strict` refuses it instead, naming the tensor and the world
sizes whose splits keep blocks whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.checkpoint import FLOAT_DTYPES, FP8_DTYPES, TensorSource
from core.errors import CheckpointError, UserError
from core.fp8 import scale_grid
from core.ops import FP8_BLOCK, compute_dtype
from core.parallel.shard import Span, divisors


@dataclass(frozen=True)
class Split:
    """Rows (dim 0) or columns (dim 1) `span` of a weight whose split dimension is `units` equal units (heads,
    experts, vocabulary rows...) long in total."""

    dim: int
    span: Span
    units: int


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def read_checked(src: TensorSource, name: str, shape: tuple[int, ...], split: Split,
                 dtypes: tuple[torch.dtype, ...]) -> Tensor:
    """The `split` slice of `name`, after checking the stored (full) shape from the header and the slice's dtype."""
    if not src.has(name):
        raise CheckpointError(f"{src.description}: tensor '{name}' is missing")
    stored = tuple(src.shape(name))
    if stored != tuple(shape):
        raise CheckpointError(f"{src.where(name)}: tensor '{name}' has shape {list(stored)}, expected {list(shape)}")
    t = src.read_slice(name, split.dim, split.span.start, split.span.stop)
    if t.dtype not in dtypes:
        raise CheckpointError(f"{src.where(name)}: tensor '{name}' has dtype {_dtype_name(t.dtype)}, expected one "
                              f"of {', '.join(_dtype_name(d) for d in dtypes)}")
    return t


def cuts_blocks(span: Span) -> bool:
    return span.start % FP8_BLOCK != 0 or (span.stop % FP8_BLOCK != 0 and span.stop != span.total)


def fitting_world_sizes(split: Split) -> list[int]:
    """World sizes whose even split of this dimension keeps every 128 block whole."""
    unit = split.span.total // split.units
    return [n for n in divisors(split.units, 64) if n == 1 or (split.units // n * unit) % FP8_BLOCK == 0]


def read_weight_split(src: TensorSource, name: str, shape: tuple[int, int], split: Split, dtype: torch.dtype,
                      strict: bool, notes: list[str]) -> tuple[Tensor, Tensor | None]:
    """(weight slice, scale_inv slice or None) for `split` of the [N, K] weight `name`. FP8 stays FP8 when the split
    keeps scale blocks whole; otherwise the slice is dequantised (see the module docstring)."""
    w = read_checked(src, name, shape, split, FLOAT_DTYPES + FP8_DTYPES)
    scale_name = name + "_scale_inv"
    if w.dtype not in FP8_DTYPES:
        if src.has(scale_name):
            raise CheckpointError(f"{src.where(name)}: tensor '{name}' is {_dtype_name(w.dtype)} but has a "
                                  f"'{scale_name}': FP8 codes cast without their block scales?")
        return w, None
    grid = scale_grid(*shape)
    b0, b1 = split.span.start // FP8_BLOCK, -(-split.span.stop // FP8_BLOCK)
    scale_split = Split(split.dim, Span(b0, b1, grid[split.dim]), split.units)
    scale = read_checked(src, scale_name, grid, scale_split, (torch.float32,))
    if not cuts_blocks(split.span):
        return w, scale
    where = f"[{split.span.start}, {split.span.stop}) of {'rows' if split.dim == 0 else 'columns'}"
    if strict:
        raise UserError(f"--strict: {name}: this rank's split {where} cuts 128x128 FP8 scale blocks; world sizes "
                        f"that keep them whole: {', '.join(map(str, fitting_world_sizes(split)))}")
    ct = compute_dtype(dtype)
    offset = split.span.start - b0 * FP8_BLOCK
    full = scale.to(ct).repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    full = full.narrow(split.dim, offset, w.shape[split.dim])
    other = 1 - split.dim
    full = full.narrow(other, 0, w.shape[other])
    notes.append(f"{name}: split {where} cuts 128x128 FP8 scale blocks; dequantised to {_dtype_name(ct)} for "
                 f"this rank at load")
    return w.to(ct) * full, None
