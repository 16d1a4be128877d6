"""CUDA memory and streams through cuda-python (`cuda.bindings.runtime`). The only module importing CUDA bindings.

Small context-managed wrappers in the spirit of Polygraphy's cuda.py:

    with Stream() as stream, DeviceBuffer(nbytes) as buf:
        buf.copy_from_host(array, stream)
        ...
        stream.synchronize()

cuda-python is imported lazily (`import_cudart()`); without it every entry point raises MissingDependencyError.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .errors import InferenceError, MissingDependencyError

CUDA_PYTHON_HINT = (
    "pip install 'ppllava-edge[tensorrt]' (x86_64 + CUDA; brings cuda-python), "
    "or on Jetson: pip install cuda-python matching JetPack's CUDA (12.6 on JetPack 6.1/6.2)"
)


def import_cudart() -> Any:
    """`cuda.bindings.runtime` (cuda-python >= 12.6), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[import-not-found,no-redef]
        except ImportError as exc:
            raise MissingDependencyError(
                f"CUDA memory and streams need 'cuda-python', which is not installed.\nHint: {CUDA_PYTHON_HINT}\nNote: {exc}"
            ) from exc
    return cudart


def _err_name(cudart: Any, err: Any) -> str:
    try:
        return cudart.cudaGetErrorName(err)[1].decode()
    except Exception:  # error naming must never hide the original error
        return str(err)


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python call result `(err, *values)`; raise InferenceError naming the call on failure."""
    cudart = import_cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise InferenceError(f"CUDA call {what} failed: {_err_name(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def device_count() -> int:
    """Number of visible CUDA devices; 0 when there is no driver or no device."""
    cudart = import_cudart()
    err, n = cudart.cudaGetDeviceCount()
    return int(n) if err == cudart.cudaError_t.cudaSuccess else 0


def device_info(device: int = 0) -> dict:
    """{"name", "compute_capability": "8.7", "sm": 87, "memory_bytes", "cuda_driver", "cuda_runtime"} of one device."""
    cudart = import_cudart()
    prop = check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "name": name,
        "compute_capability": f"{prop.major}.{prop.minor}",
        "sm": int(prop.major) * 10 + int(prop.minor),
        "memory_bytes": int(prop.totalGlobalMem),
        "cuda_driver": _version(int(check(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion"))),
        "cuda_runtime": _version(int(check(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))),
    }


def mem_get_info() -> tuple[int, int]:
    """(free, total) device memory in bytes."""
    cudart = import_cudart()
    free, total = check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


class Stream:
    """A non-blocking CUDA stream; `handle` is the int TensorRT's execute_async_v3 takes."""

    def __init__(self) -> None:
        self._cudart = import_cudart()
        self.stream = check(self._cudart.cudaStreamCreateWithFlags(self._cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        check(self._cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.stream is not None:
            check(self._cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc). Copies are asynchronous on the given stream."""

    def __init__(self, nbytes: int) -> None:
        self._cudart = import_cudart()
        self.nbytes = int(nbytes)
        self.ptr = int(check(self._cudart.cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})"))

    def _copy(self, dst: int, src: int, nbytes: int, kind: Any, stream: Stream) -> None:
        check(self._cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream.stream), "cudaMemcpyAsync")

    def copy_from_host(self, array: np.ndarray, stream: Stream, offset: int = 0) -> None:
        array = np.ascontiguousarray(array)
        if offset + array.nbytes > self.nbytes:
            raise InferenceError(f"host array of {array.nbytes} bytes does not fit a device buffer of {self.nbytes} bytes at offset {offset}")
        self._copy(self.ptr + offset, array.ctypes.data, array.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def copy_to_host(self, array: np.ndarray, stream: Stream, offset: int = 0) -> None:
        """Fills the C-contiguous `array` from the buffer (synchronize the stream before reading it)."""
        if not array.flags.c_contiguous:
            raise InferenceError("copy_to_host needs a C-contiguous destination array")
        if offset + array.nbytes > self.nbytes:
            raise InferenceError(f"device buffer of {self.nbytes} bytes holds fewer than {array.nbytes} bytes at offset {offset}")
        self._copy(array.ctypes.data, self.ptr + offset, array.nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def copy_from_device(self, src: DeviceBuffer, nbytes: int, stream: Stream, dst_offset: int = 0, src_offset: int = 0) -> None:
        if dst_offset + nbytes > self.nbytes or src_offset + nbytes > src.nbytes:
            raise InferenceError(f"device copy of {nbytes} bytes out of bounds (dst {dst_offset}/{self.nbytes}, src {src_offset}/{src.nbytes})")
        self._copy(self.ptr + dst_offset, src.ptr + src_offset, nbytes, self._cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream)

    def free(self) -> None:
        if self.ptr:
            check(self._cudart.cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __enter__(self) -> DeviceBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.free()


class HostBuffer:
    """Pinned (page-locked) host memory seen as a numpy array, for fast asynchronous device-to-host copies."""

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        self._cudart = import_cudart()
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * self.dtype.itemsize
        self.ptr = int(check(self._cudart.cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})"))
        raw = np.ctypeslib.as_array(ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8)), (max(self.nbytes, 1),))
        self.array = raw[: self.nbytes].view(self.dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            self.array = None  # type: ignore[assignment]
            check(self._cudart.cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0
