"""`ppllava-edge bench` on the tiny export: report fields and their consistency, statistics, FLOP counts, errors.

The issue's performance targets are printed by the bench as measured ratios; nothing here asserts them.
"""

from __future__ import annotations

import csv
import json
import math
import statistics

import numpy as np
import pytest
from click.testing import CliRunner

from ppllava_edge.bench import hardware
from ppllava_edge.bench.stats import STATS, mean_std, percentile, stddev, summarize
from ppllava_edge.external_data import graph_weight_bytes
from ppllava_edge.cli.main import cli

STAGES = ("decode_video", "preprocess", "vision", "pool", "prefill", "decode_step", "e2e")
MAX_NEW = 4
ITERATIONS = 2


# ---- statistics ---------------------------------------------------------------------------------------------
def _direct_percentile(xs, q):
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_summarize_matches_direct_computation(n):
    xs = list(np.random.default_rng(n).gamma(2.0, 10.0, size=n))
    s = summarize(xs)
    assert set(STATS) <= set(s) and s["n"] == n
    assert s["min"] == min(xs) and s["max"] == max(xs)
    assert s["mean"] == pytest.approx(sum(xs) / n, rel=1e-12)
    for k, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert s[k] == pytest.approx(_direct_percentile(xs, q), rel=1e-12)
    expected_std = statistics.stdev(xs) if n > 1 else 0.0  # sample stddev (N-1), 0 for one sample
    assert s["stddev"] == pytest.approx(expected_std, rel=1e-12, abs=1e-12)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]


def test_stats_edge_cases():
    one = summarize([7.5])
    assert all(one[k] == 7.5 for k in ("min", "mean", "p50", "p90", "p95", "p99", "max")) and one["stddev"] == 0.0
    empty = summarize([])
    assert empty["n"] == 0 and all(empty[k] is None for k in STATS)
    assert stddev([1.0, 3.0]) == pytest.approx(math.sqrt(2.0))  # N-1: ((1)^2 + (1)^2) / 1
    assert stddev([]) == 0.0 and stddev([4.0]) == 0.0
    assert mean_std([]) == (None, None) and mean_std([2.0, 4.0]) == (3.0, pytest.approx(math.sqrt(2.0)))
    assert percentile([1, 2, 3, 4], 50) == 2.5


# ---- FLOP counts and efficiencies -----------------------------------------------------------------------
TINY_MODEL = {  # the tiny preset's manifest `model` block
    "image_size": 84, "patch_size": 14, "patches_per_frame": 36, "vision_hidden_size": 48, "vision_layers": 6, "btadapter_depth": 4,
    "max_frames": 64, "clip_embed_dim": 32, "hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_kv_heads": 4,
    "head_dim": 16, "intermediate_size": 128, "vocab_size": 32064, "vision_params": 270384, "llm_params": 4186432,
}


def test_flop_counts_follow_the_dims():
    m = TINY_MODEL
    # one CLIP layer: 4 D^2 (attention) + 2 D I (MLP, I = 96 for tiny) plus biases / norms: within a few percent
    assert hardware.vision_layer_weights(m) == pytest.approx(4 * 48 * 48 + 2 * 48 * 96, rel=0.06)
    f2, f4, f8 = (hardware.vision_flops(m, t) for t in (2, 4, 8))
    assert 0 < f2 < f4 < f8 and f8 / f4 == pytest.approx(2.0, rel=0.1)  # ~linear in T (temporal attention is T^2 but tiny)
    layer = 64 * 64 * 4 + 3 * 64 * 128
    assert hardware.llm_layer_weights(m) == layer
    n = 100
    expected = 2 * n * 2 * layer + 2 * 2 * 4 * 16 * n * (n + 1) + 2 * 64 * 32064
    assert hardware.prefill_flops(m, n) == expected
    assert hardware.kv_cache_bytes(m, 10, 4) == 2 * 2 * 4 * 10 * 16 * 4
    assert hardware.decode_efficiency(1e9, 10.0, 20.0) == pytest.approx(0.5)
    assert hardware.compute_efficiency(1e9, 100.0, 20.0) == pytest.approx(0.5)
    assert hardware.decode_efficiency(1e9, None, 20.0) is None


def test_hardware_probes_are_positive():
    bw = hardware.memory_bandwidth(size_mb=16, repeats=3)
    mm = hardware.gemm_flops(n=128, repeats=2)
    # the value is the best probe's median; its spread over the repetitions is reported beside it
    assert set(bw["probes"]) == {"read_threads", "gemv", "ort_gemv"}
    assert bw["gbs"] > 0 and bw["gbs"] == max(bw["probes"].values()) == bw["probes"][bw["probe"]]
    d = bw["detail"][bw["probe"]]
    assert d["min"] <= bw["gbs"] <= d["max"] and bw["spread"] == pytest.approx((d["max"] - d["min"]) / d["median"])
    assert bw["bytes"] == 16 << 20
    assert mm["gflops"] > 0 and mm["gflops"] == max(mm["probes"].values())


def test_bandwidth_probe_working_set_outgrows_the_cache():
    llc = hardware.last_level_cache_bytes()
    assert llc is None or llc >= 1 << 20
    # default working set: at least 1 GiB and 16x the LLC (checked without running the probe)
    import inspect

    assert "max(1024, 16 * (llc or 0)" in inspect.getsource(hardware.memory_bandwidth)


def test_decode_bytes_count_weights_as_stored_plus_kv(tiny_export):
    """graph_weight_bytes = the initializers actually stored (rotary tables excluded), checked against the loaded
    arrays; decode_bytes_per_token adds the KV cache at the mean position of a run's steps."""
    import onnx
    from onnx import numpy_helper

    m = json.loads((tiny_export / "export.json").read_text())
    path = tiny_export / m["graphs"]["decoder"]["file"]
    model = onnx.load(str(path))
    want = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if not t.name.startswith("rotary."))
    assert graph_weight_bytes(path) == want
    w, kv = hardware.decode_bytes_per_token(want, m["model"], context=100, new_tokens=9, kv_itemsize=4)
    # 8 decode steps attend 101..108 positions: mean 104.5
    assert w == want and kv == int(hardware.kv_cache_bytes(m["model"], 1, 4) * 104.5)


# ---- the bench on the tiny export ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_run(tiny_export, sample_video, tmp_path_factory):
    """ORT + torch + both baselines at 2 and 4 frames, written as JSON / CSV / PNG through the CLI."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench")
    res = CliRunner().invoke(cli, [
        "bench", str(tiny_export), "--video", str(sample_video), "--frames", "2,4", "--iterations", str(ITERATIONS), "--warmup", "1",
        "--max-new-tokens", str(MAX_NEW), "--questions", "2", "--backend", "ort,torch", "--baseline", "nopool,avgpool", "--provider", "cpu",
        "--json", str(out / "b.json"), "--csv", str(out / "b.csv"), "--plot", str(out / "b.png"), "--quiet",
    ])
    assert res.exit_code == 0, res.output
    return res, json.loads((out / "b.json").read_text()), out


def test_bench_json_fields_present_and_consistent(bench_run, tiny_export):
    res, data, _ = bench_run
    manifest = json.loads((tiny_export / "export.json").read_text())
    per_pair, patches = manifest["visual_tokens_per_frame_pair"], manifest["model"]["patches_per_frame"]
    from ppllava_edge.tokenization import LlamaPromptTokenizer

    tok = LlamaPromptTokenizer.from_file(tiny_export / manifest["tokenizers"]["llama"], image_token_id=manifest["image_token_id"])
    prompt = len(tok.prompt_ids(data["config"]["questions"][0])) - 1

    env = data["environment"]
    assert env["provider"] == "cpu" and env["cpu"]["logical"] and env["onnxruntime"]["version"] and env["numpy"]
    assert "jetson" in env and "gpu" in env and "ppllava_edge" in env
    for key in ("memory_bandwidth_gbs", "gemm_gflops", "decode_efficiency", "vision_efficiency", "prefill_efficiency"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert data["hardware"]["bandwidth_probe"]["spread"] >= 0
    assert data["cache"]["first_ms"] > 0 and data["cache"]["second_ms"] > 0
    assert data["failed"] == 0

    names = [(v["name"], v["frames"]) for v in data["variants"]]
    assert names == [(tiny_export.name, 2), (tiny_export.name, 4), ("nopool", 8), ("avgpool", 2), ("avgpool", 4), ("torch", 2), ("torch", 4)]
    for v in data["variants"]:
        assert v["error"] is None
        for key in ("name", "visual_tokens", "context_len", "tokens_per_s", "peak_rss_mb", "stages"):
            assert v[key] is not None, (v["name"], key)
        assert v["peak_rss_mb"] > 10 and v["weight_bytes"] > 0 and v["kv_cache_bytes"] > 0
        for st in STAGES:
            s = v["stages"][st]
            assert set(STATS) <= set(s), (v["name"], st)
            assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
            assert s["stddev"] >= 0
        # every run did exactly the same work: MAX_NEW tokens, EOS ignored
        assert v["new_tokens"] == MAX_NEW and [r["new_tokens"] for r in v["runs"]] == [MAX_NEW] * ITERATIONS
        assert v["stages"]["decode_step"]["n"] == ITERATIONS * (MAX_NEW - 1)
        assert v["stages"]["e2e"]["n"] == ITERATIONS
        # the stages are parts of the end-to-end time
        parts = sum(v["stages"][st]["mean"] for st in ("decode_video", "preprocess", "vision", "pool", "prefill", "decode"))
        assert parts <= v["stages"]["e2e"]["mean"] + 1e-6
        assert v["stages"]["ttft"]["mean"] <= v["stages"]["e2e"]["mean"]
        # token counts follow the formulas
        t = v["frames"]
        expected = {None: (t // 2) * per_pair, "nopool": 8 * patches, "avgpool": patches}[v["baseline"]]
        assert v["visual_tokens"] == expected, v["name"]
        assert v["context_len"] == prompt + expected
        assert v["kv_cache_bytes"] == hardware.kv_cache_bytes(manifest["model"], v["context_len"] + MAX_NEW - 1, 4)
        # decode efficiency counts the decoder's stored weights plus the KV cache read per step
        assert v["decode_bytes_per_token"] == v["decode_weight_bytes"] + v["decode_kv_bytes"]
        assert v["decode_efficiency"] == pytest.approx(v["decode_bytes_per_token"] * v["tokens_per_s"] / (data["memory_bandwidth_gbs"] * 1e9))
        if v["kind"] == "export":  # one KV buffer set, sized to the largest request served (first or second question)
            assert v["kv_cache_allocated_bytes"] == v["kv_cache_peak_used_bytes"] >= v["kv_cache_bytes"]
            assert v["decode_weight_bytes"] == graph_weight_bytes(tiny_export / manifest["graphs"]["decoder"]["file"])
    pooled = data["variants"][1]
    assert pooled["cache"]["second_hits"] == ITERATIONS and pooled["cache"]["second_stages"]["vision"] == 0.0
    assert data["variants"][0]["ratios"]["e2e"] == pytest.approx(1.0)
    # every runtime variant carries its same-run speed-up against the PyTorch reference at the same frames
    torch = {v["frames"]: v for v in data["variants"] if v["kind"] == "torch"}
    for v in data["variants"]:
        if v["kind"] == "torch":
            assert "vs_torch" not in v
            continue
        if v["frames"] not in torch:  # nopool's 8 frames: no torch run at those frames, no ratio
            assert v["vs_torch"] is None and v["baseline"] == "nopool"
            continue
        for st in ("vision", "prefill", "decode_step", "ttft", "e2e"):
            assert v["vs_torch"][st] == pytest.approx(torch[v["frames"]]["stages"][st]["mean"] / v["stages"][st]["mean"]), (v["name"], st)
    nopool = next(v for v in data["variants"] if v["baseline"] == "nopool")
    assert nopool["visual_tokens"] == 8 * 36  # T*P on the tiny preset
    for t in data["targets"]:  # reported with a verdict, never asserted
        assert isinstance(t["passed"], bool) and t["value"] is not None
    assert data["presets"] == ["tiny"] and data["targets_apply"] is False


def test_bench_markdown_csv_and_png(bench_run):
    res, data, out = bench_run
    md = res.stdout
    assert md.startswith("| variant |") and "e2e ×" in md and "build: ppllava-edge" in md and "dec eff" in md
    # a toy preset prints no ✓/✗ target verdicts, and says why
    assert "targets: not evaluated — preset tiny" in md and "✗" not in md and "✓" not in md
    assert f"- decode ({data['variants'][0]['name']}, fp32):" in md and "allocated /" in md
    # the same-run ratio against PyTorch per stage, one row per runtime variant (no verdicts on a toy preset)
    first = data["variants"][0]
    vt = first["vs_torch"]
    row = f"| {first['name']} | {first['frames']} | " + " | ".join(f"{vt[st]:.2f}" for st in ("vision", "prefill", "decode_step", "ttft", "e2e")) + " |"
    assert "same run against the PyTorch reference" in md and row in md
    assert "Traceback" not in res.output
    for v in data["variants"]:
        assert f"| {v['name']} |" in md
    with (out / "b.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(data["variants"])
    for row, v in zip(rows, data["variants"]):
        assert row["name"] == v["name"] and int(row["visual_tokens"]) == v["visual_tokens"]
        if v.get("vs_torch"):
            assert float(row["vs_torch_prefill"]) == pytest.approx(v["vs_torch"]["prefill"])
        else:  # torch itself, nopool (no torch run at its 8 frames)
            assert row["vs_torch_prefill"] == ""
        for st in STAGES:
            assert float(row[f"{st}_p50_ms"]) <= float(row[f"{st}_p99_ms"])
            assert float(row[f"{st}_mean_ms"]) == pytest.approx(v["stages"][st]["mean"])
    png = (out / "b.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bench_json_on_stdout(tiny_export, sample_video):
    res = CliRunner().invoke(cli, ["bench", str(tiny_export), "--video", str(sample_video), "--frames", "2", "--iterations", "1",
                                   "--warmup", "0", "--max-new-tokens", "2", "--no-hardware", "-o", "json", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)  # stdout carries the result only
    assert data["memory_bandwidth_gbs"] is None and data["variants"][0]["visual_tokens"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["--frames", "3"], "even"),
        (["--frames", "4,7"], "even"),
        (["--provider", "nosuch"], "unknown provider"),
        (["--frames", "32"], "outside the frame range"),
        (["--backend", "onnx"], "unknown backend"),
        (["--baseline", "meanpool"], "unknown baseline"),
        (["--iterations", "0"], "--iterations"),
        (["--backend", "trt"], "--engines"),
    ],
)
def test_bench_bad_arguments_are_clear_errors(tiny_export, sample_video, args, message):
    res = CliRunner().invoke(cli, ["bench", str(tiny_export), "--video", str(sample_video), "--no-hardware", *args])
    assert res.exit_code == 1, res.output
    assert message in res.output and "Traceback" not in res.output
    assert res.stdout == ""  # nothing on stdout


def test_targets_per_llm_precision():
    """Decode efficiency per variant, TPOT of the weight-only decoders against fp32 and KV allocated / used are
    evaluated on a small-preset run (numbers made up here; the evaluation is what is tested)."""
    from ppllava_edge.bench.targets import evaluate_targets, targets_apply

    def entry(name, prec, tpot, eff, alloc):
        return {"name": name, "kind": "export", "backend": "ort", "baseline": None, "frames": 32, "precision": prec, "llm_precision": prec,
                "stages": {"decode_step": {"mean": tpot}}, "decode_efficiency": eff, "kv_cache_bytes": 1000,
                "kv_cache_allocated_bytes": alloc, "error": None}

    variants = [entry("E", "fp32", 20.0, 0.85, 1000), entry("E8", "int8-weight", 10.0, 0.7, 1000), entry("E4", "int4-weight", 8.0, 0.5, 2000)]
    result = {"variants": variants, "config": {"headline_frames": 32}, "presets": ["small"]}
    got = {(t["id"], t["compared"].split()[0]): (round(t["value"], 3), t["passed"]) for t in evaluate_targets(result)}
    assert got[("decode_efficiency", "E")] == (0.85, True) and got[("decode_efficiency", "E4")] == (0.5, False)
    assert got[("tpot_int8_weight", "E8")] == (0.5, True) and got[("tpot_int4_weight", "E4")] == (0.4, False)
    assert got[("kv_allocated", "E")] == (1.0, True) and got[("kv_allocated", "E4")] == (2.0, False)
    assert targets_apply(result) and not targets_apply(dict(result, presets=["tiny"]))


def test_targets_and_table_against_torch():
    """The same-run ratios against PyTorch: e2e and vision speed-ups, prefill as a time ratio, and the per-stage
    table's ✓/✗ (numbers made up here; the evaluation and the printing are what is tested)."""
    from ppllava_edge.bench.report import vs_torch_table
    from ppllava_edge.bench.targets import evaluate_targets
    from ppllava_edge.bench.runner import _add_torch_ratios

    def entry(name, kind, vision, prefill, step, e2e, ck="S"):
        stages = {"vision": {"mean": vision}, "prefill": {"mean": prefill}, "decode_step": {"mean": step}, "ttft": {"mean": e2e - 10 * step},
                  "e2e": {"mean": e2e}}
        return {"name": name, "kind": kind, "backend": "torch" if kind == "torch" else "ort", "baseline": None, "frames": 32, "precision": "fp32",
                "llm_precision": "fp32", "checkpoint": ck, "export": name, "stages": stages, "error": None}

    variants = [entry("E", "export", 2000.0, 1000.0, 20.0, 4000.0), entry("torch", "torch", 3000.0, 1500.0, 60.0, 6400.0)]
    _add_torch_ratios(variants)
    assert variants[0]["vs_torch"]["vision"] == 1.5 and variants[0]["vs_torch"]["decode_step"] == 3.0 and "vs_torch" not in variants[1]
    result = {"variants": variants, "config": {"headline_frames": 32}, "presets": ["small"]}
    got = {t["id"]: (round(t["value"], 3), t["passed"]) for t in evaluate_targets(result)}
    assert got["ort_vs_torch_e2e"] == (1.6, True) and got["ort_vs_torch_vision"] == (1.5, True)
    assert got["ort_vs_torch_prefill"] == (0.667, True)  # ORT's prefill time / PyTorch's, target <= 0.7
    assert vs_torch_table(variants)[2] == "| E | 1.50 ✓ | 1.50 ✓ | 3.00 | 1.53 | 1.60 ✓ |"
    variants[0]["stages"]["prefill"]["mean"] = 1200.0  # 0.8x PyTorch's time: missed
    _add_torch_ratios(variants)
    assert vs_torch_table(variants)[2].startswith("| E | 1.50 ✓ | 1.25 ✗ |")
    assert vs_torch_table(variants, marks=False)[2].startswith("| E | 1.50 | 1.25 |")
    _add_torch_ratios([variants[0], dict(variants[1], frames=16)])  # no torch run at the same frames: no ratio
    assert variants[0]["vs_torch"] is None and vs_torch_table(variants) == []


def test_vision_targets_before_after_and_int8(tmp_path):
    """Vision efficiency per export, fp32 vision of a later export vs the first (before/after a graph change), int8
    vision vs the fp32 export it was quantized from and its gate's vision cosine (numbers made up here)."""
    from ppllava_edge.bench.targets import evaluate_targets

    def entry(name, vis_prec, vision_ms, eff, cos=None, src=None):
        return {"name": name, "kind": "export", "backend": "ort", "baseline": None, "frames": 32, "precision": vis_prec, "vision_precision": vis_prec,
                "llm_precision": "fp32", "export": str(tmp_path / name), "stages": {"vision": {"mean": vision_ms}, "decode_step": {"mean": 20.0}},
                "vision_efficiency": eff, "vision_cosine": cos, "quantized_from": src, "error": None}

    variants = [entry("before", "fp32", 3000.0, 0.40), entry("after", "fp32", 1500.0, 0.80), entry("other", "fp32", 1400.0, 0.85),
                entry("after-int8", "int8", 600.0, 0.75, cos=0.995, src=str((tmp_path / "after").resolve()))]
    result = {"variants": variants, "config": {"headline_frames": 32}, "presets": ["small"]}
    got = {(t["id"], t["compared"].split()[0]): (round(t["value"], 3), t["passed"]) for t in evaluate_targets(result)}
    assert got[("vision_efficiency", "before")] == (0.4, False) and got[("vision_efficiency", "after")] == (0.8, True)
    assert got[("vision_vs_first", "after")] == (2.0, True) and ("vision_vs_first", "before") not in got
    assert ("vision_vs_first", "after-int8") not in got  # int8 is not a before/after of the fp32 graph
    assert got[("vision_int8", "after-int8")] == (2.5, True)  # against its source export, not the faster "other"
    assert got[("vision_int8_cosine", "after-int8")] == (0.995, True)
    variants[3]["quantized_from"] = None  # source not in the run: the first fp32 export
    assert {t["id"]: t["value"] for t in evaluate_targets(result) if t["compared"].startswith("after-int8 vs")}["vision_int8"] == 5.0


def test_bench_cold_start_runs_a_fresh_ask(tiny_export, tmp_path):
    """--cold-start: three fresh `python -m ppllava_edge ask` processes of the export after the warm runs; the overhead
    is the median one's wall time minus the warm answer (plus the warm TPOT for tokens it stopped short of), printed
    in the notes with every process's wall time."""
    res = CliRunner().invoke(cli, ["bench", str(tiny_export), "--synthetic", "--frames", "2", "--iterations", "1", "--warmup", "0",
                                   "--max-new-tokens", "3", "--no-hardware", "--provider", "cpu", "--cold-start", "--json", str(tmp_path / "b.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    cold = json.loads((tmp_path / "b.json").read_text())["cold_start"]
    e = json.loads((tmp_path / "b.json").read_text())["variants"][0]
    assert "-m ppllava_edge ask" in cold["command"] and str(tiny_export) in cold["command"] and cold["variant"] == e["name"]
    assert 1 <= cold["tokens"] <= 3 and cold["missing_tokens"] == 3 - cold["tokens"]
    assert cold["wall_ms"] > cold["fresh_e2e_ms"] > 0 and cold["warm_e2e_ms"] == e["stages"]["e2e"]["mean"]
    assert len(cold["walls_ms"]) == 3 and cold["wall_ms"] == sorted(cold["walls_ms"])[1]  # the median process counts
    assert set(cold["session_load_ms"]) >= {"vision", "prompt_pool", "decoder"}
    want = cold["wall_ms"] - (cold["warm_e2e_ms"] - cold["missing_tokens"] * e["stages"]["decode_step"]["mean"])
    assert cold["overhead_ms"] == pytest.approx(want)
    assert f"overhead {cold['overhead_ms'] / 1e3:.2f} s" in res.stdout and "the median of 3 processes: " in res.stdout


def test_cold_start_target():
    from ppllava_edge.bench.targets import evaluate_targets

    e = {"name": "E", "kind": "export", "backend": "ort", "baseline": None, "frames": 32, "precision": "fp32", "llm_precision": "fp32",
         "stages": {"e2e": {"mean": 5000.0}}, "error": None}
    for overhead, passed in ((900.0, True), (1500.0, False)):
        cold = {"variant": "E", "wall_ms": 5000.0 + overhead, "warm_e2e_ms": 5000.0, "overhead_ms": overhead}
        got = [t for t in evaluate_targets({"variants": [e], "config": {"headline_frames": 32}, "cold_start": cold}) if t["id"] == "cold_start_s"]
        assert [(t["value"], t["passed"]) for t in got] == [(overhead / 1e3, passed)]
