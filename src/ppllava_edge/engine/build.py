"""ONNX export folder -> TensorRT engines + engines.json, with the TensorRT Python API (imported lazily).

Planning is pure and tested without TensorRT (`plan.py`: `plan_build`, `trtexec_command`); the calibration-cache
format and its calibrator live in `calibration_cache.py`. `build_engines` runs the TensorRT builder for each plan:

- the ONNX file is parsed with `OnnxParser.parse_from_file` (which resolves external data next to the file);
- fp16 exports and symmetric int8 Q/DQ graphs build as strongly typed networks (precision comes from the graph);
- the int8 graphs of `ppllava-edge quantize` (ONNX Runtime Q/DQ, uint8 asymmetric activations, which TensorRT's
  explicit quantization does not accept) build on TensorRT 10 from their fp32 source graph with BuilderFlag.INT8
  and the TensorRT calibration cache `quantize --trt-cache` wrote; TensorRT 11 refuses them (no implicit INT8).
  The cache is checked before building (header, algorithm, every scale line, and after parsing: a scale for every
  activation feeding a matrix multiply / convolution), it gets its own calibration profile (min = opt = max = the
  first profile's opt, as Polygraphy does), and a build where TensorRT still asks the calibrator for data fails
  with a message saying the cache was rejected;
- ONNX Runtime's weight-only MatMulNBits graphs (int4-weight / int8-weight) are refused (no TensorRT parser support);
  the weight-only decoder_trt `quantize` writes with DequantizeLinear weights builds (precision e.g. "int4-weight+fp16");
- graphs whose inputs or outputs are bf16 / fp8 are refused at plan time (numpy, hence the runtime, has no such types);
- fp32 exports build fp32 (TF32 allowed), or with `--fp16` as a weakly typed network with BuilderFlag.FP16 on
  TensorRT 10 (TensorRT 11 removed weak typing: re-export with `--dtype fp16` instead);
- one optimization profile per graph, two for the decoder (context / generation), from `profiles.py`; every
  `add_optimization_profile` index and `set_*` result is checked;
- the timing cache file is loaded before and saved (atomically) after every engine; a cache TensorRT cannot read or
  refuses is replaced by a fresh one with a warning, as Polygraphy does, and never costs the output folder;
- `--dla-core` builds a static-shape vision engine (one frame count: DLA has no dynamic shapes) for that DLA core
  with GPU fallback (Jetson AGX Orin / Orin NX with TensorRT <= 10.7, or TensorRT >= 11.4.1 on JetPack 7.2.2+). On
  TensorRT 10 it is built as trtexec --useDLACore builds it (samples/common/sampleEngines.cpp, release/10.3
  lines 1123-1147, release/10.7 1103-1127, release/10.16 1241-1265): from the fp32 graph, weakly typed, with
  PREFER_PRECISION_CONSTRAINTS and FP16 (INT8 instead for an implicit-INT8 graph); TensorRT 10 rejects precision
  flags on strongly typed networks (NVIDIA/TensorRT#4228, #4253), so an fp16 export is refused. TensorRT 11.4.1+
  builds DLA strongly typed (an fp16 export). engines.json records how many layers `can_run_on_DLA` before the
  build and how many DLA subgraphs the built engine has (its engine inspector's layer information); an engine with
  none is refused.

    result = build_engines("export/", "engines/", BuildOptions(fp16=True, timing_cache=Path("tc.bin")))
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EngineBuildError, InputError
from ..manifest import load_manifest
from .calibration_cache import _cache_calibrator, read_calibration_cache, retag_calibration_cache, uncalibrated_tensors
from .plan import BuildOptions, EnginePlan, layer_info_name, plan_build, trtexec_command
from .profiles import Profile, resolve_limits

log = logging.getLogger(__name__)


@dataclass
class BuiltEngine:
    plan: EnginePlan
    path: Path
    size_bytes: int
    build_seconds: float
    trtexec: str


@dataclass
class BuildResult:
    out: Path
    engines: list[BuiltEngine] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    seconds: float = 0.0


# ---- building (TensorRT) ---------------------------------------------------------------------------
def _network_flags(trt, strongly_typed: bool) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(flag)) if (strongly_typed and flag is not None) else 0


def _parse_onnx(trt, builder, logger, plan: EnginePlan):
    network = builder.create_network(_network_flags(trt, plan.strongly_typed))
    if network is None:
        raise EngineBuildError(f"{plan.graph}: TensorRT could not create a network definition (see the TensorRT log above)")
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):  # resolves external data relative to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{plan.onnx}: TensorRT's ONNX parser failed: {errors or 'no details'}")
    return network, parser


def _profile(builder, plan: EnginePlan, name: str, shapes: Profile):
    p = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in shapes.items():
        try:
            p.set_shape(tensor, lo, opt, hi)  # the binding raises RuntimeError on inconsistent shapes (pyCore.cpp)
        except RuntimeError as exc:
            raise EngineBuildError(f"{plan.graph}: TensorRT refused the {name!r} profile shapes of {tensor!r} (min {lo}, opt {opt}, max {hi}): {exc}") from exc
    return p


def _add_profiles(builder, config, plan: EnginePlan) -> None:
    """One optimization profile per plan profile (checked), and for implicit INT8 a separate calibration profile."""
    for name, shapes in zip(plan.profile_names, plan.profiles):
        index = config.add_optimization_profile(_profile(builder, plan, name, shapes))
        if index < 0:  # NvInfer.h, IBuilderConfig::addOptimizationProfile: -1 if the input is not valid
            spec = "; ".join(f"{t} {lo}..{hi}" for t, (lo, _, hi) in shapes.items())
            raise EngineBuildError(
                f"{plan.graph}: TensorRT refused optimization profile {name!r} (add_optimization_profile returned {index}): {spec}.\n"
                "Hint: the ONNX inputs may not match export.json; re-export, or check the TensorRT log above."
            )
    if plan.int8_flag:
        # A profile of its own (as Polygraphy does): TensorRT overwrites a calibration profile's min and max with its
        # opt (NvInfer.h, setCalibrationProfile), which must not touch the build profiles.
        opt = {t: (o, o, o) for t, (_, o, _) in plan.profiles[0].items()}
        if not config.set_calibration_profile(_profile(builder, plan, "calibration", opt)):
            raise EngineBuildError(f"{plan.graph}: TensorRT refused the calibration profile (the opt shapes of {plan.profile_names[0]!r})")


def _attach_timing_cache(config, data: bytes, path: Path | None):
    """(timing cache for this build, the bytes it came from or b"") from `data` when TensorRT accepts it, else a fresh
    one (with a warning); (None, b"") when TensorRT cannot make one at all: the build then runs without, and later
    engines do not try again. Keep the cache alive until the build ends."""
    cache = config.create_timing_cache(data) if data else None  # nullptr (None) for data TensorRT cannot read
    if data and cache is None:
        log.warning("timing cache %s is unreadable (corrupt, or from another TensorRT version): starting a new one, saved after this engine", path)
    if cache is not None and not config.set_timing_cache(cache, False):
        log.warning("TensorRT refused timing cache %s (made on another GPU or TensorRT version): starting a new one, saved after this engine", path)
        cache = None
    if cache is not None:
        return cache, data
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        log.warning("TensorRT could not create an empty timing cache: building without a timing cache")
        return None, b""
    return cache, b""


def _timing_cache_bytes(config) -> bytes | None:
    """The build's timing cache, serialized; None (with a warning) when TensorRT has none to give (getTimingCache may
    return null): later engines then build without one."""
    cache = config.get_timing_cache()
    memory = cache.serialize() if cache is not None else None
    if memory is None:
        log.warning("TensorRT returned no timing cache after the build: building the remaining engines without one")
        return None
    return bytes(memoryview(memory))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _config(trt, builder, plan: EnginePlan, opts: BuildOptions):
    """(builder config, calibrator or None); keep the calibrator alive until the build is done."""
    config = builder.create_builder_config()
    if config is None:
        raise EngineBuildError(f"{plan.graph}: TensorRT could not create a builder config (see the TensorRT log above)")
    calibrator = None
    if opts.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    if opts.builder_level is not None:
        config.builder_optimization_level = int(opts.builder_level)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.prefer_precision:  # what trtexec sets for every DLA build on TensorRT 10 (sampleEngines.cpp, release/10.3:1129)
        config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
    if plan.int8_flag:
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _cache_calibrator(trt, Path(plan.calibration_cache).read_bytes(), plan.calibration_algorithm or "EntropyCalibration2")
        config.int8_calibrator = calibrator
    if plan.dla_core is not None:
        if builder.num_DLA_cores <= plan.dla_core:
            raise EngineBuildError(
                f"--dla-core {plan.dla_core}: this device has {builder.num_DLA_cores} DLA core(s).\n"
                "Note: DLA exists on Jetson AGX Orin / Orin NX (2 cores), not on Orin Nano, Thor or discrete GPUs."
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # full layer information for engines.json
    if plan.symbolic:
        _add_profiles(builder, config, plan)
    return config, calibrator


def _check_calibration(trt, network, plan: EnginePlan) -> None:
    _, scales = read_calibration_cache(Path(plan.calibration_cache))
    missing = uncalibrated_tensors(trt, network, scales)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise EngineBuildError(
            f"{plan.graph}: the calibration cache {plan.calibration_cache} has no scale for {len(missing)} tensor(s) that feed "
            f"INT8 matrix multiplies / convolutions of {plan.onnx.name}: {shown}.\n"
            "Note: without a scale TensorRT runs those layers in fp16/fp32, or ignores the cache and tries to calibrate without data.\n"
            "Hint: re-run `ppllava-edge quantize ... --trt-cache` from this fp32 export (quantization.source_export)."
        )


def _dla_placement(network, config, plan: EnginePlan) -> dict:
    """How many layers of the network can run on the DLA (IBuilderConfig.can_run_on_DLA); refuses none at all,
    which with GPU fallback would silently run the whole engine on the GPU."""
    on_dla, on_gpu = [], []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        (on_dla if config.can_run_on_DLA(layer) else on_gpu).append(layer.name)
    if not on_dla:
        raise EngineBuildError(
            f"{plan.graph}: none of its {len(on_gpu)} layers can run on DLA core {plan.dla_core}, so with GPU fallback the whole engine "
            "would run on the GPU.\nHint: build without --dla-core."
        )
    if on_gpu:
        log.warning("%s: %d of %d layers fall back to the GPU (DLA runs 2D convolutions, pooling and activations, not matmuls or softmax)",
                    plan.graph, len(on_gpu), len(on_dla) + len(on_gpu))
    return {"requested": plan.device, "source": "IBuilderConfig.can_run_on_DLA", "dla_layers": len(on_dla), "gpu_layers": len(on_gpu),
            "gpu_layer_names": on_gpu[:20], "layer_info": None}


def engine_placement(info: str | None) -> dict | None:
    """DLA placement of a built engine from its inspector's JSON layer information (DETAILED verbosity): layers are
    objects with "Name" and "LayerType" under "Layers" (as trex reads them: trex/parser.py:42, layer.py:35), and
    TensorRT hands each DLA subgraph over as one layer named "{ForeignNode[first...last]}" (its build log lists DLA
    layers as "[DlaLayer] {ForeignNode[...]}", samples/sampleCudla/README.md:69). None when `info` is not in that
    form. GPU subgraphs may also be foreign nodes, so `dla_subgraphs` is an upper bound; zero means no DLA at all."""
    try:
        layers = json.loads(info)["Layers"] if info else None
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, dict) and "Name" in x for x in layers):
        return None
    foreign = [x["Name"] for x in layers if str(x["Name"]).startswith("{ForeignNode[")]
    return {"source": "IEngineInspector", "dla_subgraphs": len(foreign), "other_layers": len(layers) - len(foreign), "dla_subgraph_names": foreign[:20]}


def _layer_information(trt, logger, serialized, dla_core: int | None) -> str | None:
    """The engine inspector's JSON layer information of a built engine, or None where TensorRT does not offer it
    (the inspector binding is optional in TensorRT's Python build)."""
    runtime = trt.Runtime(logger)
    if dla_core is not None:
        runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(serialized)
    inspect = getattr(engine, "create_engine_inspector", None) if engine is not None else None
    inspector = inspect() if inspect is not None else None
    if inspector is None:
        return None
    return inspector.get_engine_information(trt.LayerInformationFormat.JSON)


def build_engines(
    export_dir: str | Path,
    out_dir: str | Path,
    opts: BuildOptions | None = None,
    on_engine: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build every stage of an export folder into `out_dir` (atomically) and write engines.json.

    Raises MissingDependencyError without TensorRT / cuda-python / GPU or with mismatched CUDA majors (after checking
    the options), and EngineBuildError when TensorRT fails. `on_engine(stage)` is called before each engine is built.
    """
    from ..atomic import AtomicDir
    from .availability import require_tensorrt
    from .jetson import detect_jetson
    from .metadata import engine_entry, export_fingerprint, new_metadata, onnx_hashes, write_metadata
    from .profiles import profiles_to_json

    opts = opts or BuildOptions()
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = load_manifest(export_dir)
    limits = resolve_limits(manifest, opts.frames, opts.max_input_len, opts.max_seq_len, opts.max_batch)
    plan_build(manifest, out_dir, opts, "unknown", "unknown", limits)  # option errors before the dependency check
    if out_dir.exists() and any(out_dir.iterdir()) and not opts.force:
        raise InputError(f"{out_dir} exists and is not empty.\nHint: pass --force to replace it, or choose another folder.")

    trt, _ = require_tensorrt("Building TensorRT engines")
    from ..device import device_info

    gpu = device_info(0)  # cudart's name ("Orin" on every Jetson Orin): what `engines` and --backend trt compare with
    plans = plan_build(manifest, out_dir, opts, trt.__version__, gpu["sm"], limits)
    jetson = detect_jetson()
    if jetson and jetson.get("module"):
        gpu["module"] = jetson["module"]  # AGX Orin / Orin NX / Orin Nano: same name and SM, different GPUs
    meta = new_metadata(
        trt_version=trt.__version__,
        gpu=gpu,
        export=export_fingerprint(manifest),
        limits=limits.as_dict(),
        options={"fp16": opts.fp16, "int8": opts.int8, "workspace_mb": opts.workspace_mb, "builder_level": opts.builder_level,
                 "dla_core": opts.dla_core, "timing_cache": str(opts.timing_cache) if opts.timing_cache else None},
        jetson=jetson,
    )
    result = BuildResult(out=out_dir, metadata=meta)
    cache_bytes = b""
    if opts.timing_cache is not None and Path(opts.timing_cache).is_file():
        cache_bytes = Path(opts.timing_cache).read_bytes()
        log.info("loaded timing cache %s (%d bytes)", opts.timing_cache, len(cache_bytes))
    saved, use_timing_cache = cache_bytes, True

    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    with AtomicDir(out_dir, force=opts.force) as tmp:
        for plan in plans:
            if plan.calibration_cache is not None:  # a copy with this TensorRT's header, referenced by engines.json and trtexec
                name = f"{plan.graph}.calibration.cache"
                (tmp / name).write_text(retag_calibration_cache(Path(plan.calibration_cache).read_text(), trt.__version__))
                plan.calibration_cache = out_dir / name
        for plan in plans:
            if on_engine:
                on_engine(plan.graph)
            t0 = time.perf_counter()
            network, _parser = _parse_onnx(trt, builder, logger, plan)
            calib = plan.calibration_cache
            if calib is not None:  # read from the copy being built (out_dir does not exist until the end)
                plan.calibration_cache = tmp / Path(calib).name
                _check_calibration(trt, network, plan)
            config, calibrator = _config(trt, builder, plan, opts)
            plan.calibration_cache = calib
            timing = None
            if use_timing_cache:
                timing, cache_bytes = _attach_timing_cache(config, cache_bytes, opts.timing_cache)
                use_timing_cache = timing is not None
            placement = _dla_placement(network, config, plan) if plan.dla_core is not None else None
            serialized = builder.build_serialized_network(network, config)
            if calibrator is not None and calibrator.asked_for_data:
                raise EngineBuildError(
                    f"{plan.graph}: TensorRT did not use the calibration cache {calib} and tried to calibrate (there is no calibration data in a build).\n"
                    "Note: the log above says why (a cache for another network, TensorRT version or calibrator).\n"
                    "Hint: re-run `ppllava-edge quantize ... --trt-cache` from this fp32 export."
                )
            if serialized is None:
                raise EngineBuildError(
                    f"TensorRT could not build {plan.graph} from {plan.onnx} (see the TensorRT log above).\n"
                    "Hint: on Jetson an out-of-memory build is the usual cause: close other programs, add swap, or lower --workspace / --max-seq-len / --frames."
                )
            path = tmp / plan.engine_file
            with open(path, "wb") as f:
                f.write(memoryview(serialized))
            if placement is not None:
                info = _layer_information(trt, logger, serialized, plan.dla_core)
                if info is not None:
                    (tmp / layer_info_name(plan.graph)).write_text(info)
                    placement["layer_info"] = layer_info_name(plan.graph)
                placement["engine"] = engine_placement(info)
                if placement["engine"] is None:
                    log.warning("%s: the engine inspector gave no detailed layer information: the DLA placement of the built engine is not checked", plan.graph)
                elif placement["engine"]["dla_subgraphs"] == 0:
                    raise EngineBuildError(
                        f"{plan.graph}: TensorRT said {placement['dla_layers']} layer(s) can run on DLA core {plan.dla_core}, but the built engine "
                        f"runs none there (its layer information has no DLA subgraph; see {layer_info_name(plan.graph)} and the TensorRT log above).\n"
                        "Hint: build without --dla-core: this engine would run entirely on the GPU."
                    )
            if timing is not None:
                built_cache = _timing_cache_bytes(config)
                use_timing_cache = built_cache is not None
                cache_bytes = built_cache or cache_bytes
            if opts.timing_cache is not None and cache_bytes and cache_bytes != saved:  # after every engine: an interrupted build keeps its timings
                _write_atomic(Path(opts.timing_cache), cache_bytes)
                saved = cache_bytes
            seconds = time.perf_counter() - t0
            spec = manifest.graph(plan.source)
            built = BuiltEngine(plan, out_dir / plan.engine_file, path.stat().st_size, seconds, trtexec_command(plan, out_dir, opts, trt.__version__))
            result.engines.append(built)
            meta["engines"][plan.graph] = engine_entry(
                file=plan.engine_file,
                graph=plan.source,
                onnx=str(plan.onnx) if plan.int8_flag else spec["file"],
                onnx_sha256=onnx_hashes(plan.onnx.parent, plan.onnx.name),
                precision=plan.precision,
                strongly_typed=plan.strongly_typed,
                profiles=profiles_to_json(plan.profiles, plan.profile_names, plan.symbols),
                device=plan.device,
                placement=placement,
                size_bytes=built.size_bytes,
                build_seconds=seconds,
                trtexec=built.trtexec,
                inputs=spec["inputs"],
                outputs=spec["outputs"],
            )
            del network, config, calibrator, timing
        result.seconds = time.perf_counter() - start
        meta["build_seconds"] = round(result.seconds, 3)
        write_metadata(tmp, meta)
    return result
