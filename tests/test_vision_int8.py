"""`quantize --vision int8` runs every weight MatMul of the fused vision graph on an ONNX Runtime int8 kernel
(calibration/vision_int8.py, README "INT8 vision: the int8 kernels (issue 23)")."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest

from tests.conftest import cosine


@pytest.fixture(scope="module")
def quantized(tiny_export, tmp_path_factory):
    from ppllava_edge.calibration.collect import collect_calibration
    from ppllava_edge.calibration.quantize import quantize_export
    from ppllava_edge.media import write_test_video

    work = tmp_path_factory.mktemp("vision_int8")
    (work / "videos").mkdir()
    for i, (n, size) in enumerate([(24, (96, 64)), (30, (64, 64)), (20, (80, 64))]):
        write_test_video(work / "videos" / f"clip{i}.mp4", num_frames=n, size=size)
    (work / "q.jsonl").write_text(json.dumps({"question": "What happens?"}) + "\n")
    collect_calibration(tiny_export, work / "videos", work / "q.jsonl", work / "calib", frames=[2], samples=4, decode_steps=1)
    result = quantize_export(tiny_export, work / "calib", work / "q", vision="int8", pool="fp32", llm="fp32", quality_tokens=0, greedy_tokens=2)
    return result.folder, work


def test_every_weight_matmul_runs_on_an_int8_kernel(tiny_export, quantized):
    from ppllava_edge.calibration.vision_int8 import matmul_kernels, optimized_op_counts
    from ppllava_edge.manifest import load_manifest

    folder, work = quantized
    q = load_manifest(folder)
    weight_matmuls = Counter(n.op_type for n in onnx.load(str(tiny_export / "vision.onnx"), load_external_data=False).graph.node)["MatMul"]
    counts = optimized_op_counts(q.path("vision"), work / "optimized")
    # before: the MatMuls after MultiHeadAttention / QuickGelu kept float activations (25 of 71 on tiny:
    # 19 weight-only MatMulNBits + 6 float MatMul)
    assert weight_matmuls == 71
    assert matmul_kernels(counts) == {"int8": weight_matmuls, "float": 0}, dict(counts)
    assert counts["MatMulIntegerToFloat"] == weight_matmuls


def test_int8_vision_output_stays_close_to_fp32(tiny_export, quantized):
    from ppllava_edge.manifest import load_manifest
    from ppllava_edge.runtime.session import create_session

    folder, _ = quantized
    fp32, q = load_manifest(tiny_export), load_manifest(folder)
    px = np.random.default_rng(3).uniform(-1.8, 2.1, (4, 3, 84, 84)).astype(np.float32)
    ref = create_session(fp32.path("vision"), "cpu").run(None, {"pixel_values": px})
    got = create_session(q.path("vision"), "cpu").run(None, {"pixel_values": px})
    assert min(cosine(r, g) for r, g in zip(ref, got)) >= 0.99
    gate = json.loads((folder / "accuracy.json").read_text())
    vision = [c for c in gate["checks"] if c["graph"] == "vision" and "cosine" in c["metric"]]
    assert len(vision) == 2 and all(c["value"] >= 0.99 for c in vision)
