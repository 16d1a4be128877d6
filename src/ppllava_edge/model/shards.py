"""safetensors files written tensor by tensor and read by byte range (never a whole file in memory).

safetensors' own Python API saves a dict of tensors that must all be in memory, and reads through a
memory map whose touched pages count towards RSS. At 7B (14.6 GB of bf16 shards) both matter, so the format is
written and read here directly. The layout follows the reference implementation byte for byte:

    8-byte little-endian header length N | N bytes of compact JSON, padded with spaces to a multiple of 8 |
    raw tensor bytes (little-endian, C order)

The JSON holds `__metadata__` ({"format": "pt"}) first, then one entry per tensor
(`{"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}`, offsets relative to the data section) in
data order: larger element sizes first, then by name, as `safetensors.torch.save_file` lays them out.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

# in the reference writer's data order (its dtype enum, descending): tensors are laid out by this rank, then name
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_RANK = {dtype: i for i, dtype in enumerate(DTYPE_CODES)}
_MAX_HEADER = 100_000_000  # the reference reader's limit
READ_BLOCK_BYTES = 64 << 20  # converting reads (CheckpointReader.read with a dtype) go through blocks of this size


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one stored tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def encode_header(specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """The file prefix (length + padded JSON) and each tensor's [begin, end) in the data section."""
    specs = list(specs)
    for s in specs:
        if s.dtype not in DTYPE_CODES:
            raise CheckpointError(f"{s.name}: dtype {s.dtype} cannot be stored in safetensors by ppllava-edge.")
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    spans: dict[str, tuple[int, int]] = {}
    offset = 0
    for s in sorted(specs, key=lambda s: (_RANK[s.dtype], s.name)):
        spans[s.name] = (offset, offset + s.nbytes)
        header[s.name] = {"dtype": DTYPE_CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, spans


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (no copy when it is already contiguous)."""
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """Writes one safetensors file whose tensors arrive one at a time (each as one or more row chunks).

    The header is written first (every offset is known from the specs); `write` seeks to the tensor's span, so
    tensors may arrive in any order. `close` fails if a tensor was never written; a file left by an error is
    incomplete, which is why callers write inside an `AtomicDir`.
    """

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        prefix, self.spans = encode_header(self.specs.values(), metadata)
        self.data_start = len(prefix)
        self.written: set[str] = set()
        self._file = open(self.path, "wb")
        self._file.write(prefix)

    def write(self, name: str, chunks: torch.Tensor | Iterable[torch.Tensor]) -> int:
        """Write tensor `name` from a tensor or from consecutive chunks (split along dim 0). Returns bytes written."""
        spec = self.specs.get(name)
        if spec is None or name in self.written:
            raise CheckpointError(f"{self.path.name}: tensor {name!r} is {'already written' if spec else 'not in this file'}.")
        begin, end = self.spans[name]
        self._file.seek(self.data_start + begin)
        done = 0
        for chunk in [chunks] if isinstance(chunks, torch.Tensor) else chunks:
            if chunk.dtype != spec.dtype:
                raise CheckpointError(f"{self.path.name}: tensor {name!r} is declared {spec.dtype}, got a {chunk.dtype} chunk.")
            data = tensor_bytes(chunk)
            if done + data.nbytes > end - begin:
                raise CheckpointError(f"{self.path.name}: tensor {name!r} {list(spec.shape)} got more than {end - begin} bytes.")
            self._file.write(data)
            done += data.nbytes
        if done != end - begin:
            raise CheckpointError(f"{self.path.name}: tensor {name!r} {list(spec.shape)} needs {end - begin} bytes, got {done}.")
        self.written.add(name)
        return done

    def close(self) -> None:
        """Flush to disk; raises if any declared tensor was not written."""
        missing = sorted(set(self.specs) - self.written)
        if missing:
            self._file.close()
            raise CheckpointError(f"{self.path.name}: {len(missing)} declared tensor(s) were never written: {', '.join(missing[:5])}")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()


@dataclass(frozen=True)
class StoredTensor:
    spec: TensorSpec
    begin: int  # absolute file offsets
    end: int


class SafetensorsFile:
    """Reads named tensors of one safetensors file with plain reads of their byte spans (no memory map).

    `bytes_read` counts the tensor bytes read so far, so a caller can prove what it did not read.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.bytes_read = 0
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot open safetensors file ({exc.strerror}).") from exc
        try:
            self.tensors, self.metadata = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: cannot read safetensors shard ({why}).")

    def _parse_header(self) -> tuple[dict[str, StoredTensor], dict]:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._bad(f"file of {size} bytes is shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise self._bad(f"header length {n} does not fit a file of {size} bytes")
        try:
            header = json.loads(self._file.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise self._bad(f"header is not JSON: {exc}") from exc
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + n, size - 8 - n
        tensors = {}
        for name, info in header.items():
            try:
                dtype = CODE_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError) as exc:
                raise self._bad(f"entry {name!r} is malformed or has an unsupported dtype: {info!r}") from exc
            spec = TensorSpec(name, shape, dtype)
            if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != spec.nbytes:
                raise self._bad(f"entry {name!r}: offsets {[begin, end]} do not hold shape {list(shape)} {info['dtype']} inside {data_size} data bytes")
            tensors[name] = StoredTensor(spec, data_start + begin, data_start + end)
        return tensors, metadata

    def _read_into(self, name: str, view: memoryview, done: int, total: int) -> None:
        """Fill `view` from the current file position (`done` of the tensor's `total` bytes read before it)."""
        got = 0
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise self._bad(f"tensor {name!r} is truncated ({done + got} of {total} bytes)")
            got += n
        self.bytes_read += got

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` in its stored dtype (a fresh CPU tensor; only its bytes are read)."""
        stored = self.tensors[name]
        buf = torch.empty(stored.end - stored.begin, dtype=torch.uint8)
        self._file.seek(stored.begin)
        self._read_into(name, memoryview(buf.numpy()), 0, len(buf))
        return buf.view(stored.spec.dtype).reshape(stored.spec.shape)

    def blocks(self, name: str, block_bytes: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Tensor `name`'s elements in storage order as (first flat index, flat block in the stored dtype), at most
        `block_bytes` each, in one reused buffer: a reader that converts the tensor (bf16 -> fp32 / fp16) holds the
        converted copy and one block, never the stored copy beside it (1.1 GB for a 7B Qwen2 lm_head). Consume each
        block before asking for the next."""
        stored = self.tensors[name]
        item = stored.spec.dtype.itemsize
        total = stored.end - stored.begin
        if total == 0:
            return
        block_bytes = READ_BLOCK_BYTES if block_bytes is None else block_bytes
        buf = torch.empty(min(total, max(item, block_bytes // item * item)), dtype=torch.uint8)
        for begin in range(0, total, len(buf)):
            n = min(len(buf), total - begin)
            self._file.seek(stored.begin + begin)  # (the file may have been read elsewhere between two blocks)
            self._read_into(name, memoryview(buf.numpy())[:n], begin, total)
            yield begin // item, buf[:n].view(stored.spec.dtype)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def plan_shards(specs: list[TensorSpec], num_shards: int) -> list[list[TensorSpec]]:
    """Split tensors (kept in order) into at most `num_shards` runs of about equal bytes, as the release does."""
    total = sum(s.nbytes for s in specs)
    target = total / num_shards
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > target and len(shards) < num_shards:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards

