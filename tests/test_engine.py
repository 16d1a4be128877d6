"""TensorRT engines, backend and Jetson awareness, tested without TensorRT or a GPU.

Pure logic (profiles, metadata checks, engine naming, trtexec lines, Jetson detection from fixture files, decoder
shape bookkeeping) runs everywhere; the missing-TensorRT error paths run where TensorRT is not installed; the
real build + run is marked `gpu` and skipped without TensorRT and a CUDA device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ppllava_edge._deps import has_module
from ppllava_edge.cli.main import cli
from ppllava_edge.engine.plan import BuildOptions, EnginePlan, plan_build, resolve_precision, shape_spec, trtexec_command
from ppllava_edge.engine.environment import format_environment, parse_nvidia_smi
from ppllava_edge.engine.jetson import clocks_state, detect_jetson, parse_nvpmodel_query, parse_tegra_release
from ppllava_edge.engine.metadata import (
    check_compatible,
    check_export,
    engine_entry,
    engine_file_name,
    load_metadata,
    new_metadata,
    normalize_trt_version,
    onnx_hashes,
    sm_of,
    write_metadata,
)
from ppllava_edge.engine.profiles import (
    CONTEXT,
    GENERATION,
    eval_dim,
    graph_profiles,
    profiles_from_json,
    profiles_to_json,
    resolve_limits,
    select_profile,
)
from ppllava_edge.errors import ConfigError, EngineBuildError, InferenceError, InputError, MissingDependencyError
from ppllava_edge.manifest import ExportManifest, load_manifest
from ppllava_edge.runtime.trt_backend import check_engine_dir, decoder_input_shapes, kv_cache_bytes, plan_forward, reorder_copies

HAVE_TRT = has_module("tensorrt")
no_trt = pytest.mark.skipif(HAVE_TRT, reason="tests the error path when TensorRT is not installed")


# ---- manifests -------------------------------------------------------------------------------------
def make_manifest(image=336, patch=14, hidden=768, layers=16, kv=12, head_dim=64, vocab=32064, clip_dim=512, frames=(2, 8, 64), dtype="fp32", context=4096) -> dict:
    """An export.json dict with the graph dims the exporter writes (small preset by default)."""
    g = image // patch
    p = g * g
    pooled = (g // 3) ** 2
    past = ["batch", kv, "past", head_dim]
    present = ["batch", kv, "past + seq", head_dim]
    f32 = "float16" if dtype == "fp16" else "float32"

    def io(name, dims, t=f32):
        return {"name": name, "dims": dims, "dtype": t}

    graphs = {
        "vision": {"inputs": [io("pixel_values", ["frames", 3, image, image])], "outputs": [io("values", ["frames", p, hidden]), io("keys", [f"{p}*frames", clip_dim])]},
        "prompt_pool": {
            "inputs": [io("clip_ids", [1, 248], "int64"), io("keys", [f"{p}*frames", clip_dim]), io("values", ["frames", p, hidden])],
            "outputs": [io("visual_tokens", [f"{pooled}*((frames//2))", hidden]), io("relevance", ["frames", g, g])],
        },
        "image_pool": {
            "inputs": [io("clip_ids", [1, 248], "int64"), io("keys", [f"{p}*tiles", clip_dim]), io("values", ["tiles", p, hidden])],
            "outputs": [io("visual_tokens", [f"{pooled}*tiles", hidden]), io("relevance", ["tiles", g, g])],
        },
        "projector_head": {"inputs": [io("values", ["tokens", hidden])], "outputs": [io("tokens", ["tokens", hidden])]},
        "decoder": {
            "inputs": [io("inputs_embeds", ["batch", "seq", hidden]), io("attention_mask", ["batch", "total"], "int64"), io("position_ids", ["batch", "seq"], "int64")]
            + [io(f"past.{i}.{k}", past) for i in range(layers) for k in ("key", "value")],
            "outputs": [io("logits", ["batch", vocab])] + [io(f"present.{i}.{k}", present) for i in range(layers) for k in ("key", "value")],
        },
    }
    for name, spec in graphs.items():
        spec.update(file=f"{name}.onnx", precision=dtype)
    return {
        "format": "ppllava-edge-export",
        "dtype": dtype,
        "created": "2026-11-25T00:00:00+00:00",
        "checkpoint": {"sha256": "ab" * 32},
        "graphs": graphs,
        "frames": {"min": frames[0], "opt": frames[1], "max": frames[2]},
        "visual_tokens_per_frame_pair": pooled,
        "pooling": {"kernel": [2, 3, 3]},
        "image_tokens": pooled + 2 * (g // 3) * (2 * (g // 3) + 1),  # the 2x2-crop pinpoint, before unpadding
        "image": {"tile_size": image, "grid_pinpoints": [[image, 2 * image], [2 * image, image], [2 * image, 2 * image]],
                  "pooled_grid": g // 3, "max_tiles": 5, "max_tokens": pooled + 2 * (g // 3) * (2 * (g // 3) + 1)},
        "model": {"image_size": image, "patches_per_frame": p, "hidden_size": hidden, "num_layers": layers, "num_kv_heads": kv, "head_dim": head_dim,
                  "vocab_size": vocab, "max_position_embeddings": context, "max_frames": 64},
    }


SMALL = ExportManifest(Path("small-export"), make_manifest())


def fake_export(tmp_path: Path, data: dict) -> ExportManifest:
    """An export folder `load_manifest` accepts, with placeholder files (nothing in it can run)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data.setdefault("embeddings", {"file": "embed_tokens.npy"})
    data.setdefault("tokenizers", {"llama": "llama_tokenizer.json", "clip": "clip_tokenizer.json"})
    for name in (*(spec["file"] for spec in data["graphs"].values()), data["embeddings"]["file"], *data["tokenizers"].values()):
        (tmp_path / name).write_bytes(b"onnx")
    (tmp_path / "export.json").write_text(json.dumps(data))
    return ExportManifest(tmp_path, data)


# ---- dims and profiles -----------------------------------------------------------------------------
def test_eval_dim_expressions():
    assert eval_dim(64, {}) == 64
    assert eval_dim("36*frames", {"frames": 8}) == 288
    assert eval_dim("4*((frames//2))", {"frames": 5}) == 8
    assert eval_dim("past + seq", {"past": 7, "seq": 1}) == 8
    with pytest.raises(ConfigError, match="no value for symbol"):
        eval_dim("frames", {})
    with pytest.raises(ConfigError):
        eval_dim("__import__('os')", {})


def test_tiny_export_profiles(tiny_export):
    manifest = load_manifest(tiny_export)  # exported with frames 2:8:16
    limits = resolve_limits(manifest)
    assert limits.frames == (2, 8, 16) and limits.max_seq_len == 4096
    assert limits.max_input_len == 8 * 4 + 256  # visual tokens at 16 frames + text headroom
    prof = graph_profiles(manifest, limits)
    assert prof["vision"] == [{"pixel_values": ((1, 3, 84, 84), (8, 3, 84, 84), (16, 3, 84, 84))}]  # min 1: the image path
    pool = prof["prompt_pool"][0]
    assert pool["keys"] == ((72, 32), (288, 32), (576, 32)) and pool["values"] == ((2, 36, 64), (8, 36, 64), (16, 36, 64))
    assert pool["clip_ids"] == ((1, 248),) * 3
    assert prof["projector_head"] == [{"values": ((1, 64), (288, 64), (576, 64))}]
    # an image's anyres tiles: 1 (lone tile) .. 5 (base + 2x2 crops, the tiny preset's 168x168 pinpoint)
    assert prof["image_pool"] == [{"clip_ids": ((1, 248),) * 3, "keys": ((36, 32), (180, 32), (180, 32)), "values": ((1, 36, 64), (5, 36, 64), (5, 36, 64))}]
    ctx, gen = prof["decoder"]
    assert ctx["inputs_embeds"] == ((1, 1, 64), (1, 80, 64), (1, 288, 64))
    assert ctx["attention_mask"] == ((1, 1), (1, 80), (1, 288))
    assert ctx["past.1.value"] == ((1, 4, 0, 16),) * 3
    assert gen["inputs_embeds"] == ((1, 1, 64),) * 3 and gen["position_ids"] == ((1, 1),) * 3
    assert gen["past.0.key"] == ((1, 4, 1, 16), (1, 4, 112, 16), (1, 4, 4095, 16))
    assert gen["attention_mask"] == ((1, 2), (1, 113), (1, 4096))


def test_small_preset_profiles_with_overrides():
    limits = resolve_limits(SMALL, frames=(4, 16, 32), max_input_len=1500, max_seq_len=2048, max_batch=5)
    prof = graph_profiles(SMALL, limits)
    assert prof["vision"][0]["pixel_values"] == ((4, 3, 336, 336), (16, 3, 336, 336), (32, 3, 336, 336))
    assert prof["prompt_pool"][0]["keys"] == ((4 * 576, 512), (16 * 576, 512), (32 * 576, 512))
    assert prof["projector_head"][0]["values"] == ((1, 768), (16 * 576, 768), (32 * 576, 768))
    ctx, gen = prof["decoder"]
    assert len(ctx) == 3 + 32  # embeds, mask, positions + 16 layers x (key, value)
    assert ctx["inputs_embeds"] == ((1, 1, 768), (1, 8 * 64 + 64, 768), (5, 1500, 768))
    assert ctx["past.15.key"] == ((1, 12, 0, 64), (1, 12, 0, 64), (5, 12, 0, 64))
    assert gen["past.0.value"] == ((1, 12, 1, 64), (1, 12, 8 * 64 + 64 + 32, 64), (5, 12, 2047, 64))
    assert gen["attention_mask"][2] == (5, 2048)


def test_small_preset_default_limits():
    limits = resolve_limits(SMALL)
    assert limits.frames == (2, 8, 64)
    assert limits.max_input_len == 32 * 64 + 256 and limits.max_seq_len == 4096 and limits.max_batch == 1
    assert graph_profiles(SMALL, limits)["vision"][0]["pixel_values"][0] == (1, 3, 336, 336)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"frames": (2, 8, 128)}, "outside the export's frame range"),
        ({"frames": (8, 4, 16)}, "MIN <= OPT <= MAX"),
        ({"max_seq_len": 5000}, "max_position_embeddings"),
        ({"max_input_len": 3000, "max_seq_len": 2048}, "--max-input-len"),
        ({"max_batch": 0}, "--max-batch"),
    ],
)
def test_bad_limits_are_rejected(kwargs, match):
    with pytest.raises(InputError, match=match):
        resolve_limits(SMALL, **kwargs)


def test_export_starting_above_two_frames_has_no_image_profile():
    manifest = ExportManifest(Path("export"), make_manifest(frames=(4, 8, 16)))
    with pytest.raises(InputError, match="frame range 4..16"):
        resolve_limits(manifest, frames=(2, 8, 16))
    assert graph_profiles(manifest, resolve_limits(manifest))["vision"][0]["pixel_values"][0][0] == 4


def test_profile_selection_and_json_round_trip():
    prof = graph_profiles(SMALL, resolve_limits(SMALL, max_batch=2))["decoder"]
    shapes = lambda b, past, seq: decoder_input_shapes(b, past, seq, 16, 12, 64, 768)  # noqa: E731
    assert select_profile(prof, shapes(1, 0, 300)) == CONTEXT
    assert select_profile(prof, shapes(1, 0, 1)) == CONTEXT
    assert select_profile(prof, shapes(2, 300, 1)) == GENERATION
    assert select_profile(prof, shapes(1, 300, 4)) == -1  # several positions after a cache: neither profile
    assert select_profile(prof, shapes(3, 10, 1)) == -1  # batch above --max-batch
    assert profiles_from_json(profiles_to_json(prof, ["context", "generation"])) == prof


# ---- decoder bookkeeping ---------------------------------------------------------------------------
def test_plan_forward():
    assert plan_forward(0, 300, 512, 4096) == [(CONTEXT, 0, 300)]
    assert plan_forward(300, 1, 512, 4096) == [(GENERATION, 0, 1)]
    assert plan_forward(0, 514, 512, 4096) == [(CONTEXT, 0, 512), (GENERATION, 512, 513), (GENERATION, 513, 514)]
    assert plan_forward(10, 3, 512, 4096) == [(GENERATION, 0, 1), (GENERATION, 1, 2), (GENERATION, 2, 3)]
    with pytest.raises(InferenceError, match="max_seq_len"):
        plan_forward(4090, 7, 512, 4096)


def test_reorder_copies_gather_and_merge():
    assert reorder_copies(np.zeros(3, np.int64), 10) == [(0, 0, 10), (10, 0, 10), (20, 0, 10)]
    assert reorder_copies(np.array([0, 1, 2]), 10) == [(0, 0, 30)]
    assert reorder_copies(np.array([2, 0, 1]), 10) == [(0, 20, 10), (10, 0, 20)]
    # the gather these copies describe equals numpy's take along the batch axis
    rows = np.arange(4 * 10, dtype=np.uint8).reshape(4, 10)
    idx = np.array([3, 3, 0, 1])
    out = np.zeros_like(rows).ravel()
    for dst, src, n in reorder_copies(idx, 10):
        out[dst : dst + n] = rows.ravel()[src : src + n]
    np.testing.assert_array_equal(out.reshape(4, 10), rows[idx])


def test_decoder_input_shapes_and_cache_size():
    s = decoder_input_shapes(2, 7, 1, 2, 4, 16, 64)
    assert s["inputs_embeds"] == (2, 1, 64) and s["attention_mask"] == (2, 8) and s["position_ids"] == (2, 1)
    assert s["past.1.value"] == (2, 4, 7, 16) and len(s) == 3 + 4
    # small preset, fp16, batch 1, 4096 positions: 2 sets x 32 tensors x 12 x 4096 x 64 x 2 bytes
    assert kv_cache_bytes(16, 12, 64, 1, 4096, 2) == 2 * 32 * 12 * 4096 * 64 * 2


# ---- metadata --------------------------------------------------------------------------------------
def test_engine_naming():
    assert engine_file_name("vision", "10.3.0.30", 87) == "vision.trt10.3.0.sm87.engine"
    assert engine_file_name("decoder", "11.4.0.106", sm_of((12, 0))) == "decoder.trt11.4.0.sm120.engine"
    assert normalize_trt_version("10.7") == "10.7.0"
    assert sm_of("8.6") == 86 and sm_of("87") == 87 and sm_of(89) == 89


def _meta(trt="10.3.0", sm=87) -> dict:
    return new_metadata(trt_version=trt, gpu={"name": "Orin", "compute_capability": "8.7", "sm": sm}, export={"folder": "exp", "checkpoint_sha256": "ab" * 32, "created": "2026-11-25T00:00:00+00:00"}, limits={}, options={})


def test_compatibility_checks():
    check_compatible(_meta(), "10.3.0.30", 87)  # same version (build number ignored) and SM
    with pytest.raises(EngineBuildError, match=r"TensorRT 10\.3\.0 built them, this machine has TensorRT 10\.7\.0(.|\n)*rebuild"):
        check_compatible(_meta(), "10.7.0", 87)
    with pytest.raises(EngineBuildError, match=r"sm87(.|\n)*this GPU is sm86(.|\n)*ppllava-edge build exp --out ENGINES --force"):
        check_compatible(_meta(), "10.3.0", 86)
    with pytest.raises(EngineBuildError, match="TensorRT 11.4.0; they target sm87"):
        check_compatible(_meta(), "11.4.0.106", 89)
    check_compatible(_meta(), "10.3.0", 87, "Orin")  # same GPU model
    check_compatible(_meta(), "10.3.0", 87, "Orin (nvgpu)")  # nvidia-smi's name for cudart's "Orin" (JetPack 6)
    check_compatible(_meta(), "10.3.0", None, "Orin")  # SM not known here ("[N/A]"): not judged
    with pytest.raises(EngineBuildError, match=r"built on a Orin, this GPU is a NVIDIA RTX A2000(.|\n)*specific to the GPU model"):
        check_compatible(_meta(), "10.3.0", 87, "NVIDIA RTX A2000")  # same SM, another model: NVIDIA says rebuild
    agx = {**_meta(), "jetson": {"model": "NVIDIA Jetson AGX Orin Developer Kit"}}
    check_compatible(agx, "10.3.0", 87, "Orin", "Jetson AGX Orin")
    with pytest.raises(EngineBuildError, match=r"built on a Jetson AGX Orin, this is a Jetson Orin Nano \(same GPU architecture, another number of SMs, and no DLA\)"):
        check_compatible(agx, "10.3.0", 87, "Orin", "Jetson Orin Nano")
    check_export(_meta(), SMALL)
    with pytest.raises(EngineBuildError, match="another export(.|\n)*ppllava-edge build small-export --out ENGINES"):
        check_export(_meta(), ExportManifest(SMALL.folder, {**SMALL.data, "checkpoint": {"sha256": "cd" * 32}}))


def test_check_engine_dir_needs_a_decoder():
    with pytest.raises(EngineBuildError, match="no decoder engine"):
        check_engine_dir(_meta(), "10.3.0", 87)


def test_metadata_round_trip_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not an engine folder"):
        load_metadata(tmp_path)
    meta = _meta()
    (tmp_path / "decoder.onnx").write_bytes(b"graph")
    (tmp_path / "decoder.onnx.data").write_bytes(b"weights")
    hashes = onnx_hashes(tmp_path, "decoder.onnx")
    assert list(hashes) == ["decoder.onnx", "decoder.onnx.data"]  # external data is hashed too
    meta["engines"]["decoder"] = engine_entry(file="decoder.trt10.3.0.sm87.engine", onnx="decoder.onnx", onnx_sha256=hashes, precision="fp16", strongly_typed=False,
                                              profiles=[], device="gpu", size_bytes=5, build_seconds=1.0, trtexec="trtexec ...")
    write_metadata(tmp_path, meta)
    with pytest.raises(ConfigError, match="missing: decoder.trt10.3.0.sm87.engine"):
        load_metadata(tmp_path)
    (tmp_path / "decoder.trt10.3.0.sm87.engine").write_bytes(b"plan")
    assert load_metadata(tmp_path)["engines"]["decoder"]["onnx_sha256"] == hashes


# ---- build planning and trtexec lines --------------------------------------------------------------
def test_precision_rules():
    assert resolve_precision("fp32", False, "10.3.0") == ("fp32", True, False)
    assert resolve_precision("fp32", True, "10.3.0") == ("fp16", False, True)  # weak typing + BuilderFlag.FP16
    assert resolve_precision("fp16", True, "10.3.0") == ("fp16", True, False)
    assert resolve_precision("int8", False, "11.4.0") == ("int8", True, False)  # Q/DQ: strongly typed
    with pytest.raises(EngineBuildError, match="--dtype fp16"):
        resolve_precision("fp32", True, "11.4.0.106")


def test_trtexec_lines_for_vision_on_dla(tmp_path):
    m = fake_export(tmp_path, make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16)))
    opts = BuildOptions(fp16=True, workspace_mb=2048, builder_level=4, timing_cache=Path("/cache/tc.bin"), dla_core=0, frames=(8, 8, 8))
    plans = {p.graph: p for p in plan_build(m, Path("/engines"), opts, "10.3.0.30", 87)}
    assert plans["vision"].device == "dla:0" and plans["decoder"].device == "gpu"
    assert plans["vision"].profile_names == ["frames=8"] and not plans["vision"].dynamic  # DLA: min = opt = max
    assert trtexec_command(plans["vision"], Path("/engines"), opts, "10.3.0.30") == (
        f"trtexec --onnx={tmp_path}/vision.onnx --saveEngine=/engines/vision.trt10.3.0.sm87.engine --fp16 --precisionConstraints=prefer "
        "--minShapes=pixel_values:8x3x84x84 --optShapes=pixel_values:8x3x84x84 --maxShapes=pixel_values:8x3x84x84 "
        "--memPoolSize=workspace:2048M --builderOptimizationLevel=4 --timingCacheFile=/cache/tc.bin --useDLACore=0 --allowGPUFallback "
        "--profilingVerbosity=detailed --exportLayerInfo=/engines/vision.layers.json --skipInference"
    )
    image_pool = trtexec_command(plans["image_pool"], Path("/engines"), opts, "10.3.0.30")
    assert "--minShapes=clip_ids:1x248,keys:36x32,values:1x36x64 --optShapes=clip_ids:1x248,keys:180x32,values:5x36x64" in image_pool
    legacy = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    legacy.pop("image")  # an export from before image tiles: a static one-tile image_pool
    legacy["graphs"]["image_pool"]["inputs"] = [{"name": "clip_ids", "dims": [1, 248], "dtype": "int64"}, {"name": "keys", "dims": [36, 32], "dtype": "float32"}, {"name": "values", "dims": [1, 36, 64], "dtype": "float32"}]
    plans = {p.graph: p for p in plan_build(fake_export(tmp_path / "legacy", legacy), Path("/engines"), opts, "10.3.0.30", 87)}
    static = trtexec_command(plans["image_pool"], Path("/engines"), opts, "10.3.0.30")
    assert "Shapes" not in static and "--useDLACore" not in static


def test_dla_needs_one_frame_count_and_a_tensorrt_with_dla(tmp_path):
    m = fake_export(tmp_path, make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16)))
    m16 = fake_export(tmp_path / "fp16", make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16), dtype="fp16"))
    with pytest.raises(InputError, match=r"DLA has no dynamic shapes(.|\n)*--frames 8:8:8(.|\n)*images"):
        plan_build(m, Path("/e"), BuildOptions(dla_core=0), "10.3.0", 87)
    two = {p.graph: p for p in plan_build(m, Path("/e"), BuildOptions(dla_core=1, frames=(2, 2, 2)), "10.3.0", 87)}
    assert two["vision"].profiles == [{"pixel_values": ((2, 3, 84, 84),) * 3}] and two["vision"].device == "dla:1"  # no 1-frame image range
    assert two["prompt_pool"].device == "gpu"
    for version, ok in [("10.7.0", True), ("10.8.0", False), ("10.16.1.11", False), ("11.1.0", False), ("11.4.0.106", False), ("11.4.1", True)]:
        if ok:
            plan_build(m16 if version.startswith("11") else m, Path("/e"), BuildOptions(dla_core=0, frames=(8, 8, 8)), version, 87)
        else:
            with pytest.raises(EngineBuildError, match="no DLA support"):
                plan_build(m, Path("/e"), BuildOptions(dla_core=0, frames=(8, 8, 8)), version, 87)


def test_trtexec_decoder_has_one_shape_group_per_profile(tmp_path):
    m = fake_export(tmp_path, make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16)))
    opts = BuildOptions(max_input_len=100, max_seq_len=200)
    dec = next(p for p in plan_build(m, Path("/e"), opts, "10.3.0", 87) if p.graph == "decoder")
    line = trtexec_command(dec, Path("/e"), opts, "10.3.0")
    assert line.count("--minShapes=") == 2 and line.count("--maxShapes=") == 2
    assert "--stronglyTyped" in line and "--fp16" not in line
    assert "--maxShapes=inputs_embeds:1x100x64,attention_mask:1x100,position_ids:1x100,past.0.key:1x4x0x16" in line
    assert "--maxShapes=inputs_embeds:1x1x64,attention_mask:1x200,position_ids:1x1,past.0.key:1x4x199x16" in line
    assert shape_spec(dec.profiles[1], 0).startswith("inputs_embeds:1x1x64,attention_mask:1x2,")
    line11 = trtexec_command(next(p for p in plan_build(m, Path("/e"), opts, "11.4.0.106", 120) if p.graph == "decoder"), Path("/e"), opts, "11.4.0.106")
    assert "--stronglyTyped" not in line11 and "decoder.trt11.4.0.sm120.engine" in line11  # always strongly typed in TRT 11


def test_int8_and_dla_option_checks(tmp_path):
    data = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    m = fake_export(tmp_path, data)
    with pytest.raises(InputError, match="--int8 needs a quantized"):
        plan_build(m, Path("/e"), BuildOptions(int8=True), "10.3.0", 87)
    # DLA on TensorRT 10 as trtexec --useDLACore builds it: the fp32 graph, weakly typed, FP16 + PREFER_PRECISION_CONSTRAINTS
    vision = next(p for p in plan_build(m, Path("/e"), BuildOptions(dla_core=0, frames=(8, 8, 8)), "10.3.0", 87) if p.graph == "vision")
    assert (vision.precision, vision.strongly_typed, vision.fp16_flag, vision.prefer_precision) == ("fp16", False, True, True)
    line = trtexec_command(vision, Path("/e"), BuildOptions(dla_core=0), "10.3.0")
    assert "--stronglyTyped" not in line and " --fp16 --precisionConstraints=prefer " in line and "--useDLACore=0 --allowGPUFallback" in line
    m16 = fake_export(tmp_path / "fp16", make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16), dtype="fp16"))
    with pytest.raises(InputError, match=r"--dla-core on TensorRT 10 needs an fp32 export(.|\n)*rejects precision flags(.|\n)*Hint: export without --dtype fp16"):
        plan_build(m16, Path("/e"), BuildOptions(dla_core=0, frames=(8, 8, 8)), "10.3.0", 87)  # on main: a strongly typed DLA build trtexec cannot make
    with pytest.raises(InputError, match=r"TensorRT 11.4.1 builds strongly typed networks only(.|\n)*--dtype fp16"):
        plan_build(m, Path("/e"), BuildOptions(dla_core=0, frames=(8, 8, 8)), "11.4.1", 87)
    v11 = next(p for p in plan_build(m16, Path("/e"), BuildOptions(dla_core=0, frames=(8, 8, 8)), "11.4.1", 87) if p.graph == "vision")
    assert (v11.precision, v11.strongly_typed, v11.fp16_flag, v11.prefer_precision) == ("fp16", True, False, False)
    data["graphs"]["decoder"]["precision"] = "int8"  # a Q/DQ decoder, as the INT8 export will record it
    plans = {p.graph: p for p in plan_build(ExportManifest(tmp_path, data), Path("/e"), BuildOptions(int8=True, fp16=True), "10.3.0", 87)}
    assert (plans["decoder"].precision, plans["decoder"].strongly_typed, plans["decoder"].fp16_flag) == ("int8", True, False)
    assert (plans["vision"].precision, plans["vision"].fp16_flag) == ("fp16", True)
    assert "--fp16" not in trtexec_command(plans["decoder"], Path("/e"), BuildOptions(int8=True, fp16=True), "10.3.0")


def test_engine_plan_every_graph_is_dynamic(tmp_path):
    m = fake_export(tmp_path, make_manifest(frames=(2, 8, 16)))
    plans = {p.graph: p for p in plan_build(m, Path("/e"), BuildOptions(), "10.3.0", 87)}
    assert [g for g, p in plans.items() if not p.dynamic] == []  # image_pool: 1..5 anyres tiles
    assert plans["image_pool"].profile_names == ["tiles"]
    assert isinstance(plans["decoder"], EnginePlan) and plans["decoder"].profile_names == ["context", "generation"]


# ---- Jetson ----------------------------------------------------------------------------------------
ORIN_RELEASE = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 04:36:44 UTC 2024\n# KERNEL_VARIANT: oot\n"
NVPMODEL_CONF = "< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=MODE_15W >\n< POWER_MODEL ID=2 NAME=MODE_30W >\n< PM_CONFIG DEFAULT=2 >\n"
MEMINFO = "MemTotal:       64335836 kB\nMemFree:        50000000 kB\nMemAvailable:   60000000 kB\nSwapTotal:      32167912 kB\nSwapFree:       32167912 kB\n"


def make_jetson_root(root: Path, locked: bool = True) -> Path:
    files = {
        "etc/nv_tegra_release": ORIN_RELEASE,
        "proc/device-tree/model": "NVIDIA Jetson AGX Orin Developer Kit\x00",
        "proc/device-tree/compatible": "nvidia,p3737-0000+p3701-0005\x00nvidia,p3701-0005\x00nvidia,tegra234\x00",
        "etc/nvpmodel.conf": NVPMODEL_CONF,
        "var/lib/nvpmodel/status": "pmode:0002 fmode:quiet\n",
        "proc/meminfo": MEMINFO,
        "sys/devices/system/cpu/cpu0/cpufreq/scaling_min_freq": "2201600\n" if locked else "115200\n",
        "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq": "2201600\n",
        "sys/class/devfreq/17000000.gpu/min_freq": "1300500000\n" if locked else "306000000\n",
        "sys/class/devfreq/17000000.gpu/max_freq": "1300500000\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def no_commands(cmd):
    return None


def test_orin_r36_detection_from_files(tmp_path):
    info = detect_jetson(make_jetson_root(tmp_path), run=no_commands)
    assert info["model"] == "NVIDIA Jetson AGX Orin Developer Kit" and info["soc"] == "tegra234" and info["soc_name"] == "Orin"
    assert info["l4t"] == "36.4.0" and info["jetpack"] == "6.1" and info["jetpack_source"] == "L4T release table"
    pm = info["power_mode"]
    assert (pm["name"], pm["id"], pm["default"]) == ("MODE_30W", 2, 2) and pm["source"] == "/var/lib/nvpmodel/status"
    assert info["jetson_clocks"]["state"] == "on"
    assert info["memory"]["total_bytes"] == 64335836 * 1024 and info["memory"]["available_bytes"] == 60000000 * 1024


def test_orin_with_nvpmodel_and_dpkg(tmp_path):
    outputs = {"nvpmodel": "NV Power Mode: MAXN\n0\n", "dpkg-query": "6.2.1+b38"}
    info = detect_jetson(make_jetson_root(tmp_path, locked=False), run=lambda cmd: outputs.get(cmd[0]))
    assert info["power_mode"]["name"] == "MAXN" and info["power_mode"]["id"] == 0 and info["power_mode"]["source"] == "nvpmodel -q"
    assert info["jetpack"] == "6.2.1" and info["jetpack_source"] == "dpkg nvidia-jetpack"
    assert info["jetson_clocks"] == {"state": "off", "evidence": {"cpu_min_eq_max": False, "gpu_min_eq_max": False}}


def test_not_a_jetson(tmp_path):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/meminfo").write_text(MEMINFO)
    assert detect_jetson(tmp_path, run=no_commands) is None
    assert clocks_state(tmp_path)["state"] == "unknown"


def test_jetson_modules_from_the_device_tree_model():
    from ppllava_edge.engine.jetson import jetson_module

    assert jetson_module("NVIDIA Jetson AGX Orin Developer Kit") == "Jetson AGX Orin"
    assert jetson_module("NVIDIA Jetson Orin NX Engineering Reference Developer Kit") == "Jetson Orin NX"
    assert jetson_module("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super") == "Jetson Orin Nano"
    assert jetson_module("NVIDIA Jetson Xavier NX Developer Kit") == "Jetson Xavier NX"
    assert jetson_module("NVIDIA Jetson AGX Xavier") == "Jetson AGX Xavier"
    assert jetson_module(None) is None and jetson_module("Raspberry Pi 5 Model B Rev 1.0") is None


def stub_nvidia_smi(folder: Path, compute_cap: str) -> Path:
    """An `nvidia-smi` that answers as JetPack 6's does on an Orin: name 'Orin (nvgpu)', memory '[N/A]'."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n"
                   'case "$1" in --query-gpu=*) echo "Orin (nvgpu), 540.4.0, ' + compute_cap + ', [N/A]" ;;\n'
                   '  *) echo "| NVIDIA-SMI 540.4.0   Driver Version: 540.4.0   CUDA Version: 12.6 |" ;; esac\n')
    exe.chmod(0o755)
    return folder


@pytest.mark.parametrize("compute_cap", ["8.7", "[N/A]"])
def test_engines_built_for_orin_are_compatible_on_an_orin(tmp_path, monkeypatch, compute_cap):
    """`engines ENGINES` on a Jetson AGX Orin whose nvidia-smi says 'Orin (nvgpu)' (and maybe '[N/A]') for engines that
    `build` recorded with cudart's name 'Orin': compatible (on main: NOT compatible, or a ValueError for '[N/A]')."""
    import ppllava_edge.engine.availability as availability
    import ppllava_edge.engine.jetson as jetson

    monkeypatch.setenv("PATH", f"{stub_nvidia_smi(tmp_path / 'bin', compute_cap)}:{os.environ['PATH']}")
    monkeypatch.setattr(jetson, "ROOT", make_jetson_root(tmp_path / "root"))
    monkeypatch.setattr(availability, "tensorrt_version", lambda: "10.3.0.30")  # JetPack 6.1's (python3-libnvinfer)
    import ppllava_edge.engine.environment as environment

    monkeypatch.setattr(environment, "cuda_python_version", lambda: None)  # no cudart (as here): nvidia-smi is what is left
    folder = tmp_path / "engines"
    folder.mkdir()
    write_metadata(folder, {**_meta(), "jetson": {"model": "NVIDIA Jetson AGX Orin Developer Kit"}})
    res = CliRunner().invoke(cli, ["engines", str(folder)])
    assert res.exit_code == 0 and "Traceback" not in res.output
    assert res.stdout.startswith("compatible with this machine (TensorRT 10.3.0.30, Orin, sm87, Jetson AGX Orin; GPU from nvidia-smi")
    if compute_cap == "[N/A]":
        assert "sm of the Jetson SoC tegra234" in res.stdout
    export = fake_export(tmp_path / "export", make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))).folder
    res = CliRunner().invoke(cli, ["build", str(export), "--out", str(tmp_path / "e"), "--dry-run"])
    assert res.exit_code == 0 and "dry run (TensorRT 10.3.0.30, sm 87)" in res.stderr and "vision.trt10.3.0.sm87.engine" in res.stdout
    (tmp_path / "root/proc/device-tree/model").write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")  # another module
    res = CliRunner().invoke(cli, ["engines", str(folder)])
    assert res.stdout.startswith("NOT compatible: the engines cannot run here: they were built on a Jetson AGX Orin, this is a Jetson Orin Nano")
    res = CliRunner().invoke(cli, ["env"])
    assert "gpu 0: Orin (sm " + ("8.7" if compute_cap == "8.7" else "?") + ", ?)" in res.stdout and "module Jetson Orin Nano" in res.stdout


def test_jetson_parsers():
    rel = parse_tegra_release("# R35 (release), REVISION: 5.0, GCID: 1, BOARD: t186ref, EABI: aarch64")
    assert rel["l4t"] == "35.5.0" and rel["board"] == "t186ref"
    assert parse_tegra_release("garbage") is None
    assert parse_nvpmodel_query("NVPM WARN: ...\nNV Power Mode: 15W\n1\n") == {"name": "15W", "id": 1}


# ---- environment -----------------------------------------------------------------------------------
def test_nvidia_smi_parsing():
    smi = parse_nvidia_smi("NVIDIA L4, 570.86.15, 8.9, 23034\n", "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |")
    assert smi["gpus"] == [{"name": "NVIDIA L4", "driver": "570.86.15", "compute_capability": "8.9", "memory_bytes": 23034 << 20}]
    assert smi["driver"] == "570.86.15" and smi["cuda_driver"] == "12.8"
    assert parse_nvidia_smi(None, None) == {"gpus": [], "driver": None, "cuda_driver": None}


def test_environment_block_with_a_jetson(tmp_path):
    from ppllava_edge.engine.environment import collect_environment

    env = collect_environment(make_jetson_root(tmp_path), run=no_commands)
    text = format_environment(env)
    assert "jetson: NVIDIA Jetson AGX Orin Developer Kit (Orin)" in text
    assert "  L4T: 36.4.0 (JetPack 6.1, L4T release table)" in text
    assert "  power mode: MODE_30W (id 2, /var/lib/nvpmodel/status)" in text and "  jetson_clocks: on" in text
    assert env["memory"]["total_bytes"] == 64335836 * 1024
    json.dumps(env)  # serializable for bench reports


def test_cpu_int8_units(tmp_path):
    """`env` names the CPU's int8 / bf16 units from /proc/cpuinfo (what ONNX Runtime's int8 GEMM can use)."""
    from ppllava_edge.engine.environment import collect_environment, cpu_units

    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nmodel name\t: Xeon\nflags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8 amx_bf16\n"
                                         "\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_units(tmp_path) == ["avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd asimddp i8mm\n")
    assert cpu_units(tmp_path) == ["asimddp", "i8mm"]
    assert cpu_units(tmp_path / "missing") == []
    env = collect_environment(tmp_path, run=no_commands)
    assert "cpu int8/bf16 units: asimddp i8mm" in format_environment(env)


def test_env_command_on_this_machine():
    import onnxruntime

    res = CliRunner().invoke(cli, ["env"])
    assert res.exit_code == 0, res.output
    assert f"onnxruntime: {onnxruntime.__version__} (providers: " in res.output
    assert "CPUExecutionProvider" in res.output
    for key in ("python:", "platform:", "cpu:", "memory:", "nvidia driver:", "CUDA:", "numpy:", "jetson:"):
        assert key in res.output
    if not HAVE_TRT:
        assert "TensorRT: not installed" in res.output
    env = json.loads(CliRunner().invoke(cli, ["env", "--json"]).output)
    assert env["onnxruntime"]["version"] == onnxruntime.__version__ and "CPUExecutionProvider" in env["onnxruntime"]["providers"]


# ---- missing TensorRT: clean errors, no traceback --------------------------------------------------
def assert_install_message(res):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert "pip install 'ppllava-edge[tensorrt]'" in res.output and "python3-libnvinfer" in res.output
    assert "'tensorrt'" in res.output  # names what is missing


@no_trt
def test_build_without_tensorrt_fails_cleanly(tiny_export, tmp_path):
    res = CliRunner().invoke(cli, ["build", str(tiny_export), "--out", str(tmp_path / "engines"), "--fp16", "--timing-cache", str(tmp_path / "tc.bin")])
    assert_install_message(res)
    assert res.output.startswith("error: Building TensorRT engines needs TensorRT")
    assert not (tmp_path / "engines").exists() and not (tmp_path / "tc.bin").exists()


def test_build_dry_run_prints_trtexec_lines(tiny_export, tmp_path):
    res = CliRunner().invoke(cli, ["build", str(tiny_export), "--out", str(tmp_path / "e"), "--dry-run", "--max-batch", "5"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if line.startswith("trtexec ")]
    assert len(lines) == 5 and all("--skipInference" in line for line in lines)
    assert not (tmp_path / "e").exists()


def test_build_option_errors_come_before_the_dependency_check(tiny_export, tmp_path):
    res = CliRunner().invoke(cli, ["build", str(tiny_export), "--out", str(tmp_path / "e"), "--int8"])
    assert res.exit_code == 1 and "--int8 needs a quantized" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["build", str(tiny_export), "--out", str(tmp_path / "e"), "--builder-level", "9"])
    assert res.exit_code == 2  # usage error


def _fake_engine_dir(folder: Path, export_dir: Path) -> Path:
    from ppllava_edge.engine.metadata import export_fingerprint

    manifest = load_manifest(export_dir)
    meta = new_metadata(trt_version="10.3.0", gpu={"name": "Orin", "compute_capability": "8.7", "sm": 87}, export=export_fingerprint(manifest),
                        limits={"frames": [2, 8, 16], "max_input_len": 288, "max_seq_len": 4096, "max_batch": 1}, options={})
    folder.mkdir()
    for g in manifest.graph_names:
        name = engine_file_name(g, "10.3.0", 87)
        (folder / name).write_bytes(b"not a real engine")
        meta["engines"][g] = engine_entry(file=name, onnx=f"{g}.onnx", onnx_sha256={}, precision="fp32", strongly_typed=True, profiles=[], device="gpu",
                                          size_bytes=17, build_seconds=0.0, trtexec="")
    write_metadata(folder, meta)
    return folder


@no_trt
def test_trt_backend_without_tensorrt_fails_cleanly(tiny_export, tmp_path):
    engines = _fake_engine_dir(tmp_path / "engines", tiny_export)
    res = CliRunner().invoke(cli, ["engines", str(engines)])
    assert res.exit_code == 0, res.output
    assert "cannot check here: TensorRT is not installed" in res.stdout
    res = CliRunner().invoke(cli, ["engines", str(engines), "--load"])
    assert_install_message(res)
    assert "The TensorRT backend (--backend trt) needs TensorRT" in res.output
    from ppllava_edge.runtime.trt_backend import open_engines

    with pytest.raises(MissingDependencyError, match="python3-libnvinfer"):
        open_engines(engines, load_manifest(tiny_export))


def test_cuda_wrappers_without_cuda_python():
    if has_module("cuda"):
        pytest.skip("cuda-python is installed")
    from ppllava_edge.device import DeviceBuffer

    with pytest.raises(MissingDependencyError, match="cuda-python"):
        DeviceBuffer(16)


def _gpu_ready() -> bool:
    if not (HAVE_TRT and has_module("cuda")):
        return False
    from ppllava_edge.device import device_count

    return device_count() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs TensorRT, cuda-python and a CUDA GPU")
def test_built_engines_match_onnxruntime(tiny_export, tmp_path):
    from ppllava_edge.engine.build import build_engines
    from ppllava_edge.runtime.decoder import open_decoder
    from ppllava_edge.runtime.session import create_session
    from ppllava_edge.runtime.trt_backend import open_engines

    manifest = load_manifest(tiny_export)
    result = build_engines(tiny_export, tmp_path / "engines", BuildOptions(max_input_len=64, max_seq_len=128, max_batch=2, timing_cache=tmp_path / "tc.bin"))
    assert len(result.engines) == 5 and (tmp_path / "tc.bin").stat().st_size > 0
    engines = open_engines(tmp_path / "engines", manifest)
    try:
        rng = np.random.default_rng(0)
        px = rng.standard_normal((4, 3, 84, 84)).astype(np.float32)
        vision = create_session(manifest.path("vision"), "cpu")
        for ref, got in zip(vision.run(None, {"pixel_values": px}), engines.runners["vision"].run(None, {"pixel_values": px})):
            np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-3)
        m = manifest.model
        ort_dec = open_decoder(create_session(manifest.path("decoder"), "cpu"), manifest.graph("decoder"), m, np.float32, "cpu")
        for dec in (ort_dec, engines.decoder):
            dec.reset(1)
        prompt = rng.standard_normal((1, 20, m["hidden_size"])).astype(np.float32)
        np.testing.assert_allclose(engines.decoder.forward(prompt), ort_dec.forward(prompt), rtol=1e-2, atol=1e-3)
        for dec in (ort_dec, engines.decoder):
            dec.reorder(np.zeros(2, np.int64))
        for _ in range(3):  # decode steps on the generation profile, KV growing by one position each
            step = rng.standard_normal((2, 1, m["hidden_size"])).astype(np.float32)
            np.testing.assert_allclose(engines.decoder.forward(step), ort_dec.forward(step), rtol=1e-2, atol=1e-3)
    finally:
        engines.close()


# ---- the int8 exports of `ppllava-edge quantize` ---------------------------------------------------
def test_calibration_cache_header_follows_the_installed_tensorrt():
    from ppllava_edge.engine.calibration_cache import retag_calibration_cache, trt_version_code

    assert trt_version_code("8.6.1") == 8601 and trt_version_code("10.3.0.30") == 100300
    text = "TRT-8601-EntropyCalibration2\nx: 3c010a14\n"
    assert retag_calibration_cache(text, "10.3.0") == "TRT-100300-EntropyCalibration2\nx: 3c010a14\n"


def quantized_export(tmp_path: Path, decoder: str = "int8", cache: bool = True) -> ExportManifest:
    """A source fp32 export and its quantized copy, with the manifest fields `ppllava-edge quantize` writes."""
    src = tmp_path / "fp32"
    small = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    fake_export(src, small)
    q = tmp_path / "int8"
    q.mkdir(parents=True)
    data = json.loads(json.dumps(small))
    data["quantization"] = {"source_export": {"path": str(src)}}
    spec = data["graphs"]["decoder"]
    spec["file"], spec["precision"] = f"decoder.{decoder}.onnx", decoder
    if decoder == "int8":
        spec["quantization"] = {"scheme": "static QDQ (u8 asym activations, s8 sym per-channel weights)"}
        if cache:
            spec["quantization"]["trt_calibration_cache"] = {"file": "trt_calibration/decoder.cache", "tensors": 3}
            (q / "trt_calibration").mkdir()
            (q / "trt_calibration/decoder.cache").write_text("TRT-8601-EntropyCalibration2\nx: 3c010a14\nonnx::MatMul_7: 3d4ccccd\n")
    return fake_export(q, data)


def test_ort_int8_graphs_build_from_the_source_with_the_calibration_cache(tmp_path):
    m = quantized_export(tmp_path)
    opts = BuildOptions(int8=True, fp16=True)
    dec = next(p for p in plan_build(m, Path("/e"), opts, "10.3.0", 87) if p.graph == "decoder")
    assert dec.onnx == tmp_path / "fp32/decoder.onnx" and dec.calibration_cache == tmp_path / "int8/trt_calibration/decoder.cache"
    assert (dec.precision, dec.strongly_typed, dec.int8_flag, dec.fp16_flag) == ("int8", False, True, True)
    line = trtexec_command(dec, Path("/e"), opts, "10.3.0")
    assert f"--onnx={tmp_path}/fp32/decoder.onnx" in line and f"--fp16 --int8 --calib={tmp_path}/int8/trt_calibration/decoder.cache" in line
    assert "--stronglyTyped" not in line
    with pytest.raises(EngineBuildError, match="implicit INT8 - removed in TensorRT 11.4.0"):
        plan_build(m, Path("/e"), BuildOptions(int8=True), "11.4.0", 120)


def test_unbuildable_quantized_graphs_are_refused(tmp_path):
    with pytest.raises(EngineBuildError, match="no TensorRT calibration cache(.|\n)*--trt-cache"):
        plan_build(quantized_export(tmp_path / "a", cache=False), Path("/e"), BuildOptions(), "10.3.0", 87)
    with pytest.raises(EngineBuildError, match="MatMulNBits"):
        plan_build(quantized_export(tmp_path / "b", decoder="int4-weight"), Path("/e"), BuildOptions(), "10.3.0", 87)
    m = quantized_export(tmp_path / "c")
    m.data["quantization"]["source_export"]["path"] = str(tmp_path / "gone")
    with pytest.raises(EngineBuildError, match="missing: .*gone"):
        plan_build(m, Path("/e"), BuildOptions(), "10.3.0", 87)


def test_calibration_cache_is_checked_before_building(tmp_path):
    from ppllava_edge.engine.calibration_cache import read_calibration_cache

    good = tmp_path / "good.cache"
    good.write_text("TRT-100300-EntropyCalibration2\nx: 3c010a14\nonnx::MatMul_7: 3d4ccccd\n")
    algo, scales = read_calibration_cache(good)
    assert algo == "EntropyCalibration2" and set(scales) == {"x", "onnx::MatMul_7"} and abs(scales["onnx::MatMul_7"] - 0.05) < 1e-7
    for text, match in [
        ("", "not a TensorRT calibration cache"),
        ("x: 3c010a14\n", "not a TensorRT calibration cache"),
        ("TRT-100300-LegacyCalibration\nx: 3c010a14\n", "algorithm 'LegacyCalibration'"),
        ("TRT-100300-EntropyCalibration2\n", "holds no tensor scales"),
        ("TRT-100300-EntropyCalibration2\nx: 3c01\ny: 00000000\n", r"2 line\(s\)(.|\n)*line 2: 'x: 3c01'"),
    ]:
        bad = tmp_path / "bad.cache"
        bad.write_text(text)
        with pytest.raises(EngineBuildError, match=match):
            read_calibration_cache(bad)


def test_bf16_and_fp8_are_refused_at_plan_time(tmp_path):
    data = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    data["graphs"]["decoder"]["outputs"][0]["dtype"] = "bfloat16"
    with pytest.raises(EngineBuildError, match=r"decoder: graph 'decoder' has inputs/outputs numpy cannot hold: logits \(bfloat16\)(.|\n)*--dtype fp16"):
        plan_build(fake_export(tmp_path / "a", data), Path("/e"), BuildOptions(), "10.3.0", 87)
    data = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    data["graphs"]["vision"]["inputs"][0]["dtype"] = "float8_e4m3fn"
    with pytest.raises(EngineBuildError, match=r"pixel_values \(float8_e4m3fn\)"):
        plan_build(fake_export(tmp_path / "b", data), Path("/e"), BuildOptions(), "10.3.0", 87)
    data = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    data["graphs"]["decoder"]["precision"] = "fp8"  # fp8 inside, fp32 I/O: fine on Ada / Hopper, refused on Orin (sm87)
    m = fake_export(tmp_path / "c", data)
    assert next(p for p in plan_build(m, Path("/e"), BuildOptions(), "10.16.1", 89) if p.graph == "decoder").precision == "fp8"
    with pytest.raises(EngineBuildError, match="fp8 kernels need a GPU of sm89 or newer; this one is sm87"):
        plan_build(m, Path("/e"), BuildOptions(), "10.3.0", 87)


def test_tensorrt_builds_the_graph_export_json_names_for_it(tmp_path):
    """export.json `backends.trt.decoder = decoder_trt`: the engine keeps the stage name, built from decoder_trt."""
    data = make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, frames=(2, 8, 16))
    data["graphs"]["decoder_trt"] = {**json.loads(json.dumps(data["graphs"]["decoder"])), "file": "decoder_trt.onnx"}
    data["graphs"]["decoder"]["inputs"] = data["graphs"]["decoder"]["inputs"][:3] + [{"name": "kv_cache", "dims": [2, 1, 4, 4096, 16], "dtype": "float32"}]
    data["backends"] = {"trt": {"decoder": "decoder_trt"}}
    m = fake_export(tmp_path, data)
    plans = {p.graph: p for p in plan_build(m, Path("/e"), BuildOptions(), "10.3.0", 87)}
    assert sorted(plans) == sorted(["vision", "prompt_pool", "image_pool", "projector_head", "decoder"])
    dec = plans["decoder"]
    assert (dec.source, dec.onnx.name, dec.engine_file) == ("decoder_trt", "decoder_trt.onnx", "decoder.trt10.3.0.sm87.engine")
    assert dec.profile_names == ["context", "generation"] and "kv_cache" not in dec.profiles[0]
    with pytest.raises(InputError, match=r"\['decoder_trt'\] are not in this export"):
        plan_build(m, Path("/e"), BuildOptions(graphs=("decoder_trt",)), "10.3.0", 87)


def test_cuda_major_mismatches():
    from ppllava_edge.engine.availability import cuda_mismatches, mismatch_hint, tensorrt_cuda_major

    assert cuda_mismatches(12, "12.9.10", "12.8") == []
    assert cuda_mismatches(None, None, None) == [] and cuda_mismatches(13, None, None) == []
    assert cuda_mismatches(13, "12.9.10", "12.8") == [
        "TensorRT is a CUDA 13 build but cuda-python 12.9.10 is for CUDA 12",
        "TensorRT needs a driver for CUDA 13, this NVIDIA driver supports CUDA 12.8",
    ]
    assert cuda_mismatches(12, "13.0.3", "13.0") == ["TensorRT is a CUDA 12 build but cuda-python 13.0.3 is for CUDA 13"]
    assert mismatch_hint(13, "12.8").endswith("pip install 'tensorrt-cu12==10.16.1.11' 'cuda-python==12.9.10'  (or update the NVIDIA driver to R580+ for CUDA 13)")
    assert "'tensorrt-cu13==10.16.1.11' 'cuda-python==13.0.3'" in mismatch_hint(12, "13.0")
    # JetPack's apt TensorRT has no pip metadata: the CUDA major comes from the Debian version of libnvinfer
    if tensorrt_cuda_major(lambda cmd: None)[0] is None:  # (no pip TensorRT installed here)
        assert tensorrt_cuda_major(lambda cmd: "libnvinfer-dev 10.3.0.30-1+cuda12.5\nlibnvinfer10 10.3.0.30-1+cuda12.5\n") == (12, "dpkg libnvinfer10")


def test_tensorrt_and_gpu_extras_pin_cuda12_builds():
    import tomllib

    from ppllava_edge.engine.availability import ORT_GPU_PINS

    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorrt"] == ["tensorrt-cu12==10.16.1.11", "cuda-python==12.9.10"]  # not `tensorrt`, which pulls the CUDA 13 build
    # onnxruntime-gpu 1.27+ on PyPI are CUDA 13 builds (Requires-Dist nvidia-cuda-runtime ~= 13.0); 1.26.0 is the newest CUDA 12
    assert extras["gpu"] == [f"onnxruntime-gpu=={ORT_GPU_PINS[12]}"] == ["onnxruntime-gpu==1.26.0"]


def fake_dist(site: Path, name: str, version: str, files: dict[str, bytes] = {}, requires: tuple[str, ...] = ()) -> None:  # noqa: B006
    """Install a distribution as pip does: its files written (over any other's), a RECORD with their SHA-256 and size."""
    import base64
    import hashlib

    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
    rows = []
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{rel},sha256={digest},{len(data)}")
    (info / "RECORD").write_text("\n".join(rows + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]) + "\n")


def install_trt(site: Path, major: int, libs: bool = True, bindings: bool = True) -> None:
    """tensorrt-cuXX as pip lays it out: the meta-package, `tensorrt_libs` and `tensorrt_bindings` (a later install of
    the other CUDA major overwrites these shared folders)."""
    fake_dist(site, f"tensorrt-cu{major}", "10.16.1.11")
    if libs:
        fake_dist(site, f"tensorrt-cu{major}-libs", "10.16.1.11", {"tensorrt_libs/libnvinfer.so.10": f"libnvinfer cuda {major}".encode()})
    if bindings:
        fake_dist(site, f"tensorrt-cu{major}-bindings", "10.16.1.11", {"tensorrt_bindings/tensorrt.so": f"bindings cuda {major} build".encode()})


def test_cu12_and_cu13_both_installed_are_judged_by_the_files_import_loads(tmp_path, monkeypatch):
    import ppllava_edge.engine.availability as availability

    site = tmp_path / "site"
    monkeypatch.setattr(availability, "DIST_PATH", [str(site)])
    fake_dist(site, "cuda-python", "12.9.10")
    install_trt(site, 13)
    install_trt(site, 12)  # installed last: its bindings and libraries are on disk
    assert availability.tensorrt_cuda_major(lambda cmd: None)[0] == 12
    stack = availability.cuda_stack("12.8", lambda cmd: None)
    assert stack["problems"] == []  # on main: "TensorRT is a CUDA 13 build but cuda-python 12.9.10 is for CUDA 12"
    assert stack["tensorrt_cuda_source"].startswith("pip tensorrt-cu12-bindings, whose files `import tensorrt` loads")
    assert availability.tensorrt_version() == "10.16.1.11"

    install_trt(site, 13, libs=False)  # then only the CUDA 13 bindings again: cu13 bindings over cu12 libraries
    stack = availability.cuda_stack("12.8", lambda cmd: None)
    assert stack["tensorrt_cuda"] == 13 and stack["problems"] == [
        "`import tensorrt` loads the bindings of tensorrt-cu13 over the libraries of tensorrt-cu12 (tensorrt-cu13 and tensorrt-cu12 "
        "are both installed and overwrote each other's files)",
        "TensorRT is a CUDA 13 build but cuda-python 12.9.10 is for CUDA 12",
        "TensorRT needs a driver for CUDA 13, this NVIDIA driver supports CUDA 12.8",
    ]
    with pytest.raises(MissingDependencyError) as err:
        availability.check_cuda_stack("Building TensorRT engines", stack)
    hint = next(line for line in str(err.value).splitlines() if line.startswith("Hint: "))
    for dist in ("tensorrt-cu12-libs", "tensorrt-cu12-bindings", "tensorrt-cu13-libs", "tensorrt-cu13-bindings", "cuda-bindings"):
        assert f" {dist} " in hint  # all removed: the -libs / -bindings of the other build would stay on disk otherwise
    assert "pip install 'tensorrt-cu12==10.16.1.11' 'cuda-python==12.9.10'" in hint


@pytest.mark.parametrize("ort, ok", [("1.26.0", True), ("1.31.1", False)])
def test_env_checks_the_cuda_major_of_onnxruntime_gpu(tmp_path, monkeypatch, ort, ok):
    """The CUDA major comes from the wheel metadata pip installed (Requires-Dist of the two real releases)."""
    import ppllava_edge.engine.availability as availability

    site = tmp_path / "site"
    monkeypatch.setattr(availability, "DIST_PATH", [str(site)])
    requires = {"1.26.0": ('nvidia-cuda-runtime-cu12~=12.0; extra == "cuda"', 'nvidia-cudnn-cu12~=9.0; extra == "cudnn"'),
                "1.31.1": ('nvidia-cuda-runtime~=13.0; extra == "cuda"', 'nvidia-cudnn-cu13~=9.0; extra == "cudnn"')}[ort]
    fake_dist(site, "onnxruntime-gpu", ort, requires=requires)
    install_trt(site, 12)
    fake_dist(site, "cuda-python", "12.9.10")
    res = CliRunner().invoke(cli, ["env"])
    cuda = 12 if ok else 13
    assert f"cuda-python 12.9.10, onnxruntime-gpu {ort} (CUDA {cuda})" in res.stdout and "Traceback" not in res.output
    if ok:
        assert res.exit_code == 0 and res.stdout.count(": ok") >= 1 and "MISMATCH" not in res.stdout
    else:
        assert res.exit_code == 1 and "MISMATCH: onnxruntime-gpu 1.31.1 is a CUDA 13 build but TensorRT is a CUDA 12 build" in res.stdout
        assert "Hint: pip uninstall -y onnxruntime-gpu && pip install 'onnxruntime-gpu==1.26.0'" in res.stderr
        assert "tensorrt-cu12==" not in res.stderr  # TensorRT itself is fine: only onnxruntime-gpu is replaced
    # building engines and the native backend do not load onnxruntime-gpu: its mismatch does not stop them
    availability.check_cuda_stack("Building TensorRT engines", availability.cuda_stack(None, lambda cmd: None))


def test_env_fails_on_a_cuda_mismatch(monkeypatch):
    import ppllava_edge.engine.availability as availability

    versions = {"tensorrt-cu13": "10.16.1.11", "tensorrt": "10.16.1.11", "cuda-python": "12.9.10"}
    monkeypatch.setattr(availability, "_dist_version", versions.get)
    res = CliRunner().invoke(cli, ["env"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "CUDA majors: TensorRT 13 (pip tensorrt-cu13), cuda-python 12.9.10" in res.stdout and "MISMATCH" in res.stdout
    assert "error: TensorRT: the installed CUDA packages do not match: TensorRT is a CUDA 13 build but cuda-python 12.9.10 is for CUDA 12" in res.stderr
    assert "pip install 'tensorrt-cu" in res.stderr
    with pytest.raises(MissingDependencyError, match="CUDA 13 build but cuda-python 12.9.10"):  # build / --backend trt: before importing TensorRT
        availability.require_tensorrt("Building TensorRT engines")


def test_build_refuses_an_export_without_a_tensorrt_decoder(tiny_export, tmp_path):
    """The in-place decoder.onnx (GroupQueryAttention, com.microsoft) cannot go to TensorRT: an export made without
    --tensorrt has no decoder_trt.onnx, and `build` says so before anything runs."""
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_export, plain)
    data = json.loads((plain / "export.json").read_text())
    del data["graphs"]["decoder_trt"], data["backends"]["trt"]
    (plain / "decoder_trt.onnx").unlink()
    (plain / "export.json").write_text(json.dumps(data))
    res = CliRunner().invoke(cli, ["build", str(plain), "--out", str(tmp_path / "e"), "--dry-run"])
    assert res.exit_code == 1 and "GroupQueryAttention" in res.output and "--tensorrt" in res.output
    assert "(adds vision_trt.onnx)" in res.output  # the fused vision graph is refused in the same message
    assert "Traceback" not in res.output
