"""Quantize an fp32 export folder into a complete export folder Q, then gate it on accuracy.

    result = quantize_export("export/", "calib/", "export-int8/", vision="int8", pool="int8", llm="int4-weight")
    print(result.report.passed, result.folder)

Per graph (`export.json` records the precision of each graph and a `quantization` block; `ask` runs Q unchanged):

- ``int8`` (vision, prompt_pool/image_pool, TensorRT's decoder_trt): static QDQ from the CALIB feeds. Activations uint8 asymmetric,
  weights int8 symmetric per channel. By default (``op_types="weights"``) only MatMul/Gemm/Conv nodes with a
  constant weight operand are quantized: LayerNorm, Softmax, residual Adds, attention Q·Kᵀ / P·V and, in the pools,
  the relevance path (the whole CLIP text branch up to keys · text, the softmaxes, the weighted pooling ``w @ v``)
  stay float, so a pool's int8 nodes are those of the visual side (see `_relevance_nodes`). ``op_types="matmul"``
  also quantizes activation×activation MatMuls of vision and decoder (the pools stay weights-only).
  ``op_types="all"`` is ORT's default (every quantizable op type, Softmax/Add/... included): it exists to show the
  accuracy gate failing; do not ship it.
- ``int8-weight`` / ``int4-weight`` (decoder): weight-only ``MatMulNBits`` (blocks of ``block_size`` along K,
  ``accuracy_level`` 4 = int8 activations inside the kernel), no calibration needed. int8 blocks are symmetric; int4
  blocks are asymmetric min/max by default (``minmax_blocks``: float zero points, llama.cpp's Q4_1 grid, computed
  as zero points 0 plus a block-sum correction, ``_zero_point_correction``, on ONNX Runtime's fast kernel). The default
  (``llm="auto"``) is int8-weight. Static int8 on this decoder is refused (``STATIC_INT8_DECODER``): ONNX Runtime
  leaves its activations float and dequantizes every weight at every step, ~100x slower than fp32.
  decoder_trt gets the same mode as standard ``DequantizeLinear`` weights (``weight_dq.py``), or static int8
  with ``llm_trt="int8"``.
- ``fp16`` (vision): ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)``; I/O stays
  float32. ORT CPU has few fp16 kernels and inserts Casts, so this is a size / GPU format, not a CPU speed-up.
- ``fp32``: the graph file is copied. ``projector_head`` (the no-pooling baseline graph) is always copied.

Accuracy gate (written to ``Q/accuracy.json``), on the held-out CALIB samples (all samples if CALIB has none):

- vision, prompt_pool, image_pool: per output, the minimum over samples of the cosine to the fp32 export
  (gated, default ≥ 0.99) and the maximum |difference| (reported). Pools get fp32 inputs, so each graph is judged
  on its own; the row ``pipeline`` reports Q-vision → Q-pool against fp32 for information.
- decoder (the graph returns only the last position's logits, so "all positions" are reached by re-running):
  ``logits cosine`` — min cosine of the last-position logits over the held-out prefill and decode-step feeds
  (gated, ≥ 0.98); ``top-1 prefill positions`` — top-1 agreement at ``prefill_positions`` cut points of each
  held-out prompt (each cut is one prefill of that prefix, so every position is compared on identical inputs;
  gated, ≥ 0.60); ``top-1 decode`` — teacher forcing: the fp32 greedy continuation is fed to both exports for
  ``greedy_tokens`` steps and the argmax compared at each step (gated, ≥ 0.60); ``greedy`` — the full pipeline
  (Q vision → Q pool → Q decoder vs all-fp32) generates ``greedy_tokens`` tokens; the value is the mean fraction
  of tokens before the first divergence (reported; gated only if ``Thresholds.greedy`` is set).

  Why these decoder numbers: the presets have random weights, whose next-token distribution is nearly uniform
  (max probability ≈ 0.0004 over 32k tokens on tiny; top-1/top-2 logit gaps ≈ 0.1–0.2 against a logit std of
  0.65), so a logit error of a few percent flips near-ties. Measured: default int8 → logits cosine 0.996 (tiny) /
  0.986 (small), top-1 0.72–0.94; ``op_types="all"`` → cosine 0.87, top-1 0.38. 0.98 / 0.60 separate these.
  For a trained checkpoint, whose logits are peaked, raise top-1 to ≈ 0.9 and logits cosine to 0.99
  (``Thresholds`` / ``--min-top1`` / ``--min-logits-cosine``).

Below a threshold, `quantize_export` raises AccuracyError (nothing is written to `out`) unless `accept_degraded`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..atomic import AtomicDir
from ..errors import AccuracyError, CalibrationError, InputError
from ..external_data import ExternalData, external_files, read_initializer
from ..memory import StepRecorder, trim_heap
from ..integrity import WEIGHTS_KEY, file_digests
from ..manifest import MANIFEST_NAME, load_manifest
from ..runtime.decoder import adapt_feed
from .readers import CalibrationSet, histogram_shape_fix, load_calibration, make_reader
from .weight_algorithms import ALGORITHMS, check_algorithm, collect_hessians, refine_packed, unpack_zero_points

log = logging.getLogger(__name__)

VISION_PRECISIONS = ("int8", "fp16", "fp32")
POOL_PRECISIONS = ("int8", "fp32")
LLM_PRECISIONS = ("auto", "int8-weight", "int4-weight", "fp32")  # the ONNX Runtime decoder ("int8": refused, see STATIC_INT8_DECODER)
LLM_TRT_PRECISIONS = ("auto", "int8", "int8-weight", "int4-weight", "fp32")  # TensorRT's decoder_trt
ACCURACY_LEVEL = {8: 4, 4: 4}  # MatMulNBits accuracy_level per bit width when not given (README: measured on SmolLM2)
ASYMMETRIC = {8: False, 4: True}  # min/max blocks per bit width when not given (int4 b32 on SmolLM2: +2.0 % vs +62.6 %)
WEIGHT_ALGORITHM = {8: "rtn", 4: "rtn"}  # --weight-algorithm auto per bit width (README "Quantization quality on trained weights")
AUTO_LLM = "int8-weight"  # --llm auto: passes the trained-LLM gate with margin and decodes faster than fp32 (README)
STATIC_INT8_DECODER = (
    "--llm int8 (static Q/DQ) is not offered for ONNX Runtime's decoder: ONNX Runtime leaves its activations float and "
    "dequantizes every weight at every step (1.47 s per token against ~15 ms for fp32, README \"Quantization quality on "
    "trained weights\").\nHint: use --llm int8-weight (MatMulNBits: int8 weights, faster than fp32) or int4-weight; "
    "static INT8 with a TensorRT calibration cache stays available for TensorRT's decoder: --llm-trt int8 --trt-cache.")
METHODS = ("minmax", "percentile", "entropy")
OP_TYPES = ("weights", "matmul", "all")
ACCURACY_NAME = "accuracy.json"
TRT_CACHE_HEADER = "TRT-8601-EntropyCalibration2"
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
_POOLS = ("prompt_pool", "image_pool")


@dataclass(frozen=True)
class Thresholds:
    """Gate thresholds. None = reported only. The defaults suit the random-weight presets; `TRAINED` (chosen from the
    measurements on SmolLM2-135M-Instruct, README "Quantization quality on trained weights") applies when the
    export's LLM is a trained model (`export.json` llm.trained)."""

    cosine: float = 0.99  # vision / pool outputs
    decoder_cosine: float = 0.98  # last-position logits
    top1: float = 0.60  # prefill positions and teacher-forced decode steps (see the module doc)
    greedy: float | None = None  # mean fraction of greedy tokens before the first divergence
    # quality rows (calibration/quality.py), through the whole pipeline; higher is better unless noted
    quality_top1: float | None = None  # next-token top-1 agreement, prefill positions and decode steps
    quality_kl: float | None = None  # mean KL(fp32 || Q) in nats, lower is better
    quality_ppl: float | None = None  # relative perplexity change of the fp32 answers under Q, lower is better
    profile: str = "random-weight LLM"


# Set from the measurements on SmolLM2-135M-Instruct (README "Quantization quality on trained weights"; int8-weight:
# top-1 0.97 / 0.95, KL 0.005 / 0.006 nats, perplexity +1.5 %): the quality rows gate, with margin for the
# weight-only modes; the decoder rows keep the random-weight values (not re-measured on trained weights).
TRAINED = Thresholds(quality_top1=0.90, quality_kl=0.05, quality_ppl=0.10, profile="trained LLM")


def default_thresholds(manifest) -> Thresholds:
    """TRAINED when the export's LLM is a trained model (make-checkpoint --llm), else the random-weight defaults."""
    return TRAINED if (manifest.data.get("llm") or {}).get("trained") else Thresholds()


@dataclass(frozen=True)
class Check:
    graph: str
    precision: str
    metric: str
    value: float
    threshold: float | None
    samples: int
    lower_is_better: bool = False

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        return self.value <= self.threshold if self.lower_is_better else self.value >= self.threshold


@dataclass
class AccuracyReport:
    checks: list[Check]
    held_out: bool
    thresholds: Thresholds
    notes: list[str] = field(default_factory=list)
    quality: dict | None = None  # calibration/quality.py's QualitySummary (trained-LLM measures)

    HEADER = ["graph", "precision", "metric", "value", "threshold", "n", "result"]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def rows(self) -> list[list[str]]:
        def fmt(v: float) -> str:
            return f"{v:.2e}" if (v != 0 and abs(v) < 1e-3) or abs(v) >= 1e4 else f"{v:.4f}"

        return [
            [c.graph, c.precision, c.metric, fmt(c.value), "" if c.threshold is None else f"{'<=' if c.lower_is_better else '>='} {c.threshold:g}", str(c.samples),
             "info" if c.threshold is None else ("ok" if c.passed else "FAIL")]
            for c in self.checks
        ]

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "held_out": self.held_out,
            "thresholds": asdict(self.thresholds),
            "checks": [{**asdict(c), "passed": c.passed} for c in self.checks],
            "notes": self.notes,
            "quality": self.quality,
        }


@dataclass
class QuantizeResult:
    folder: Path
    manifest: dict
    report: AccuracyReport
    graphs: dict[str, dict]  # graph -> {"precision", "seconds", "bytes", "nodes_quantized"}
    seconds: float


# ---- helpers -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """ORT's quantization tools print progress to stdout and log at INFO: keep stdout for results."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("onnxruntime.quantization.matmul_nbits_quantizer", "onnxruntime.quantization",
                                              "onnxruntime.tools.symbolic_shape_infer", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
        if buf.getvalue().strip():
            log.debug("onnxruntime.quantization output:\n%s", buf.getvalue())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb + 1e-300))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


def _weight_nodes(model, op_types: Sequence[str] = _WEIGHT_OPS) -> list[str]:
    """Names of `op_types` nodes that have an initializer operand (the weight MatMuls / Gemms / Convs)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in inits for i in n.input)]


def _relevance_nodes(model) -> list[str]:
    """The weight nodes the pools' relevance depends on: every weight MatMul/Gemm/Conv upstream of the text
    operand of the MatMul that takes the graph input `keys` (keys · text), i.e. the whole CLIP text branch
    (encoder layers and text projection), in graph order. The relevance is softmax(keys · text / 0.01), so any
    error in the text features is multiplied by 1/temperature (100): quantizing only the encoder layers (with the
    projection kept float) still moved the relevance cosine to 0.987-0.998 on the tiny preset depending on the
    calibration frames, against >= 0.9999 with the branch float. The branch runs once per prompt, so it stays
    float by default (`op_types="all"` quantizes it anyway)."""
    inits = {i.name for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    start = [n for n in model.graph.node if n.op_type == "MatMul" and "keys" in n.input]
    seen: set[str] = set()
    stack = [i for n in start for i in n.input if i != "keys"]
    while stack:
        n = producer.get(stack.pop())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(n.input)
    return [n.name for n in model.graph.node
            if n.name in seen and n.op_type in _WEIGHT_OPS and any(i in inits for i in n.input)]


def _preprocess(src: Path, dst: Path) -> str:
    """ORT's quant_pre_process; graphs whose symbolic shape inference fails (the pools' derived dims) are
    pre-processed with skip_symbolic_shape=True (export-notes pitfall 3). Returns which one ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # external data in and out: ORT's optimiser writes its output into a temp dir where the source's external
    # file names (pools.onnx.data, shared by both pools) do not resolve unless the output carries its own file
    ext = {"save_as_external_data": True, "all_tensors_to_one_file": True, "external_data_location": f"{dst.name}.data"}
    try:
        # when symbolic shape inference fails, ORT saves sym_shape_infer_temp.onnx + <uuid>.data into the
        # current directory: run it from the output's folder so nothing lands in the user's cwd
        with _quiet(), contextlib.chdir(dst.parent):
            quant_pre_process(str(src.resolve()), str(dst.resolve()), **ext)
        return "default"
    except Exception as exc:  # symbolic shape inference raises bare Exception / TypeError
        log.info("%s: quant_pre_process failed (%s); retrying with skip_symbolic_shape=True", src.name, exc)
        with _quiet():
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, **ext)
        return "skip_symbolic_shape"


def _exclude_target(entry: str, graph: str) -> str | None:
    """The node name an --exclude-node entry names in `graph`, or None if it does not apply to it.

    "GRAPH:NAME" applies to that graph ("pool:NAME" to both pools); a plain name to every graph."""
    g, sep, n = entry.partition(":")
    if sep and g in ("vision", "vision_trt", "prompt_pool", "image_pool", "decoder", "decoder_trt", "pool"):
        return n if g == graph or (g == "pool" and graph in _POOLS) else None
    return entry


def _split_excludes(exclude_nodes: Sequence[str], graph: str) -> list[str]:
    return [n for n in (_exclude_target(e, graph) for e in exclude_nodes) if n is not None]


def _ranges_to_trt_cache(ranges_json: Path, dst: Path, graph_tensors: set[str]) -> int:
    """TensorRT calibration cache (text): header line, then `tensor: <hex of the big-endian float32 scale>` per
    tensor, scale = max(|lo|, |hi|) / 127 (TensorRT INT8 is symmetric). Only tensors of the fp32 graph are kept
    (TensorRT consumes the fp32 ONNX with this cache). Returns the number of tensors written."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(ranges_json)
    lines = [TRT_CACHE_HEADER]
    for name, td in sorted(data.items()):
        if name not in graph_tensors:
            continue
        lo, hi = (float(np.asarray(v).max() if i else np.asarray(v).min()) for i, v in enumerate(td.range_value))
        amax = max(abs(lo), abs(hi), 1e-12)
        lines.append(f"{name}: {struct.pack('>f', amax / 127.0).hex()}")
    dst.write_text("\n".join(lines) + "\n")
    return len(lines) - 1


# ---- per-graph conversions ------------------------------------------------------------------------------
def _cal_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[name]


# Histogram settings. ORT's quantize_static does not forward num_bins, and its Entropy default (128 bins, 128
# quantized bins) can never clip, i.e. equals MinMax; so the calibrator is created here with TensorRT-like bins.
_CALIB_OPTIONS = {
    "minmax": {"symmetric": False},
    "percentile": {"num_bins": 2048, "percentile": 99.999, "symmetric": True},
    "entropy": {"num_bins": 512, "num_quantized_bins": 128, "symmetric": False},
}
_CHUNK = 4  # samples per collect_data call: histogram calibrators keep every intermediate tensor of a chunk in memory


def calibrate_ranges(model_path: Path, calib: CalibrationSet, graph: str, method: str, op_types: list[str] | None, out: Path, work: Path) -> None:
    """Activation ranges of `model_path` over CALIB's calibration feeds, saved with ORT's save_tensors_data (the
    format quantize_static reads back through calibration_cache_path). MinMax streams (`minmax.py`: the weights
    are mapped once, not copied); the histogram methods use ORT's calibrator, a chunk of samples at a time."""
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, create_calibrator, save_tensors_data

    input_names = [i.name for i in onnx.load(str(model_path), load_external_data=False).graph.input]
    reader = make_reader(calib, graph, "calib", input_names)
    try:
        if method == "minmax":
            from .minmax import minmax_ranges

            ranges = TensorsData(CalibrationMethod.MinMax, minmax_ranges(model_path, iter(reader.get_next, None), op_types,
                                                                         symmetric=_CALIB_OPTIONS["minmax"]["symmetric"]))
        else:
            with histogram_shape_fix(), _quiet():
                calibrator = create_calibrator(model_path, op_types, augmented_model_path=str(work / f"{graph}.augmented.onnx"),
                                               calibrate_method=_cal_method(method), extra_options=dict(_CALIB_OPTIONS[method]))
                for start in range(0, len(reader), _CHUNK):
                    reader.set_range(start, start + _CHUNK)
                    calibrator.collect_data(reader)
                ranges = calibrator.compute_data()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CalibrationError(
            f"{graph}: {method} calibration failed: {exc}\n"
            "Hint: --method minmax is the most robust; with --op-types all, Entropy overflows on the attention-mask bias."
        ) from exc
    save_tensors_data(ranges, out)


def _quantize_static(src: Path, dst: Path, calib: CalibrationSet, graph: str, method: str, op_types: str, excludes: list[str], work: Path, trt_dir: Path | None) -> dict:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    pre = work / f"{graph}.pre.onnx"
    how = _preprocess(src, pre)
    trim_heap()  # the pre-processor's copies of the graph, freed but still held by the C heap
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if graph == "vision":  # every weight MatMul on an int8 kernel (vision_int8.py)
        from .vision_int8 import VISION_EXTRA_OPTIONS, type_contrib_outputs

        type_contrib_outputs(pre)
        extra.update(VISION_EXTRA_OPTIONS)
    model = onnx.load(str(pre), load_external_data=False)  # node names and types only: the weights stay on disk
    names = {n.name for n in model.graph.node}
    unknown = [e for e in excludes if e not in names]
    user_excludes = list(excludes)
    if graph in _POOLS and op_types != "all":
        excludes = [*excludes, *_relevance_nodes(model)]
    if graph in _POOLS or op_types == "weights":
        nodes = [n for n in _weight_nodes(model) if n not in excludes]
        types = list(_WEIGHT_OPS)
    elif op_types == "matmul":
        nodes = [n.name for n in model.graph.node if n.op_type in _WEIGHT_OPS and n.name not in excludes]
        types = list(_WEIGHT_OPS)
    else:  # "all": ORT's defaults, everything quantizable
        nodes, types = None, None
    if graph in _POOLS and op_types == "all":
        nodes, types = None, None
    if nodes is not None and not nodes:
        copy_graph(src, dst)
        return {"scheme": "none (no weight nodes)", "nodes_quantized": 0, "preprocess": how, "unknown_excludes": unknown}
    ranges = work / f"{graph}.ranges.json"
    calibrate_ranges(pre, calib, graph, method, types, ranges, work)
    trim_heap()
    try:
        with _quiet():
            quantize_static(
                str(pre), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=types, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                nodes_to_exclude=[e for e in excludes if e in names], calibrate_method=_cal_method(method),
                extra_options=extra, calibration_cache_path=str(ranges),
            )
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise CalibrationError(f"{graph}: ONNX Runtime static quantization failed: {exc}") from exc
    del model
    q = onnx.load(str(dst), load_external_data=False)
    nq = sum(n.op_type == "DequantizeLinear" for n in q.graph.node)
    info = {"scheme": "static QDQ (u8 asym activations, s8 sym per-channel weights)", "method": method,
            "op_types": op_types, "nodes_quantized": len(nodes) if nodes is not None else None,
            "dequantize_nodes": nq, "preprocess": how, "kept_float": sorted(set(excludes) - set(user_excludes)),
            "unknown_excludes": unknown}
    if trt_dir is not None:
        g = onnx.load(str(src), load_external_data=False).graph
        fp32_tensors = {o for n in g.node for o in (*n.input, *n.output)} | {i.name for i in g.input}
        trt_dir.mkdir(exist_ok=True)
        n = _ranges_to_trt_cache(ranges, trt_dir / f"{graph}.cache", fp32_tensors)
        info["trt_calibration_cache"] = {"file": f"trt_calibration/{graph}.cache", "tensors": n}
    return info


def minmax_blocks(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric blocks for MatMulNBits with *float* zero points: per column and block of K (padded with zeros),
    scale = (max - min) / (2^bits - 1), zero point = -min / scale, q = round((w - min) / scale); the kernel computes
    (q - zero_point) * scale. This is llama.cpp's Q4_1 / Q8_1 grid (d = scale, m = min), so a weight that *is* a
    dequantized Q4_1 tensor (an LLM read from a Q4_1 GGUF) comes back exactly at block 32 instead of being rounded a
    second time onto another grid. Returns (packed [N, blocks, block_size * bits / 8] uint8, scales [N, blocks]
    float32, zero points [N, blocks] float32)."""
    w = np.asarray(w, dtype=np.float32)
    k, n = w.shape
    kb = (k + block_size - 1) // block_size
    if kb * block_size != k:
        w = np.pad(w, ((0, kb * block_size - k), (0, 0)))
    blocks = w.T.reshape(n, kb, block_size)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    top = (1 << bits) - 1
    scale = (hi - lo) / top
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / scale[..., None]), 0, top).astype(np.uint8)
    packed = q if bits == 8 else (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(packed), scale, (-lo / scale).astype(np.float32)


def _quantize_nbits(src: Path, dst: Path, bits: int, block_size: int, excludes: list[str], upcast: bool = False,
                    accuracy_level: int = 4, symmetric: bool = True, algorithm: str = "rtn", hessians: dict | None = None) -> dict:
    """Weight-only MatMulNBits, one initializer at a time (peak memory: one weight in fp32 + its packed form).

    Every MatMul whose B is a 2-D initializer becomes MatMulNBits (symmetric, blocks of `block_size` along K,
    accuracy_level 4) with the same kernels ONNX Runtime's MatMulNBitsQuantizer calls (quantize_matmul_4bits /
    _8bits), so the packed bytes are identical to it; weights are read memory-mapped from the source's external
    data and written to `dst.data` as they are produced, so a 7B decoder quantizes in a few GB.

    `algorithm` / `hessians`: how the values on each block's grid are chosen (weight_algorithms.py; "gptq" reads
    H = XᵀX per weight name from `hessians`).

    `upcast`: an fp16 graph comes out with fp32 activations (every remaining fp16 initializer, the scales and the
    graph's inputs / outputs become fp32) - what a CPU runs fast. Only for graphs without Cast nodes (the decoder
    written by decoder_builder).
    """
    import onnx
    from onnx import helper
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    if upcast and any(n.op_type == "Cast" for n in graph.node):
        raise CalibrationError(f"{src.name}: cannot give this graph fp32 activations (it has Cast nodes); quantize an fp32 export instead")
    names = {n.name for n in graph.node}
    skip = set(excludes)

    def out_dtype(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) if upcast and a.dtype == np.float16 else a
    inits = {t.name: t for t in graph.initializer}

    def quantizable(nd) -> bool:
        return nd.op_type == "MatMul" and nd.name not in skip and nd.input[1] in inits and len(inits[nd.input[1]].dims) == 2

    targets = {nd.input[1] for nd in graph.node if quantizable(nd)}
    # initializers some other consumer still reads in float (kept beside their quantized form)
    keep_float = {i for nd in graph.node for j, i in enumerate(nd.input) if not (quantizable(nd) and j == 1)}
    keep_float |= {o.name for o in graph.output}
    data_name = dst.name + ".data"
    new_inits, new_nodes, extra_inits, count = [], [], [], 0
    with ExternalData(dst.parent / data_name) as out:
        quantized: dict[str, tuple[str, str, int, int]] = {}
        split: set[str] = set()  # asymmetric int4 weights written as MatMulNBits + a zero-point correction
        for t in graph.initializer:
            arr = read_initializer(t, src.parent)
            if t.name in targets:
                w = np.asarray(arr, dtype=np.float32)
                k, n = w.shape
                k_blocks = (k + block_size - 1) // block_size
                blob = block_size * bits // 8
                packed = np.zeros((n, k_blocks, blob), dtype=np.uint8)
                scales = np.zeros((n, k_blocks), dtype=np.float32)
                zero_points = np.zeros((n, (k_blocks * bits + 7) // 8), dtype=np.uint8)
                if k_blocks * block_size != k:
                    w = np.pad(w, ((0, k_blocks * block_size - k), (0, 0)))
                zp_float = None
                if symmetric:
                    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, scales, zero_points, block_size, n, k, symmetric)
                else:
                    if k % block_size:  # no whole blocks to sum: ONNX Runtime's own asymmetric grid (uint8 zero points, fast)
                        (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(packed, w, scales, zero_points, block_size, n, k, False)
                    else:  # (at 8 bits too: ONNX Runtime's CPU kernel takes no float zero points there, the correction does)
                        packed, scales, zp_float = minmax_blocks(w, bits, block_size)
                if algorithm != "rtn":  # the same grid, other values on it (weight_algorithms.py)
                    zero = (1 << (bits - 1)) if symmetric else zp_float if zp_float is not None else unpack_zero_points(zero_points, bits, k_blocks)
                    packed, zero = refine_packed(algorithm, w, packed, scales, zero, bits, block_size, (hessians or {}).get(t.name), zp_float is not None)
                    zp_float = zero if zp_float is not None else None
                if zp_float is not None:
                    # fast exact form: sum_k x_k (q_k - z) s = [MatMulNBits with zero points 0] - blocksum(x) @ (z * s);
                    # ONNX Runtime's CPU kernel takes float zero points only on a slow reference path (~80x)
                    new_inits.append(out.add(f"{t.name}_zp_correction", out_dtype((zp_float * scales).T.astype(arr.dtype))))
                    split.add(t.name)
                new_inits.append(out.add(f"{t.name}_Q{bits}", packed))
                new_inits.append(out.add(f"{t.name}_scales", out_dtype(scales.astype(arr.dtype))))
                if not symmetric:
                    new_inits.append(out.add(f"{t.name}_zero_points", zero_points))  # (split: uint8 zeros)
                quantized[t.name] = (f"{t.name}_Q{bits}", f"{t.name}_scales", k, n)
                del w, packed
                if t.name not in keep_float:
                    continue
            new_inits.append(out.add(t.name, out_dtype(np.asarray(arr))))
        for nd in graph.node:
            if nd.op_type == "MatMul" and nd.name not in skip and nd.input[1] in quantized:
                qb, sc, k, n = quantized[nd.input[1]]
                w_name = nd.input[1]
                zp = [] if symmetric else [f"{w_name}_zero_points"]
                y = nd.output[0] if w_name not in split else f"{nd.name}/nbits"
                new_nodes.append(helper.make_node("MatMulNBits", [nd.input[0], qb, sc, *zp], [y], name=f"{nd.name}_Q{bits}",
                                                  domain="com.microsoft", K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level))
                if w_name in split:
                    new_nodes += _zero_point_correction(nd, y, k // block_size, block_size, f"{w_name}_zp_correction", extra_inits)
                count += 1
            else:
                new_nodes.append(nd)
    del graph.initializer[:]
    graph.initializer.extend(new_inits + extra_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if upcast:
        for vi in (*graph.input, *graph.output, *graph.value_info):
            if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    onnx.save_model(model, str(dst))
    return {"algorithm": algorithm, "scheme": f"weight-only MatMulNBits ({bits}-bit {'symmetric' if symmetric else 'asymmetric min/max, float zero points (as zero points 0 + a block-sum correction where K is a multiple of the block)'}, block {block_size}, "
                      f"accuracy_level {accuracy_level}; streamed per initializer)"
            + ("; fp32 activations" if upcast else ""), "nodes_quantized": count, "unknown_excludes": [e for e in excludes if e not in names]}


def _zero_point_correction(nd, y_nbits: str, blocks: int, block_size: int, correction: str, inits: list) -> list:
    """Nodes computing nd's output = y_nbits - (block sums of x) @ correction, with correction = (z * s)^T [blocks, N]:
    Reshape(x, [-1, blocks, B]) -> ReduceSum(-1) -> MatMul -> Reshape to y's shape -> Sub."""
    from onnx import helper, numpy_helper

    x, base = nd.input[0], nd.name
    shape_name, axes_name = f"{base}/zp/blocks_shape", f"{base}/zp/axes"
    inits += [numpy_helper.from_array(np.array([-1, blocks, block_size], np.int64), shape_name), numpy_helper.from_array(np.array([-1], np.int64), axes_name)]
    return [
        helper.make_node("Reshape", [x, shape_name], [f"{base}/zp/x_blocks"], name=f"{base}/zp/reshape"),
        helper.make_node("ReduceSum", [f"{base}/zp/x_blocks", axes_name], [f"{base}/zp/x_sums"], name=f"{base}/zp/sum", keepdims=0),
        helper.make_node("MatMul", [f"{base}/zp/x_sums", correction], [f"{base}/zp/flat"], name=f"{base}/zp/matmul"),
        helper.make_node("Shape", [y_nbits], [f"{base}/zp/y_shape"], name=f"{base}/zp/shape"),
        helper.make_node("Reshape", [f"{base}/zp/flat", f"{base}/zp/y_shape"], [f"{base}/zp/term"], name=f"{base}/zp/reshape_back"),
        helper.make_node("Sub", [y_nbits, f"{base}/zp/term"], list(nd.output), name=f"{base}/zp/sub"),
    ]


def _to_fp16(src: Path, dst: Path, excludes: list[str]) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    names = {n.name for n in model.graph.node}
    with _quiet():
        m16 = convert_float_to_float16(model, keep_io_types=True, node_block_list=[e for e in excludes if e in names] or None)
    onnx.save(m16, str(dst))
    return {"scheme": "fp16 (convert_float_to_float16, keep_io_types=True)", "unknown_excludes": [e for e in excludes if e not in names]}


# ---- accuracy gate ---------------------------------------------------------------------------------------
def _graph_checks(graph: str, precision: str, ref, qs, calib: CalibrationSet, th: Thresholds, sessions: tuple | None = None) -> list[Check]:
    """Per output: min cosine (gated) and max |difference| of `qs` against `ref` on the held-out feeds; `sessions`
    (fp32, quantized) replaces the pipelines' own sessions of `graph`."""
    recs = calib.eval_records(graph)
    a_s, b_s = sessions or (ref.sessions[graph], qs.sessions[graph])
    outs = [o.name for o in a_s.get_outputs()]
    cos = {o: [] for o in outs}
    mabs = {o: [] for o in outs}
    for r in recs:
        a = a_s.run(None, calib.feed(graph, r, input_names=_inputs(a_s)))
        b = b_s.run(None, calib.feed(graph, r, input_names=_inputs(b_s)))
        for o, x, y in zip(outs, a, b):
            cos[o].append(_cosine(x, y))
            mabs[o].append(_max_abs(x, y))
    checks = []
    for o in outs:
        checks.append(Check(graph, precision, f"{o} cosine (min)", min(cos[o]), th.cosine, len(recs)))
        checks.append(Check(graph, precision, f"{o} max-abs", max(mabs[o]), None, len(recs)))
    return checks


def _decoder_feed(embeds: np.ndarray, kv: tuple[int, int], names: list[str], session) -> dict:
    """A prefill feed (empty past) in the contract of `session`'s graph."""
    n = embeds.shape[1]
    feed = {"inputs_embeds": np.ascontiguousarray(embeds, np.float32), "attention_mask": np.ones((1, n), np.int64),
            "position_ids": np.arange(n, dtype=np.int64)[None]}
    for k in names:
        feed[k] = np.zeros((1, kv[0], 0, kv[1]), np.float32)
    return adapt_feed(feed, _inputs(session))


def _inputs(session) -> list[str]:
    return [i.name for i in session.get_inputs()]


def _decoder_checks(precision: str, ref, qs, calib: CalibrationSet, th: Thresholds, positions: int, tokens: int) -> list[Check]:
    """Logits cosine, top-1 over prefill positions and over teacher-forced decode steps (decoder graph alone)."""
    m = ref.manifest.model
    kv = (m["num_kv_heads"], m["head_dim"])
    recs = calib.eval_records("decoder")
    # 1) last-position logits on the stored feeds (prefill + decode steps)
    cos = []
    rs, qd = ref.sessions["decoder"], qs.sessions["decoder"]
    for r in recs:
        a = rs.run(["logits"], calib.feed("decoder", r, input_names=_inputs(rs)))[0]
        cos.append(_cosine(a, qd.run(["logits"], calib.feed("decoder", r, input_names=_inputs(qd)))[0]))
    checks = [Check("decoder", precision, "logits cosine (min)", min(cos), th.decoder_cosine, len(recs))]
    prefills = [r for r in recs if r["kind"] == "prefill"]
    # 2) top-1 over prefill positions: the graph returns the last position only, so one prefill per prefix cut
    agree = total = 0
    for r in prefills:
        e = calib.load(r)["inputs_embeds"]
        L = e.shape[1]
        for p in sorted({int(round(x)) for x in np.linspace(max(2, L // 8), L, positions)}):
            a = rs.run(["logits"], _decoder_feed(e[:, :p], kv, ref.decoder.past_names, rs))[0]
            b = qd.run(["logits"], _decoder_feed(e[:, :p], kv, ref.decoder.past_names, qd))[0]
            agree += int(np.argmax(a[0]) == np.argmax(b[0]))
            total += 1
    checks.append(Check("decoder", precision, "top-1 prefill positions", agree / max(total, 1), th.top1, total))
    # 3) teacher forcing: both decoders get the fp32 greedy continuation; compare the argmax at every step
    agree = total = 0
    for r in prefills:
        e = calib.load(r)["inputs_embeds"]
        ref.decoder.reset(1)
        qs.decoder.reset(1)
        la, lb = ref.decoder.forward(e), qs.decoder.forward(e)
        for _ in range(min(tokens, m["max_position_embeddings"] - e.shape[1])):
            ta = int(np.argmax(la[0]))
            agree += int(ta == int(np.argmax(lb[0])))
            total += 1
            x = ref.embed(np.asarray([ta]))
            la, lb = ref.decoder.forward(x), qs.decoder.forward(x)
    checks.append(Check("decoder", precision, "top-1 decode (teacher-forced)", agree / max(total, 1), th.top1, total))
    return checks


def _trt_decoder_checks(precision: str, ref, qs, calib: CalibrationSet, th: Thresholds) -> list[Check]:
    """The TensorRT decoder graph (run here by ONNX Runtime on CPU): last-position logits cosine on held-out feeds."""
    from ..runtime.session import create_session

    a_s = create_session(ref.manifest.path("decoder_trt"), "cpu")
    b_s = create_session(qs.manifest.path("decoder_trt"), "cpu")
    recs = calib.eval_records("decoder_trt")
    cos = [_cosine(a_s.run(["logits"], calib.feed("decoder_trt", r, input_names=_inputs(a_s)))[0],
                   b_s.run(["logits"], calib.feed("decoder_trt", r, input_names=_inputs(b_s)))[0]) for r in recs]
    return [Check("decoder_trt", precision, "logits cosine (min)", min(cos), th.decoder_cosine, len(recs))]


def _trt_vision_checks(precision: str, ref, qs, calib: CalibrationSet, th: Thresholds) -> list[Check]:
    """The TensorRT vision graph (traced standard ops, run here by ONNX Runtime on CPU), gated as the vision graph."""
    from ..runtime.session import create_session

    sessions = (create_session(ref.manifest.path("vision_trt"), "cpu"), create_session(qs.manifest.path("vision_trt"), "cpu"))
    return _graph_checks("vision_trt", precision, ref, qs, calib, th, sessions)


class _VisionCache:
    """Vision outputs per (pipeline, video) so the end-to-end checks run each vision graph once per video."""

    def __init__(self, calib: CalibrationSet):
        self.calib = calib
        self.records = {r["video"]: r for r in calib.records("vision", "all")}
        self.out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, pipe, video: int) -> tuple[np.ndarray, np.ndarray]:
        key = (id(pipe), video)
        if key not in self.out:
            px = self.calib.load(self.records[video])["pixel_values"]
            values, keys = pipe.sessions["vision"].run(None, {"pixel_values": px})
            self.out[key] = (values, keys)
        return self.out[key]


def _pipeline_checks(ref, qs, calib: CalibrationSet, th: Thresholds, tokens: int, pooled: bool) -> list[Check]:
    """End to end, Q (vision -> prompt_pool -> decoder) against fp32: pooled visual tokens (information) and greedy."""
    from ..runtime.generation import GenerationConfig, generate

    vision = _VisionCache(calib)
    pool_by_source = {r["source"]: r for r in calib.records("prompt_pool", "all")}
    cfg = GenerationConfig(max_new_tokens=tokens, ignore_eos=True)
    cos, prefix, exact = [], [], 0
    prefills = [r for r in calib.eval_records("decoder") if r["kind"] == "prefill"]
    for r in prefills:
        clip_ids = calib.load(pool_by_source[r["source"]])["clip_ids"]
        input_ids = calib.load(r)["input_ids"]
        vts, ids = [], []
        for pipe in (ref, qs):
            values, keys = vision(pipe, r["video"])
            vt, _ = pipe.sessions["prompt_pool"].run(None, {"clip_ids": clip_ids, "keys": keys, "values": values})
            vts.append(vt)
            ids.append(list(generate(pipe.decoder, pipe.embed, pipe.embed_prompt(input_ids, vt), cfg).ids))
        cos.append(_cosine(*vts))
        a, b = ids
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
        exact += int(a == b)
    n = len(prefills)
    checks = [Check("pipeline", "", "visual_tokens cosine (vision+pool, min)", min(cos), None, n)] if pooled and cos else []
    checks.append(Check("pipeline", "", f"greedy {tokens} tokens: prefix agreement (mean)", float(np.mean(prefix)) if prefix else 1.0, th.greedy, n))
    checks.append(Check("pipeline", "", f"greedy {tokens} tokens: exact sequences", exact / max(n, 1), None, n))
    return checks


# The targets on a trained LLM (printed, not gated): (top-1 decode steps >=, perplexity change <=) per LLM mode
QUALITY_TARGETS = {"int8-weight": (0.98, 0.02), "int4-weight": (0.90, 0.10)}


def _quality_checks(ref, qs, calib: CalibrationSet, th: Thresholds, tokens: int, pairs: int | None, llm: str) -> tuple[list[Check], dict, list[str]]:
    """The trained-LLM rows (calibration/quality.py): top-1 and KL at prefill positions and teacher-forced decode
    steps, perplexity of the fp32 answers under Q, greedy exact match and common prefix."""
    from .quality import measure_quality

    q = measure_quality(ref, qs, calib, tokens, pairs)
    checks = [
        Check("quality", "", "top-1 prefill positions", q.top1_prefill, th.quality_top1, q.prefill_positions),
        Check("quality", "", "top-1 decode steps (teacher-forced)", q.top1_decode, th.quality_top1, q.decode_steps),
        Check("quality", "", "mean KL prefill positions (nats)", q.kl_prefill, th.quality_kl, q.prefill_positions, lower_is_better=True),
        Check("quality", "", "mean KL decode steps (nats)", q.kl_decode, th.quality_kl, q.decode_steps, lower_is_better=True),
        Check("quality", "", "perplexity of fp32 answers: change", q.ppl_change, th.quality_ppl, q.decode_steps, lower_is_better=True),
        Check("quality", "", "perplexity of fp32 answers: fp32", q.ppl_fp32, None, q.decode_steps),
        Check("quality", "", "perplexity of fp32 answers: Q", q.ppl_q, None, q.decode_steps),
        Check("quality", "", f"greedy {tokens} tokens: exact match", q.exact_match, None, q.pairs),
        Check("quality", "", f"greedy {tokens} tokens: common prefix (tokens)", q.common_prefix, None, q.pairs),
    ]
    notes = []
    if q.pairs < 20:
        notes.append(f"quality rows measured on {q.pairs} held-out (video, question) pairs; the README's table uses >= 20")
    if llm in QUALITY_TARGETS:
        t1, ppl = QUALITY_TARGETS[llm]
        met = q.top1_decode >= t1 and q.top1_prefill >= t1 and q.ppl_change <= ppl
        notes.append(f"target for --llm {llm}: top-1 >= {t1:g} and perplexity within +{ppl:.0%}: "
                     f"{'met' if met else 'MISSED'} (top-1 {q.top1_prefill:.3f} / {q.top1_decode:.3f}, perplexity {q.ppl_change:+.1%})")
    return checks, asdict(q) | {"ppl_change": q.ppl_change}, notes


GATE_MODES = ("auto", "full", "truncated")
GATE_LAYERS = 2
FULL_GATE_FRACTION = 0.25  # auto: the full gate when the source decoder takes at most this fraction of RAM


def _gate_mode(mode: str, manifest) -> str:
    if mode not in GATE_MODES:
        raise InputError(f"--gate {mode!r}: choose one of {', '.join(GATE_MODES)}")
    if mode != "auto":
        return mode
    import psutil

    from ..bench.hardware import graph_weight_bytes

    decoder = graph_weight_bytes(manifest.path(manifest.graph_for("decoder")), skip_prefixes=())
    return "full" if decoder <= FULL_GATE_FRACTION * psutil.virtual_memory().total else "truncated"


class _GateSide:
    """What the decoder checks read from one side of the gate (a Pipeline has the same attributes): the decoder
    session, a KV decoder over it, the model dims and the embedding lookup."""

    def __init__(self, manifest, decoder_path: Path, layers: int):
        from ..runtime.decoder import open_decoder
        from ..runtime.session import create_session

        model = dict(manifest.model, num_layers=layers)
        self.manifest = type("M", (), {"model": model})()
        self.sessions = {"decoder": create_session(decoder_path, "cpu")}
        self.embed_table = np.load(manifest.path("embeddings"), mmap_mode="r")
        self.decoder = open_decoder(self.sessions["decoder"], {"contract": "gqa-inplace-v1"}, model, np.float32, "cpu")
        self.dtype = self.decoder.dtype

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=self.dtype)[:, None, :]


def evaluate_accuracy_truncated(manifest, q_dir: Path, calib: CalibrationSet, precisions: dict[str, str], thresholds: Thresholds,
                                prefill_positions: int, greedy_tokens: int, block_size: int, excludes: list[str],
                                llm_activations: str, work: Path, accuracy_level: int | None = None,
                                asymmetric: bool | None = None) -> AccuracyReport:
    """The gate at a scale where the source decoder does not fit: the vision / pool graphs against the source's as
    usual; the decoder as a depth-truncated pair (its first GATE_LAYERS layers and the real head, written from the
    checkpoint in the export's dtype, and the same quantization of it) on CALIB's held-out prompts. The end-to-end
    greedy comparison needs both full decoders and is not run (said in the report)."""
    from ..export.exporter import decoder_copy
    from ..runtime.session import create_session

    checks: list[Check] = []
    notes = [f"decoder gate on depth-truncated decoders (first {GATE_LAYERS} of {manifest.model['num_layers']} layers, real embeddings and head); "
             "the end-to-end greedy comparison is not run at this scale"]
    if not calib.has_holdout():
        notes.append("CALIB has no held-out samples: measured on the calibration samples themselves")
    q = load_manifest(q_dir)
    for g in ("vision", "prompt_pool", "image_pool"):
        if precisions.get(g, "fp32") != "fp32":
            ref = type("S", (), {"sessions": {g: create_session(manifest.path(g), "cpu")}})()
            qs = type("S", (), {"sessions": {g: create_session(q.path(g), "cpu")}})()
            checks += _graph_checks(g, precisions[g], ref, qs, calib, thresholds)
            del ref, qs
    prec = precisions.get("decoder", "fp32")
    if prec in ("int8-weight", "int4-weight"):
        work.mkdir(parents=True, exist_ok=True)
        try:
            src_dtype = manifest.data.get("dtype", "fp32")
            ref_path = decoder_copy(manifest.data["checkpoint"]["path"], work / "decoder.ref.onnx", src_dtype, GATE_LAYERS)
            q_path = work / "decoder.q.onnx"
            bits = 8 if prec == "int8-weight" else 4
            _quantize_nbits(ref_path, q_path, bits, block_size, _split_excludes(excludes, "decoder"),
                            upcast=src_dtype == "fp16" and llm_activations == "fp32",
                            accuracy_level=ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level,
                            symmetric=not (ASYMMETRIC[bits] if asymmetric is None else asymmetric))
            ref, qs = _GateSide(manifest, ref_path, GATE_LAYERS), _GateSide(manifest, q_path, GATE_LAYERS)
            checks += _decoder_checks(prec, ref, qs, calib, thresholds, prefill_positions, greedy_tokens)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return AccuracyReport(checks, calib.has_holdout(), thresholds, notes)


def evaluate_accuracy(
    ref_dir: str | Path,
    q_dir: str | Path,
    calib: CalibrationSet,
    precisions: dict[str, str],
    thresholds: Thresholds | None = None,
    prefill_positions: int = 8,
    greedy_tokens: int = 16,
    quality_tokens: int = 32,
    quality_pairs: int | None = None,
) -> AccuracyReport:
    """Compare export `q_dir` against the fp32 export `ref_dir` on CALIB's held-out samples (see module doc).
    `thresholds` None: `default_thresholds` of the fp32 export. `quality_tokens` 0 skips the quality rows."""
    from ..runtime.pipeline import Pipeline

    ref = Pipeline.from_export(ref_dir, provider="cpu")
    qs = Pipeline.from_export(q_dir, provider="cpu")
    thresholds = thresholds or default_thresholds(ref.manifest)
    checks: list[Check] = []
    notes: list[str] = []
    if not calib.has_holdout():
        notes.append("CALIB has no held-out samples: measured on the calibration samples themselves")
    for g in ("vision", "prompt_pool", "image_pool"):
        if precisions.get(g, "fp32") != "fp32":
            checks += _graph_checks(g, precisions[g], ref, qs, calib, thresholds)
    if precisions.get("decoder", "fp32") != "fp32":
        checks += _decoder_checks(precisions["decoder"], ref, qs, calib, thresholds, prefill_positions, greedy_tokens)
    if precisions.get("decoder_trt", "fp32") != "fp32":
        checks += _trt_decoder_checks(precisions["decoder_trt"], ref, qs, calib, thresholds)
    if precisions.get("vision_trt", "fp32") != "fp32":
        checks += _trt_vision_checks(precisions["vision_trt"], ref, qs, calib, thresholds)
    if any(p != "fp32" for p in precisions.values()):
        pooled = precisions.get("vision", "fp32") != "fp32" or precisions.get("prompt_pool", "fp32") != "fp32"
        checks += _pipeline_checks(ref, qs, calib, thresholds, greedy_tokens, pooled)
    quality = None
    if quality_tokens > 0 and any(p != "fp32" for p in precisions.values()):
        qchecks, quality, qnotes = _quality_checks(ref, qs, calib, thresholds, quality_tokens, quality_pairs, precisions.get("decoder", "fp32"))
        checks += qchecks
        notes += qnotes
    return AccuracyReport(checks, calib.has_holdout(), thresholds, notes, quality)


# ---- the whole folder ------------------------------------------------------------------------------------
def quantize_export(
    export_dir: str | Path,
    calib_dir: str | Path,
    out: str | Path,
    vision: str = "int8",
    pool: str = "int8",
    llm: str = "auto",
    method: str = "minmax",
    exclude_nodes: Sequence[str] = (),
    op_types: str = "weights",
    block_size: int = 32,
    accept_degraded: bool = False,
    thresholds: Thresholds | None = None,
    prefill_positions: int = 8,
    greedy_tokens: int = 16,
    quality_tokens: int = 32,
    quality_pairs: int | None = None,
    trt_cache: bool = False,
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
    llm_activations: str = "fp32",
    gate: str = "auto",
    llm_trt: str = "auto",
    accuracy_level: int | None = None,
    asymmetric: bool | None = None,
    weight_algorithm: str = "auto",
) -> QuantizeResult:
    """Write a complete quantized export folder `out` from the fp32 `export_dir` and CALIB, then gate it.

    Args:
        export_dir: the fp32 export folder CALIB was collected on.
        calib_dir: CALIB from `collect_calibration` (needed for any int8; weight-only / fp16 only use it for the gate).
        out: the folder to write (atomically: it appears only when everything, gate included, succeeded).
        vision: "int8" | "fp16" | "fp32".
        pool: "int8" | "fp32" (prompt_pool and image_pool).
        llm: "auto" | "int8-weight" | "int4-weight" | "fp32": ONNX Runtime's decoder ("auto": AUTO_LLM). "int8" (static
            Q/DQ) is refused with STATIC_INT8_DECODER: ONNX Runtime runs it far slower than fp32.
        llm_trt: TensorRT's standard-ops decoder_trt (exports made with --tensorrt): "auto" (the --llm mode: int8 /
            int4 weight-only as DequantizeLinear weights, see weight_dq.py; fp32 copied), "int8" (static Q/DQ from
            CALIB, with --trt-cache its calibration cache), "int8-weight", "int4-weight", "fp32".
        method: static calibration method "minmax" | "percentile" | "entropy".
        exclude_nodes: node names kept float ("graph:name" for one graph, or a plain name for every graph;
            names of the graph after ORT pre-processing, which keeps the exporter's names for MatMul/Gemm nodes).
        op_types: "weights" (default) | "matmul" | "all" (see module doc; "all" is the broken configuration).
        block_size: MatMulNBits block size (16, 32, 64, 128, ...).
        accept_degraded: write `out` even when the gate fails (accuracy.json records the failure).
        thresholds: gate thresholds (None: `default_thresholds` of the export: TRAINED for a trained LLM).
        quality_tokens / quality_pairs: answer length and pair count of the quality rows (0 tokens: skipped).
        prefill_positions: prefix cuts per held-out prompt for decoder top-1.
        greedy_tokens: tokens for the teacher-forced and the greedy pipeline comparison.
        trt_cache: also write `trt_calibration/<graph>.cache` (TensorRT text calibration cache) for int8 graphs.
        force: replace a non-empty `out`.
        on_stage: called with a stage label before each stage (for progress output).
        llm_activations: "fp32" (default; what a CPU runs fast) or "fp16": the activations of a weight-only decoder
            quantized from an fp16 export (an fp32 export stays fp32).
        accuracy_level: MatMulNBits compute of the weight-only decoder: 0 (fp32 activations) or 4 (int8 activations
            inside the kernel); None: ACCURACY_LEVEL[bits] (README "Quantization quality on trained weights").
        asymmetric: weight-only min/max blocks with zero points instead of symmetric ones (ONNX Runtime's decoder only;
            TensorRT requires zero points of 0, so decoder_trt stays symmetric); None: ASYMMETRIC[bits].
        weight_algorithm: how the weight-only decoder's values are chosen on their grid: "rtn" | "hqq" | "gptq"
            (weight_algorithms.py; gptq calibrates on CALIB's decoder feeds); "auto": WEIGHT_ALGORITHM[bits].
        gate: "full" (the whole quantized export against the source), "truncated" (the decoder gate on depth-truncated
            decoders built from the checkpoint - the full fp16 reference of a 7B decoder needs 13.5 GB), or "auto".

    Raises:
        InputError: bad option values, unknown --exclude-node names.
        CalibrationError: CALIB missing / from another model / quantization failed.
        AccuracyError: the gate failed (the report is `exc.report`) and `accept_degraded` is False.
    """
    t_start = time.perf_counter()
    stage = on_stage or (lambda s: None)
    if llm == "int8":
        raise InputError(STATIC_INT8_DECODER)
    for name, value, allowed in (("vision", vision, VISION_PRECISIONS), ("pool", pool, POOL_PRECISIONS), ("llm", llm, LLM_PRECISIONS),
                                 ("llm_trt", llm_trt, LLM_TRT_PRECISIONS), ("method", method, METHODS), ("op_types", op_types, OP_TYPES)):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise InputError(f"accuracy_level must be 0..4 (ONNX Runtime MatMulNBits), got {accuracy_level!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"block_size must be a power of two >= 16, got {block_size}")
    if llm in ("int8-weight", "int4-weight") or weight_algorithm not in ALGORITHMS:
        bits = 8 if llm == "int8-weight" else 4
        check_algorithm(weight_algorithm, bits, not (ASYMMETRIC[bits] if asymmetric is None else asymmetric))
    manifest = load_manifest(export_dir)
    src_dtype = manifest.data.get("dtype", "fp32")
    src_prec = {g: manifest.graph(g).get("precision", src_dtype) for g in manifest.data["graphs"]}
    if any(p != src_dtype for p in src_prec.values()):
        raise InputError(f"{export_dir} is already quantized ({src_prec}); quantize the fp32 or fp16 export instead.")
    if src_dtype == "fp16":
        for name, value in (("--pool", pool), ("--llm-trt", llm_trt)):
            if value == "int8":
                raise InputError(f"{name} int8 (static Q/DQ) needs an fp32 export; {export_dir} is fp16.\n"
                                 "Hint: use --llm int8-weight / int4-weight (weight-only) or export with --dtype fp32.")
    calib = load_calibration(calib_dir, manifest)
    gate = _gate_mode(gate, manifest)
    thresholds = thresholds or default_thresholds(manifest)
    llm = AUTO_LLM if llm == "auto" else llm
    # the TensorRT decoder (standard ops) follows the weight-only --llm mode as DequantizeLinear weights (weight_dq.py),
    # or --llm-trt int8: static Q/DQ (TensorRT builds it from the fp32 graph with the calibration cache)
    llm_trt = llm if llm_trt == "auto" else llm_trt
    precisions = {"vision": vision, "prompt_pool": pool, "image_pool": pool, "decoder": llm, "projector_head": "fp32",
                  "decoder_trt": llm_trt, "vision_trt": vision}
    if llm_trt not in ("auto", "fp32", llm) and "decoder_trt" not in manifest.data["graphs"]:
        raise InputError(f"--llm-trt {llm_trt}: {export_dir} has no TensorRT decoder (decoder_trt).\n"
                         "Hint: export with `ppllava-edge export CHECKPOINT OUT --tensorrt`, or leave --llm-trt out.")
    precisions = {g: p for g, p in precisions.items() if g in manifest.data["graphs"]}
    precisions.update({g: "fp32" for g in manifest.data["graphs"] if g not in precisions})

    graphs_info: dict[str, dict] = {}
    steps = StepRecorder()
    with AtomicDir(out, force) as tmp, contextlib.closing(steps):
        work = tmp / ".work"
        work.mkdir()
        trt_dir = tmp / "trt_calibration" if trt_cache else None
        data = json.loads(json.dumps(manifest.data))
        for entry in manifest.data_files():
            shutil.copyfile(entry, tmp / entry.name)
        present: dict[str, set[str]] = {}  # graph -> --exclude-node names found in it
        for g, prec in precisions.items():
            t0 = time.perf_counter()
            suffix = "" if prec == "fp32" else f".{prec}"
            dst_name = f"{Path(manifest.graph(g)['file']).stem}{suffix}.onnx"
            dst = tmp / dst_name
            excl = _split_excludes(exclude_nodes, g)
            if prec != "fp32":
                stage(f"{g} -> {prec}")
            with steps.step(g):
                info = _quantize_graph(manifest, g, prec, dst, calib, method, op_types, excl, block_size, llm, llm_activations, work, trt_dir,
                                       accuracy_level, asymmetric, weight_algorithm)
            if prec == "fp32":
                prec = src_dtype
            else:
                present[g] = set(excl) - set(info.pop("unknown_excludes", []))
            info["seconds"] = round(time.perf_counter() - t0, 3)
            info["bytes"] = sum(f.stat().st_size for f in tmp.glob(dst.name + "*"))
            graphs_info[g] = {"precision": prec, **info}
            data["graphs"][g]["file"] = dst_name
            data["graphs"][g]["precision"] = prec
            data["graphs"][g]["quantization"] = info
        missing = [e for e in exclude_nodes if not any(_exclude_target(e, g) in names for g, names in present.items())]
        if missing:
            raise InputError(
                f"--exclude-node {', '.join(missing)}: no such node in the quantized graph(s) {', '.join(sorted(present)) or '(none)'}.\n"
                "Hint: use node names of the exported graph (e.g. node_MatMul_17), optionally as GRAPH:NAME."
            )
        shutil.rmtree(work)
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")  # new id: feature caches must not mix exports
        data["quantization"] = {
            "source_export": {"path": str(Path(export_dir).resolve()), "created": manifest.data.get("created")},
            "calibration": {"path": str(Path(calib_dir).resolve()), "created": calib.index.get("created"),
                            "sources": len(calib.index["sources"]), "held_out": calib.has_holdout()},
            "vision": vision, "pool": pool, "llm": llm, "llm_trt": precisions.get("decoder_trt"), "method": method, "op_types": op_types,
            "block_size": block_size, "exclude_nodes": list(exclude_nodes), "accept_degraded": accept_degraded,
            "llm_activations": llm_activations, "gate": gate, "accuracy_level": accuracy_level, "asymmetric": asymmetric,
            "tool": {"onnxruntime": _ort_version()},
        }
        data[WEIGHTS_KEY] = file_digests(tmp, data)  # this folder's files, not the source export's
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        stage("accuracy gate" + (" (depth-truncated decoder)" if gate == "truncated" else ""))
        with steps.step("accuracy gate"):
            if gate == "truncated":
                report = evaluate_accuracy_truncated(manifest, tmp, calib, precisions, thresholds, prefill_positions, greedy_tokens, block_size,
                                                     list(exclude_nodes), llm_activations, tmp / ".gate", accuracy_level, asymmetric)
            else:
                report = evaluate_accuracy(export_dir, tmp, calib, precisions, thresholds, prefill_positions, greedy_tokens, quality_tokens, quality_pairs)
        data["quantization"]["steps"] = steps.as_dict()
        data["quantization"]["peak_rss_mb"] = steps.peak_rss_mb
        data["quantization"]["accuracy"] = {"passed": report.passed, "file": ACCURACY_NAME}
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        (tmp / ACCURACY_NAME).write_text(json.dumps(report.as_dict(), indent=2))
        if not report.passed and not accept_degraded:
            fails = "; ".join(f"{c.graph} {c.metric} = {c.value:.4f} {'>' if c.lower_is_better else '<'} {c.threshold:g}" for c in report.failures())
            err = AccuracyError(
                f"accuracy gate failed: {fails}.\nNothing was written to {out}.\n"
                "Hint: keep the failing graph in higher precision (--vision/--pool/--llm), exclude nodes (--exclude-node), "
                "try another --method, or pass --accept-degraded to write it anyway."
            )
            err.report = report  # type: ignore[attr-defined]
            raise err
    return QuantizeResult(Path(out), data, report, graphs_info, time.perf_counter() - t_start)


def _quantize_graph(manifest, g: str, prec: str, dst: Path, calib: CalibrationSet, method: str, op_types: str, excl: list[str],
                    block_size: int, llm: str, llm_activations: str, work: Path, trt_dir: Path | None,
                    accuracy_level: int | None = None, asymmetric: bool | None = None, weight_algorithm: str = "auto") -> dict:
    """One graph of the export to `dst` at `prec` ("fp32" = unchanged: the export's own precision, copied)."""
    src = manifest.path(g)
    src_dtype = manifest.data.get("dtype", "fp32")
    if prec == "fp32":
        copy_graph(src, dst)
        info = {"scheme": f"{src_dtype} (copied)"}
        return info
    if prec == "int8" and src_dtype == "fp16":  # an fp32 twin of the same graph, calibrated and quantized
        from ..export.exporter import trace_vision_graph, write_vision_graph

        ckpt, opset = manifest.data["checkpoint"]["path"], manifest.data.get("opset", 20)
        if g == "vision":  # the fused graph ONNX Runtime runs, written again in fp32
            fp32 = write_vision_graph(ckpt, work / f"{g}.fp32.onnx", "fp32", opset)
            source = "the fused vision graph written in fp32 from the checkpoint (the export is fp16)"
        else:  # vision_trt: TensorRT's traced standard-ops graph
            fp32 = trace_vision_graph(ckpt, work / f"{g}.fp32.onnx", manifest.frames, opset=opset)
            source = "an fp32 trace of the checkpoint's vision tower (the export is fp16)"
        info = _quantize_static(fp32, dst, calib, g, method, op_types, excl, work, trt_dir)
        info["source"] = source
        return info
    if prec == "int8":
        return _quantize_static(src, dst, calib, g, method, op_types, excl, work, trt_dir)
    if prec in ("int8-weight", "int4-weight") and g == "decoder_trt":
        from .weight_dq import quantize_dq

        return quantize_dq(src, dst, 8 if prec == "int8-weight" else 4, block_size, excl)
    if prec in ("int8-weight", "int4-weight"):
        upcast = src_dtype == "fp16" and llm_activations == "fp32"
        bits = 8 if prec == "int8-weight" else 4
        level = ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level
        asym = ASYMMETRIC[bits] if asymmetric is None else asymmetric
        algorithm = WEIGHT_ALGORITHM[bits] if weight_algorithm == "auto" else weight_algorithm
        hessians = collect_hessians(src, calib) if algorithm == "gptq" else None
        return _quantize_nbits(src, dst, bits, block_size, excl, upcast=upcast, accuracy_level=level, symmetric=not asym,
                               algorithm=algorithm, hessians=hessians)
    return _to_fp16(src, dst, excl)


def copy_graph(src: Path, dst: Path) -> None:
    """Copy an ONNX file and the external-data files it names (kept beside it under the same names)."""
    import onnx

    shutil.copyfile(src, dst)
    for location in external_files(onnx.load(str(src), load_external_data=False)):
        shutil.copyfile(src.parent / location, dst.parent / location)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
