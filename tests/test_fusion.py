"""The fused vision graph (export/fusion.py): what ONNX Runtime runs, what TensorRT builds, its parity with PyTorch
and its initializers traced to the checkpoint."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ppllava_edge.export.fusion import VisionDims, build_vision  # noqa: E402
from ppllava_edge.export.graphs import VisionGraph  # noqa: E402

from .conftest import cosine  # noqa: E402


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ops(path) -> Counter:
    return Counter((n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node)


def _build(model, path, **kw):
    state = model.state_dict()
    return build_vision(lambda n: state[n].detach().float().numpy(), VisionDims.from_config(model.cfg), path, **kw)


def test_ort_runs_the_fused_vision_graph_and_tensorrt_the_traced_one(tiny_export):
    from ppllava_edge.engine.plan import BuildOptions, plan_build
    from ppllava_edge.manifest import load_manifest

    m = load_manifest(tiny_export)
    assert m.graph_for("vision", "ort") == "vision" and m.graph_for("vision", "trt") == "vision_trt"
    assert "MultiHeadAttention" in m.graph("vision")["ops"] and m.graph("vision_trt")["ops"].startswith("standard ONNX ops")
    fused, traced = _ops(m.path("vision")), _ops(m.path("vision_trt"))
    # every attention that runs is one MultiHeadAttention: 5 main layers (the 6th is dead) + 3 adapter steps x 2
    assert fused[("com.microsoft", "MultiHeadAttention")] == 5 + 3 * 2
    assert fused[("ai.onnx", "Softmax")] == 0 and fused[("ai.onnx", "Transpose")] <= 1 + 3 * 2
    assert {d for d, _ in traced} == {"ai.onnx"} and traced[("ai.onnx", "Softmax")] == 5 + 3 * 2
    # both answer the same; TensorRT builds the traced one under the stage's name
    px = np.random.default_rng(0).standard_normal((5, 3, 84, 84), dtype=np.float32)
    for a, b in zip(_session(m.path("vision")).run(None, {"pixel_values": px}), _session(m.path("vision_trt")).run(None, {"pixel_values": px})):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    plan = next(p for p in plan_build(m, Path("/e"), BuildOptions(), "10.16.1", 87) if p.graph == "vision")
    assert (plan.source, plan.onnx.name, plan.engine_file) == ("vision_trt", "vision_trt.onnx", "vision.trt10.16.1.sm87.engine")
    checks = {(c["graph"], c["case"], c["output"]) for c in m.data["validation"]["checks"]}
    assert ("vision_trt", "T=5", "keys") in checks and ("vision", "T=1 (image tile)", "values") in checks


@pytest.mark.parametrize("attention_op", ["MultiHeadAttention", "Attention"])
def test_fused_graph_equals_pytorch_at_any_frame_count(tiny_model, tmp_path, attention_op):
    path = tmp_path / "vision.onnx"
    _build(tiny_model, path, attention_op=attention_op)
    sess = _session(path)
    for T in (1, 2, 3, 7, 16):
        px = torch.randn(T, 3, 84, 84, generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            ref = [t.numpy() for t in VisionGraph(tiny_model)(px)]
        got = sess.run(None, {"pixel_values": px.numpy()})
        for name, r, g in zip(("values", "keys"), ref, got):
            assert g.shape == r.shape, (T, name)
            assert np.abs(g - r).max() <= 1e-5 * np.abs(r).max(), (T, name)


def test_fp16_graph_keeps_fp16_io_and_stays_close(tiny_model, tmp_path):
    path = tmp_path / "vision16.onnx"
    _build(tiny_model, path, dtype="fp16")
    px = torch.randn(4, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [t.numpy() for t in VisionGraph(tiny_model)(px)]
    got = _session(path).run(None, {"pixel_values": px.numpy().astype(np.float16)})
    assert all(g.dtype == np.float16 for g in got)
    assert cosine(got[0], ref[0]) > 0.999 and cosine(got[1], ref[1]) > 0.999


def test_every_initializer_traces_to_the_checkpoint(tiny_ckpt, tiny_model, tmp_path):
    from ppllava_edge.export.weights_check import check_weights
    from ppllava_edge.model.checkpoint import read_state_dict

    state = read_state_dict(tiny_ckpt)
    info = _build(tiny_model, tmp_path / "vision.onnx", external=True)
    wm = info["weights"]
    graphs = {"vision": {"file": "vision.onnx", "weights": wm.to_json()}}
    report = check_weights(tmp_path, graphs, lambda n: state[n].float().numpy(), np.float32)
    assert report.passed, report.text()
    # every tower / head tensor the traced program uses is held: the dead last layer and adapter pair are not
    held = {s for _, srcs in wm.map.values() for s in srcs}
    used = {n for n in state if n.startswith(("vision_tower.", "multi_modal_projector.linear_1", "multi_modal_projector.clip_visual_"))}
    dead = {n for n in used if ".encoder.layers.5." in n or "_layers.3." in n or "post_layernorm" in n}
    assert held == used - dead
    # packed q|k|v biases and transposed weights are what the map says: a wrong tensor is caught
    bias = next(k for k in wm.map if k.endswith("self_attn.qkv_proj.bias"))
    wrong = lambda n: state[n].float().numpy() + (n.endswith("self_attn.v_proj.bias") and n.startswith(bias.split("qkv_proj")[0]))  # noqa: E731
    bad = check_weights(tmp_path, graphs, wrong, np.float32)
    assert [(f.kind, f.initializer) for f in bad.findings] == [("mismatch", bias)]


def test_export_streams_the_fused_graph_with_a_checked_weight_map(tiny_export, tiny_ckpt, tmp_path):
    """The exporter writes vision.onnx from the checkpoint's shards into vision.onnx.data, maps every initializer
    (MultiHeadAttention's packed q|k|v bias traced to its three Linear biases) and the export's weights check passes; the fp32 twin that
    `quantize --vision int8` uses on fp16 exports is the same graph, byte for byte in its weights."""
    from ppllava_edge.export.exporter import write_vision_graph
    from ppllava_edge.external_data import external_files

    m = json.loads((tiny_export / "export.json").read_text())
    assert m["weights_check"]["passed"]
    wm = m["graphs"]["vision"]["weights"]["map"]
    layer = "vision_tower.vision_model.encoder.layers.0.self_attn."
    assert wm[layer + "qkv_proj.bias"] == ["concat_transpose", [layer + f"{p}_proj.bias" for p in "qkv"]]
    assert wm[layer + "q_proj.weight"] == ["transpose", [layer + "q_proj.weight"]]
    assert wm["vision_tower.vision_model.btadapter_T_layers.0.temporal_fc.weight"][0] == "transpose"
    assert external_files(onnx.load(str(tiny_export / "vision.onnx"), load_external_data=False)) == ["vision.onnx.data"]
    assert "weights" in m["graphs"]["vision_trt"]  # the traced TensorRT twin is mapped and checked too
    twin = write_vision_graph(tiny_ckpt, tmp_path / "vision.fp32.onnx")
    assert (tmp_path / "vision.fp32.onnx.data").read_bytes() == (tiny_export / "vision.onnx.data").read_bytes()
    px = np.random.default_rng(3).standard_normal((3, 3, 84, 84), dtype=np.float32)
    for a, b in zip(_session(twin).run(None, {"pixel_values": px}), _session(tiny_export / "vision.onnx").run(None, {"pixel_values": px})):
        np.testing.assert_array_equal(a, b)


def test_tensorrt_build_refuses_an_export_without_the_standard_ops_vision_graph(tiny_export):
    """An export made without --tensorrt has only the fused vision graph: `build` says so and how to fix it."""
    from ppllava_edge.engine.plan import BuildOptions, plan_build
    from ppllava_edge.errors import EngineBuildError
    from ppllava_edge.manifest import ExportManifest

    data = json.loads((tiny_export / "export.json").read_text())
    del data["backends"]["trt"], data["graphs"]["vision_trt"], data["graphs"]["decoder_trt"]
    with pytest.raises(EngineBuildError, match=r"vision: this export's vision.onnx uses com.microsoft operators(.|\n)*--tensorrt` \(adds vision_trt.onnx\)"):
        plan_build(ExportManifest(tiny_export, data), Path("/e"), BuildOptions(graphs=("vision",)), "10.16.1", 87)
