"""Weight-only int4 / int8 for TensorRT: the standard-ops decoder (`decoder_trt`) with DequantizeLinear weights.

TensorRT's ONNX parser does not take ONNX Runtime's MatMulNBits, so `quantize --llm int4-weight|int8-weight` on an
export made with `--tensorrt` also rewrites `decoder_trt` into the weight-only pattern TensorRT 10 documents: every
MatMul whose B is a constant [K, N] weight reads it through a DequantizeLinear of a constant low-bit tensor.

    int4:  W_q (INT4 [K, N]) --DequantizeLinear(axis=0, block_size=B)--> W [K, N] --> MatMul(x, W)
           scale [K/B, N] (the activation dtype); no zero point (symmetric; TensorRT requires zero points of 0)
    int8:  W_q (INT8 [K, N]) --DequantizeLinear(axis=1)--> W --> MatMul   scale [N] (per output channel)

Why this pattern (the sources, README "TensorRT decoder at int4 / int8"): TensorRT's Dequantize layer takes int8,
fp8 and int4 inputs, "a 1-D tensor for per-channel quantization, or a 2-D tensor for block quantization (supported
for DataType::kINT4 only)", zero points must be zero (docs.nvidia.com/deeplearning/tensorrt/operators/docs/
Dequantize.html); the ONNX parser (onnx/onnx-tensorrt onnxOpImporters.cpp, QuantDequantLinearHelper) accepts a
scale of the input's rank with exactly one blocked dimension, the block size being input / scale along it, and
docs/operators.md lists DequantizeLinear for INT8, FP8, INT4 with "x_zero_point must be zero". Blocked
DequantizeLinear needs ONNX opset 21 (block_size, int4), so the rewritten graph declares opset 21.

The int4 values are those of the MatMulNBits decoder: each weight is quantized by the same ONNX Runtime kernel
(`quantize_matmul_4bits`, symmetric, per column and block of K), then unpacked (uint4 - 8 = int4) - so ONNX Runtime
runs the same quantized model through either graph (a test compares their greedy ids). Where K is not a multiple
of B (SmolLM2's K = 576 at B = 128), TensorRT cannot infer an integer block size, so that weight uses the largest
power-of-two block below B that divides K (recorded in the manifest).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CalibrationError
from ..external_data import ExternalData, read_initializer

DQ_OPSET = 21


def _block_for(k: int, block_size: int) -> int:
    b = block_size
    while b > 1 and k % b:
        b //= 2
    return b


def int4_blocks(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(int4 values as int8 [K, N] in -8..7, scales float32 [K/B, N]) of `w` [K, N], exactly as ONNX Runtime's
    MatMulNBits quantizer computes them (symmetric): `(q - 8) * scale` is its dequantized weight."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    w = np.ascontiguousarray(w, dtype=np.float32)
    k, n = w.shape
    kb = (k + block_size - 1) // block_size
    packed = np.zeros((n, kb, block_size // 2), dtype=np.uint8)
    scales = np.zeros((n, kb), dtype=np.float32)
    zp = np.zeros((n, (kb + 1) // 2), dtype=np.uint8)
    if kb * block_size != k:
        w = np.pad(w, ((0, kb * block_size - k), (0, 0)))
    quantize_matmul_4bits(packed, w, scales, zp, block_size, n, k, True)
    u = np.empty((n, kb, block_size), dtype=np.uint8)
    u[..., 0::2] = packed & 0x0F  # low nibble first (MLAS's blob layout)
    u[..., 1::2] = packed >> 4
    q = (u.reshape(n, kb * block_size)[:, :k].astype(np.int8) - 8).T
    return np.ascontiguousarray(q), np.ascontiguousarray(scales.T)


def int8_channels(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [K, N], scales float32 [N]): symmetric per output channel, scale = max|w| / 127."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 raw data: row-major elements, two per byte, the first in the low nibble."""
    flat = (q.astype(np.int8).ravel() & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def quantize_dq(src: Path, dst: Path, bits: int, block_size: int, excludes: list[str]) -> dict:
    """`src` (a standard-ops graph) to `dst` with every MatMul's constant 2-D weight behind a DequantizeLinear
    (int4 blocked along K, or int8 per channel); weights are read memory-mapped and written to `dst.data` one at a
    time. A weight read through `Transpose(perm=[1, 0])` (a tied head) is quantized in its [K, N] orientation."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    names = {n.name for n in graph.node}
    skip = set(excludes)
    inits = {t.name: t for t in graph.initializer}
    producer = {o: nd for nd in graph.node for o in nd.output}
    consumers: dict[str, int] = {}
    for nd in graph.node:
        for i in nd.input:
            consumers[i] = consumers.get(i, 0) + 1

    def weight_of(nd) -> tuple[str, bool] | None:
        """(initializer name, transposed) of MatMul `nd`'s constant B, or None."""
        if nd.op_type != "MatMul" or nd.name in skip or len(nd.input) < 2:
            return None
        b = nd.input[1]
        if b in inits and len(inits[b].dims) == 2:
            return b, False
        t = producer.get(b)
        if (t is not None and t.op_type == "Transpose" and t.input[0] in inits and len(inits[t.input[0]].dims) == 2
                and [a.ints for a in t.attribute if a.name == "perm"] in ([[1, 0]], []) and consumers.get(b) == 1):
            return t.input[0], True
        return None

    targets = {nd.name: weight_of(nd) for nd in graph.node}
    targets = {k: v for k, v in targets.items() if v is not None}
    if not targets:
        raise CalibrationError(f"{src.name}: no MatMul with a constant 2-D weight to quantize")
    dropped_transposes = {nd.input[1] for nd in graph.node if nd.name in targets and targets[nd.name][1]}
    data_name = dst.name + ".data"
    new_inits, new_nodes, blocks_used, qbytes = [], [], {}, 0
    done: dict[tuple[str, bool], tuple[str, str, int]] = {}
    with ExternalData(dst.parent / data_name) as out:
        for nd in graph.node:
            if nd.output[0] in dropped_transposes:
                continue  # folded into the quantized weight
            if nd.name not in targets:
                new_nodes.append(nd)
                continue
            name, transposed = targets[nd.name]
            if (name, transposed) not in done:
                arr = read_initializer(inits[name], src.parent)
                dtype = arr.dtype
                w = np.asarray(arr, dtype=np.float32)
                w = w.T if transposed else w
                k, n = w.shape
                qname, sname = f"{name}{'_T' if transposed else ''}_DQ{bits}", f"{name}{'_T' if transposed else ''}_DQ{bits}_scale"
                if bits == 4:
                    b = _block_for(k, block_size)
                    q, scale = int4_blocks(w, b)
                    raw = pack_int4(q)
                    proto = out.add(qname, np.frombuffer(raw, dtype=np.uint8))
                    del proto.dims[:]
                    proto.dims.extend([k, n])
                    proto.data_type = TensorProto.INT4
                    blocks_used[b] = blocks_used.get(b, 0) + 1
                    attrs = {"axis": 0, "block_size": b}
                else:
                    q, scale = int8_channels(w)
                    proto = out.add(qname, q)
                    raw = q
                    attrs = {"axis": 1}
                qbytes += len(raw) if isinstance(raw, bytes) else raw.nbytes
                new_inits.append(proto)
                new_inits.append(out.add(sname, scale.astype(dtype)))
                qbytes += scale.astype(dtype).nbytes
                dq_out = f"{qname}_dequantized"
                new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [dq_out], name=f"{qname}_DequantizeLinear", **attrs))
                done[(name, transposed)] = (dq_out, qname, k)
                del w, q
            new_nodes.append(helper.make_node("MatMul", [nd.input[0], done[(name, transposed)][0]], list(nd.output), name=nd.name))
        referenced = {i for nd in new_nodes for i in nd.input} | {o.name for o in graph.output}
        for t in graph.initializer:  # the float weights something else still reads (none in the traced decoder)
            if t.name in referenced:
                new_inits.append(out.add(t.name, np.asarray(read_initializer(t, src.parent))))
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < DQ_OPSET:
            op.version = DQ_OPSET
    if model.ir_version < 10:  # IR 10 brought the INT4 / UINT4 types
        model.ir_version = 10
    onnx.save_model(model, str(dst))
    scheme = (f"weight-only DequantizeLinear (int4 symmetric, blocks of {block_size} along K" if bits == 4
              else "weight-only DequantizeLinear (int8 symmetric per output channel")
    info = {"scheme": scheme + "; the MatMulNBits quantizer's values; TensorRT's weight-only pattern)", "nodes_quantized": len(targets),
            "weight_bytes": qbytes, "opset": DQ_OPSET, "unknown_excludes": [e for e in excludes if e not in names]}
    if bits == 4 and set(blocks_used) != {block_size}:
        info["block_sizes"] = {str(b): c for b, c in sorted(blocks_used.items())}
    return info
