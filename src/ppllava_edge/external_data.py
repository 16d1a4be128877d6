"""ONNX initializers in external-data files, one tensor at a time (needs the `onnx` package: export extra).

Writing: `ExternalData(path).add(name, array)` appends the bytes (large tensors aligned to 64 KiB, so ONNX Runtime
can memory-map them; tensors under 1 KiB stay inline) and returns a TensorProto pointing at them. Reading: `read_initializer(tensor, folder)`
memory-maps one tensor's bytes. Together they let the decoder builder and the weight-only quantizer handle a 7B
graph while holding one tensor in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

ALIGN = 1 << 16  # offsets of tensors >= ALIGN_THRESHOLD are multiples of this (mmap-able on every OS)
ALIGN_THRESHOLD = 1 << 20
INLINE_BELOW = 1024  # bytes; onnx's own save_model convention (size_threshold=1024)


class ExternalData:
    """Appends tensors to one external-data file and returns TensorProtos that point into it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self.offset = 0
        self.bytes_written = 0

    def add(self, name: str, array: np.ndarray):
        import onnx

        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d scalar into shape [1])
            array = array.copy(order="C")
        nbytes = array.nbytes
        if nbytes < INLINE_BELOW:  # shape-like constants stay in the proto (shape inference must read them)
            return onnx.numpy_helper.from_array(array, name)
        if nbytes >= ALIGN_THRESHOLD and self.offset % ALIGN:
            pad = ALIGN - self.offset % ALIGN
            self._f.write(b"\0" * pad)
            self.offset += pad
        tensor = onnx.TensorProto()
        tensor.name = name
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._f.write(memoryview(array).cast("B"))
        self.offset += nbytes
        self.bytes_written += nbytes
        return tensor

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> ExternalData:
        return self

    def __exit__(self, *exc) -> None:
        if not self._f.closed:
            self.close()


def read_initializer(tensor, folder: str | os.PathLike) -> np.ndarray:
    """One initializer as a numpy array: memory-mapped from its external-data file (read-only), or from the proto."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    ext = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape)) if shape else 1
    offset = int(ext.get("offset", 0))
    path = Path(folder) / ext["location"]
    if count == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)


def share_initializers(paths: list[Path], data_name: str, min_bytes: int = INLINE_BELOW) -> dict:
    """Rewrite several graphs of one folder so their initializers live in one external-data file `data_name`,
    each distinct tensor (by content) stored once: the CLIP text encoder that prompt_pool and image_pool both hold
    is then on disk once. Each graph is rewritten in place (through a temporary file); returns byte counts."""
    import hashlib

    import onnx

    folder = Path(paths[0]).parent
    tmp_data = folder / (data_name + ".tmp")
    seen: dict[tuple[str, int, tuple], tuple[int, int]] = {}  # (digest, dtype, shape) -> (offset, length)
    stored = referenced = 0
    models = []
    with ExternalData(tmp_data) as out:
        for path in paths:
            model = onnx.load(str(path), load_external_data=False)
            inits = []
            for t in model.graph.initializer:
                arr = np.asarray(read_initializer(t, folder))
                if arr.nbytes < min_bytes:
                    inits.append(onnx.numpy_helper.from_array(arr, t.name))
                    continue
                key = (hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast("B")).hexdigest(), t.data_type, tuple(arr.shape))
                referenced += arr.nbytes
                if key not in seen:
                    proto = out.add(t.name, arr)
                    ext = {e.key: e.value for e in proto.external_data}
                    seen[key] = (int(ext["offset"]), int(ext["length"]))
                    stored += arr.nbytes
                offset, length = seen[key]
                proto = onnx.TensorProto()
                proto.name, proto.data_type = t.name, t.data_type
                proto.dims.extend(arr.shape)
                proto.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    e = proto.external_data.add()
                    e.key, e.value = k, v
                inits.append(proto)
            old_files = external_files(model)
            del model.graph.initializer[:]
            model.graph.initializer.extend(inits)
            models.append((path, model, old_files))
    (folder / (data_name + ".tmp")).replace(folder / data_name)
    for path, model, old_files in models:
        onnx.save_model(model, str(path))
        for f in old_files:
            if f != data_name and (folder / f).exists():
                (folder / f).unlink()
    return {"stored_bytes": stored, "referenced_bytes": referenced}


def external_files(model) -> list[str]:
    """The external-data file names a ModelProto's initializers point to."""
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def graph_weight_bytes(path: str | os.PathLike, skip_prefixes: tuple[str, ...] = ("rotary.",)) -> int:
    """Bytes of a graph's initializers as stored (fp32 / fp16 / int8 / packed int4 + scales), without loading them;
    tables a step reads one row of (the rotary cos/sin caches) are left out."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name.startswith(skip_prefixes):
            continue
        ext = {e.key: e.value for e in t.external_data}
        if "length" in ext:
            total += int(ext["length"])
        elif t.raw_data:
            total += len(t.raw_data)
        else:
            n = int(np.prod(t.dims)) if t.dims else 1
            total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total
