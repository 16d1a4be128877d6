"""How far a run is from this machine's limits: measured memory bandwidth and GEMM FLOP/s, FLOP counts of the
vision graph and the LLM prefill from the manifest's model dims, and the efficiencies derived from them.

    bw = memory_bandwidth()            # {"gbs": ..., "probes": {...}}
    mm = gemm_flops()                  # {"gflops": ..., "probes": {...}}
    vision_flops(manifest.model, 32)   # FLOPs of vision.onnx for 32 frames
    prefill_flops(manifest.model, 1044)

Both probes report the best of a few repetitions (the limit the hardware reached), since other processes can only
make a probe slower. numpy's BLAS and ONNX Runtime's MLAS both use every core by default, as the graphs do.
"""

from __future__ import annotations

import os
import time

import numpy as np


# ---- probes -----------------------------------------------------------------------------------------
def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, thread-pool start
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def memory_bandwidth(size_mb: int = 256, repeats: int = 5) -> dict:
    """Read bandwidth in GB/s (1e9 bytes/s) from a large float32 array, two ways; `gbs` is the better one.

    - `sum`: numpy's reduction over the array (one thread, vectorised);
    - `sum_threads`: the same reduction split over one thread per core (numpy releases the GIL);
    - `gemv`: a matrix-vector product over the same bytes (BLAS) - the access pattern of a decode step.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = max(1, size_mb * (1 << 20) // 4)
    cols = 1024
    rows = max(1, n // cols)
    a = np.ones((rows, cols), dtype=np.float32)
    a[::7] = 0.5  # touch every page with non-trivial data
    x = np.ones(cols, dtype=np.float32)
    nbytes = a.nbytes
    workers = max(1, os.cpu_count() or 1)
    chunks = np.array_split(a, workers)
    with ThreadPoolExecutor(workers) as pool:
        probes = {
            "sum": nbytes / _best_seconds(lambda: np.add.reduce(a, axis=None), repeats) / 1e9,
            "sum_threads": nbytes / _best_seconds(lambda: list(pool.map(lambda c: np.add.reduce(c, axis=None), chunks)), repeats) / 1e9,
            "gemv": nbytes / _best_seconds(lambda: a @ x, repeats) / 1e9,
        }
    del a, chunks
    return {"gbs": max(probes.values()), "bytes": nbytes, "repeats": repeats, "probes": probes}


def _ort_matmul_seconds(n: int, repeats: int, threads: int | None) -> float | None:
    """Best time of an n x n x n fp32 MatMul in ONNX Runtime; None when `onnx` (to build the graph) is missing."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "gemm_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]), helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    return _best_seconds(lambda: sess.run(None, feed), repeats)


def gemm_flops(n: int = 1536, repeats: int = 5, threads: int | None = None) -> dict:
    """fp32 GEMM throughput in GFLOP/s (2 n^3 FLOPs per product): numpy (BLAS) and ONNX Runtime (MLAS) MatMul;
    `gflops` is the better one, the compute roof the graphs' efficiencies are measured against."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n**3
    probes = {"numpy": flops / _best_seconds(lambda: a @ b, repeats) / 1e9}
    ort_s = _ort_matmul_seconds(n, repeats, threads)
    if ort_s is not None:
        probes["onnxruntime"] = flops / ort_s / 1e9
    return {"gflops": max(probes.values()), "n": n, "repeats": repeats, "probes": probes}


# ---- FLOP counts from the manifest's model dims ----------------------------------------------------------
def vision_layer_weights(model: dict) -> float:
    """Weights (incl. biases) of one CLIP encoder layer, solved from `vision_params` (the MLP width is not in the
    manifest): params = L*w + depth*(w + 5 D^2) + patch conv + position / time embeddings."""
    d, p = model["vision_hidden_size"], model["patch_size"]
    layers, depth = model["vision_layers"], model["btadapter_depth"]
    seq = model["patches_per_frame"] + 1
    other = 3 * p * p * d + (seq + model.get("max_frames", 64) + 1) * d
    return max(0.0, (model["vision_params"] - other - depth * 5 * d * d) / (layers + depth))


def vision_flops(model: dict, frames: int) -> float:
    """FLOPs of vision.onnx for `frames` frames (multiply-add = 2): patch conv, the L-1 CLIP layers that run
    (attention over 1+P tokens per frame), the depth-1 BT-Adapter pairs that run (temporal attention over T per
    patch + a spatial layer), and the heads (linear_1 to the LLM width, the CLIP visual projection for the keys)."""
    d, p = model["vision_hidden_size"], model["patch_size"]
    layers, depth = model["vision_layers"], model["btadapter_depth"]
    patches = model["patches_per_frame"]
    seq = patches + 1
    t = frames
    w = vision_layer_weights(model)
    layer = 2.0 * t * seq * w + 4.0 * t * seq * seq * d  # linear + (QK^T, AV) per frame
    flops = 2.0 * t * patches * 3 * p * p * d
    flops += (layers - 1) * layer
    steps = max(0, depth - 1)
    temporal = 2.0 * patches * t * 5 * d * d + 4.0 * patches * t * t * d
    flops += steps * (temporal + layer)
    flops += 2.0 * t * patches * d * (model["hidden_size"] + model["clip_embed_dim"])
    return flops


def llm_layer_weights(model: dict) -> int:
    """Matmul weights of one decoder layer: q, k, v, o projections and the gated MLP."""
    d, h, kv, hd, inter = model["hidden_size"], model["num_attention_heads"], model["num_kv_heads"], model["head_dim"], model["intermediate_size"]
    return d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * inter


def prefill_flops(model: dict, tokens: int) -> float:
    """FLOPs of the prefill of `tokens` positions: the layers' matmuls, causal attention (QK^T and AV over the
    lower triangle only) and the LM head on the last position (the graph keeps one position of logits)."""
    layers, h, hd = model["num_layers"], model["num_attention_heads"], model["head_dim"]
    linear = 2.0 * tokens * layers * llm_layer_weights(model)
    attention = 2.0 * layers * h * hd * tokens * (tokens + 1)
    head = 2.0 * model["hidden_size"] * model["vocab_size"]
    return linear + attention + head


def kv_cache_bytes(model: dict, positions: int, itemsize: int, batch: int = 1) -> int:
    """Bytes of the K and V caches holding `positions` positions."""
    return 2 * model["num_layers"] * batch * model["num_kv_heads"] * positions * model["head_dim"] * itemsize


# ---- efficiencies ----------------------------------------------------------------------------------------
def decode_efficiency(weight_bytes_per_token: float, tokens_per_s: float | None, bandwidth_gbs: float | None) -> float | None:
    """Fraction of the memory bandwidth a decode step uses just to read the weights once per token."""
    if not tokens_per_s or not bandwidth_gbs:
        return None
    return weight_bytes_per_token * tokens_per_s / (bandwidth_gbs * 1e9)


def compute_efficiency(flops: float, ms: float | None, gflops: float | None) -> float | None:
    """Achieved FLOP/s of a stage over the measured GEMM FLOP/s."""
    if not ms or not gflops:
        return None
    return flops / (ms / 1e3) / (gflops * 1e9)
