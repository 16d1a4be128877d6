"""Importing a package area must not pull in heavy or optional dependencies (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CASES = {
    "runtime generation": (["ppllava_edge.runtime.generation"], ["torch", "transformers"]),
    "media": (["ppllava_edge.media"], ["torch", "av", "onnxruntime"]),
    "bench": (
        ["ppllava_edge.bench.runner", "ppllava_edge.bench.report", "ppllava_edge.bench.hardware", "ppllava_edge.bench.stats", "ppllava_edge.cli.bench_cmd"],
        ["torch", "onnxruntime", "tensorrt", "matplotlib"],
    ),
    "serve + load test": (
        ["ppllava_edge.serve.app", "ppllava_edge.serve.scheduler", "ppllava_edge.serve.protocol", "ppllava_edge.serve.inputs", "ppllava_edge.serve.metrics", "ppllava_edge.serve.run",
         "ppllava_edge.cli.serve_cmd", "ppllava_edge.bench.loadtest"],
        ["torch", "transformers", "tensorrt", "onnxruntime", "openai"],
    ),
    "chat page + relevance": (["ppllava_edge.serve.page", "ppllava_edge.relevance"], ["torch", "transformers", "tensorrt", "onnxruntime", "openai"]),
    "triton": (
        ["ppllava_edge.triton.protocol", "ppllava_edge.triton.pbtxt", "ppllava_edge.triton.repository", "ppllava_edge.triton.python_model",
         "ppllava_edge.triton.server", "ppllava_edge.triton.client", "ppllava_edge.triton.loadtest", "ppllava_edge.cli.triton_cmd"],
        ["torch", "transformers", "tensorrt", "onnxruntime", "tritonclient", "triton_python_backend_utils", "google.protobuf"],
    ),
    "engine + cli": (
        ["ppllava_edge.cli.main", "ppllava_edge.engine.plan", "ppllava_edge.engine.build", "ppllava_edge.engine.calibration_cache", "ppllava_edge.engine.environment", "ppllava_edge.runtime.trt_backend", "ppllava_edge.device"],
        ["tensorrt", "cuda", "torch", "onnx"],
    ),
}


@pytest.mark.parametrize("area", list(CASES))
def test_import_does_not_load_heavy_modules(area):
    modules, banned = CASES[area]
    code = f"import sys, {', '.join(modules)}\nprint(sorted(m for m in {banned!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"{area} imports {out.stdout.strip()}"
