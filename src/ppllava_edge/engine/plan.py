"""Build planning (pure, tested without TensorRT): `plan_build` decides, per stage, which graph of the export TensorRT
builds (export.json `backends.trt`, e.g. a standard-ops `decoder_trt` next to ONNX Runtime's fused decoder; engines
keep the stage names), the engine file name, precision and typing, device and optimization profiles, and
`trtexec_command` renders the equivalent trtexec command line. `build.py` runs the plans.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, EngineBuildError, InputError
from ..manifest import ExportManifest
from .calibration_cache import read_calibration_cache
from .metadata import engine_file_name, normalize_trt_version, trt_major
from .profiles import BuildLimits, Profile, dim_symbols, graph_profiles, is_static, resolve_limits, symbol_ranges

DLA_GRAPHS = ("vision",)
# numpy dtype names (export.json) of types numpy has no native equivalent for; TensorRT's own trt.nptype maps
# neither bf16 nor fp8 (python/packaging/bindings_wheel/tensorrt/__init__.py, nptype)
NUMPY_LESS_DTYPES = ("bfloat16", "float8", "float4", "int4", "uint4")
MIN_SM = {"bf16": 80, "fp8": 89}  # bf16 kernels need Ampere (sm80) or newer, fp8 Ada / Hopper (sm89) or newer


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
    prefer_precision: bool = False  # BuilderFlag.PREFER_PRECISION_CONSTRAINTS (DLA on TensorRT 10, as trtexec sets it)
    calibration_cache: Path | None = None
    symbols: list[dict[str, tuple[int, int, int]]] = field(default_factory=list)  # per profile: dim symbol -> (min, opt, max)
    source: str = ""  # the export's graph built for this stage (export.json backends.trt; default: the stage itself)
    symbolic: bool = True  # the ONNX inputs have named (runtime) dims: TensorRT needs optimization profiles
    calibration_algorithm: str | None = None  # header algorithm of the calibration cache (CALIBRATORS)

    def __post_init__(self) -> None:
        self.source = self.source or self.graph

    @property
    def dynamic(self) -> bool:
        return not all(is_static(p) for p in self.profiles)

    @property
    def dla_core(self) -> int | None:
        return int(self.device.split(":")[1]) if self.device.startswith("dla:") else None


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
    source = Path(manifest.quantization.get("source_export", {}).get("path", "") or "<no source export recorded>")
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


def dla_unavailable(trt_version: str) -> str | None:
    """Why this TensorRT cannot build for DLA, or None. TensorRT 10.7 was the last 10.x release with DLA; 11.0-11.3
    have none and 11.4.0 only on Windows on ARM; 11.4.1 brings it back on Jetson AGX Orin with JetPack 7.2.2+
    (strongly typed networks only). 'unknown' (a dry run) plans for JetPack 6's TensorRT 10.3."""
    if trt_version == "unknown":
        return None
    major, minor, patch = (int(x) for x in normalize_trt_version(trt_version).split("."))
    if major == 10 and minor > 7:
        return f"TensorRT {trt_version} has no DLA support (10.7 was the last 10.x release with DLA; JetPack 6 ships 10.3)"
    if major == 11 and (minor, patch) < (4, 1):
        return f"TensorRT {trt_version} has no DLA support on Jetson (DLA returns in 11.4.1 on Jetson AGX Orin with JetPack 7.2.2+)"
    if major < 10:
        return f"TensorRT {trt_version} is older than the TensorRT 10 API this builder uses"
    return None


def _check_dla(opts: BuildOptions, limits: BuildLimits, trt_version: str) -> None:
    if opts.dla_core is None:
        return
    if opts.dla_core < 0:
        raise InputError(f"--dla-core {opts.dla_core}: must be >= 0")
    reason = dla_unavailable(trt_version)
    if reason:
        raise EngineBuildError(f"--dla-core: {reason}.\nHint: build without --dla-core (the vision engine then runs on the GPU).")
    fmin, fopt, fmax = limits.frames
    if not fmin == fopt == fmax:
        raise InputError(
            f"--dla-core needs one frame count: DLA has no dynamic shapes (a profile's min, opt and max must be equal), "
            f"but --frames is {fmin}:{fopt}:{fmax}.\n"
            f"Hint: add --frames N:N:N with the frame count you will ask with, e.g. --frames {fopt}:{fopt}:{fopt}.\n"
            "Note: images (one tile) then need a GPU vision engine: build a second folder without --dla-core."
        )


def dla_precision(stage: str, graph_precision: str, precision: str, strongly: bool, fp16_flag: bool, int8_flag: bool, trt_version: str) -> tuple[str, bool, bool]:
    """(precision, strongly_typed, fp16_flag) of a DLA engine. DLA runs fp16 and int8, never fp32.

    TensorRT 10 (<= 10.7): as trtexec --useDLACore (sampleEngines.cpp, release/10.3:1123-1147): weakly typed with
    PREFER_PRECISION_CONSTRAINTS and FP16, or INT8 (and FP16 only with --fp16) for an implicit-INT8 graph; so the
    fp32 graph is built, and a strongly typed (fp16 / Q/DQ) export is refused: TensorRT 10 rejects FP16 / INT8 flags
    on strongly typed networks (NVIDIA/TensorRT#4228, #4253). TensorRT >= 11.4.1: strongly typed only, so the graph
    must be fp16 or int8.
    """
    if _major(trt_version) >= 11:
        if graph_precision == "fp32":
            raise InputError(
                f"--dla-core on TensorRT {trt_version} builds strongly typed networks only, and DLA has no fp32: {stage} needs an fp16 graph.\n"
                "Hint: export with --dtype fp16 and build that with --dla-core."
            )
        return precision, strongly, False
    if int8_flag:
        return precision, False, fp16_flag
    if strongly and graph_precision != "fp32":
        raise InputError(
            f"--dla-core on TensorRT 10 needs an fp32 export: DLA engines are built from the fp32 graph with the FP16 flag (as "
            f"`trtexec --useDLACore` does), and TensorRT 10 rejects precision flags on this export's strongly typed {graph_precision} graph.\n"
            "Hint: export without --dtype fp16 (fp32, the default) and build that with --dla-core; the vision engine is built fp16 for the DLA."
        )
    return "fp16", False, True


def check_io_dtypes(stage: str, graph: str, spec: dict) -> None:
    """Refuse a graph whose inputs or outputs are bf16 / fp8 / 4-bit: the engine would build, then fail to load."""
    bad = [f"{io['name']} ({io['dtype']})" for io in (*spec["inputs"], *spec["outputs"]) if str(io.get("dtype", "")).startswith(NUMPY_LESS_DTYPES)]
    if bad:
        raise EngineBuildError(
            f"{stage}: graph {graph!r} has inputs/outputs numpy cannot hold: {', '.join(bad)}.\n"
            "Note: the TensorRT backend feeds and reads numpy arrays (TensorRT's own trt.nptype has no bf16 or fp8 either), "
            "so such an engine would build and then fail to load.\n"
            "Hint: export with --dtype fp16 or fp32 (bf16 / fp8 inside a graph is fine; its inputs and outputs must be fp16, fp32 or integer)."
        )


def _check_precision_sm(stage: str, precision: str, sm: int | str) -> None:
    need = MIN_SM.get(precision)
    if need is not None and str(sm).isdigit() and int(sm) < need:
        raise EngineBuildError(f"{stage}: {precision} kernels need a GPU of sm{need} or newer; this one is sm{sm}.\nHint: build an fp16 export instead.")


def plan_build(manifest: ExportManifest, out_dir: Path, opts: BuildOptions, trt_version: str, sm: int | str, limits: BuildLimits | None = None) -> list[EnginePlan]:
    """One EnginePlan per stage: the graph TensorRT builds for it, file name, precision/typing, device, profiles.
    Raises on inconsistent options, before anything needs TensorRT."""
    limits = limits or resolve_limits(manifest, opts.frames, opts.max_input_len, opts.max_seq_len, opts.max_batch)
    stages = manifest.backend_graphs("trt")  # stage -> graph TensorRT builds (export.json `backends`)
    names = list(opts.graphs or stages)
    unknown = [g for g in names if g not in stages]
    if unknown:
        raise InputError(f"graphs {unknown} are not in this export (it has: {', '.join(stages)})")
    refused = []  # every graph TensorRT's parser cannot take, in one error
    for g in names:
        entry = manifest.graph(stages[g])
        if entry.get("contract") == "gqa-inplace-v1":
            refused.append(
                f"{g}: this export's {stages[g]}.onnx uses com.microsoft GroupQueryAttention (ONNX Runtime's in-place KV cache), "
                "which TensorRT's ONNX parser does not take, and the export has no standard-ops decoder for TensorRT.\n"
                "Hint: re-export with `ppllava-edge export CHECKPOINT OUT --tensorrt` (adds decoder_trt.onnx)."
            )
        elif "ONNX Runtime only" in entry.get("ops", ""):  # e.g. the fused vision graph
            refused.append(
                f"{g}: this export's {stages[g]}.onnx uses com.microsoft operators ({entry['ops']}), which "
                f"TensorRT's ONNX parser does not take, and the export has no standard-ops {g} graph for TensorRT.\n"
                f"Hint: re-export with `ppllava-edge export CHECKPOINT OUT --tensorrt` (adds {g}_trt.onnx)."
            )
    if refused:
        raise EngineBuildError("\n".join(refused))
    sources = {g: stages[g] for g in names}
    precisions = {g: manifest.precision(sources[g]) for g in names}
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
    _check_dla(opts, limits, trt_version)
    on_dla = tuple(g for g in names if opts.dla_core is not None and g in DLA_GRAPHS)
    profiles = graph_profiles(manifest, limits, names, sources, static_frames=on_dla)
    plans = []
    for g in names:
        src = sources[g]
        spec = manifest.graph(src)
        check_io_dtypes(g, src, spec)
        onnx, cache, int8_flag, algorithm = manifest.path(src), None, False, None
        dq_weights = "DequantizeLinear" in str(spec.get("quantization", {}).get("scheme", ""))
        if precisions[g] in ("int8-weight", "int4-weight") and dq_weights:
            # weight-only DequantizeLinear weights (calibration/weight_dq.py): the activations keep the export's dtype
            act, strongly, fp16_flag = resolve_precision(manifest.dtype, opts.fp16, trt_version)
            precision = f"{precisions[g]}+{act}"
        elif precisions[g] in ("int8-weight", "int4-weight"):
            raise EngineBuildError(
                f"{g}: precision {precisions[g]} is ONNX Runtime's weight-only MatMulNBits operator, which TensorRT's ONNX parser does not implement.\n"
                "Hint: build engines from the fp32 / fp16 export (or an int8 Q/DQ one); keep MatMulNBits exports for `ppllava-edge ask`."
            )
        elif precisions[g] == "int8" and is_asymmetric_qdq(spec):
            onnx, cache = implicit_int8_source(manifest, src, trt_version)
            algorithm = read_calibration_cache(cache)[0]
            precision, strongly, fp16_flag, int8_flag = "int8", False, opts.fp16, True
        else:
            precision, strongly, fp16_flag = resolve_precision(precisions[g], opts.fp16, trt_version)
        _check_precision_sm(g, precision, sm)
        device, prefer = "gpu", False
        if g in on_dla:
            precision, strongly, fp16_flag = dla_precision(g, precisions[g], precision, strongly, fp16_flag, int8_flag, trt_version)
            device, prefer = f"dla:{opts.dla_core}", not strongly
        ranges = symbol_ranges(g, manifest, limits, g in on_dla)
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
                profile_names=[n for n, _ in ranges],
                symbols=[r for _, r in ranges],
                int8_flag=int8_flag,
                prefer_precision=prefer,
                calibration_cache=cache,
                source=src,
                symbolic=any(dim_symbols(d) for i in spec["inputs"] for d in i["dims"]),
                calibration_algorithm=algorithm,
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
    if plan.prefer_precision:
        args.append("--precisionConstraints=prefer")
    if plan.int8_flag:
        args += ["--int8", f"--calib={plan.calibration_cache}"]
    if plan.symbolic:  # named dims in the ONNX need shapes, also when the profile is static (DLA)
        for prof in plan.profiles:
            args += [f"--minShapes={shape_spec(prof, 0)}", f"--optShapes={shape_spec(prof, 1)}", f"--maxShapes={shape_spec(prof, 2)}"]
    if opts.workspace_mb is not None:
        args.append(f"--memPoolSize=workspace:{opts.workspace_mb}M")
    if opts.builder_level is not None:
        args.append(f"--builderOptimizationLevel={opts.builder_level}")
    if opts.timing_cache is not None:
        args.append(f"--timingCacheFile={opts.timing_cache}")
    if plan.dla_core is not None:
        args += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback", "--profilingVerbosity=detailed",
                 f"--exportLayerInfo={Path(out_dir) / layer_info_name(plan.graph)}"]
    args.append("--skipInference")
    return " ".join(shlex.quote(a) for a in args)


def layer_info_name(graph: str) -> str:
    return f"{graph}.layers.json"
