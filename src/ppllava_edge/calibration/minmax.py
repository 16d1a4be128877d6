"""MinMax activation ranges in bounded memory: ONNX Runtime's MinMaxCalibrater, without its copies of the weights.

ORT's calibrator loads the whole model into Python (`onnx.load` with its external data), adds a ReduceMin /
ReduceMax pair per calibrated tensor, saves that copy inline and opens a session on it: the weights sit in
memory two to three times (a CLIP-L tower in fp32 is 1.2 GB). Here the graph is read without its external data,
augmented the same way, and saved beside the source so its initializers still point into the source's data file;
the session maps them and keeps each tensor's running min and max (no per-sample outputs are kept).

The tensors calibrated, the reduction and the merge are ORT's (`select_tensors_to_calibrate`, ReduceMin /
ReduceMax with keepdims, a NaN-ignoring min / max across samples, the session's graph optimisations off), so the
ranges equal ORT's MinMax ranges (`tests/test_quantize.py` compares them) and are written in the format
`quantize_static(calibration_cache_path=...)` reads back.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_FLOAT_TYPES = (1, 10)  # TensorProto.FLOAT, FLOAT16


def tensors_to_calibrate(model, op_types: Sequence[str] | None) -> list[str]:
    """ORT's choice (CalibraterBase.select_tensors_to_calibrate): the float inputs and outputs of `op_types` nodes
    (every node when empty) that have a type in the graph and are not initializers; in graph order."""
    value_infos = {vi.name: vi for vi in model.graph.value_info}
    value_infos.update({o.name: o for o in model.graph.output})
    value_infos.update({i.name: i for i in model.graph.input})
    inits = {i.name for i in model.graph.initializer}
    out: dict[str, None] = {}
    for node in model.graph.node:
        if op_types and node.op_type not in op_types:
            continue
        for name in itertools.chain(node.input, node.output):
            vi = value_infos.get(name)
            if (vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _FLOAT_TYPES
                    and name not in inits):
                out[name] = None
    return list(out)


def augment(model_path: Path, op_types: Sequence[str] | None, augmented: Path) -> list[str]:
    """Write `augmented` (in `model_path`'s folder: external data locations are relative) with a ReduceMin and a
    ReduceMax output per calibrated tensor; returns the tensor names. The weights are never loaded."""
    import onnx

    model_path, augmented = Path(model_path), Path(augmented)
    if augmented.parent.resolve() != model_path.parent.resolve():
        raise ValueError(f"{augmented} must sit beside {model_path} (its initializers name external files relatively)")
    inferred = augmented.with_name(f".{augmented.stem}.{uuid.uuid4().hex}.inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(os.fspath(model_path), os.fspath(inferred))
        model = onnx.load(os.fspath(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)
    names = tensors_to_calibrate(model, op_types)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in itertools.chain(model.graph.value_info, model.graph.output, model.graph.input)}
    del model.graph.output[:]  # the model's own outputs are not needed, and not computing them saves time
    # each ReduceMin / ReduceMax right after its tensor's producer (graph inputs: first), so every activation can
    # be freed as soon as its own consumers ran; reductions appended at the end would keep them all alive
    wanted = set(names)
    nodes = list(model.graph.node)
    del model.graph.node[:]

    def reduce(tensors) -> None:
        for name in tensors:
            if name not in wanted:
                continue
            for op in ("ReduceMin", "ReduceMax"):
                out = f"{name}_{op}"
                model.graph.node.append(onnx.helper.make_node(op, [name], [out], keepdims=1, name=out))
                model.graph.output.append(onnx.helper.make_tensor_value_info(out, types[name], None))

    reduce(i.name for i in model.graph.input)
    for node in nodes:
        model.graph.node.append(node)
        reduce(node.output)
    onnx.save(model, os.fspath(augmented))
    return names


def minmax_ranges(model_path: Path, feeds: Iterable[dict[str, np.ndarray]], op_types: Sequence[str] | None,
                  symmetric: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tensor: (lowest, highest)} over `feeds`, as ORT's MinMax calibrator computes them (arrays of shape (1,)).

    Peak memory: the session's mapped weights plus one sample's live activations (the CPU arena is off, so a
    large sample's buffers are returned, not kept for the next)."""
    import onnxruntime as ort

    model_path = Path(model_path)
    augmented = model_path.with_name(f"{model_path.stem}.minmax.{uuid.uuid4().hex[:8]}.onnx")
    try:
        names = augment(model_path, op_types, augmented)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT's calibrator
        so.enable_cpu_mem_arena = False
        so.enable_mem_pattern = False
        # ORT's default order runs the added reductions late and keeps every calibrated activation alive until
        # then: CLIP-L, 4 frames: +2.9 GB over the weights; priority-based order: +1.0 GB, the plain graph's +0.8 GB
        so.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        so.log_severity_level = 3
        session = ort.InferenceSession(os.fspath(augmented), so, providers=["CPUExecutionProvider"])
        inputs = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        lo: dict[str, np.ndarray] = {}
        hi: dict[str, np.ndarray] = {}
        seen = 0
        for feed in feeds:
            values = dict(zip(outputs, session.run(outputs, {k: v for k, v in feed.items() if k in inputs}), strict=True))
            for name in names:
                mn = np.ravel(values[f"{name}_ReduceMin"])
                mx = np.ravel(values[f"{name}_ReduceMax"])
                lo[name] = mn if name not in lo else np.fmin(lo[name], mn)
                hi[name] = mx if name not in hi else np.fmax(hi[name], mx)
            seen += 1
        del session
    finally:
        augmented.unlink(missing_ok=True)
    if not seen:
        raise ValueError("No data is collected.")
    if symmetric:
        out = {}
        for name in names:
            m = np.fmax(np.abs(lo[name]), np.abs(hi[name]))
            out[name] = (-m, m)
        return out
    return {name: (lo[name], hi[name]) for name in names}
