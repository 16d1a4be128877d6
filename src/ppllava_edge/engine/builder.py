"""ONNX export folder -> TensorRT engines + engines.json, with the TensorRT Python API (imported lazily).

Planning is pure and tested without TensorRT: `plan_build` decides, per graph, the engine file name, precision and
typing, device and optimization profiles, and `trtexec_command` renders the equivalent trtexec command line.
`build_engines` then runs the TensorRT builder for each plan:

- the ONNX file is parsed with `OnnxParser.parse_from_file` (which resolves external data next to the file);
- fp16 exports and symmetric int8 Q/DQ graphs build as strongly typed networks (precision comes from the graph);
- the int8 graphs of `ppllava-edge quantize` (ONNX Runtime Q/DQ, uint8 asymmetric activations, which TensorRT's
  explicit quantization does not accept) build on TensorRT 10 from their fp32 source graph with BuilderFlag.INT8
  and the TensorRT calibration cache `quantize --trt-cache` wrote; TensorRT 11 refuses them (no implicit INT8);
- ONNX Runtime's weight-only MatMulNBits graphs (int4-weight / int8-weight) are refused (no TensorRT parser support);
- fp32 exports build fp32 (TF32 allowed), or with `--fp16` as a weakly typed network with BuilderFlag.FP16 on
  TensorRT 10 (TensorRT 11 removed weak typing: re-export with `--dtype fp16` instead);
- one optimization profile per graph, two for the decoder (context / generation), from `profiles.py`;
- the timing cache file is loaded before and saved after every engine;
- `--dla-core` puts the vision engine on that DLA core with GPU fallback (Jetson AGX Orin / Orin NX).

    result = build_engines("export/", "engines/", BuildOptions(fp16=True, timing_cache=Path("tc.bin")))
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, EngineBuildError, InputError
from ..manifest import ExportManifest, load_manifest
from .metadata import engine_file_name, normalize_trt_version, trt_major
from .profiles import BuildLimits, Profile, graph_profiles, is_static, resolve_limits, symbol_ranges

log = logging.getLogger(__name__)

DLA_GRAPHS = ("vision",)


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False  # fp32 exports: allow fp16 kernels (TensorRT 10 weak typing)
    int8: bool = False  # require Q/DQ (int8) graphs in the export; they always build strongly typed
    frames: tuple[int, int, int] | None = None  # MIN:OPT:MAX override (within the export's range)
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_batch: int = 1
    timing_cache: Path | None = None
    workspace_mb: int | None = None  # None: TensorRT's default (device memory)
    builder_level: int | None = None  # 0..5, None: TensorRT's default (3)
    dla_core: int | None = None
    force: bool = False
    graphs: tuple[str, ...] | None = None  # subset of the manifest's graphs (default: all)


@dataclass
class EnginePlan:
    graph: str
    onnx: Path
    engine_file: str
    precision: str  # "fp32" | "fp16" | "int8"
    strongly_typed: bool
    fp16_flag: bool  # weakly typed build with BuilderFlag.FP16 (TensorRT 10 only)
    device: str  # "gpu" | "dla:N"
    profiles: list[Profile]
    profile_names: list[str]
    int8_flag: bool = False  # implicit INT8 from a calibration cache (TensorRT 10 only)
    calibration_cache: Path | None = None
    symbols: list[dict[str, tuple[int, int, int]]] = field(default_factory=list)  # per profile: dim symbol -> (min, opt, max)

    @property
    def dynamic(self) -> bool:
        return not all(is_static(p) for p in self.profiles)


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


# ---- planning (pure) -----------------------------------------------------------------------------
def _major(trt_version: str) -> int:
    """Major TensorRT version; 'unknown' (a dry run without TensorRT) plans for TensorRT 10, JetPack 6's."""
    return 10 if trt_version == "unknown" else trt_major(trt_version)


def resolve_precision(graph_precision: str, fp16: bool, trt_version: str) -> tuple[str, bool, bool]:
    """(precision, strongly_typed, fp16_flag) of one graph.

    Q/DQ int8 and fp16 graphs carry their types: strongly typed. fp32 graphs are strongly typed fp32, or with
    `fp16` a weakly typed network with BuilderFlag.FP16 - which TensorRT >= 11 no longer has.
    """
    if graph_precision in ("int8", "fp16", "bf16", "fp8"):
        return graph_precision, True, False
    if graph_precision != "fp32":
        raise ConfigError(f"unknown graph precision {graph_precision!r} in export.json (expected fp32, fp16 or int8)")
    if not fp16:
        return "fp32", True, False
    if _major(trt_version) >= 11:
        raise EngineBuildError(
            f"--fp16 on an fp32 export needs TensorRT 10 (weakly typed networks); TensorRT {trt_version} builds strongly typed networks only.\n"
            "Hint: export in fp16 (`ppllava-edge export CHECKPOINT OUT --dtype fp16`) and build that without --fp16."
        )
    return "fp16", False, True


def is_asymmetric_qdq(spec: dict) -> bool:
    """Q/DQ graphs from `ppllava-edge quantize` (ONNX Runtime static QDQ) use uint8 asymmetric activations."""
    return "asym" in str(spec.get("quantization", {}).get("scheme", ""))


def trt_version_code(trt_version: str) -> int:
    """NV_TENSORRT_VERSION as in calibration cache headers: 8.6.1 -> 8601, 10.3.0 -> 100300."""
    major, minor, patch = (int(x) for x in normalize_trt_version(trt_version).split("."))
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


def retag_calibration_cache(text: str, trt_version: str) -> str:
    """Give a text calibration cache the header of the installed TensorRT ('TRT-100300-EntropyCalibration2').

    The per-tensor scales do not depend on the TensorRT version, but TensorRT ignores a cache whose header names
    another version (and would then try to calibrate, which needs data we do not feed).
    """
    lines = text.splitlines()
    algo = lines[0].split("-", 2)[2] if lines and lines[0].startswith("TRT-") and lines[0].count("-") >= 2 else "EntropyCalibration2"
    return "\n".join([f"TRT-{trt_version_code(trt_version)}-{algo}", *lines[1:]]) + "\n"


def implicit_int8_source(manifest: ExportManifest, graph: str, trt_version: str) -> tuple[Path, Path]:
    """(fp32 ONNX, calibration cache) for building an asymmetric-QDQ int8 graph with TensorRT 10's implicit INT8.

    TensorRT's explicit quantization takes only symmetric int8 Q/DQ (zero point 0; uint8 only on DLA), so the
    quantized graph itself cannot be built. `ppllava-edge quantize` also writes the same calibration as a TensorRT
    cache for the source fp32 graph, which TensorRT 10 consumes with BuilderFlag.INT8 (deprecated since 10.1,
    removed in 11).
    """
    spec = manifest.graph(graph)
    if _major(trt_version) >= 11:
        raise EngineBuildError(
            f"{graph}: this int8 graph is ONNX Runtime static Q/DQ with uint8 asymmetric activations, which TensorRT builds "
            f"only from its calibration cache with implicit INT8 - removed in TensorRT {trt_version}.\n"
            "Hint: build the fp16 / fp32 source export instead, or use TensorRT 10 (JetPack 6)."
        )
    cache_entry = spec.get("quantization", {}).get("trt_calibration_cache")
    if not cache_entry:
        raise EngineBuildError(
            f"{graph}: this int8 graph is uint8-asymmetric Q/DQ (not buildable by TensorRT) and the export has no TensorRT calibration cache for it.\n"
            "Hint: re-run `ppllava-edge quantize ... --trt-cache`, or build the fp32 source export."
        )
    cache = manifest.folder / cache_entry["file"]
    source = Path(manifest.data.get("quantization", {}).get("source_export", {}).get("path", "") or "<no source export recorded>")
    try:
        onnx = source / json.loads((source / "export.json").read_text())["graphs"][graph]["file"]
    except (OSError, ValueError, KeyError):
        onnx = source / f"export.json (graph {graph})"  # reported as missing below
    missing = [str(p) for p in (cache, onnx) if not p.is_file()]
    if missing:
        raise EngineBuildError(
            f"{graph}: implicit INT8 needs the fp32 source graph and its calibration cache; missing: {', '.join(missing)}.\n"
            "Hint: copy the source export (recorded in export.json: quantization.source_export.path) next to this one."
        )
    return onnx, cache


def plan_build(manifest: ExportManifest, out_dir: Path, opts: BuildOptions, trt_version: str, sm: int | str, limits: BuildLimits | None = None) -> list[EnginePlan]:
    """One EnginePlan per graph: file name, precision/typing, device, profiles. Raises on inconsistent options."""
    data = manifest.data
    limits = limits or resolve_limits(data, opts.frames, opts.max_input_len, opts.max_seq_len, opts.max_batch)
    stages = manifest.backend_graphs("trt")  # stage -> the graph TensorRT builds for it (decoder -> decoder_trt)
    names = list(opts.graphs or stages)
    unknown = [g for g in names if g not in stages]
    if unknown:
        raise InputError(f"graphs {unknown} are not in this export (it has: {', '.join(stages)})")
    for g in names:
        if data["graphs"][stages[g]].get("contract") == "gqa-inplace-v1":
            raise EngineBuildError(
                f"{g}: this export's {stages[g]}.onnx uses com.microsoft GroupQueryAttention (ONNX Runtime's in-place KV cache), "
                "which TensorRT's ONNX parser does not take, and the export has no standard-ops decoder for TensorRT.\n"
                "Hint: re-export with `ppllava-edge export CHECKPOINT OUT --tensorrt` (adds decoder_trt.onnx)."
            )
    precisions = {g: data["graphs"][stages[g]].get("precision", data.get("dtype", "fp32")) for g in names}
    if opts.int8 and not any(p == "int8" for p in precisions.values()):
        raise InputError(
            "--int8 needs a quantized (Q/DQ) export, but no graph of this export records precision int8 "
            f"({', '.join(f'{g}={p}' for g, p in precisions.items())}).\n"
            "Hint: make one with `ppllava-edge quantize` (or build this export without --int8)."
        )
    if opts.builder_level is not None and not 0 <= opts.builder_level <= 5:
        raise InputError(f"--builder-level {opts.builder_level}: must be 0..5")
    if opts.workspace_mb is not None and opts.workspace_mb <= 0:
        raise InputError(f"--workspace {opts.workspace_mb}: must be a positive number of MiB")
    profiles = graph_profiles(data, limits, names)
    plans = []
    for g in names:
        onnx, cache, int8_flag = manifest.path(stages[g]), None, False
        if precisions[g] in ("int8-weight", "int4-weight"):
            raise EngineBuildError(
                f"{g}: precision {precisions[g]} is ONNX Runtime's weight-only MatMulNBits operator, which TensorRT's ONNX parser does not implement.\n"
                "Hint: build engines from the fp32 / fp16 export (or an int8 Q/DQ one); keep MatMulNBits exports for `ppllava-edge ask`."
            )
        if precisions[g] == "int8" and is_asymmetric_qdq(data["graphs"][stages[g]]):
            onnx, cache = implicit_int8_source(manifest, stages[g], trt_version)
            precision, strongly, fp16_flag, int8_flag = "int8", False, opts.fp16, True
        else:
            precision, strongly, fp16_flag = resolve_precision(precisions[g], opts.fp16, trt_version)
        device = "gpu"
        if opts.dla_core is not None and g in DLA_GRAPHS:
            if opts.dla_core < 0:
                raise InputError(f"--dla-core {opts.dla_core}: must be >= 0")
            if precision == "fp32":
                raise InputError(
                    "--dla-core needs an fp16 or int8 vision graph (DLA has no fp32).\n"
                    "Hint: add --fp16 (TensorRT 10) or export with --dtype fp16."
                )
            device = f"dla:{opts.dla_core}"
        plans.append(
            EnginePlan(
                graph=g,
                onnx=onnx,
                engine_file=engine_file_name(g, trt_version, sm),
                precision=precision,
                strongly_typed=strongly,
                fp16_flag=fp16_flag,
                device=device,
                profiles=profiles[g],
                profile_names=[n for n, _ in symbol_ranges(g, data, limits)],
                symbols=[r for _, r in symbol_ranges(g, data, limits)],
                int8_flag=int8_flag,
                calibration_cache=cache,
            )
        )
    return plans


def shape_spec(profile: Profile, which: int) -> str:
    """trtexec shape spec of one profile corner: 'pixel_values:8x3x84x84,keys:288x32' (which: 0 min, 1 opt, 2 max)."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}" for name, shapes in profile.items())


def trtexec_command(plan: EnginePlan, out_dir: Path, opts: BuildOptions, trt_version: str) -> str:
    """The trtexec command line that builds the same engine as `build_engines` (one shape-flag group per profile)."""
    major = _major(trt_version)
    args = ["trtexec", f"--onnx={plan.onnx}", f"--saveEngine={Path(out_dir) / plan.engine_file}"]
    if plan.strongly_typed and major < 11:
        args.append("--stronglyTyped")
    if plan.fp16_flag:
        args.append("--fp16")
    if plan.int8_flag:
        args += ["--int8", f"--calib={plan.calibration_cache}"]
    if plan.dynamic:
        for prof in plan.profiles:
            args += [f"--minShapes={shape_spec(prof, 0)}", f"--optShapes={shape_spec(prof, 1)}", f"--maxShapes={shape_spec(prof, 2)}"]
    if opts.workspace_mb is not None:
        args.append(f"--memPoolSize=workspace:{opts.workspace_mb}M")
    if opts.builder_level is not None:
        args.append(f"--builderOptimizationLevel={opts.builder_level}")
    if opts.timing_cache is not None:
        args.append(f"--timingCacheFile={opts.timing_cache}")
    if plan.device.startswith("dla:"):
        args += [f"--useDLACore={plan.device.split(':')[1]}", "--allowGPUFallback"]
    args.append("--skipInference")
    return " ".join(shlex.quote(a) for a in args)


# ---- building (TensorRT) ---------------------------------------------------------------------------
def _network_flags(trt, strongly_typed: bool) -> int:
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(flag)) if (strongly_typed and flag is not None) else 0


def _parse_onnx(trt, builder, logger, plan: EnginePlan):
    network = builder.create_network(_network_flags(trt, plan.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(plan.onnx)):  # resolves external data relative to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{plan.onnx}: TensorRT's ONNX parser failed: {errors or 'no details'}")
    return network, parser


def _config(trt, builder, plan: EnginePlan, opts: BuildOptions, cache_bytes: bytes):
    """(builder config, calibrator or None); the caller keeps the calibrator alive until the build is done."""
    config = builder.create_builder_config()
    calibrator = None
    if opts.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    if opts.builder_level is not None:
        config.builder_optimization_level = int(opts.builder_level)
    if plan.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.int8_flag:
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _cache_calibrator(trt, Path(plan.calibration_cache).read_bytes())
        config.int8_calibrator = calibrator
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    if plan.device.startswith("dla:"):
        core = int(plan.device.split(":")[1])
        if builder.num_DLA_cores <= core:
            raise EngineBuildError(
                f"--dla-core {core}: this device has {builder.num_DLA_cores} DLA core(s).\n"
                "Note: DLA exists on Jetson AGX Orin / Orin NX (2 cores), not on Orin Nano, Thor or discrete GPUs."
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if plan.dynamic:
        for i, prof in enumerate(plan.profiles):
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in prof.items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
            if plan.int8_flag and i == 0:
                config.set_calibration_profile(p)
    return config, calibrator


def _cache_calibrator(trt, cache: bytes):
    """An entropy calibrator that only serves a calibration cache (created at call time, as Polygraphy does)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # no data: TensorRT must take every scale from the cache
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data) -> None:
            return None

    return CacheCalibrator()


def build_engines(
    export_dir: str | Path,
    out_dir: str | Path,
    opts: BuildOptions | None = None,
    on_engine: Callable[[str], None] | None = None,
) -> BuildResult:
    """Build every graph of an export folder into `out_dir` (atomically) and write engines.json.

    Raises MissingDependencyError without TensorRT / cuda-python / GPU (after checking the options), and
    EngineBuildError when TensorRT fails. `on_engine(graph)` is called before each engine is built.
    """
    from ..atomic import AtomicDir
    from .availability import require_tensorrt
    from .jetson import detect_jetson
    from .metadata import engine_entry, export_fingerprint, new_metadata, onnx_hashes, write_metadata
    from .profiles import profiles_to_json

    opts = opts or BuildOptions()
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    manifest = load_manifest(export_dir)
    limits = resolve_limits(manifest.data, opts.frames, opts.max_input_len, opts.max_seq_len, opts.max_batch)
    plan_build(manifest, out_dir, opts, "10.0.0", "unknown", limits)  # option errors before the dependency check
    if out_dir.exists() and any(out_dir.iterdir()) and not opts.force:
        raise InputError(f"{out_dir} exists and is not empty.\nHint: pass --force to replace it, or choose another folder.")

    trt, _ = require_tensorrt("Building TensorRT engines")
    from ..runtime.cuda import device_info

    gpu = device_info(0)
    plans = plan_build(manifest, out_dir, opts, trt.__version__, gpu["sm"], limits)
    jetson = detect_jetson()
    meta = new_metadata(
        trt_version=trt.__version__,
        gpu=gpu,
        export=export_fingerprint(export_dir, manifest.data),
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
            config, calibrator = _config(trt, builder, plan, opts, cache_bytes)
            plan.calibration_cache = calib
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise EngineBuildError(
                    f"TensorRT could not build {plan.graph} from {plan.onnx} (see the TensorRT log above).\n"
                    "Hint: on Jetson an out-of-memory build is the usual cause: close other programs, add swap, or lower --workspace / --max-seq-len / --frames."
                )
            path = tmp / plan.engine_file
            with open(path, "wb") as f:
                f.write(memoryview(serialized))
            cache_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
            if opts.timing_cache is not None:  # saved after every engine so an interrupted build keeps its timings
                Path(opts.timing_cache).parent.mkdir(parents=True, exist_ok=True)
                Path(opts.timing_cache).write_bytes(cache_bytes)
            seconds = time.perf_counter() - t0
            spec = manifest.graph(manifest.graph_for(plan.graph, "trt"))
            built = BuiltEngine(plan, out_dir / plan.engine_file, path.stat().st_size, seconds, trtexec_command(plan, out_dir, opts, trt.__version__))
            result.engines.append(built)
            meta["engines"][plan.graph] = engine_entry(
                file=plan.engine_file,
                onnx=str(plan.onnx) if plan.int8_flag else spec["file"],
                onnx_sha256=onnx_hashes(plan.onnx.parent, plan.onnx.name),
                precision=plan.precision,
                strongly_typed=plan.strongly_typed,
                profiles=profiles_to_json(plan.profiles, plan.profile_names, plan.symbols),
                device=plan.device,
                size_bytes=built.size_bytes,
                build_seconds=seconds,
                trtexec=built.trtexec,
                inputs=spec["inputs"],
                outputs=spec["outputs"],
            )
            del network, config, calibrator
        result.seconds = time.perf_counter() - start
        meta["build_seconds"] = round(result.seconds, 3)
        write_metadata(tmp, meta)
    return result
