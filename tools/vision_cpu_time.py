"""Vision graph CPU time on a shared machine: python tools/vision_cpu_time.py FRAMES ITERS EXPORT [EXPORT ...]

With --wall THREADS first (python tools/vision_cpu_time.py --wall 2 FRAMES ITERS EXPORT ...): wall clock instead,
each graph in the runtime's own session (`create_session`: THREADS intra-op threads, arena "shrink"), the load
average printed before and after; used for the README's "INT8 vision: the int8 kernels" table.

Each export's ONNX Runtime vision graph (`manifest.graph_for("vision")`) runs on the same random pixels with one
intra-op thread; CPU time (`time.process_time`) is the work done, whatever else the machine runs. One untimed run,
then ITERS runs interleaved across exports. Prints the median, GFLOP/s (FLOPs from bench.hardware.vision_flops), the
efficiency against a one-thread ONNX Runtime MatMul (1536²) timed the same way, the speed-up against the first
export and the output cosine to it. Used for the README's "Vision graph: fused attention" numbers.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from ppllava_edge.bench.hardware import vision_flops
from ppllava_edge.manifest import load_manifest


def _options() -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return o


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def gemm_gflops(n: int = 1536, repeats: int = 5) -> float:
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    s = ort.InferenceSession(model.SerializeToString(), _options(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    s.run(None, {"a": a, "b": a})
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        s.run(None, {"a": a, "b": a})
        ts.append(time.process_time() - t0)
    return 2 * n**3 / float(np.median(ts)) / 1e9


def main(frames: int, iters: int, exports: list[str], wall_threads: int = 0) -> None:
    clock = time.perf_counter if wall_threads else time.process_time
    gemm = gemm_gflops()
    print(f"GEMM, 1 thread, CPU time: {gemm:.1f} GFLOP/s; load average {os.getloadavg()}", flush=True)
    manifests = [load_manifest(e) for e in exports]
    if wall_threads:
        from ppllava_edge.runtime.session import create_session

        sessions = [create_session(m.path(m.graph_for("vision")), "cpu", threads=wall_threads, arena="shrink") for m in manifests]
    else:
        sessions = [ort.InferenceSession(str(m.path(m.graph_for("vision"))), _options(), providers=["CPUExecutionProvider"]) for m in manifests]
    size = manifests[0].model["image_size"]
    px = np.random.default_rng(0).standard_normal((frames, 3, size, size), dtype=np.float32)
    outs = [s.run(None, {"pixel_values": px}) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(iters):
        for j, s in enumerate(sessions):
            t0 = clock()
            s.run(None, {"pixel_values": px})
            times[j].append(clock() - t0)
    flops = vision_flops(manifests[0].model, frames)
    base = float(np.median(times[0]))
    for m, t, o in zip(manifests, times, outs):
        med = float(np.median(t))
        prec = m.graph(m.graph_for("vision")).get("precision")
        print(f"T={frames} {m.folder.name} ({prec} vision): {med * 1e3:.0f} ms {'wall' if wall_threads else 'CPU'} (best {min(t) * 1e3:.0f}), {flops / med / 1e9:.1f} GFLOP/s, "
              f"efficiency {flops / med / 1e9 / gemm:.2f}, speed-up vs first {base / med:.2f}, "
              f"cosine to first: values {_cosine(outs[0][0], o[0]):.5f} keys {_cosine(outs[0][1], o[1]):.5f}")
    print("load average", os.getloadavg())


if __name__ == "__main__":
    args = sys.argv[1:]
    wall = int(args[1]) if args[:1] == ["--wall"] else 0
    args = args[2:] if wall else args
    if len(args) < 3:
        sys.exit(__doc__.splitlines()[0])
    main(int(args[0]), int(args[1]), args[2:], wall)
