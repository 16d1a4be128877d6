"""ONNX export folder -> TensorRT engines + engines.json, with the TensorRT Python API (imported lazily).

Planning is pure and tested without TensorRT: `plan_build` decides, per stage, which graph of the export TensorRT
builds (export.json `backends.trt`, e.g. a standard-ops `decoder_trt` next to ONNX Runtime's fused decoder; engines
keep the stage names), the engine file name, precision and typing, device and optimization profiles, and
`trtexec_command` renders the equivalent trtexec command line. `build_engines` then runs the TensorRT builder for
each plan:

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
import math
import os
import re
import shlex
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, EngineBuildError, InputError
from ..manifest import ExportManifest, load_manifest
from .metadata import engine_file_name, normalize_trt_version, trt_major
from .profiles import BuildLimits, Profile, dim_symbols, graph_profiles, is_static, resolve_limits, symbol_ranges

log = logging.getLogger(__name__)

DLA_GRAPHS = ("vision",)
# calibration-cache header algorithm -> the TensorRT 10 calibrator class that accepts it (a cache whose algorithm
# does not match the calibrator is not used: pyInt8Doc.h, read_calibration_cache)
CALIBRATORS = {"EntropyCalibration2": "IInt8EntropyCalibrator2", "MinMaxCalibration": "IInt8MinMaxCalibrator"}
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


def read_calibration_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(algorithm, {tensor: scale}) of a TensorRT text calibration cache, or EngineBuildError saying what is wrong.

    Format: a header 'TRT-<version>-<algorithm>' (e.g. TRT-100300-EntropyCalibration2), then one
    '<tensor>: <8 hex digits of the big-endian float32 scale>' line per tensor. TensorRT does not use a cache whose
    header names another version or calibrator (pyInt8Doc.h, read_calibration_cache) and would then calibrate, which
    needs data the build does not have: so the header and every line are checked here, before anything is built.
    """
    hint = "Hint: re-run `ppllava-edge quantize ... --trt-cache` to write it again."
    try:
        lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    except OSError as exc:
        raise EngineBuildError(f"{path}: cannot read the calibration cache ({exc}).\n{hint}") from exc
    m = re.fullmatch(r"TRT-(\d+)-(\w+)", lines[0].strip()) if lines else None
    if m is None:
        raise EngineBuildError(
            f"{path}: not a TensorRT calibration cache (first line {lines[0][:60] if lines else ''!r}; expected 'TRT-<version>-<algorithm>', "
            f"e.g. TRT-100300-EntropyCalibration2).\n{hint}"
        )
    algorithm = m.group(2)
    if algorithm not in CALIBRATORS:
        raise EngineBuildError(
            f"{path}: calibration algorithm {algorithm!r} in the header; the builder serves caches of {', '.join(CALIBRATORS)} "
            f"(TensorRT ignores a cache whose algorithm differs from its calibrator's).\n{hint}"
        )
    scales: dict[str, float] = {}
    bad = []
    for number, line in enumerate(lines[1:], 2):
        name, sep, value = line.rpartition(":")  # tensor names may hold ':' ('onnx::MatMul_12'); the scale is last
        value = value.strip()
        scale = None
        if sep and name.strip() and re.fullmatch(r"[0-9a-fA-F]{8}", value):
            scale = struct.unpack(">f", bytes.fromhex(value))[0]
        if scale is None or not math.isfinite(scale) or scale <= 0:
            bad.append(f"line {number}: {line.strip()[:60]!r}")
        else:
            scales[name.strip()] = scale
    if bad:
        raise EngineBuildError(f"{path}: {len(bad)} line(s) are not '<tensor>: <hex float32 scale>' with a positive scale: {'; '.join(bad[:3])}.\n{hint}")
    if not scales:
        raise EngineBuildError(f"{path}: the calibration cache holds no tensor scales.\n{hint}")
    return algorithm, scales


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
    data = manifest.data
    limits = limits or resolve_limits(data, opts.frames, opts.max_input_len, opts.max_seq_len, opts.max_batch)
    stages = manifest.backend_graphs("trt")  # stage -> graph TensorRT builds (export.json `backends`)
    names = list(opts.graphs or stages)
    unknown = [g for g in names if g not in stages]
    if unknown:
        raise InputError(f"graphs {unknown} are not in this export (it has: {', '.join(stages)})")
    refused = []  # every graph TensorRT's parser cannot take, in one error
    for g in names:
        if data["graphs"][stages[g]].get("contract") == "gqa-inplace-v1":
            refused.append(
                f"{g}: this export's {stages[g]}.onnx uses com.microsoft GroupQueryAttention (ONNX Runtime's in-place KV cache), "
                "which TensorRT's ONNX parser does not take, and the export has no standard-ops decoder for TensorRT.\n"
                "Hint: re-export with `ppllava-edge export CHECKPOINT OUT --tensorrt` (adds decoder_trt.onnx)."
            )
        elif "ONNX Runtime only" in data["graphs"][stages[g]].get("ops", ""):  # e.g. the fused vision graph
            refused.append(
                f"{g}: this export's {stages[g]}.onnx uses com.microsoft operators ({data['graphs'][stages[g]]['ops']}), which "
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
    profiles = graph_profiles(data, limits, names, sources, static_frames=on_dla)
    plans = []
    for g in names:
        src = sources[g]
        spec = data["graphs"][src]
        check_io_dtypes(g, src, spec)
        onnx, cache, int8_flag, algorithm = manifest.path(src), None, False, None
        dq_weights = "DequantizeLinear" in str(spec.get("quantization", {}).get("scheme", ""))
        if precisions[g] in ("int8-weight", "int4-weight") and dq_weights:
            # weight-only DequantizeLinear weights (calibration/weight_dq.py): the activations keep the export's dtype
            act, strongly, fp16_flag = resolve_precision(data.get("dtype", "fp32"), opts.fp16, trt_version)
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
        ranges = symbol_ranges(g, data, limits, g in on_dla)
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


def _cache_calibrator(trt, cache: bytes, algorithm: str):
    """A calibrator that only serves a calibration cache (created at call time, as Polygraphy does), of the class
    the cache's header names. `asked_for_data` records whether TensorRT ignored the cache and tried to calibrate."""
    base = getattr(trt, CALIBRATORS[algorithm])

    class CacheCalibrator(base):  # type: ignore[misc, valid-type]
        asked_for_data = False

        def __init__(self) -> None:
            base.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names):  # no data: TensorRT must take every scale from the cache
            CacheCalibrator.asked_for_data = True
            return None

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data) -> None:
            return None

    return CacheCalibrator()


def uncalibrated_tensors(trt, network, scales: dict[str, float]) -> list[str]:
    """Activations feeding the network's matrix multiplies and convolutions (the layers implicit INT8 is for) that
    the calibration cache has no scale for. Inputs are followed back through shuffles the ONNX parser inserts;
    weights (constant layers) need no scale, and TensorRT-internal tensors ('(Unnamed Layer* 7) ...'), which no
    ONNX-side calibration can name, are left to TensorRT (it warns and runs their layers in higher precision)."""
    producer = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    targets = (trt.LayerType.MATRIX_MULTIPLY, trt.LayerType.CONVOLUTION)
    missing: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type not in targets:
            continue
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            name = tensor.name if tensor is not None else None
            while name is not None and name not in scales:
                src = producer.get(name)
                if src is None or src.type != trt.LayerType.SHUFFLE or src.get_input(0) is None:
                    break
                name = src.get_input(0).name
            if name is None or name in scales or name.startswith("(Unnamed Layer"):
                continue
            src = producer.get(name)
            if src is not None and src.type == trt.LayerType.CONSTANT:
                continue
            if name not in missing:
                missing.append(name)
    return missing


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
    limits = resolve_limits(manifest.data, opts.frames, opts.max_input_len, opts.max_seq_len, opts.max_batch)
    plan_build(manifest, out_dir, opts, "unknown", "unknown", limits)  # option errors before the dependency check
    if out_dir.exists() and any(out_dir.iterdir()) and not opts.force:
        raise InputError(f"{out_dir} exists and is not empty.\nHint: pass --force to replace it, or choose another folder.")

    trt, _ = require_tensorrt("Building TensorRT engines")
    from ..runtime.cuda import device_info

    gpu = device_info(0)  # cudart's name ("Orin" on every Jetson Orin): what `engines` and --backend trt compare with
    plans = plan_build(manifest, out_dir, opts, trt.__version__, gpu["sm"], limits)
    jetson = detect_jetson()
    if jetson and jetson.get("module"):
        gpu["module"] = jetson["module"]  # AGX Orin / Orin NX / Orin Nano: same name and SM, different GPUs
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
