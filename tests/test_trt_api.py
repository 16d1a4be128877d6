"""Our calls into the TensorRT API (engine builder and native backend), against the stand-in of tests/trt_standin.py.

The stand-in computes nothing; it has TensorRT's enum values and return conventions (cited there by header line), and
knobs that make a call fail the way TensorRT reports failure. So these tests check what a user would meet on a GPU:
which calls are made, that every result is checked, and what ends up in the output folder or the error message.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import ppllava_edge.engine.availability as availability
import ppllava_edge.device as cuda
from ppllava_edge.cli.main import cli
from ppllava_edge.engine.build import build_engines
from ppllava_edge.engine.metadata import engine_entry, export_fingerprint, load_metadata, new_metadata, write_metadata
from ppllava_edge.engine.plan import BuildOptions
from ppllava_edge.engine.profiles import graph_profiles, profiles_to_json, resolve_limits
from ppllava_edge.errors import EngineBuildError, InferenceError
from ppllava_edge.manifest import ExportManifest

from .test_engine import fake_export, make_manifest, quantized_export
from .trt_standin import V10, V11, EngineSpec, StandIn

V10_JETPACK = "10.3.0.30"  # JetPack 6.1/6.2; enum values as in 10.16 (release/10.3 NvInfer.h:9620 kSTRONGLY_TYPED = 1,
# :8300/:8303/:8309 kFP16/kINT8/kGPU_FALLBACK, NvInferRuntime.h:2525 kUSER_MANAGED = 2)
GPU = {"name": "Stand-in GPU", "compute_capability": "8.7", "sm": 87, "memory_bytes": 1 << 34, "cuda_driver": "12.6", "cuda_runtime": "12.6"}


def tiny_data(dtype: str = "fp32") -> dict:
    return make_manifest(image=84, patch=14, hidden=64, layers=2, kv=4, head_dim=16, clip_dim=32, vocab=100, frames=(2, 8, 16), dtype=dtype)


@pytest.fixture
def standin(monkeypatch):
    def make(version: str = V10) -> StandIn:
        sim = StandIn(version)
        monkeypatch.setattr(availability, "require_tensorrt", lambda purpose, need_gpu=True: (sim.module, None))
        monkeypatch.setattr(cuda, "device_info", lambda device=0: dict(GPU))
        return sim

    return make


def parses(sim: StandIn) -> list[tuple]:
    return [c for c in sim.calls if c[0] == "parse"]


# ---- builder ---------------------------------------------------------------------------------------
def test_build_calls_and_outputs(standin, tmp_path):
    sim = standin(V10)
    export = fake_export(tmp_path / "export", tiny_data()).folder
    tc = tmp_path / "tc.bin"
    tc.write_bytes(b"TC\x03")  # a timing cache this "TensorRT" wrote earlier (3 builds)
    opts = BuildOptions(fp16=True, timing_cache=tc, workspace_mb=512, builder_level=2, max_input_len=64, max_seq_len=128)
    result = build_engines(export, tmp_path / "engines", opts)

    assert [p[1] for p in parses(sim)] == ["vision.onnx", "prompt_pool.onnx", "image_pool.onnx", "projector_head.onnx", "decoder.onnx"]
    assert all(p[2] == 0 for p in parses(sim))  # fp32 export + --fp16 on TensorRT 10: weakly typed
    assert sim.calls.count(("flag", "FP16")) == 5 and sim.calls.count(("pool", "WORKSPACE", 512 << 20)) == 5
    assert ("builder_optimization_level", 2) in sim.calls
    profiles = [c[1] for c in sim.calls if c[0] == "profile"]
    assert len(profiles) == 1 + 1 + 1 + 1 + 2  # vision, prompt_pool, image_pool (1..5 anyres tiles), projector_head, decoder x2
    assert profiles[-1]["past.0.key"] == ((1, 4, 1, 16), (1, 4, 96, 16), (1, 4, 127, 16))
    assert [c[1] for c in sim.calls if c[0] == "create_timing_cache"] == [b"TC\x03", b"TC\x04", b"TC\x05", b"TC\x06", b"TC\x07"]
    assert tc.read_bytes() == b"TC\x08" and sorted(p.name for p in tmp_path.iterdir()) == ["engines", "export", "tc.bin"]

    meta = load_metadata(tmp_path / "engines")
    assert meta["tensorrt"] == "10.16.1" and meta["gpu"]["sm"] == 87 and meta["gpu"]["name"] == "Stand-in GPU"
    dec = meta["engines"]["decoder"]
    assert dec["file"] == "decoder.trt10.16.1.sm87.engine" and dec["graph"] == "decoder" and dec["precision"] == "fp16" and not dec["strongly_typed"]
    assert [p["name"] for p in dec["profiles"]] == ["context", "generation"] and dec["profiles"][1]["dims"]["past"] == [1, 96, 127]
    assert [e.trtexec for e in result.engines] == [meta["engines"][e.plan.graph]["trtexec"] for e in result.engines]
    assert (tmp_path / "engines" / dec["file"]).read_bytes() == b"standin:decoder.onnx"


@pytest.mark.parametrize("version, flags", [(V10, 1 << 1), (V11, 1 << 0)])
def test_strongly_typed_flag_follows_the_tensorrt_version(standin, tmp_path, version, flags):
    sim = standin(version)
    build_engines(fake_export(tmp_path / "export", tiny_data("fp16")).folder, tmp_path / "engines", BuildOptions(max_input_len=64, max_seq_len=128))
    assert {p[2] for p in parses(sim)} == {flags}  # kSTRONGLY_TYPED is 1 in TensorRT 10 and 0 in 11
    assert not any(c[0] == "flag" for c in sim.calls)  # no FP16 / INT8 flags: precision comes from the graph


@pytest.mark.parametrize(
    "knob, warning",
    [
        ({}, "is unreadable"),  # create_timing_cache -> None (C++ nullptr)
        ({"set_timing_cache_ok": False}, "TensorRT refused timing cache"),
        ({"lose_timing_cache": True}, "returned no timing cache"),
    ],
)
def test_a_bad_timing_cache_warns_and_the_build_completes(standin, tmp_path, caplog, knob, warning):
    sim = standin(V10)
    for k, v in knob.items():
        setattr(sim, k, v)
    tc = tmp_path / "tc.bin"
    tc.write_bytes(b"TC\x03" if knob.get("set_timing_cache_ok") is False else b"\x00corrupt timing cache")
    export = fake_export(tmp_path / "export", tiny_data()).folder
    with caplog.at_level(logging.WARNING, logger="ppllava_edge.engine.build"):
        result = build_engines(export, tmp_path / "engines", BuildOptions(timing_cache=tc, max_input_len=64, max_seq_len=128))
    messages = [r.getMessage() for r in caplog.records]
    assert sum(warning in m for m in messages) == 1  # said once, not once per engine
    assert len(result.engines) == 5 and len(load_metadata(tmp_path / "engines")["engines"]) == 5
    if not knob:  # the unreadable file was replaced by the cache of this build (5 engines)
        assert tc.read_bytes() == b"TC\x05"


def test_a_refused_profile_fails_with_its_name_and_leaves_nothing(standin, tmp_path):
    sim = standin(V10)
    sim.profile_index = -1  # add_optimization_profile: -1 when the profile is not valid
    export = fake_export(tmp_path / "export", tiny_data()).folder
    with pytest.raises(EngineBuildError, match=r"vision: TensorRT refused optimization profile 'frames' \(add_optimization_profile returned -1\): pixel_values"):
        build_engines(export, tmp_path / "engines", BuildOptions(max_input_len=64, max_seq_len=128))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no engines folder, no temp folder
    res = CliRunner().invoke(cli, ["build", str(export), "--out", str(tmp_path / "engines")])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.output.count("error:") == 1
    assert "\nerror: vision: TensorRT refused optimization profile 'frames'" in res.output


# ---- implicit INT8 from a calibration cache ------------------------------------------------------------
DECODER_NET = [  # what the parser makes of two MatMuls: one on the normed input, one on the attention probabilities
    ("ln", "SHUFFLE", ["x"], "/ln/Mul_output_0"),
    ("w", "CONSTANT", [], "onnx::MatMul_7"),
    ("q_proj", "MATRIX_MULTIPLY", ["/ln/Mul_output_0", "onnx::MatMul_7"], "/q/MatMul_output_0"),
    ("pv", "MATRIX_MULTIPLY", ["/attn/Softmax_output_0", "/v/MatMul_output_0"], "/attn/out"),
]


def int8_build(sim: StandIn, tmp_path: Path):
    m = quantized_export(tmp_path / "q")
    return m, lambda: build_engines(m.folder, tmp_path / "engines", BuildOptions(int8=True, max_input_len=64, max_seq_len=128))


def test_calibration_cache_missing_tensors_are_named(standin, tmp_path):
    sim = standin(V10)
    sim.networks["decoder.onnx"] = DECODER_NET
    _, build = int8_build(sim, tmp_path)
    with pytest.raises(EngineBuildError, match=r"has no scale for 2 tensor\(s\)(.|\n)*: /attn/Softmax_output_0, /v/MatMul_output_0\.(.|\n)*--trt-cache"):
        build()
    assert not (tmp_path / "engines").exists()
    assert not any(c[0] == "build" and c[1] == "decoder.onnx" for c in sim.calls)  # refused before building


def test_calibration_uses_its_own_profile_and_a_rejected_cache_fails_clearly(standin, tmp_path):
    sim = standin(V10)
    sim.networks["decoder.onnx"] = DECODER_NET[:3]  # x (through the shuffle) and the weights: covered by the cache
    _, build = int8_build(sim, tmp_path)
    build()
    meta = load_metadata(tmp_path / "engines")
    assert meta["engines"]["decoder"]["precision"] == "int8" and ("flag", "INT8") in sim.calls
    (calib,) = [c[1] for c in sim.calls if c[0] == "calibration_profile"]
    build_profiles = [c[1] for c in sim.calls if c[0] == "profile"][-2:]
    ctx = build_profiles[0]
    assert calib["inputs_embeds"] == (ctx["inputs_embeds"][1],) * 3 == ((1, 64, 64),) * 3  # min = opt = max = the context opt
    assert ctx["inputs_embeds"][0] == (1, 1, 64)  # the build profile keeps its own range
    (tmp_path / "engines").rename(tmp_path / "first")

    sim.reject_calibration_cache = True  # TensorRT ignores the cache and asks the calibrator for batches
    with pytest.raises(EngineBuildError, match=r"decoder: TensorRT did not use the calibration cache .*decoder.calibration.cache and tried to calibrate"):
        build()
    assert not (tmp_path / "engines").exists()


def test_a_refused_calibration_profile_fails(standin, tmp_path):
    sim = standin(V10)
    sim.calibration_profile_ok = False
    sim.networks["decoder.onnx"] = DECODER_NET[:3]
    with pytest.raises(EngineBuildError, match="decoder: TensorRT refused the calibration profile"):
        int8_build(sim, tmp_path)[1]()


# ---- DLA ---------------------------------------------------------------------------------------------
VISION_NET = [
    ("patch_embed", "CONVOLUTION", ["pixel_values"], "/embed/Conv_output_0"),
    ("flatten", "SHUFFLE", ["/embed/Conv_output_0"], "/embed/Flatten_output_0"),
    ("qkv", "MATRIX_MULTIPLY", ["/embed/Flatten_output_0", "w"], "/qkv/MatMul_output_0"),
]


def test_dla_vision_engine_is_static_and_records_placement(standin, tmp_path, caplog):
    """DLA on TensorRT 10 as trtexec --useDLACore builds it (sampleEngines.cpp, release/10.3:1123-1147): the fp32 graph,
    weakly typed, FP16 + PREFER_PRECISION_CONSTRAINTS + GPU_FALLBACK; the placement is checked on the built engine."""
    sim = standin(V10_JETPACK)
    sim.dla_cores = 2
    sim.networks["vision.onnx"] = VISION_NET
    sim.engines["vision.onnx"] = EngineSpec(inputs={"pixel_values": ("HALF", (8, 3, 84, 84), [((8, 3, 84, 84),) * 3])}, outputs={})
    export = fake_export(tmp_path / "export", tiny_data()).folder
    with caplog.at_level(logging.WARNING, logger="ppllava_edge.engine.build"):
        build_engines(export, tmp_path / "engines", BuildOptions(dla_core=1, frames=(8, 8, 8), max_input_len=64, max_seq_len=128))
    assert parses(sim)[0] == ("parse", "vision.onnx", 0)  # weakly typed: TensorRT 10 takes no precision flags on strongly typed networks
    assert sim.calls.count(("flag", "FP16")) == sim.calls.count(("flag", "PREFER_PRECISION_CONSTRAINTS")) == 1  # the vision engine only
    assert ("flag", "GPU_FALLBACK") in sim.calls
    vision = load_metadata(tmp_path / "engines")["engines"]["vision"]
    assert vision["device"] == "dla:1" and vision["profiles"][0]["shapes"]["pixel_values"] == {"min": [8, 3, 84, 84], "opt": [8, 3, 84, 84], "max": [8, 3, 84, 84]}
    assert (vision["precision"], vision["strongly_typed"]) == ("fp16", False)
    assert "--fp16 --precisionConstraints=prefer" in vision["trtexec"] and "--stronglyTyped" not in vision["trtexec"]
    assert vision["placement"] == {"requested": "dla:1", "source": "IBuilderConfig.can_run_on_DLA", "dla_layers": 1, "gpu_layers": 2,
                                   "gpu_layer_names": ["flatten", "qkv"], "layer_info": "vision.layers.json",
                                   "engine": {"source": "IEngineInspector", "dla_subgraphs": 1, "other_layers": 2,
                                              "dla_subgraph_names": ["{ForeignNode[patch_embed...patch_embed]}"]}}
    assert [x["Name"] for x in json.loads((tmp_path / "engines/vision.layers.json").read_text())["Layers"]][1:] == ["flatten", "qkv"]
    assert ("DLA_core", 1) in sim.calls and ("deserialize", "vision.onnx", 1) in sim.calls  # inspected on the DLA core it runs on
    assert ("profile", {"pixel_values": ((8, 3, 84, 84),) * 3}) in sim.calls  # a (static) profile: the ONNX dims are named
    assert any("2 of 3 layers fall back to the GPU" in r.getMessage() for r in caplog.records)
    assert "dla" not in json.dumps(load_metadata(tmp_path / "engines")["engines"]["decoder"]["device"])


def test_a_dla_engine_that_runs_nothing_on_the_dla_is_refused(standin, tmp_path):
    """can_run_on_DLA says yes before the build, but the built engine's layer information has no DLA subgraph."""
    sim = standin(V10_JETPACK)
    sim.dla_cores, sim.place_on_dla = 2, False
    sim.networks["vision.onnx"] = VISION_NET
    sim.engines["vision.onnx"] = EngineSpec(inputs={"pixel_values": ("HALF", (8, 3, 84, 84), [((8, 3, 84, 84),) * 3])}, outputs={})
    export = fake_export(tmp_path / "export", tiny_data()).folder
    with pytest.raises(EngineBuildError, match=r"vision: TensorRT said 1 layer\(s\) can run on DLA core 0, but the built engine runs none there"):
        build_engines(export, tmp_path / "engines", BuildOptions(dla_core=0, frames=(8, 8, 8), max_input_len=64, max_seq_len=128))
    assert not (tmp_path / "engines").exists()


def test_dla_with_nothing_dla_can_run_is_refused(standin, tmp_path):
    sim = standin(V10_JETPACK)
    sim.dla_cores, sim.dla_layer_types = 2, set()
    export = fake_export(tmp_path / "export", tiny_data()).folder
    with pytest.raises(EngineBuildError, match="none of its 3 layers can run on DLA core 0, so with GPU fallback the whole engine would run on the GPU"):
        sim.networks["vision.onnx"] = VISION_NET
        build_engines(export, tmp_path / "engines", BuildOptions(dla_core=0, frames=(8, 8, 8), max_input_len=64, max_seq_len=128))
    sim.dla_cores = 0
    with pytest.raises(EngineBuildError, match="this device has 0 DLA core"):
        build_engines(export, tmp_path / "engines", BuildOptions(dla_core=0, frames=(8, 8, 8), max_input_len=64, max_seq_len=128))
    assert not (tmp_path / "engines").exists()


# ---- native backend --------------------------------------------------------------------------------------
class FakeStream:
    handle = 7

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


_addresses = itertools.count(1)


class FakeDeviceBuffer:
    allocated: list[int] = []

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.ptr = int(nbytes), next(_addresses) << 32
        FakeDeviceBuffer.allocated.append(self.nbytes)

    def copy_from_host(self, *a, **k) -> None:
        pass

    def copy_to_host(self, *a, **k) -> None:
        pass

    def copy_from_device(self, *a, **k) -> None:
        pass

    def free(self) -> None:
        self.ptr = 0


class FakeHostBuffer:
    def __init__(self, shape, dtype) -> None:
        self.array = np.zeros(shape, dtype)

    def free(self) -> None:
        pass


def engine_folder(sim: StandIn, tmp_path: Path, data: dict, logits: str = "FLOAT") -> tuple[Path, ExportManifest]:
    """An engine folder for `data` (vision + decoder) whose engine files the stand-in deserializes."""
    manifest = fake_export(tmp_path / "export", data)
    limits = resolve_limits(manifest, max_input_len=64, max_seq_len=128)
    profiles = graph_profiles(manifest, limits, ["vision", "decoder"])
    meta = new_metadata(trt_version=sim.version, gpu=dict(GPU), export=export_fingerprint(manifest), limits=limits.as_dict(), options={})
    folder = tmp_path / "engines"
    folder.mkdir()
    hidden, vocab = 64, 100

    def io(graph: str) -> dict:
        return {i["name"]: ("INT64" if i["dtype"] == "int64" else "FLOAT", tuple(-1 if isinstance(d, str) else d for d in i["dims"]),
                            [p[i["name"]] for p in profiles[graph]]) for i in data["graphs"][graph]["inputs"]}

    specs = {
        "vision": EngineSpec(io("vision"), {"values": ("FLOAT", lambda s: (s["pixel_values"][0], 36, hidden)),
                                            "keys": ("FLOAT", lambda s: (36 * s["pixel_values"][0], 32))}, memory=[5 << 20]),
        "decoder": EngineSpec(io("decoder"), {"logits": (logits, lambda s: (s["inputs_embeds"][0], vocab)),
                                              **{o["name"]: ("FLOAT", lambda s: (1,)) for o in data["graphs"]["decoder"]["outputs"][1:]}},
                              memory=[3 << 20, 1 << 20]),
    }
    for graph, spec in specs.items():
        name = f"{graph}.engine"
        (folder / name).write_bytes(f"standin:{name}".encode())
        sim.engines[name] = spec
        meta["engines"][graph] = engine_entry(file=name, graph=graph, onnx=f"{graph}.onnx", onnx_sha256={}, precision="fp32", strongly_typed=True,
                                              profiles=profiles_to_json(profiles[graph], [str(i) for i in range(len(profiles[graph]))]),
                                              device="gpu", size_bytes=1, build_seconds=0.0, trtexec="")
    write_metadata(folder, meta)
    return folder, manifest


@pytest.fixture
def runtime(standin, monkeypatch, tmp_path):
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "DeviceBuffer", FakeDeviceBuffer)
    monkeypatch.setattr(cuda, "HostBuffer", FakeHostBuffer)
    FakeDeviceBuffer.allocated = []
    sim = standin(V10)
    return sim, *engine_folder(sim, tmp_path, tiny_data())


def test_contexts_share_one_activation_buffer_and_calls_are_checked(runtime):
    from ppllava_edge.runtime.trt_backend import open_engines

    sim, folder, manifest = runtime
    engines = open_engines(folder, manifest)
    user_managed = sim.module.ExecutionContextAllocationStrategy.USER_MANAGED
    assert len(sim.contexts) == 3 and all(c.strategy == user_managed for c in sim.contexts)  # vision + context + generation
    assert {c.memory for c in sim.contexts} == {(engines.activations.ptr, 5 << 20)}  # one buffer, the largest engine's need
    assert FakeDeviceBuffer.allocated.count(5 << 20) == 1 and (3 << 20) not in FakeDeviceBuffer.allocated
    ctx, gen = sim.contexts[1:]
    assert (ctx.profile, gen.profile) == (0, 1)

    dec = engines.decoder
    dec.reset(1)
    assert dec.forward(np.zeros((1, 5, 64), np.float32)).shape == (1, 100)
    dec.forward(np.zeros((1, 1, 64), np.float32))
    enqueues = [c[2] for c in sim.calls if c[0] == "enqueue"]
    assert enqueues == [0, 1]  # prefill on the context profile, the step on the generation profile
    assert ("shape", id(gen), "past.1.value", (1, 4, 5, 16)) in sim.calls
    out = engines.runners["vision"].run(None, {"pixel_values": np.zeros((4, 3, 84, 84), np.float32)})
    assert [o.shape for o in out] == [(4, 36, 64), (144, 32)]

    sim.refuse_address = {"present.1.value"}
    with pytest.raises(InferenceError, match="decoder: TensorRT refused the device address of 'present.1.value'"):
        dec.forward(np.zeros((1, 1, 64), np.float32))
    sim.refuse_address = set()
    sim.enqueue_ok = False
    with pytest.raises(InferenceError, match="decoder: TensorRT could not enqueue the inference"):
        dec.forward(np.zeros((1, 1, 64), np.float32))
    with pytest.raises(InferenceError, match="vision.engine: TensorRT could not enqueue"):
        engines.runners["vision"].run(None, {"pixel_values": np.zeros((2, 3, 84, 84), np.float32)})
    sim.enqueue_ok = True
    sim.refuse_shape = {"position_ids"}
    with pytest.raises(InferenceError, match=r"decoder: TensorRT refused shape \(1, 1\) for 'position_ids'"):
        dec.forward(np.zeros((1, 1, 64), np.float32))
    engines.close()


def test_engines_that_cannot_load_fail_before_any_context(runtime, monkeypatch):
    from ppllava_edge.runtime import trt_backend

    sim, folder, manifest = runtime
    sim.profile_async_ok = False
    with pytest.raises(EngineBuildError, match="decoder.engine: TensorRT refused optimization profile 0"):
        trt_backend.open_engines(folder, manifest)
    sim.profile_async_ok = True
    monkeypatch.setattr(cuda, "device_info", lambda device=0: {**GPU, "name": "Another GPU"})
    with pytest.raises(EngineBuildError, match="built on a Stand-in GPU, this GPU is a Another GPU"):
        trt_backend.open_engines(folder, manifest)


def test_bf16_engine_outputs_are_refused_at_load(standin, monkeypatch, tmp_path):
    from ppllava_edge.runtime.trt_backend import open_engines

    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "DeviceBuffer", FakeDeviceBuffer)
    sim = standin(V10)
    folder, manifest = engine_folder(sim, tmp_path, tiny_data(), logits="BF16")
    with pytest.raises(EngineBuildError, match="decoder.engine: tensor 'logits' is BF16, which numpy cannot hold"):
        open_engines(folder, manifest)


def test_cuda_graph_is_refused_before_tensorrt_is_needed(monkeypatch, tmp_path):
    """--cuda-graph is refused by the CLI while parsing (cli/app.py), before any engine or TensorRT is touched."""

    def unreachable(purpose, need_gpu=True):
        raise AssertionError("TensorRT must not be needed to refuse --cuda-graph")

    monkeypatch.setattr(availability, "require_tensorrt", unreachable)
    fake_export(tmp_path / "export", tiny_data())
    res = CliRunner().invoke(cli, ["ask", str(tmp_path / "export"), str(tmp_path / "clip.mp4"), "what?", "--backend", "trt", "--cuda-graph"])
    assert res.exit_code == 1, res.output
    assert re.search(r"--cuda-graph is not supported(.|\n)*uncaptured enqueue after each shape change", res.output)


def test_cli_cuda_graph_is_one_clear_error(tiny_export, tmp_path):
    for args in (["ask", str(tiny_export), str(tmp_path / "clip.mp4"), "what?", "--backend", "trt", "--cuda-graph"],
                 ["ask", str(tiny_export), str(tmp_path / "clip.mp4"), "what?", "--cuda-graph"],  # not silently ignored with ort either
                 ["engines", str(tmp_path / "engines"), "--load", "--cuda-graph"]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1 and "Traceback" not in res.output, args
        assert res.output.startswith("error: --cuda-graph is not supported by the TensorRT decoder") and "Hint: drop --cuda-graph" in res.output


# ---- thread safety of the TensorRT-backed Pipeline ---------------------------------------------------------
def test_trt_pipeline_shared_by_threads_caches_each_videos_own_features(standin, monkeypatch, tmp_path, tiny_export, sample_videos):
    """Two threads ask one TensorRT-backed Pipeline about two different videos. The stand-in engines compute what the
    export's graphs compute (ONNX Runtime on a host-memory "device"), and both vision runs are held at their enqueue
    until the other arrives: with one execution context and one set of input buffers per engine and no lock, the
    second video's pixels overwrote the first's before its enqueue, and the first video's cache entry held the second
    video's features (on main: so did every later answer about it)."""
    import threading

    from ppllava_edge.runtime.pipeline import Pipeline, Timings
    from ppllava_edge.runtime.generation import GenerationConfig

    from .trt_standin import Device, onnx_engine_spec

    sim = standin(V10)
    device = sim.device = Device()
    monkeypatch.setattr(cuda, "Stream", device.Stream)
    monkeypatch.setattr(cuda, "DeviceBuffer", device.DeviceBuffer)
    monkeypatch.setattr(cuda, "HostBuffer", device.HostBuffer)
    build_engines(tiny_export, tmp_path / "engines", BuildOptions(frames=(8, 8, 8), max_input_len=96, max_seq_len=128))
    meta = load_metadata(tmp_path / "engines")
    export = json.loads((tiny_export / "export.json").read_text())
    for stage, entry in meta["engines"].items():  # build_engines wrote "standin:<onnx file>" into each engine file
        graph = export["graphs"][entry["graph"]]
        sim.engines[graph["file"]] = onnx_engine_spec(tiny_export / graph["file"], graph, entry["profiles"])

    held = threading.Barrier(2, timeout=1.0)
    vision_spec = sim.engines[export["graphs"][meta["engines"]["vision"]["graph"]]["file"]]

    def hold_vision(ctx) -> None:
        if ctx.spec is vision_spec:
            try:  # with the runner locked the other thread cannot get here: the barrier breaks after 1 s
                held.wait()
            except threading.BrokenBarrierError:
                pass

    gen = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    videos = sample_videos[:2]
    alone = Pipeline.from_export(tiny_export, backend="trt", engines=tmp_path / "engines")
    want_ids = {v: alone.ask(v, "What happens?", generation=gen).ids for v in videos}  # one at a time
    want = {v: alone.features(v, 8, Timings())[:2] for v in videos}
    assert not np.allclose(want[videos[0]][0], want[videos[1]][0])  # two different videos, two different feature sets
    ref = Pipeline.from_export(tiny_export, provider="cpu")  # the ONNX Runtime path agrees with the stand-in engines
    np.testing.assert_allclose(ref.features(videos[0], 8, Timings())[0], want[videos[0]][0], rtol=1e-4, atol=1e-4)

    pipe = Pipeline.from_export(tiny_export, backend="trt", engines=tmp_path / "engines")
    sim.before_enqueue = hold_vision
    got, errors = {}, []

    def ask(video) -> None:
        try:
            got[video] = pipe.ask(video, "What happens?", generation=gen).ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(v,)) for v in videos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    sim.before_enqueue = None
    assert not errors and pipe.vision_runs == 2
    for v in videos:
        t = Timings()
        values, keys, _ = pipe.features(v, 8, t)
        assert t.cache_hit
        np.testing.assert_array_equal(values, want[v][0])
        np.testing.assert_array_equal(keys, want[v][1])
    assert got == want_ids
    for p in (alone, pipe):
        p.close()
