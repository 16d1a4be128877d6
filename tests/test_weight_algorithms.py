"""`quantize --weight-algorithm rtn|hqq|gptq` (calibration/weight_algorithms.py): the values chosen on each block's
grid. Fast: small random layers with correlated activations, one-MatMul ONNX graphs."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from ppllava_edge.calibration.convert import _quantize_nbits, minmax_blocks  # noqa: E402
from ppllava_edge.calibration.weight_algorithms import (  # noqa: E402
    Grid, collect_hessians, dequantize, gptq, hqq_zero, pack, refine, unpack, unpack_zero_points)
from ppllava_edge.errors import InputError  # noqa: E402


def _activations(rng, rows: int, k: int, mix_seed: int = 10) -> np.ndarray:
    """Correlated inputs with a few large channels, as an LLM's normed hidden states have (one distribution per
    `mix_seed`, fresh samples from `rng`)."""
    mrng = np.random.default_rng(mix_seed)
    mix = mrng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    mix[:, mrng.choice(k, 4, replace=False)] *= 8
    return (rng.standard_normal((rows, k)) @ mix).astype(np.float32)


def _minmax_grid(w, bits, block):
    packed, s, z = minmax_blocks(w, bits, block)
    return unpack(packed, bits, w.shape[0]), Grid(s, z)


@pytest.mark.parametrize("bits,block", [(4, 32), (4, 128), (8, 32)])
def test_gptq_beats_round_to_nearest_on_the_calibration_activations(bits, block):
    """On a layer's own calibration activations X, GPTQ's output error ||X W - X Ŵ|| is below round-to-nearest's on the
    same grid (the point of GPTQ), and on held-out activations from the same distribution too."""
    rng = np.random.default_rng(0)
    k, n = 256, 64
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x, x_new = _activations(rng, 2048, k), _activations(rng, 2048, k)
    q_rtn, grid = _minmax_grid(w, bits, block)
    h = x.astype(np.float64).T @ x
    q_gptq = gptq(w, grid, bits, block, h)
    err = {name: np.linalg.norm(x @ w - x @ dequantize(q, grid, block)) for name, q in (("rtn", q_rtn), ("gptq", q_gptq))}
    assert err["gptq"] < 0.9 * err["rtn"], err  # measured 0.85 at every (bits, block) here
    held = {name: np.linalg.norm(x_new @ w - x_new @ dequantize(q, grid, block)) for name, q in (("rtn", q_rtn), ("gptq", q_gptq))}
    assert held["gptq"] < 0.9 * held["rtn"], held  # measured 0.87-0.88


def test_weights_already_on_the_grid_stay_exact():
    """A dequantized Q4_1 weight (w = d * q + m per block of 32): GPTQ and HQQ keep it exactly (static groups; HQQ
    keeps its best iterate), as round-to-nearest does."""
    rng = np.random.default_rng(1)
    k, n, b = 128, 16, 32
    d = rng.uniform(0.01, 0.05, (n, k // b, 1))
    m = rng.uniform(-0.3, -0.1, (n, k // b, 1))
    q = rng.integers(0, 16, (n, k // b, b))
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(n, k).T.astype(np.float32)
    _, grid = _minmax_grid(w, 4, b)
    h = (x := _activations(rng, 512, k)).astype(np.float64).T @ x
    for qq, g in ((gptq(w, grid, 4, b, h), grid), hqq_zero(w, grid, 4, b)):
        np.testing.assert_allclose(dequantize(qq, g, b), w, atol=1e-5)


def test_hqq_lowers_the_weight_error():
    """HQQ re-fits the float zero points: its mean |W - Ŵ| is below min/max rounding's, at block 32 and 128."""
    rng = np.random.default_rng(2)
    w = (rng.standard_t(4, (512, 96)) * 0.02).astype(np.float32)
    for b in (32, 128):
        q_rtn, grid = _minmax_grid(w, 4, b)
        q_hqq, g_hqq = hqq_zero(w, grid, 4, b)
        e_rtn, e_hqq = np.abs(w - dequantize(q_rtn, grid, b)).mean(), np.abs(w - dequantize(q_hqq, g_hqq, b)).mean()
        assert e_hqq < 0.97 * e_rtn, (b, e_rtn, e_hqq)


def _one_matmul(tmp_path, w, name="src.onnx"):
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="head")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", k])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["s", n])], [onnx.numpy_helper.from_array(w, "w")])
    src = tmp_path / name
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(src))
    return src


@pytest.mark.parametrize("bits,block,symmetric,algorithm", [(4, 32, False, "gptq"), (4, 32, True, "gptq"), (8, 32, True, "gptq"), (8, 32, False, "gptq"),
                                                             (4, 128, False, "hqq"), (4, 32, False, "rtn")])
def test_written_decoder_equals_a_numpy_dequantize_and_matmul(tmp_path, bits, block, symmetric, algorithm):
    """The MatMulNBits graph `_quantize_nbits(algorithm=...)` writes computes x @ (what refine() chose, dequantized in
    numpy): the same argmax ids on every row and logits within float noise (accuracy level 0) - so the stored bytes,
    scales and zero points are the algorithm's."""
    rng = np.random.default_rng(3)
    k, n = 256, 200
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    x = _activations(rng, 300, k)
    h = x.astype(np.float64).T @ x
    src, dst = _one_matmul(tmp_path, w), tmp_path / "q.onnx"
    info = _quantize_nbits(src, dst, bits, block, [], accuracy_level=0, symmetric=symmetric, algorithm=algorithm, hessians={"w": h})
    assert info["nodes_quantized"] == 1 and info["algorithm"] == algorithm
    got = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # the reference, independently of the writer: the grid the writer starts from, then refine()
    if symmetric:
        from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

        packed, s, zp = np.zeros((n, k // block, block * bits // 8), np.uint8), np.zeros((n, k // block), np.float32), np.zeros((n, k // block), np.uint8)
        (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, s, zp, block, n, k, True)
        grid = Grid(s, np.full_like(s, 1 << (bits - 1)))
    else:
        _, grid = _minmax_grid(w, bits, block)
    q, grid = refine(algorithm, w, grid, bits, block, h)
    ref = x @ dequantize(q, grid, block)
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    if algorithm != "rtn":  # and it is not round-to-nearest's result
        rtn = _quantize_nbits(src, tmp_path / "rtn.onnx", bits, block, [], accuracy_level=0, symmetric=symmetric)
        assert rtn["algorithm"] == "rtn"
        y_rtn = ort.InferenceSession(str(tmp_path / "rtn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(y_rtn - got).max() > 1e-3
        if algorithm == "gptq":
            assert np.linalg.norm(got - x @ w) < np.linalg.norm(y_rtn - x @ w)


def test_int8_asymmetric_keeps_a_q4_1_weight_exactly(tmp_path):
    """int8-weight --asymmetric: min/max blocks with float zero points at 8 bits too (zero points 0 + the block-sum
    correction). A dequantized Q4_1 weight (16 levels per block of 32) lies on that grid (scale = 15 d / 255), so the
    written graph computes x @ w up to float noise; the symmetric int8 grid rounds it a second time."""
    rng = np.random.default_rng(6)
    k, n, b = 128, 24, 32
    d = rng.uniform(0.01, 0.05, (n, k // b, 1))
    m = rng.uniform(-0.3, -0.1, (n, k // b, 1))
    q = rng.integers(0, 16, (n, k // b, b))
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(n, k).T.astype(np.float32)
    x = _activations(rng, 64, k)
    src = _one_matmul(tmp_path, w)
    errs = {}
    for sym in (False, True):
        dst = tmp_path / f"q{sym}.onnx"
        _quantize_nbits(src, dst, 8, b, [], accuracy_level=0, symmetric=sym)
        y = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        errs[sym] = np.abs(y - x @ w).max() / np.abs(x @ w).max()
    assert errs[False] < 1e-5 and errs[True] > 20 * errs[False], errs


def test_pack_round_trips():
    rng = np.random.default_rng(4)
    for bits in (4, 8):
        q = rng.integers(0, 1 << bits, (96, 10)).astype(np.uint8)
        np.testing.assert_array_equal(unpack(pack(q, bits, 32), bits, 96), q)
    zp = np.array([[0x21, 0x03]], np.uint8)
    np.testing.assert_array_equal(unpack_zero_points(zp, 4, 3), [[1, 2, 3]])


class _Calib:
    """The two CalibrationSet methods collect_hessians reads, over fixed prefill feeds."""

    folder = "CALIB"

    def __init__(self, feeds):
        self._feeds = feeds

    def records(self, graph, split):
        assert graph == "decoder" and split == "calib"  # never the held-out split
        return list(range(len(self._feeds)))

    def feed(self, graph, rec, input_names=None):
        return self._feeds[rec]


def test_hessians_come_from_every_position_of_the_calibration_feeds(tmp_path):
    """H = Σ XᵀX per weight over the CALIB feeds; the head, which reads only the last position (Gather), gets the
    hidden state of every position it is sliced from."""
    rng = np.random.default_rng(5)
    k, n = 8, 5
    w1, w2 = rng.standard_normal((k, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Gather", ["h", "last"], ["h_last"], name="last_pos", axis=1),
             helper.make_node("MatMul", ["h_last", "w2"], ["logits"], name="head")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n])],
                          [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2"),
                           onnx.numpy_helper.from_array(np.array(-1, np.int64), "last")])
    src = tmp_path / "decoder.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]), str(src), save_as_external_data=True,
              location="decoder.onnx.data", size_threshold=0)
    feeds = [{"x": rng.standard_normal((1, s, k)).astype(np.float32)} for s in (3, 7)]
    hs = collect_hessians(src, _Calib(feeds))
    xs = np.concatenate([f["x"][0] for f in feeds]).astype(np.float64)
    hidden = xs @ w1
    np.testing.assert_allclose(hs["w1"], xs.T @ xs, rtol=1e-5)
    np.testing.assert_allclose(hs["w2"], hidden.T @ hidden, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]  # nothing written, nothing linked


def test_gptq_refuses_hessians_that_do_not_fit(tmp_path, monkeypatch):
    """GPTQ holds every H at once: when that is over half the available RAM it is refused before any work, naming
    the alternative."""
    import psutil

    src = _one_matmul(tmp_path, np.ones((64, 8), np.float32), "decoder.onnx")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 40000})())
    with pytest.raises(InputError, match=r"gptq holds H = XᵀX for 1 MatMul inputs .* use --weight-algorithm rtn"):
        collect_hessians(src, _Calib([]))


def test_bad_weight_algorithm_is_one_clear_error(tmp_path):
    """A bad --weight-algorithm, or hqq where zero points cannot move, is refused before any work, naming the option."""
    from ppllava_edge.calibration.quantize import quantize_export
    from ppllava_edge.cli.main import cli as main

    with pytest.raises(InputError, match="--weight-algorithm 'awq' is not one of auto, rtn, hqq, gptq"):
        quantize_export(tmp_path / "missing", tmp_path / "calib", tmp_path / "out", llm="int4-weight", weight_algorithm="awq")
    with pytest.raises(InputError, match="hqq .* needs int4-weight with asymmetric blocks"):
        quantize_export(tmp_path / "missing", tmp_path / "calib", tmp_path / "out", llm="int4-weight", asymmetric=False, weight_algorithm="hqq")
    with pytest.raises(InputError, match="hqq .* 8-bit"):
        quantize_export(tmp_path / "missing", tmp_path / "calib", tmp_path / "out", llm="int8-weight", weight_algorithm="hqq")
    r = CliRunner().invoke(main, ["quantize", str(tmp_path), "--calib", str(tmp_path), "--out", str(tmp_path / "o"), "--weight-algorithm", "awq"])
    assert r.exit_code == 2 and "Invalid value for '--weight-algorithm'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
