"""Per-graph conversion of one ONNX graph at one precision mode (`quantize.py` orchestrates the folder).

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
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import CalibrationError
from ..external_data import ExternalData, external_files, read_initializer
from ..memory import trim_heap
from .options import WEIGHT_ONLY, QuantizeOptions
from .readers import CalibrationSet, histogram_shape_fix, make_reader
from .weight_algorithms import collect_hessians, refine_packed, unpack_zero_points

log = logging.getLogger(__name__)

TRT_CACHE_HEADER = "TRT-8601-EntropyCalibration2"
_WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
_POOLS = ("prompt_pool", "image_pool")


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


def _quantize_graph(manifest, g: str, prec: str, dst: Path, calib: CalibrationSet, options: QuantizeOptions, work: Path,
                    trt_dir: Path | None) -> dict:
    """One graph of the export to `dst` at `prec` ("fp32" = unchanged: the export's own precision, copied), with the
    conversion settings of `options`."""
    src = manifest.path(g)
    src_dtype = manifest.dtype
    excl = _split_excludes(options.exclude_nodes, g)
    if prec == "fp32":
        copy_graph(src, dst)
        info = {"scheme": f"{src_dtype} (copied)"}
        return info
    if prec == "int8" and src_dtype == "fp16":  # an fp32 twin of the same graph, calibrated and quantized
        from ..export.exporter import trace_vision_graph, write_vision_graph

        ckpt, opset = manifest.checkpoint["path"], manifest.opset
        if g == "vision":  # the fused graph ONNX Runtime runs, written again in fp32
            fp32 = write_vision_graph(ckpt, work / f"{g}.fp32.onnx", "fp32", opset)
            source = "the fused vision graph written in fp32 from the checkpoint (the export is fp16)"
        else:  # vision_trt: TensorRT's traced standard-ops graph
            fp32 = trace_vision_graph(ckpt, work / f"{g}.fp32.onnx", manifest.frames, opset=opset)
            source = "an fp32 trace of the checkpoint's vision tower (the export is fp16)"
        info = _quantize_static(fp32, dst, calib, g, options.method, options.op_types, excl, work, trt_dir)
        info["source"] = source
        return info
    if prec == "int8":
        return _quantize_static(src, dst, calib, g, options.method, options.op_types, excl, work, trt_dir)
    if prec in WEIGHT_ONLY and g == "decoder_trt":
        from .weight_dq import quantize_dq

        return quantize_dq(src, dst, 8 if prec == "int8-weight" else 4, options.block_size, excl)
    if prec in WEIGHT_ONLY:
        bits = 8 if prec == "int8-weight" else 4
        algorithm = options.algorithm_for(bits)
        hessians = collect_hessians(src, calib) if algorithm == "gptq" else None
        return _quantize_nbits(src, dst, bits, options.block_size, excl, **options.weight_only(bits, src_dtype),
                               algorithm=algorithm, hessians=hessians)
    return _to_fp16(src, dst, excl)


def copy_graph(src: Path, dst: Path) -> None:
    """Copy an ONNX file and the external-data files it names (kept beside it under the same names)."""
    import onnx

    shutil.copyfile(src, dst)
    for location in external_files(onnx.load(str(src), load_external_data=False)):
        shutil.copyfile(src.parent / location, dst.parent / location)
