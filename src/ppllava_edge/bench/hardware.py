"""How far a run is from this machine's limits: measured memory bandwidth and GEMM FLOP/s, FLOP counts of the
vision graph and the LLM prefill from the manifest's model dims, and the efficiencies derived from them.

    bw = memory_bandwidth()            # {"gbs": ..., "probes": {...}}
    mm = gemm_flops()                  # {"gflops": ..., "probes": {...}}
    vision_flops(manifest.model, 32)   # FLOPs of vision.onnx for 32 frames
    prefill_flops(manifest.model, 1044)

The GEMM probe reports the best of a few repetitions (the compute roof the hardware reached). The bandwidth probe
reads a working set far larger than the last-level cache and reports the median of its repetitions and their
spread (a best-of over a cache-sized array read 37-73 GB/s from run to run on one machine). numpy's BLAS and ONNX
Runtime's MLAS both use every core by default, as the graphs do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def last_level_cache_bytes() -> int | None:
    """Total last-level cache of this machine from sysfs (the highest cache level, summed over its instances)."""
    root = Path("/sys/devices/system/cpu")
    seen: dict[str, int] = {}
    level_max = 0
    for cache in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            level = int((cache / "level").read_text())
            size = (cache / "size").read_text().strip().upper()
            shared = (cache / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        nbytes = int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[size[-1]] if size[-1] in "KMG" else int(size)
        if level > level_max:
            level_max, seen = level, {}
        if level == level_max:
            seen[shared] = nbytes
    return sum(seen.values()) or None


def _samples(fn, repeats: int) -> list[float]:
    fn()  # warm-up: page faults, thread-pool start
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _matmul_session(a_shape: list[int], b_shape: list[int], threads: int | None):
    """An ONNX Runtime session of one fp32 MatMul with both operands fed as inputs `a`, `b`; None without `onnx`."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return None
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul_probe",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape), helper.make_tensor_value_info("b", TensorProto.FLOAT, b_shape)],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [a_shape[0], b_shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def memory_bandwidth(size_mb: int | None = None, repeats: int = 7, threads: int | None = None) -> dict:
    """Sustained read bandwidth in GB/s (1e9 bytes/s) over a working set far larger than the last-level cache.

    The working set is `size_mb` MiB (default: 1 GiB, or 16x the LLC when that is larger), so no probe is served
    from cache. Three probes read every byte once per repetition:

    - `read_threads`: numpy's reduction split over one thread per core (numpy releases the GIL);
    - `gemv`: numpy's BLAS matrix-vector product;
    - `ort_gemv`: ONNX Runtime's MatMul [1,K] x [K,N] (MLAS GEMV, the kernel of a decode step).

    Each probe's value is the **median** of `repeats` repetitions (one repetition slowed by another process does
    not move it); `gbs` is the best probe's median, and `spread` is that probe's (max - min) / median, which the
    bench prints so a noisy machine shows.
    """
    from concurrent.futures import ThreadPoolExecutor

    llc = last_level_cache_bytes()
    if size_mb is None:
        size_mb = max(1024, 16 * (llc or 0) // (1 << 20))
    cols = 8192
    rows = max(1, size_mb * (1 << 20) // 4 // cols)
    a = np.ones((rows, cols), dtype=np.float32)
    a[::7] = 0.5  # touch every page with non-trivial data
    x = np.ones(cols, dtype=np.float32)
    x_row = np.ones((1, rows), dtype=np.float32)
    nbytes = a.nbytes
    workers = max(1, os.cpu_count() or 1)
    chunks = np.array_split(a, workers)
    probes_s: dict[str, list[float]] = {}
    with ThreadPoolExecutor(workers) as pool:
        probes_s["read_threads"] = _samples(lambda: list(pool.map(lambda c: np.add.reduce(c, axis=None), chunks)), repeats)
    probes_s["gemv"] = _samples(lambda: a @ x, repeats)
    sess = _matmul_session([1, rows], [rows, cols], threads)  # MLAS's GEMV: the access pattern of a decode step
    if sess is not None:
        probes_s["ort_gemv"] = _samples(lambda: sess.run(None, {"a": x_row, "b": a}), repeats)
        del sess
    del a, chunks
    detail = {}
    for name, secs in probes_s.items():
        gbs = sorted(nbytes / t / 1e9 for t in secs)
        median = float(np.median(gbs))
        detail[name] = {"median": median, "min": gbs[0], "max": gbs[-1], "spread": (gbs[-1] - gbs[0]) / median}
    best = max(detail, key=lambda k: detail[k]["median"])
    return {
        "gbs": detail[best]["median"], "probe": best, "spread": detail[best]["spread"], "min": detail[best]["min"], "max": detail[best]["max"],
        "bytes": nbytes, "llc_bytes": llc, "repeats": repeats, "probes": {k: v["median"] for k, v in detail.items()}, "detail": detail,
    }


def _ort_matmul_seconds(n: int, repeats: int, threads: int | None) -> float | None:
    """Best time of an n x n x n fp32 MatMul in ONNX Runtime; None when `onnx` (to build the graph) is missing."""
    sess = _matmul_session([n, n], [n, n], threads)
    if sess is None:
        return None
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
def decode_efficiency(bytes_per_token: float, tokens_per_s: float | None, bandwidth_gbs: float | None) -> float | None:
    """Fraction of the memory bandwidth a decode step uses for the bytes it must read once per token: the decoder's
    weights as stored plus the KV cache at that context (see `decode_bytes_per_token`)."""
    if not tokens_per_s or not bandwidth_gbs:
        return None
    return bytes_per_token * tokens_per_s / (bandwidth_gbs * 1e9)


def decode_bytes_per_token(weight_bytes: int, model: dict, context: int, new_tokens: int, kv_itemsize: int) -> tuple[int, int]:
    """(weights, KV) bytes a decode step must read, averaged over a run's steps: every step reads all decoder
    weights once and the K/V caches of every cached position (context + i for the i-th step)."""
    steps = max(1, new_tokens - 1)
    mean_positions = context + (steps - 1) / 2 + 1  # step i (0-based) attends context + i + 1 positions
    return int(weight_bytes), int(kv_cache_bytes(model, 1, kv_itemsize) * mean_positions)


def compute_efficiency(flops: float, ms: float | None, gflops: float | None) -> float | None:
    """Achieved FLOP/s of a stage over the measured GEMM FLOP/s."""
    if not ms or not gflops:
        return None
    return flops / (ms / 1e3) / (gflops * 1e9)
