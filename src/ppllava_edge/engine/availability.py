"""Is TensorRT usable here? One check shared by `build`, the native TensorRT backend and `env`.

`require_tensorrt(purpose)` imports tensorrt and cuda-python and checks that a CUDA device is visible; otherwise
it raises one MissingDependencyError that names everything missing and how to install it, for x86_64 (pip) and
for Jetson (JetPack's python3-libnvinfer).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

from .._deps import has_module
from ..errors import MissingDependencyError

PIP_HINT = "pip install 'ppllava-edge[tensorrt]'  (x86_64 with an NVIDIA driver and CUDA; installs tensorrt and cuda-python)"
JETSON_HINT = (
    "sudo apt install python3-libnvinfer python3-libnvinfer-dev  (JetPack ships TensorRT; use a venv with "
    "--system-site-packages) and pip install cuda-python matching JetPack's CUDA (12.6 on JetPack 6.1/6.2)"
)


def tensorrt_version() -> str | None:
    """Installed TensorRT version without importing it when the pip metadata knows it; None when not installed."""
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if not has_module("tensorrt"):
        return None
    try:  # JetPack's python3-libnvinfer has no pip metadata
        return str(importlib.import_module("tensorrt").__version__)
    except Exception:  # a broken install (missing libnvinfer.so) is reported as not usable
        return None


def cuda_python_version() -> str | None:
    for dist in ("cuda-python", "cuda-bindings"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def on_jetson(root: str | Path = "/") -> bool:
    return (Path(root) / "etc/nv_tegra_release").is_file()


def install_hint(jetson: bool | None = None) -> str:
    jetson = on_jetson() if jetson is None else jetson
    return f"on Jetson: {JETSON_HINT}; on x86_64: {PIP_HINT}" if jetson else f"on x86_64: {PIP_HINT}; on Jetson: {JETSON_HINT}"


def require_tensorrt(purpose: str, need_gpu: bool = True) -> tuple[ModuleType, Any]:
    """(tensorrt, cudart) or MissingDependencyError listing what is missing (module, cuda-python, GPU) and the fix."""
    missing: list[str] = []
    notes: list[str] = []
    trt = cudart = None
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as exc:
        missing.append("the TensorRT Python package 'tensorrt'")
        notes.append(str(exc))
    try:
        from ..runtime.cuda import import_cudart

        cudart = import_cudart()
    except MissingDependencyError:
        missing.append("the CUDA runtime bindings 'cuda-python' (cuda.bindings)")
    if need_gpu:
        if cudart is not None:
            err, n = cudart.cudaGetDeviceCount()
            if err != cudart.cudaError_t.cudaSuccess or n == 0:
                missing.append(f"a CUDA GPU with a working NVIDIA driver (cudaGetDeviceCount: {err})")
        elif shutil.which("nvidia-smi") is None and not on_jetson():
            missing.append("an NVIDIA GPU and driver (nvidia-smi not found)")
    if missing:
        raise MissingDependencyError(
            f"{purpose} needs TensorRT, cuda-python and an NVIDIA GPU; missing here: {', '.join(missing)}.\n"
            f"Hint: {install_hint()}.\n"
            "Note: nothing was built or run; the ONNX Runtime backend (`ppllava-edge ask --provider cpu`) works without them."
            + (f"\nNote: {notes[0]}" if notes else "")
        )
    return trt, cudart
