"""Reading checkpoints in the Hugging Face DeepSeek-V3 layout: one `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Tensors are read one at a time (never the whole file), and every problem is reported
as a CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from core.config import ModelConfig
from core.errors import CheckpointError

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorSource(Protocol):
    """What the model loader reads from: a directory on disk or the embedded default held in memory."""

    config: ModelConfig
    description: str

    def has(self, name: str) -> bool: ...

    def read(self, name: str) -> Tensor: ...

    def where(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor: ...


def check_tensor(source: TensorSource, name: str, shape: Iterable[int], dtypes: tuple[torch.dtype, ...]) -> Tensor:
    """Read `name`, refusing a missing tensor, another shape or a dtype outside `dtypes`."""
    if not source.has(name):
        raise CheckpointError(f"{source.description}: tensor '{name}' is missing")
    t = source.read(name)
    shape = tuple(shape)
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"{source.where(name)}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}"
        )
    if t.dtype not in dtypes:
        raise CheckpointError(
            f"{source.where(name)}: tensor '{name}' has dtype {str(t.dtype).replace('torch.', '')}, expected one of "
            f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}"
        )
    return t


class DirectoryCheckpoint:
    """A Hugging Face checkpoint directory: config.json plus safetensors (single file or sharded with an index)."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        self.directory = directory
        self.description = str(directory)
        self.config = ModelConfig.from_file(directory / "config.json")
        self._handles: dict[str, object] = {}
        self._weight_map = self._read_index()

    def _read_index(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: invalid JSON ({e})") from None
            except OSError as e:
                raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: expected an object with a 'weight_map' of tensor name -> file")
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).is_file():
                    raise CheckpointError(f"{index}: names shard '{shard}', which is not in {self.directory}")
            return weight_map
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if SINGLE_FILE in files:
            files = [SINGLE_FILE]
        if len(files) != 1:
            raise CheckpointError(
                f"{self.directory}: expected {SINGLE_FILE} or {INDEX_FILE}, found "
                f"{', '.join(files) if files else 'no .safetensors files'}"
            )
        return {name: files[0] for name in self._open(files[0]).keys()}

    def _open(self, shard: str):
        if shard not in self._handles:
            path = self.directory / shard
            try:
                self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[shard]

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def where(self, name: str) -> str:
        return str(self.directory / self._weight_map.get(name, "?"))

    def names(self) -> list[str]:
        return list(self._weight_map)

    def read(self, name: str) -> Tensor:
        shard = self._weight_map[name]
        handle = self._open(shard)
        if name not in handle.keys():
            raise CheckpointError(f"{self.directory / INDEX_FILE}: maps '{name}' to '{shard}', which lacks it")
        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.directory / shard}: cannot read tensor '{name}' ({e})") from None

    def _handle(self, name: str):
        shard = self._weight_map[name]
        handle = self._open(shard)
        if name not in handle.keys():
            raise CheckpointError(f"{self.directory / INDEX_FILE}: maps '{name}' to '{shard}', which lacks it")
        return handle, shard

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the file's header (nothing read)."""
        handle, shard = self._handle(name)
        try:
            return tuple(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.directory / shard}: cannot read tensor '{name}' ({e})") from None

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor, reading only those bytes' pages."""
        handle, shard = self._handle(name)
        try:
            part = handle.get_slice(name)
            return part[start:stop] if dim == 0 else part[:, start:stop]
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.directory / shard}: cannot read tensor '{name}' ({e})") from None


class MemoryCheckpoint:
    """Tensors held in memory under their checkpoint names (the embedded default model)."""

    def __init__(self, config: ModelConfig, tensors: dict[str, Tensor], description: str):
        self.config = config
        self.tensors = tensors
        self.description = description

    def has(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> Tensor:
        return self.tensors[name]

    def where(self, name: str) -> str:
        return self.description

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        return self.tensors[name].narrow(dim, start, stop - start)

    def names(self) -> list[str]:
        return list(self.tensors)
