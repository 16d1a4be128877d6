"""ONNX Runtime sessions with an explicit execution-provider choice (cpu, cuda, tensorrt; default: best available)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InferenceError, MissingDependencyError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PREFERENCE = ("tensorrt", "cuda", "cpu")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # the plain install has it; a GPU install swaps it for onnxruntime-gpu
        raise MissingDependencyError(
            "Running an export needs 'onnxruntime', which is not installed.\n"
            "Hint: pip install onnxruntime==1.32.0 (CPU) or pip install 'ppllava-edge[gpu]' (CUDA / TensorRT EP)"
        ) from exc
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers, best first."""
    have = set(_ort().get_available_providers())
    return [p for p in PREFERENCE if PROVIDERS[p] in have]


def resolve_provider(name: str | None) -> str:
    """'auto'/None -> the best available; otherwise check the requested one exists."""
    have = available_providers()
    if name in (None, "auto"):
        return have[0]
    if name not in PROVIDERS:
        raise InferenceError(f"unknown provider {name!r}; choose one of: auto, {', '.join(PROVIDERS)}")
    if name not in have:
        raise InferenceError(
            f"provider {name!r} ({PROVIDERS[name]}) is not available in this onnxruntime build "
            f"(available: {', '.join(have)}).\n"
            "Hint: for cuda/tensorrt install the GPU build: pip uninstall -y onnxruntime && pip install 'ppllava-edge[gpu]'"
            + (" and TensorRT (pip install 'ppllava-edge[tensorrt]' or JetPack)" if name == "tensorrt" else "")
        )
    return name


def provider_list(provider: str, cache_dir: Path | None = None, fp16: bool = False) -> list:
    """ORT `providers=` argument for a resolved provider, with CPU fallback."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cache = Path(cache_dir or "trt_cache")
    cache.mkdir(parents=True, exist_ok=True)
    trt_options = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": fp16,
    }
    return [("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]


def create_session(path: Path, provider: str, threads: int | None = None, cache_dir: Path | None = None, fp16: bool = False):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), so, providers=provider_list(provider, cache_dir, fp16))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InferenceError(f"{path}: onnxruntime could not load the graph ({type(exc).__name__}: {exc})") from exc
