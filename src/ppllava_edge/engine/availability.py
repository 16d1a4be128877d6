"""Is TensorRT usable here? One check shared by `build`, the native TensorRT backend and `env`.

`require_tensorrt(purpose)` imports tensorrt and cuda-python and checks that a CUDA device is visible; otherwise
it raises one MissingDependencyError that names everything missing and how to install it, for x86_64 (pip) and
for Jetson (JetPack's python3-libnvinfer).

It also refuses a CUDA major-version mismatch before importing TensorRT (whose import would otherwise fail with an
obscure missing-library error, or work and fail later): TensorRT's wheels are built per CUDA major
(`tensorrt-cu12`, `tensorrt-cu13`; the bare `tensorrt` meta-package pulls the newest, a CUDA 13 build for 10.16),
cuda-python's major is its CUDA major, and the NVIDIA driver must support at least that CUDA major. onnxruntime-gpu
is built per CUDA major too (PyPI: CUDA 12 up to 1.26, CUDA 13 from 1.27; its wheel metadata says which).
`cuda_stack(...)` gathers them, `cuda_mismatches(...)` / `ort_mismatches(...)` say what is wrong (pure, tested).
"""

from __future__ import annotations

import base64
import hashlib
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
# pip distributions of TensorRT per CUDA major: the meta-package, its libraries (`tensorrt_libs`) and its bindings
# (`tensorrt_bindings`, what `import tensorrt` loads). Two majors installed side by side share those module folders:
# the one installed last owns the files on disk (see `owns_its_files`).
TRT_CUDA_DISTS = {major: (f"tensorrt-cu{major}", f"tensorrt-cu{major}-libs", f"tensorrt-cu{major}-bindings") for major in (13, 12, 11)}
# onnxruntime-gpu on PyPI: up to 1.26 CUDA 12 builds (1.23.2-1.26.0 checked), 1.27 and newer CUDA 13 (their wheel metadata, Requires-Dist
# nvidia-cuda-runtime-cu12 ~= 12.0 / nvidia-cuda-runtime ~= 13.0). The `gpu` extra pins the CUDA 12 one.
ORT_GPU_PINS = {12: "1.26.0", 13: "1.31.1"}
DIST_PATH: list[str] | None = None  # where installed distributions are looked up (None: sys.path; tests point it at fixtures)


def _dist(name: str) -> importlib.metadata.Distribution | None:
    found = importlib.metadata.distributions(name=name, **({"path": DIST_PATH} if DIST_PATH is not None else {}))
    return next(iter(found), None)


def _dist_version(name: str) -> str | None:
    dist = _dist(name)
    return dist.version if dist is not None else None


def owns_its_files(name: str) -> bool | None:
    """Whether the shared libraries `name`'s RECORD lists are its own copies on disk (size, and SHA-256 for files up to
    64 MiB), not another distribution's that overwrote them; None when unknown (not installed, or it records no
    shared library). This tells which of tensorrt-cu12-bindings / -cu13-bindings `import tensorrt` loads."""
    dist = _dist(name)
    if dist is None:
        return None
    seen = False
    for f in dist.files or []:
        if not re.search(r"\.so(\.\d+)*$", f.name) or f.size is None:
            continue
        path = Path(str(dist.locate_file(f)))
        try:
            size = path.stat().st_size
        except OSError:
            return False
        if size != int(f.size):
            return False
        if f.hash is not None and f.hash.mode == "sha256" and size <= 64 << 20:
            digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
            if digest != f.hash.value:
                return False
        seen = True
    return True if seen else None


def installed_trt_majors() -> list[int]:
    """CUDA majors of the pip TensorRT builds installed (any of the meta, -libs or -bindings distributions)."""
    return [major for major, dists in TRT_CUDA_DISTS.items() if any(_dist_version(d) for d in dists)]


def tensorrt_version() -> str | None:
    """Installed TensorRT version without importing it when the pip metadata knows it; None when not installed."""
    majors = installed_trt_majors()
    active = tensorrt_cuda_major(lambda cmd: None)[0] if len(majors) > 1 else (majors[0] if majors else None)
    for dist in ([*TRT_CUDA_DISTS[active]] if active in TRT_CUDA_DISTS else []) + ["tensorrt"]:
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
    the Debian package version of JetPack's libnvinfer (`10.3.0.30-1+cuda12.5`); (None, "unknown") otherwise.

    With two CUDA builds installed side by side (tensorrt-cu12 and tensorrt-cu13 share the `tensorrt_bindings` and
    `tensorrt_libs` folders), the one whose bindings are on disk is what `import tensorrt` loads; when the files do
    not tell, the major is unknown (not judged) rather than guessed."""
    majors = installed_trt_majors()
    if len(majors) == 1:
        dist = next(d for d in TRT_CUDA_DISTS[majors[0]] if _dist_version(d))
        return majors[0], f"pip {dist}"
    if majors:
        both = " and ".join(f"tensorrt-cu{m}" for m in majors)
        owners = [m for m in majors if owns_its_files(TRT_CUDA_DISTS[m][2])]
        if len(owners) == 1:
            return owners[0], f"pip tensorrt-cu{owners[0]}-bindings, whose files `import tensorrt` loads ({both} are both installed)"
        return None, f"unknown: {both} are both installed and their files on disk do not say which one `import tensorrt` loads"
    if run is None:
        from .jetson import run_command as run
    out = run(["dpkg-query", "--showformat=${Package} ${Version}\n", "--show", "libnvinfer*"]) or ""
    m = re.search(r"^(libnvinfer\d+)\s+\S*\+cuda(\d+)\.", out, flags=re.M)
    if m:
        return int(m.group(2)), f"dpkg {m.group(1)}"
    return None, "unknown"


def split_tensorrt_install() -> list[str]:
    """Problems of two pip TensorRT CUDA builds installed together: the bindings of one over the libraries of the other."""
    majors = installed_trt_majors()
    if len(majors) < 2:
        return []
    bindings = [m for m in majors if owns_its_files(TRT_CUDA_DISTS[m][2])]
    libs = [m for m in majors if owns_its_files(TRT_CUDA_DISTS[m][1])]
    if len(bindings) == 1 and len(libs) == 1 and bindings != libs:
        return [f"`import tensorrt` loads the bindings of tensorrt-cu{bindings[0]} over the libraries of tensorrt-cu{libs[0]} "
                f"({' and '.join(f'tensorrt-cu{m}' for m in majors)} are both installed and overwrote each other's files)"]
    return []


def onnxruntime_gpu_cuda() -> tuple[str | None, int | None]:
    """(onnxruntime-gpu version, the CUDA major it was built for) from its wheel metadata: Requires-Dist
    `nvidia-cuda-runtime-cu12 ~= 12.0` (up to 1.26 on PyPI) or `nvidia-cuda-runtime ~= 13.0` (1.27+); (None, None)
    when not installed, (version, None) when its metadata does not say (e.g. a Jetson wheel)."""
    dist = _dist("onnxruntime-gpu")
    if dist is None:
        return None, None
    for req in dist.requires or []:
        m = re.match(r"\s*nvidia[-_]cuda[-_]runtime(?:[-_]cu(\d+))?\s*(?:~=|==|>=)\s*(\d+)", req)
        if m:
            return dist.version, int(m.group(1) or m.group(2))
    return dist.version, None


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


def ort_mismatches(ort_version: str | None, ort_cuda: int | None, trt_cuda: int | None, driver_cuda: str | None) -> list[str]:
    """What is wrong with onnxruntime-gpu's CUDA major: a driver too old for it, or a TensorRT of another CUDA major
    (`--provider tensorrt` loads TensorRT's libraries into ONNX Runtime's process). Unknown parts are not judged."""
    if ort_cuda is None:
        return []
    problems = []
    if trt_cuda is not None and trt_cuda != ort_cuda:
        problems.append(f"onnxruntime-gpu {ort_version} is a CUDA {ort_cuda} build but TensorRT is a CUDA {trt_cuda} build")
    drv = _major(driver_cuda)
    if drv is not None and drv < ort_cuda:
        problems.append(f"onnxruntime-gpu {ort_version} needs a driver for CUDA {ort_cuda}, this NVIDIA driver supports CUDA {driver_cuda}")
    return problems


def mismatch_hint(trt_cuda: int | None, driver_cuda: str | None, ort_cuda: int | None = None, trt: bool = True) -> str:
    """Which packages to install: the CUDA major the driver supports (12 or 13), else TensorRT's. Removes every pip
    TensorRT distribution first (meta, -libs, -bindings of both majors: they share module folders) and cuda-python
    with its cuda-bindings (`trt`: TensorRT is what is wrong); onnxruntime-gpu is replaced when it is of another major."""
    drv = _major(driver_cuda)
    want = 13 if (drv or 0) >= 13 else 12 if drv is not None else (trt_cuda or ort_cuda or 12)
    steps = []
    if trt:
        trt_dists = " ".join(d for major in (12, 13) for d in TRT_CUDA_DISTS[major])
        steps.append(f"pip uninstall -y tensorrt {trt_dists} cuda-python cuda-bindings && "
                     f"pip install 'tensorrt-cu{want}=={TENSORRT_PIN}' 'cuda-python=={CUDA_PYTHON_PINS[want]}'")
    if ort_cuda is not None and ort_cuda != want:
        steps.append(f"pip uninstall -y onnxruntime-gpu && pip install 'onnxruntime-gpu=={ORT_GPU_PINS[want]}'")
    newer = want == 12 and max(trt_cuda or 0, ort_cuda or 0) >= 13
    return " && ".join(steps) + ("  (or update the NVIDIA driver to R580+ for CUDA 13)" if newer else "")


def cuda_stack(driver_cuda: str | None = None, run: Callable[[list[str]], str | None] | None = None) -> dict:
    """{"tensorrt_cuda", "tensorrt_cuda_source", "cuda_python", "onnxruntime_gpu", "onnxruntime_gpu_cuda", "driver_cuda",
    "problems", "ort_problems"} for `env` and the checks; `problems` concern TensorRT / cuda-python (what `build` and
    `--backend trt` need), `ort_problems` onnxruntime-gpu (its CUDA / TensorRT execution providers)."""
    trt_cuda, source = tensorrt_cuda_major(run)
    cp = cuda_python_version()
    ort_version, ort_cuda = onnxruntime_gpu_cuda()
    return {"tensorrt_cuda": trt_cuda, "tensorrt_cuda_source": source, "cuda_python": cp, "onnxruntime_gpu": ort_version,
            "onnxruntime_gpu_cuda": ort_cuda, "driver_cuda": driver_cuda,
            "problems": split_tensorrt_install() + cuda_mismatches(trt_cuda, cp, driver_cuda),
            "ort_problems": ort_mismatches(ort_version, ort_cuda, trt_cuda, driver_cuda)}


def check_cuda_stack(purpose: str, stack: dict, ort: bool = False) -> None:
    """MissingDependencyError naming every mismatch of `stack` (see cuda_stack) and the pip line that fixes it;
    `ort`: onnxruntime-gpu's too (`env`; building engines and the native backend do not load it)."""
    problems = stack["problems"] + (stack.get("ort_problems", []) if ort else [])
    if problems:
        ort_cuda = stack.get("onnxruntime_gpu_cuda") if ort and stack.get("ort_problems") else None
        raise MissingDependencyError(
            f"{purpose}: the installed CUDA packages do not match: {'; '.join(problems)}.\n"
            f"Hint: {mismatch_hint(stack['tensorrt_cuda'], stack['driver_cuda'], ort_cuda, trt=bool(stack['problems']))}\n"
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
        from ..device import import_cudart

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
