"""Reading checkpoints in the Hugging Face DeepSeek-V3 layout: one `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Tensors are read one at a time (never the whole file), and every problem is reported
as a CheckpointError naming the file and the tensor.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

import torch
from torch import Tensor

from core.config import ModelConfig
from core.errors import CheckpointError
from core.safe_files import (MAX_INDEX_BYTES, containment_root, open_regular, os_reason, parse_json, quote_name,
                             quote_value, read_json_file, resolve_inside)

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
FP8_DTYPES = (torch.float8_e4m3fn,)
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on a header
MAX_RANK = 8
SAFETENSORS_DTYPES: dict[str, tuple[int, torch.dtype | None]] = {  # name -> (bytes per element, torch dtype)
    "BOOL": (1, torch.bool), "U8": (1, torch.uint8), "I8": (1, torch.int8), "I16": (2, torch.int16),
    "U16": (2, torch.uint16), "I32": (4, torch.int32), "U32": (4, torch.uint32), "I64": (8, torch.int64),
    "U64": (8, torch.uint64), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16), "F32": (4, torch.float32),
    "F64": (8, torch.float64), "F8_E4M3": (1, torch.float8_e4m3fn), "F8_E5M2": (1, torch.float8_e5m2),
    "F8_E8M0": (1, getattr(torch, "float8_e8m0fnu", None)),
}


def dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "")


class TensorSource(Protocol):
    """What the model loader reads from: a directory on disk or the embedded default held in memory.
    `meta(name)` gives (shape, dtype) without reading the data, so a shape can be checked before any allocation."""

    config: ModelConfig
    description: str

    def has(self, name: str) -> bool: ...

    def read(self, name: str) -> Tensor: ...

    def where(self, name: str) -> str: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor: ...


def _check_meta(source: TensorSource, name: str, shape: tuple[int, ...], got_shape: tuple[int, ...],
                got_dtype: torch.dtype | None, dtypes: tuple[torch.dtype, ...]) -> None:
    if got_shape != shape:
        raise CheckpointError(
            f"{source.where(name)}: tensor {quote_name(name)} has shape {list(got_shape)}, expected {list(shape)}"
        )
    if got_dtype not in dtypes:
        raise CheckpointError(
            f"{source.where(name)}: tensor {quote_name(name)} has dtype {dtype_name(got_dtype)}, expected one of "
            f"{', '.join(dtype_name(d) for d in dtypes)}"
        )


def check_tensor(source: TensorSource, name: str, shape: Iterable[int], dtypes: tuple[torch.dtype, ...]) -> Tensor:
    """Read `name`, refusing a missing tensor, another shape or a dtype outside `dtypes`. Where the source can say
    a tensor's shape and dtype without reading it (`meta`), they are checked before anything is allocated."""
    if not source.has(name):
        raise CheckpointError(f"{source.description}: tensor {quote_name(name)} is missing")
    shape = tuple(shape)
    meta = getattr(source, "meta", None)
    if meta is not None:
        _check_meta(source, name, shape, *meta(name), dtypes)
    t = source.read(name)
    _check_meta(source, name, shape, tuple(t.shape), t.dtype, dtypes)
    return t


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header, validated against the file: `start`/`end` are byte offsets into the
    data section and `end - start` is exactly the bytes `shape` x `dtype` need."""

    dtype: torch.dtype | None
    dtype_code: str
    shape: tuple[int, ...]
    start: int
    end: int
    base: int = 0  # where the data section starts in the file (8 + header length)


def read_safetensors_header(path: Path, what: str) -> dict[str, TensorInfo]:
    """The validated header of safetensors file `path` (`what` names it in messages). Every number in it is checked
    before it is used: the header length against the file size and the format's limit, each tensor's dtype,
    rank, dimensions, and offsets against the data section, sizes against shape x dtype, no two tensors overlapping.
    Only the 8-byte length and the header itself are read."""
    fd = open_regular(path, what)
    try:
        size = os.fstat(fd).st_size
        if size < 8:
            raise CheckpointError(f"{what}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
        head = os.pread(fd, 8, 0)
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise CheckpointError(f"{what}: not a valid safetensors file (header length {length} exceeds "
                                  f"{'the file' if 8 + length > size else 'the format limit'})")
        raw = b""
        while len(raw) < length:
            chunk = os.pread(fd, length - len(raw), 8 + len(raw))
            if not chunk:
                raise CheckpointError(f"{what}: not a valid safetensors file (header cut short)")
            raw += chunk
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read ({os_reason(e)})") from None
    finally:
        os.close(fd)
    header = parse_json(raw, f"{what} (safetensors header)", max_depth=3)
    if not isinstance(header, dict):
        raise CheckpointError(f"{what}: not a valid safetensors file (the header is not a JSON object)")
    data_bytes = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{what}: __metadata__ must map strings to strings")
            continue
        bad = f"{what}: tensor {quote_name(name)} has a malformed header entry"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad} (expected dtype, shape and data_offsets, got {quote_value(entry)})")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{bad}: dtype {quote_value(code)} is not one of {', '.join(SAFETENSORS_DTYPES)}")
        if (not isinstance(shape, list) or len(shape) > MAX_RANK
                or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= data_bytes for n in shape)):
            raise CheckpointError(f"{bad}: shape {quote_value(shape)} (at most {MAX_RANK} sizes, each within the file)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) for n in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise CheckpointError(f"{bad}: data_offsets {quote_value(offsets)} are not within the {data_bytes} "
                                  f"data bytes")
        itemsize, dtype = SAFETENSORS_DTYPES[code]
        need = math.prod(shape) * itemsize
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(f"{bad}: shape {shape} x {code} needs {need} bytes, data_offsets hold "
                                  f"{offsets[1] - offsets[0]}")
        infos[name] = TensorInfo(dtype, code, tuple(shape), offsets[0], offsets[1], 8 + length)
    spans = sorted((i.start, i.end, n) for n, i in infos.items() if i.end > i.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{what}: tensors {quote_name(a)} and {quote_name(b)} overlap in the file")
    return infos


def read_config(directory: Path) -> ModelConfig:
    """The config.json of checkpoint `directory`, contained and bounded like every checkpoint file; reads nothing
    else (for the checks and plans made before any weight is read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{quote_name(str(directory))}: no such checkpoint directory")
    path = resolve_inside(containment_root(directory), directory, "config.json", str(directory))
    return ModelConfig.from_file(path, what=quote_name(str(directory / "config.json")))


class DirectoryCheckpoint:
    """A Hugging Face checkpoint directory: config.json plus safetensors (single file or sharded with an index).

    Every file is resolved inside the checkpoint's root (core.safe_files: `..`, absolute names and symlinks leaving
    it are refused; a Hugging Face cache snapshot's links into its `blobs/` stay allowed) and must be a regular
    file. At construction every shard's header is read and validated, and the index is checked against them: each
    tensor it names is in the shard it names, and no tensor is in two shards."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.config = read_config(directory)
        self.directory = directory
        self.root = containment_root(directory)
        self.description = str(directory)
        self._shards: dict[str, Path] = {}  # a file name as the index spells it -> its real path
        self._headers: dict[Path, dict[str, TensorInfo]] = {}
        self._weight_map = self._read_index()

    def _show(self, name: str) -> str:
        return quote_name(str(self.directory / name))

    def resolve(self, name: object, what: str) -> Path:
        """The real path of the file `name` (found in `what`) inside this checkpoint, or a CheckpointError."""
        return resolve_inside(self.root, self.directory, name, what)

    def _read_index(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        shown = self._show(INDEX_FILE)
        if os.path.lexists(index):
            data = read_json_file(self.resolve(INDEX_FILE, str(self.directory)), MAX_INDEX_BYTES, what=shown)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{shown}: expected an object with a 'weight_map' of tensor name -> file")
            for shard in sorted(set(weight_map.values())):
                path = self.resolve(shard, shown)
                if not path.exists():
                    raise CheckpointError(f"{shown}: names shard {quote_name(shard)}, which is not in "
                                          f"{quote_name(str(self.directory))}")
                self._shards[shard] = path
            self._check_headers(weight_map, shown)
            return weight_map
        files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if SINGLE_FILE in files:
            files = [SINGLE_FILE]
        if len(files) != 1:
            raise CheckpointError(
                f"{quote_name(str(self.directory))}: expected {SINGLE_FILE} or {INDEX_FILE}, found "
                f"{', '.join(quote_name(f) for f in files[:10]) if files else 'no .safetensors files'}"
            )
        self._shards[files[0]] = self.resolve(files[0], str(self.directory))
        return {name: files[0] for name in self._header(files[0])}

    def _header(self, shard: str) -> dict[str, TensorInfo]:
        path = self._shards[shard]
        if path not in self._headers:
            self._headers[path] = read_safetensors_header(path, self._show(shard))
        return self._headers[path]

    def _check_headers(self, weight_map: dict[str, str], shown: str) -> None:
        holder: dict[str, str] = {}
        for shard in sorted(self._shards):
            if self._shards[shard] in self._headers:
                continue  # the same file spelled another way
            for name in self._header(shard):
                if name in holder:
                    raise CheckpointError(f"{shown}: tensor {quote_name(name)} is in both {quote_name(holder[name])} "
                                          f"and {quote_name(shard)}; refused (conflicting shards)")
                holder[name] = shard
        for name, shard in weight_map.items():
            if name not in self._header(shard):
                raise CheckpointError(f"{shown}: maps {quote_name(name)} to {quote_name(shard)}, which lacks it")

    def _pread(self, name: str, offset: int, count: int) -> bytearray:
        """`count` bytes of tensor `name` from byte `offset` of its data, read with pread at the validated header's
        offsets: no memory map, so an I/O error, or a file cut short after its header was checked, is one line
        naming the shard (a mapped read would end the process with SIGBUS)."""
        shard = self._weight_map[name]
        info = self._header(shard)[name]
        shown = self._show(shard)
        buf = bytearray(count)
        view, got = memoryview(buf), 0
        fd = open_regular(self._shards[shard], shown)
        try:
            while got < count:
                n = os.preadv(fd, [view[got:]], info.base + info.start + offset + got)
                if n == 0:
                    raise CheckpointError(f"{shown}: cut short while reading tensor {quote_name(name)} (the file "
                                          f"changed after its header was checked)")
                got += n
        except OSError as e:
            raise CheckpointError(f"{shown}: cannot read tensor {quote_name(name)} ({os_reason(e)})") from None
        finally:
            os.close(fd)
        return buf

    def _tensor(self, name: str, data: bytearray, shape: tuple[int, ...]) -> Tensor:
        info = self._header(self._weight_map[name])[name]
        if info.dtype is None:
            raise CheckpointError(f"{self.where(name)}: tensor {quote_name(name)} has dtype {info.dtype_code}, which "
                                  f"this project does not read")
        if not data:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(data, dtype=info.dtype).reshape(shape)

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def where(self, name: str) -> str:
        return self._show(self._weight_map.get(name, "?"))

    def names(self) -> list[str]:
        return list(self._weight_map)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype | None]:
        """(shape, dtype) from the validated header, without reading the tensor."""
        info = self._header(self._weight_map[name])[name]
        return info.shape, info.dtype

    def read(self, name: str) -> Tensor:
        info = self._header(self._weight_map[name])[name]
        return self._tensor(name, self._pread(name, 0, info.end - info.start), info.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape, from the validated header (nothing read)."""
        return self._header(self._weight_map[name])[name].shape

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> Tensor:
        """Rows (dim 0) or columns (dim 1, of a 2-D tensor) [start, stop) of a tensor, reading only those bytes."""
        info = self._header(self._weight_map[name])[name]
        shape, item = info.shape, (info.end - info.start) // max(math.prod(info.shape), 1)
        if dim not in (0, 1) or (dim == 1 and len(shape) != 2) or not 0 <= start <= stop <= shape[dim]:
            raise CheckpointError(f"{self.where(name)}: cannot take [{start}:{stop}] along dim {dim} of tensor "
                                  f"{quote_name(name)} of shape {list(shape)}")
        if dim == 0:
            row = math.prod(shape[1:]) * item
            return self._tensor(name, self._pread(name, start * row, (stop - start) * row),
                                (stop - start, *shape[1:]))
        width, data = (stop - start) * item, bytearray()
        for r in range(shape[0]):  # one pread per row: only this rank's columns are read
            data += self._pread(name, (r * shape[1] + start) * item, width)
        return self._tensor(name, data, (shape[0], stop - start))


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
