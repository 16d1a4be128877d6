"""calibrate -> quantize -> ask on the tiny export: every precision mode, the accuracy gate, mixed shapes, bad inputs."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("onnx")

from ppllava_edge.calibration.collect import collect_calibration  # noqa: E402
from ppllava_edge.calibration.options import QuantizeOptions  # noqa: E402
from ppllava_edge.calibration.quantize import quantize_export  # noqa: E402
from ppllava_edge.calibration.readers import histogram_shape_fix, load_calibration  # noqa: E402
from ppllava_edge.errors import AccuracyError, CalibrationError, InputError  # noqa: E402

# a cheaper gate for tests (fewer prefix cuts and greedy tokens); thresholds are the defaults
FAST = QuantizeOptions(prefill_positions=3, greedy_tokens=4, quality_tokens=4)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from ppllava_edge.media import write_test_video

    folder = tmp_path_factory.mktemp("calib_videos")
    for i, (n, size) in enumerate([(24, (96, 64)), (30, (64, 64)), (20, (80, 64))]):
        write_test_video(folder / f"clip{i}.mp4", num_frames=n, size=size)
    (folder / "notes.txt").write_text("not a video, ignored")
    return folder


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    lines = [
        {"question": "What happens in this video?"},
        {"video": "clip1.mp4", "question": "Describe the moving square and the disc in detail, including their colours."},
        {"video": "clip2.mp4", "question": "Is there any text?"},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    return path


@pytest.fixture(scope="module")
def calib(tiny_export, videos, questions, tmp_path_factory):
    """Mixed shapes: T alternates 2 / 4 over videos, prompts have different lengths."""
    out = tmp_path_factory.mktemp("calib") / "calib"
    seen = []
    summary = collect_calibration(tiny_export, videos, questions, out, frames=[2, 4], samples=8, decode_steps=2, progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1]
    assert summary.videos == 3 and summary.sources == 5 and summary.holdout_sources == 2  # clip2: its own + the shared question
    return out


def _ask(folder, video, n=4):
    from ppllava_edge.runtime.generation import GenerationConfig
    from ppllava_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_export(folder, provider="cpu")
    return pipe.ask(video, "What is happening?", num_frames=4, generation=GenerationConfig(max_new_tokens=n, ignore_eos=True))


def test_calibration_feeds(calib, tiny_export):
    import onnxruntime as ort

    c = load_calibration(calib)
    idx = c.index
    assert {r["frames"] for r in idx["records"]["vision"]} == {2, 4}
    assert len({r["seq"] for r in c.records("decoder", "all") if r["kind"] == "prefill"}) > 1
    assert c.records("vision", "holdout") and c.records("decoder", "calib")
    # prefill embeds hold the pooled visual tokens at the image token; decode feeds slice the stored past
    sess = {g: ort.InferenceSession(str(tiny_export / f"{g}.onnx")) for g in ("prompt_pool", "decoder")}
    pre = c.records("decoder", "all")[0]
    arrays = c.load(pre)
    tokens = sess["prompt_pool"].run(None, c.feed("prompt_pool", c.records("prompt_pool", "all")[0]))[0]
    where = int(np.flatnonzero(arrays["input_ids"] == 32000)[0])
    np.testing.assert_allclose(arrays["inputs_embeds"][0, where:where + len(tokens)], tokens, atol=1e-6)
    steps = [r for r in c.records("decoder", "all") if r["source"] == pre["source"] and r["kind"] == "decode"]
    assert [r["past"] for r in steps] == [pre["seq"], pre["seq"] + 1]
    names = [i.name for i in sess["decoder"].get_inputs()]
    assert "seqlens_k" in names  # the feeds follow the in-place decoder's contract
    logits = sess["decoder"].run(["logits"], c.feed("decoder", pre, input_names=names))[0]
    assert int(np.argmax(logits)) == int(arrays["step_ids"][0])
    logits = sess["decoder"].run(["logits"], c.feed("decoder", steps[0], input_names=names))[0]
    assert int(np.argmax(logits)) == int(arrays["step_ids"][1])


def test_histogram_fix_is_scoped():
    from onnxruntime.quantization.calibrate import HistogramCollector

    data = {"t": [np.ones((2, 3), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4)]}
    original = HistogramCollector.collect
    with pytest.raises(ValueError):
        HistogramCollector("percentile", False, 64, 128, 99.9, "same").collect(dict(data))
    with histogram_shape_fix():
        h = HistogramCollector("percentile", False, 64, 128, 99.9, "same")
        h.collect(dict(data))
        assert int(h.histogram_dict["t"][0].sum()) == 14
    assert HistogramCollector.collect is original


def test_default_int8_passes_gate_and_answers(tiny_export, calib, videos, tmp_path):
    """The defaults: int8 vision and pools, int8-weight (MatMulNBits) for ONNX Runtime's decoder and the same mode as
    DequantizeLinear weights for TensorRT's decoder_trt; --llm-trt int8 keeps static int8 + the calibration cache."""
    from ppllava_edge.cli.main import cli

    out = tmp_path / "q"
    res = quantize_export(tiny_export, calib, out, trt_cache=True, llm_trt="int8", options=FAST)
    assert res.report.passed
    manifest = json.loads((out / "export.json").read_text())
    assert {g: manifest["graphs"][g]["precision"] for g in manifest["graphs"]} == {
        "vision": "int8", "prompt_pool": "int8", "image_pool": "int8", "projector_head": "fp32", "decoder": "int8-weight", "decoder_trt": "int8",
        "vision_trt": "int8"}
    assert "MatMulNBits" in manifest["graphs"]["decoder"]["quantization"]["scheme"]
    # the TensorRT decoder and vision graphs are calibrated on the same feeds (the decoder in its own contract) and
    # gated like their ONNX Runtime twins; the TensorRT cache is written for the graphs TensorRT builds
    for g in ("decoder_trt", "vision_trt"):
        assert (out / "trt_calibration" / f"{g}.cache").is_file()
        assert any(c.graph == g and c.passed for c in res.report.checks)
    assert manifest["quantization"]["llm"] == "int8-weight" and manifest["quantization"]["llm_trt"] == "int8" and manifest["created"] != json.loads((tiny_export / "export.json").read_text())["created"]
    # LayerNorm / Softmax / Add / the relevance path stay float: only weight MatMul/Gemm/Conv inputs get Q/DQ
    import onnx

    g = onnx.load(str(out / manifest["graphs"]["prompt_pool"]["file"])).graph
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type in ("Softmax", "LayerNormalization", "Add") or n.name == "node_matmul":
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input), n.name
    # the whole CLIP text branch (encoder layers + projection) stays float: the /0.01 softmax amplifies its error
    pq = manifest["graphs"]["prompt_pool"]["quantization"]
    assert "node_linear_12" in pq["kept_float"] and len(pq["kept_float"]) == 13 and pq["nodes_quantized"] == 1
    values = {(c.graph, c.metric): c.value for c in res.report.checks}
    assert values[("prompt_pool", "relevance cosine (min)")] > 0.999 and values[("image_pool", "relevance cosine (min)")] > 0.999
    acc = json.loads((out / "accuracy.json").read_text())
    assert acc["passed"] and acc["held_out"]
    metrics = {(c["graph"], c["metric"]) for c in acc["checks"]}
    assert ("decoder", "top-1 prefill positions") in metrics and ("vision", "values cosine (min)") in metrics
    lines = (out / "trt_calibration" / "vision.cache").read_text().splitlines()
    assert lines[0].startswith("TRT-") and lines[0].endswith("EntropyCalibration2") and len(lines) > 10
    name, hexscale = lines[1].split(": ")
    assert struct.unpack(">f", bytes.fromhex(hexscale))[0] > 0
    # the quantized folder answers through the library and `ppllava-edge ask`
    video = videos / "clip0.mp4"
    assert len(_ask(out, video).ids) == 4
    r = CliRunner().invoke(cli, ["ask", str(out), str(video), "What is happening?", "--frames", "4", "--max-new-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["ids"]) >= 1
    # export.json records the quantized folder's own files (not the source export's digests)
    assert "vision.int8.onnx" in manifest["weights"] and "vision.onnx" not in manifest["weights"]
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code == 0 and f"all {len(manifest['weights'])} files match export.json" in r.stdout, r.output


def test_prefill_only_calibration_never_opens_the_decoder(tiny_export, calib, videos, questions, tmp_path, monkeypatch):
    """--decode-steps 0 (the 7B flow: an fp16 7B decoder does not fit in RAM on a CPU): the same prefill feeds as a
    full calibration, empty pasts, no decoder session; weight-only quantization and its gate run on them."""
    import ppllava_edge.runtime.pipeline as pl

    opened = []
    real = pl.create_session
    monkeypatch.setattr(pl, "create_session", lambda path, *a, **k: (opened.append(Path(path).name), real(path, *a, **k))[1])
    out = tmp_path / "c0"
    collect_calibration(tiny_export, videos, questions, out, frames=[2, 4], samples=8, decode_steps=0)
    assert "decoder.onnx" not in opened and "vision.onnx" in opened
    full, pre = load_calibration(calib), load_calibration(out)
    assert not [r for r in pre.records("decoder", "all") if r["kind"] == "decode"]
    a, b = full.records("decoder", "all"), pre.records("decoder", "all")
    first_full = [r for r in a if r["kind"] == "prefill"]
    assert [r["seq"] for r in first_full] == [r["seq"] for r in b]
    for ra, rb in zip(first_full, b):
        fa, fb = full.feed("decoder", ra), pre.feed("decoder", rb)
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    monkeypatch.undo()
    res = quantize_export(tiny_export, out, tmp_path / "w8", vision="fp32", pool="fp32", llm="int8-weight", options=FAST)
    assert res.report.passed
    with pytest.raises(InputError, match="decoder=False"):
        pl.Pipeline.from_export(tiny_export, provider="cpu", decoder=False).ask(videos / "clip1.mp4", "Why?", num_frames=2)


def test_weight_only_and_fp16(tiny_export, calib, videos, tmp_path):
    import onnx

    out = tmp_path / "w8"
    res = quantize_export(tiny_export, calib, out, vision="fp16", pool="fp32", llm="int8-weight", options=FAST)
    assert res.report.passed
    m = json.loads((out / "export.json").read_text())
    assert m["graphs"]["vision"]["precision"] == "fp16" and m["graphs"]["decoder"]["precision"] == "int8-weight"
    # the in-place graph: per layer the packed qkv, o, packed gate|up and down projections, plus lm_head; every one
    # weight-only, and the GroupQueryAttention (in-place KV cache) kept
    q = onnx.load(str(out / m["graphs"]["decoder"]["file"]))
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("MatMulNBits") == 4 * m["model"]["num_layers"] + 1 and "MatMul" not in ops
    assert ops.count("GroupQueryAttention") == m["model"]["num_layers"]
    assert len(_ask(out, videos / "clip1.mp4").ids) == 4
    # int4 weight-only on a 64-wide random model is measurably degraded: written only with accept_degraded
    out4 = tmp_path / "w4"
    res4 = quantize_export(tiny_export, calib, out4, vision="fp32", pool="fp32", llm="int4-weight", block_size=16, accept_degraded=True, options=FAST)
    m4 = json.loads((out4 / "export.json").read_text())
    assert m4["graphs"]["decoder"]["precision"] == "int4-weight" and m4["quantization"]["block_size"] == 16
    assert json.loads((out4 / "accuracy.json").read_text())["passed"] == res4.report.passed
    assert len(_ask(out4, videos / "clip1.mp4").ids) == 4


def test_gate_fails_on_degraded_decoder(tiny_export, calib, tmp_path):
    """int4 weights with blocks of 16 on the 64-wide random LLM degrade its logits past the gate (the in-place
    decoder's fused ops leave static int8 over 'all' op types little to break, so that no longer fails)."""
    from ppllava_edge.cli.main import cli

    out = tmp_path / "broken"
    with pytest.raises(AccuracyError, match="decoder logits cosine") as info:
        quantize_export(tiny_export, calib, out, vision="fp32", pool="fp32", llm="int4-weight", block_size=16, options=FAST)
    assert not out.exists()
    assert not info.value.report.passed
    # the CLI: exit 1, the table and the error on stderr, no traceback, nothing written
    r = CliRunner().invoke(cli, ["quantize", str(tiny_export), "--calib", str(calib), "--out", str(out), "--vision", "fp32", "--pool", "fp32",
                                 "--llm", "int4-weight", "--block-size", "16", "--greedy-tokens", "4"])
    assert r.exit_code == 1
    assert "accuracy gate failed" in r.stderr and "FAIL" in r.stderr and "Traceback" not in r.output + r.stderr
    assert not out.exists()


def test_static_int8_decoder_is_refused(tiny_export, calib, tmp_path):
    """--llm int8 on ONNX Runtime's decoder (float activations, every weight dequantized every step: ~100x slower than
    fp32) is refused with one error naming int8-weight; nothing is written."""
    out = tmp_path / "s8"
    with pytest.raises(InputError, match="int8-weight"):
        quantize_export(tiny_export, calib, out, llm="int8", options=FAST)
    r = _run(["quantize", str(tiny_export), "--calib", str(calib), "--out", str(out), "--llm", "int8"])
    assert r.exit_code == 1 and "--llm int8-weight" in r.stderr and "--llm-trt int8" in r.stderr
    assert not out.exists()


def test_impossible_options_are_refused_once_before_the_export_is_read(tmp_path):
    """QuantizeOptions refuses a combination that can never work when it is built: the CLI builds it first, so a
    missing export is not even opened (one error naming the option, exit 1, nothing written)."""
    with pytest.raises(InputError, match="block_size must be a power of two >= 16, got 24"):
        QuantizeOptions(llm="int4-weight", block_size=24)
    with pytest.raises(InputError, match="llm_trt must be one of auto, int8, int8-weight, int4-weight, fp32; got 'int3'"):
        dataclasses.replace(FAST, llm_trt="int3")
    missing, out = tmp_path / "no-export", tmp_path / "q"
    r = _run(["quantize", str(missing), "--calib", str(missing), "--out", str(out), "--llm", "int8"])
    assert r.exit_code == 1 and "--llm int8 (static Q/DQ) is not offered" in r.stderr and str(missing) not in r.stderr
    r = _run(["quantize", str(missing), "--calib", str(missing), "--out", str(out), "--llm", "int8-weight", "--weight-algorithm", "hqq"])
    assert r.exit_code == 1 and "hqq re-fits float zero points" in r.stderr and "8-bit" in r.stderr
    assert not out.exists()


def test_test_videos_are_reproducible(tiny_export, calib, videos, tmp_path):
    """write_test_video gives the same bytes in a fresh process and in this one (after an export, ORT sessions,
    calibration): with x264's default mbtree the bundled libx264 did not, so CALIB and every gate number drifted."""
    from ppllava_edge.media import write_test_video

    here = write_test_video(tmp_path / "here.mp4", num_frames=24, size=(96, 64)).read_bytes()
    code = f"from ppllava_edge.media import write_test_video; write_test_video({str(tmp_path / 'fresh.mp4')!r}, num_frames=24, size=(96, 64))"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / "fresh.mp4").read_bytes() == here == (videos / "clip0.mp4").read_bytes()


_QUANTIZE_POOL = """
import sys
from pathlib import Path
from ppllava_edge.calibration.convert import _quantize_static
from ppllava_edge.calibration.readers import load_calibration
from ppllava_edge.manifest import load_manifest
export, calib, out = map(Path, sys.argv[1:])
(out / "work").mkdir(parents=True)
m = load_manifest(export)
_quantize_static(m.path("prompt_pool"), out / "pp.onnx", load_calibration(calib, m), "prompt_pool", "minmax", "weights", [], out / "work", None)
"""


def test_quantize_independent_of_hash_seed(tiny_export, calib, tmp_path):
    """Same CALIB, two PYTHONHASHSEEDs: the quantized graph is bit-identical (no set / dict-order dependence)."""
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", _QUANTIZE_POOL, str(tiny_export), str(calib), str(out)], check=True, env=env, timeout=120,
                       cwd=tmp_path)  # ORT drops sym_shape_infer_temp.onnx + a .data file in the cwd
        outs.append((out / "pp.onnx").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("method,kw", [("percentile", {"vision": "int8", "pool": "int8", "llm": "fp32"}),  # frames 2 / 4
                                        ("entropy", {"vision": "fp32", "pool": "fp32", "llm": "fp32", "llm_trt": "int8"})])  # prompts of different lengths
def test_mixed_shapes_histogram_methods(tiny_export, calib, videos, tmp_path, method, kw):
    from onnxruntime.quantization.calibrate import HistogramCollector

    original = HistogramCollector.collect
    out = tmp_path / method
    res = quantize_export(tiny_export, calib, out, method=method, accept_degraded=True, **kw, options=FAST)
    assert HistogramCollector.collect is original
    m = json.loads((out / "export.json").read_text())
    assert m["quantization"]["method"] == method
    values = {(c.graph, c.metric): c.value for c in res.report.checks}
    graph = "decoder_trt" if kw.get("llm_trt") == "int8" else "vision"
    key = (graph, "logits cosine (min)" if graph == "decoder_trt" else "values cosine (min)")
    assert values[key] > 0.98
    assert len(_ask(out, videos / "clip2.mp4").ids) == 4


# ---- bad inputs ---------------------------------------------------------------------------------------------
def _run(args):
    from ppllava_edge.cli.main import cli

    r = CliRunner().invoke(cli, args)
    assert "Traceback" not in r.output + r.stderr
    return r


def test_bad_inputs(tiny_export, videos, questions, tmp_path):
    from ppllava_edge.media import write_test_video

    out = str(tmp_path / "c")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run(["calibrate", str(tiny_export), "--videos", str(empty), "--questions", str(questions), "--out", out])
    assert r.exit_code == 1 and str(empty) in r.stderr and "no video files" in r.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "ok"}\n{"question": \n[1, 2]\n{"vidoe": "clip0.mp4", "question": "typo"}\n{"question": ""}\n')
    r = _run(["calibrate", str(tiny_export), "--videos", str(videos), "--questions", str(bad), "--out", out])
    assert r.exit_code == 1
    for n in (2, 3, 4, 5):
        assert f"{bad}:{n}:" in r.stderr
    assert f"{bad}:1:" not in r.stderr

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"video": "nope.mp4", "question": "where?"}\n{"question": "q"}\n')
    r = _run(["calibrate", str(tiny_export), "--videos", str(videos), "--questions", str(missing), "--out", out])
    assert r.exit_code == 1 and f"{missing}:1" in r.stderr and "nope.mp4" in r.stderr

    everyone = tmp_path / "everyone.jsonl"
    everyone.write_text('{"question": "What happens?"}\n')
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_test_video(mixed / "good.mp4", num_frames=12, size=(64, 64))
    (mixed / "broken.mp4").write_bytes(b"not a video at all")
    (mixed / "empty.mkv").write_bytes(b"")
    r = _run(["calibrate", str(tiny_export), "--videos", str(mixed), "--questions", str(everyone), "--out", out, "--frames", "2", "--on-bad-video", "fail"])
    assert r.exit_code == 1 and "broken.mp4" in r.stderr and "empty.mkv" in r.stderr and "2 of 3" in r.stderr
    assert not (tmp_path / "c").exists()
    r = _run(["calibrate", str(tiny_export), "--videos", str(mixed), "--questions", str(everyone), "--out", out, "--frames", "2"])
    assert r.exit_code == 0, r.stderr
    assert "skipped" in r.stderr and "broken.mp4" in r.stderr and r.stdout.strip() == out
    calib = load_calibration(out)
    assert calib.index["summary"]["skipped"] and not calib.has_holdout()

    r = _run(["calibrate", str(tiny_export), "--videos", str(videos), "--questions", str(questions), "--out", out, "--frames", "99"])
    assert r.exit_code == 1 and "frame range" in r.stderr

    r = _run(["quantize", str(tiny_export), "--calib", str(tmp_path / "nope"), "--out", str(tmp_path / "q")])
    assert r.exit_code == 1 and "index.json" in r.stderr
    r = _run(["quantize", str(tiny_export), "--calib", out, "--out", str(tmp_path / "q"), "--vision", "fp32", "--pool", "fp32",
              "--llm", "int8-weight", "--exclude-node", "no_such_node"])
    assert r.exit_code == 1 and "no_such_node" in r.stderr and not (tmp_path / "q").exists()
    with pytest.raises(CalibrationError, match="on_bad_video"):
        collect_calibration(tiny_export, videos, questions, out, on_bad_video="ignore")


@pytest.mark.parametrize("bits, block", [(4, 32), (8, 32), (4, 16)])
def test_streamed_weight_only_equals_onnxruntime_quantizer(tiny_export, tmp_path, bits, block):
    """The per-initializer MatMulNBits quantizer (memory-mapped reads, one weight at a time) writes the same nodes
    and the same packed bytes / scales as ONNX Runtime's own MatMulNBitsQuantizer on the whole graph."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from ppllava_edge.calibration.convert import _quantize_nbits
    from ppllava_edge.external_data import read_initializer

    src = tiny_export / "decoder.onnx"
    dst = tmp_path / "d.onnx"
    info = _quantize_nbits(src, dst, bits, block, [])
    ref = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=4, op_types_to_quantize=("MatMul",))
    ref.process()
    want = {t.name: onnx.numpy_helper.to_array(t) for t in ref.model.model.graph.initializer}
    got_model = onnx.load(str(dst), load_external_data=False)
    got = {t.name: np.asarray(read_initializer(t, tmp_path)) for t in got_model.graph.initializer}
    assert set(got) == set(want) and info["nodes_quantized"] == 9
    for name, arr in want.items():
        assert got[name].shape == arr.shape and got[name].dtype == arr.dtype and np.array_equal(got[name], arr), name

    def nodes(m):
        return [(n.op_type, list(n.input), {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in m.graph.node]

    assert nodes(got_model) == nodes(ref.model.model)


@pytest.mark.parametrize("graph", ["vision", "prompt_pool"])
def test_streamed_minmax_equals_onnxruntime_calibrator(tiny_export, calib, tmp_path, graph):
    """The bounded-memory MinMax calibrator (weights mapped from the graph's external data, running min / max)
    gives exactly ORT's MinMaxCalibrater ranges: the same tensors, the same values; and leaves no file behind."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from ppllava_edge.calibration.minmax import minmax_ranges
    from ppllava_edge.calibration.convert import _WEIGHT_OPS, _preprocess
    from ppllava_edge.calibration.readers import make_reader

    cs = load_calibration(calib)
    pre = tmp_path / f"{graph}.pre.onnx"
    _preprocess(tiny_export / f"{graph}.onnx", pre)
    before = sorted(p.name for p in tmp_path.iterdir())
    ours = minmax_ranges(pre, cs.feeds(graph), list(_WEIGHT_OPS))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    cal = create_calibrator(pre, list(_WEIGHT_OPS), augmented_model_path=str(ref_dir / "aug.onnx"), calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"symmetric": False})
    cal.collect_data(make_reader(cs, graph))
    theirs = cal.compute_data()
    assert set(ours) == set(theirs.data) and len(ours) > 10
    for name, (lo, hi) in ours.items():
        want = theirs.data[name].range_value
        assert np.array_equal(lo, want[0]) and np.array_equal(hi, want[1]) and lo.dtype == want[0].dtype, name
