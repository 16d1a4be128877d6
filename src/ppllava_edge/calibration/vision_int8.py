"""The int8 vision graph on ONNX Runtime's int8 kernels (issue 23 item 4).

`quantize --vision int8` quantizes the fused vision graph (export/fusion.py) with static Q/DQ on its weight
MatMuls. ONNX Runtime's quantizer quantizes a MatMul's activation only when it knows that tensor's type, and
neither ONNX shape inference nor the symbolic shape inference that `quant_pre_process` falls back from types the
outputs of the graph's com.microsoft operators (MultiHeadAttention, QuickGelu, BiasGelu). So every MatMul fed by
one of them — each layer's out_proj (after MultiHeadAttention) and fc2 (after QuickGelu), the BT-Adapter's
out_proj / temporal_fc / fc2, 55 of the CLIP-L tower's 179 MatMuls — kept a float activation: ONNX Runtime turned
its weight DequantizeLinear into a weight-only MatMulNBits (fp32 compute on dequantized weights, slower than fp32
sgemm), or left a float MatMul where two MatMuls share a weight (the adapter's CLS and patch MLPs).

`type_contrib_outputs` gives those outputs their float type before quantizing; then every weight MatMul gets its
activation Q/DQ. `VISION_EXTRA_OPTIONS` leaves MatMul outputs unquantized, so ONNX Runtime fuses each
DQ(activation) + DQ(weight) + MatMul into MatMulIntegerToFloat (u8 x s8 GEMM on VNNI / AMX, float output), not
QLinearMatMul + a requantize / dequantize pair per output (README "INT8 vision: the int8 kernels (issue 23)" has
the profile and the measured alternatives).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

# quantize_static extra_options for the vision graph. OpTypesToExcludeOutputQuantization=MatMul: no Q/DQ on MatMul
# outputs -> MatMulIntegerToFloat (the bias Add and the next float op read the float result directly).
VISION_EXTRA_OPTIONS = {"OpTypesToExcludeOutputQuantization": ["MatMul"]}

# what ONNX Runtime's CPU graph optimizer turns a quantized MatMul into (int8 GEMM) vs float / weight-only
INT8_MATMUL_OPS = ("QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QGemm")
FLOAT_MATMUL_OPS = ("MatMul", "FusedMatMul", "Gemm", "MatMulNBits")

_FLOAT_TYPES = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16


def type_contrib_outputs(path: Path) -> int:
    """Add a value_info (input 0's float type, no shape) for every untyped output of a com.microsoft node of the ONNX
    file at `path` (rewritten in place; its external data is untouched). Returns how many outputs were typed."""
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    known = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    known.update({i.name: i.data_type for i in g.initializer})
    added = 0
    for node in g.node:
        if node.domain != "com.microsoft" or not node.input or known.get(node.input[0]) not in _FLOAT_TYPES:
            continue
        for out in node.output:
            if out and not known.get(out):
                g.value_info.append(helper.make_tensor_value_info(out, known[node.input[0]], None))
                known[out] = known[node.input[0]]
                added += 1
    if added:
        onnx.save(model, str(path))
    return added


def optimized_op_counts(path: Path, work: Path) -> Counter:
    """Op types of the graph ONNX Runtime's CPU provider runs for the ONNX file at `path` (all optimizations, the
    optimized copy written under `work` and counted): what each quantized MatMul became."""
    import onnx
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    out = work / f"{Path(path).stem}.optimized.onnx"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    so.optimized_model_filepath = str(out)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)


def matmul_kernels(counts: Counter) -> dict[str, int]:
    """{"int8": MatMuls on int8 GEMM kernels, "float": MatMuls left float or weight-only} from `optimized_op_counts`."""
    return {"int8": sum(counts[o] for o in INT8_MATMUL_OPS), "float": sum(counts[o] for o in FLOAT_MATMUL_OPS)}
