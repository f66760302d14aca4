"""Reading and writing safetensors one tensor (or one slab of rows) at a time.

The reader parses the header itself and reads with plain file reads: no memory map, so nothing
it has read stays resident (pages of a mapped file count in the process's RSS until it is
unmapped). The writer takes each tensor as a stream of chunks, so a model-sized file is written
with one slab in memory. Both follow the format as the ``safetensors`` package writes it
(8-byte little-endian header length, a JSON header padded with spaces to a multiple of 8, then the
data); files from one are read by the other.
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("brecq")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SLAB_BYTES = 64 << 20  # what one read or write of a large tensor holds
MAX_HEADER_BYTES = 100 << 20


class MalformedSafetensors(ValueError):
    """A safetensors file that cannot be what it claims: truncated, or a header that does not parse
    or does not describe the data."""


@dataclass(frozen=True)
class StoredTensor:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(self.rows, 1)


class SafetensorsFile:
    """The header of one safetensors file, and reads of whole tensors or row ranges from it."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MalformedSafetensors(f"{self.path}: {size} bytes, too short for a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise MalformedSafetensors(f"{self.path}: header length {length} does not fit the file's {size} "
                                           "bytes (truncated, or not a safetensors file)")
            try:
                header = json.loads(f.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise MalformedSafetensors(f"{self.path}: header is not JSON ({exc})") from None
        if not isinstance(header, dict):
            raise MalformedSafetensors(f"{self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + length
        self.tensors: dict[str, StoredTensor] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MalformedSafetensors(f"{self.path}: tensor {name!r} has a malformed entry {info!r} (expected "
                                           f"dtype one of {sorted(DTYPES)}, shape and data_offsets)") from None
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize or start < 0:
                raise MalformedSafetensors(f"{self.path}: tensor {name!r} spans {end - start} bytes, but "
                                           f"{info['dtype']} {list(shape)} needs {numel * dtype.itemsize}")
            if base + end > size:
                raise MalformedSafetensors(f"{self.path}: tensor {name!r} ends at byte {base + end}, past the end of "
                                           f"the file ({size} bytes): the file is truncated")
            self.tensors[name] = StoredTensor(dtype, shape, base + start, base + end)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored (dtype and shape), or rows ``rows`` (a step-1 slice) of it."""
        info = self.tensors[name]
        first, stop = 0, info.rows
        if rows is not None:
            first, stop, step = rows.indices(info.rows)
            if step != 1:
                raise ValueError(f"SafetensorsFile.read: rows must be a slice with step 1, got {rows}")
            stop = max(stop, first)
        shape = ((stop - first,) + info.shape[1:]) if info.shape else ()
        out = torch.empty(shape, dtype=info.dtype)
        if out.numel():
            buffer = out.view(-1).view(torch.uint8).numpy()
            with open(self.path, "rb") as f:
                f.seek(info.start + first * info.row_bytes)
                got = f.readinto(buffer)
            if got != buffer.nbytes:
                raise MalformedSafetensors(f"{self.path}: tensor {name!r}: read {got} of {buffer.nbytes} bytes "
                                           "(the file changed or is truncated)")
        return out

    def read_into(self, name: str, out: torch.Tensor, slab_bytes: int = SLAB_BYTES) -> None:
        """Copy tensor ``name`` into ``out`` (same shape, any dtype and device), a slab of rows at a time."""
        info = self.tensors[name]
        if tuple(out.shape) != info.shape:
            raise ValueError(f"{self.path}: tensor {name!r} has shape {list(info.shape)}, the destination "
                             f"{list(out.shape)}")
        if not info.shape:
            out.copy_(self.read(name))
            return
        step = max(1, slab_bytes // max(info.row_bytes, 1))
        for first in range(0, info.rows, step):
            out[first:first + step].copy_(self.read(name, slice(first, first + step)))


class ShardedCheckpoint:
    """The weights of a Hugging Face model folder (``model.safetensors``, or the shards named by
    ``model.safetensors.index.json``), read tensor by tensor."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise MalformedSafetensors(f"{index}: not a safetensors index with a weight_map ({exc})") from None
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [single.name]
        else:
            raise FileNotFoundError(f"{self.folder}: no model.safetensors or model.safetensors.index.json; streamed "
                                    "loading reads safetensors weights only (save the model with "
                                    "save_pretrained(safe_serialization=True))")
        self.files = {name: SafetensorsFile(self.folder / name) for name in files}
        self._where: dict[str, SafetensorsFile] = {}
        for file in self.files.values():
            for name in file.tensors:
                self._where[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self._where

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> StoredTensor:
        return self._file(name).tensors[name]

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._where[name]
        except KeyError:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the checkpoint") from None

    def read(self, name: str, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
        tensor = self._file(name).read(name, rows)
        return tensor if dtype is None or tensor.dtype == dtype else tensor.to(dtype)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Copy tensor ``name`` into ``out`` (same shape, any dtype), a slab of rows at a time."""
        self._file(name).read_into(name, out)

    def slabs(self, name: str, dtype: torch.dtype | None = None,
              slab_bytes: int = SLAB_BYTES) -> Iterator[torch.Tensor]:
        """Tensor ``name`` in slabs of whole rows of at most about ``slab_bytes`` (as converted)."""
        info = self.info(name)
        itemsize = (dtype or info.dtype).itemsize
        row_bytes = max(1, info.row_bytes // info.dtype.itemsize * itemsize)
        step = max(1, slab_bytes // row_bytes)
        if not info.shape:
            yield self.read(name, dtype)
            return
        for first in range(0, max(info.rows, 1), step):
            yield self.read(name, dtype, slice(first, first + step))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, dtype and shape, and a function giving its contents as
    contiguous chunks whose bytes, in order, are the tensor's."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * self.dtype.itemsize


def tensor_entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    """An entry for a tensor already in memory (any device)."""
    return TensorEntry(name, tensor.dtype, tuple(tensor.shape), lambda: [tensor])


def write_safetensors(file, entries: list[TensorEntry], metadata: dict[str, str] | None = None) -> None:
    """Write ``entries`` to the open binary ``file``, holding one chunk at a time. Data are laid out
    by element size, largest first, then by name, so every tensor starts aligned to its element
    size. Raises if a chunk stream gives other bytes than its entry declares."""
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("write_safetensors: tensor names must be unique")
    ordered = sorted(entries, key=lambda e: (-e.dtype.itemsize, e.name))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in ordered:
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"write_safetensors: tensor {e.name!r} has dtype {e.dtype}, not one safetensors stores")
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for e in ordered:
        written = 0
        for chunk in e.chunks():
            if chunk.dtype != e.dtype:
                raise ValueError(f"write_safetensors: tensor {e.name!r}: a chunk of dtype {chunk.dtype}, declared "
                                 f"{e.dtype}")
            data = chunk.detach().reshape(-1).cpu().contiguous()
            if data.numel():
                file.write(memoryview(data.view(torch.uint8).numpy()))
            written += data.numel() * data.element_size()
        if written != e.nbytes:
            raise ValueError(f"write_safetensors: tensor {e.name!r}: its chunks hold {written} bytes, its "
                             f"{list(e.shape)} {e.dtype} needs {e.nbytes}")
