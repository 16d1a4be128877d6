"""Is TensorRT usable here? One check shared by `build`, the native TensorRT backend and `env`.

`require_tensorrt(purpose)` imports tensorrt and cuda-python and checks that a CUDA device is visible; otherwise
it raises one MissingDependencyError that names everything missing and how to install it, for x86_64 (pip) and
for Jetson (JetPack's python3-libnvinfer).

It also refuses a CUDA major-version mismatch before importing TensorRT (whose import would otherwise fail with an
obscure missing-library error, or work and fail later): TensorRT's wheels are built per CUDA major
(`tensorrt-cu12`, `tensorrt-cu13`; the bare `tensorrt` meta-package pulls the newest, a CUDA 13 build for 10.16),
cuda-python's major is its CUDA major, and the NVIDIA driver must support at least that CUDA major.
`cuda_stack(...)` gathers the three, `cuda_mismatches(...)` says what is wrong (pure, tested).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .._deps import has_module
from ..errors import MissingDependencyError

TENSORRT_PIN = "10.16.1.11"
CUDA_PYTHON_PINS = {12: "12.9.10", 13: "13.0.3"}  # cuda-python matching each TensorRT CUDA build
PIP_HINT = (
    "pip install 'ppllava-edge[tensorrt]'  (x86_64 with an NVIDIA driver for CUDA 12: tensorrt-cu12 and cuda-python 12.9); "
    f"for CUDA 13 (driver R580+): pip install 'tensorrt-cu13=={TENSORRT_PIN}' 'cuda-python=={CUDA_PYTHON_PINS[13]}'"
)
JETSON_HINT = (
    "sudo apt install python3-libnvinfer python3-libnvinfer-dev  (JetPack ships TensorRT; use a venv with "
    "--system-site-packages) and pip install cuda-python matching JetPack's CUDA (12.6 on JetPack 6.1/6.2)"
)
# pip distributions that carry TensorRT, newest naming first; '-cuXX' names the CUDA major of the build
TRT_DISTS = ("tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-cu13-libs", "tensorrt-cu12-libs", "tensorrt-cu11-libs", "tensorrt")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def tensorrt_version() -> str | None:
    """Installed TensorRT version without importing it when the pip metadata knows it; None when not installed."""
    for dist in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12"):
        version = _dist_version(dist)
        if version:
            return version
    if not has_module("tensorrt"):
        return None
    try:  # JetPack's python3-libnvinfer has no pip metadata
        return str(importlib.import_module("tensorrt").__version__)
    except Exception:  # a broken install (missing libnvinfer.so) is reported as not usable
        return None


def cuda_python_version() -> str | None:
    for dist in ("cuda-python", "cuda-bindings"):
        version = _dist_version(dist)
        if version:
            return version
    return None


def tensorrt_cuda_major(run: Callable[[list[str]], str | None] | None = None) -> tuple[int | None, str]:
    """(CUDA major TensorRT was built for, where that came from): the pip distribution name (`tensorrt-cu12`), else
    the Debian package version of JetPack's libnvinfer (`10.3.0.30-1+cuda12.5`); (None, "unknown") otherwise."""
    for dist in TRT_DISTS:
        m = re.search(r"-cu(\d+)", dist)
        if m and _dist_version(dist):
            return int(m.group(1)), f"pip {dist}"
    if run is None:
        from .jetson import run_command as run
    out = run(["dpkg-query", "--showformat=${Package} ${Version}\n", "--show", "libnvinfer*"]) or ""
    m = re.search(r"^(libnvinfer\d+)\s+\S*\+cuda(\d+)\.", out, flags=re.M)
    if m:
        return int(m.group(2)), f"dpkg {m.group(1)}"
    return None, "unknown"


def _major(version: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", str(version or ""))
    return int(m.group(1)) if m else None


def cuda_mismatches(trt_cuda: int | None, cuda_python: str | None, driver_cuda: str | None) -> list[str]:
    """What is wrong between TensorRT's CUDA major, cuda-python's version and the driver's CUDA version ("12.8").

    Unknown parts are not judged. Rules: TensorRT and cuda-python must target the same CUDA major (one CUDA runtime
    per process), and the driver must support at least that major (a CUDA 13 build needs an R580+ driver).
    """
    problems = []
    cp = _major(cuda_python)
    drv = _major(driver_cuda)
    if trt_cuda is not None and cp is not None and trt_cuda != cp:
        problems.append(f"TensorRT is a CUDA {trt_cuda} build but cuda-python {cuda_python} is for CUDA {cp}")
    for what, major in (("TensorRT", trt_cuda), (f"cuda-python {cuda_python}", cp)):
        if major is not None and drv is not None and drv < major:
            problems.append(f"{what} needs a driver for CUDA {major}, this NVIDIA driver supports CUDA {driver_cuda}")
    return problems


def mismatch_hint(trt_cuda: int | None, driver_cuda: str | None) -> str:
    """Which pair to install: the CUDA major the driver supports (12 or 13), else TensorRT's."""
    drv = _major(driver_cuda)
    want = 13 if (drv or 0) >= 13 else 12 if drv is not None else (trt_cuda or 12)
    return (
        f"pip uninstall -y tensorrt tensorrt-cu12 tensorrt-cu13 cuda-python && "
        f"pip install 'tensorrt-cu{want}=={TENSORRT_PIN}' 'cuda-python=={CUDA_PYTHON_PINS[want]}'"
        + ("  (or update the NVIDIA driver to R580+ for CUDA 13)" if want == 12 and (trt_cuda or 0) >= 13 else "")
    )


def cuda_stack(driver_cuda: str | None = None, run: Callable[[list[str]], str | None] | None = None) -> dict:
    """{"tensorrt_cuda", "tensorrt_cuda_source", "cuda_python", "driver_cuda", "problems"} for `env` and the checks."""
    trt_cuda, source = tensorrt_cuda_major(run)
    cp = cuda_python_version()
    return {"tensorrt_cuda": trt_cuda, "tensorrt_cuda_source": source, "cuda_python": cp, "driver_cuda": driver_cuda,
            "problems": cuda_mismatches(trt_cuda, cp, driver_cuda)}


def check_cuda_stack(purpose: str, stack: dict) -> None:
    """MissingDependencyError naming every mismatch of `stack` (see cuda_stack) and the pip line that fixes it."""
    if stack["problems"]:
        raise MissingDependencyError(
            f"{purpose}: the installed CUDA packages do not match: {'; '.join(stack['problems'])}.\n"
            f"Hint: {mismatch_hint(stack['tensorrt_cuda'], stack['driver_cuda'])}\n"
            f"Note: TensorRT's CUDA major from {stack['tensorrt_cuda_source']}; `ppllava-edge env` shows the whole stack."
        )


def on_jetson(root: str | Path = "/") -> bool:
    return (Path(root) / "etc/nv_tegra_release").is_file()


def install_hint(jetson: bool | None = None) -> str:
    jetson = on_jetson() if jetson is None else jetson
    return f"on Jetson: {JETSON_HINT}; on x86_64: {PIP_HINT}" if jetson else f"on x86_64: {PIP_HINT}; on Jetson: {JETSON_HINT}"


def _driver_cuda(cudart: Any) -> str | None:
    err, v = cudart.cudaDriverGetVersion()
    if err != cudart.cudaError_t.cudaSuccess or not v:
        return None
    return f"{v // 1000}.{(v % 1000) // 10}"


def require_tensorrt(purpose: str, need_gpu: bool = True) -> tuple[ModuleType, Any]:
    """(tensorrt, cudart) or MissingDependencyError listing what is missing (module, cuda-python, GPU) or mismatched
    (CUDA majors of TensorRT, cuda-python and the driver), and the fix."""
    check_cuda_stack(purpose, cuda_stack())  # before importing TensorRT: a cu13 build without CUDA 13 fails to import
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
    if cudart is not None:
        check_cuda_stack(purpose, cuda_stack(_driver_cuda(cudart)))
    return trt, cudart
