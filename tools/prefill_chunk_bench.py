"""Whole-decoder prefill by chunk size: python tools/prefill_chunk_bench.py EXPORT [S] [ITERS] [THREADS] [CHUNKS]

The export's ONNX Runtime decoder (as the runtime opens it: `InplaceKVDecoder`, cache bound in place) prefills the
same S random prompt embeddings with `prefill_chunk` set to each of CHUNKS (comma-separated; 0 = one run), ITERS
rounds interleaved. Prints per chunk size the median wall ms at THREADS intra-op threads, the CPU ms
(`process_time`; with 1 thread the work done, whatever else the machine runs), the speed-up against one run and the
max-abs difference of the logits and of the KV cache against one run.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from ppllava_edge.manifest import load_manifest
from ppllava_edge.runtime.decoder import open_decoder
from ppllava_edge.runtime.session import create_session


def main() -> None:
    export = sys.argv[1]
    S = int(sys.argv[2]) if len(sys.argv) > 2 else 1051
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    chunks = [int(c) for c in (sys.argv[5] if len(sys.argv) > 5 else "0,512,256,128,64").split(",")]
    m = load_manifest(export)
    graph = m.graph_for("decoder", "ort")
    sess = create_session(m.path(graph), "cpu", threads, optimize="basic")
    dec = open_decoder(sess, m.graph(graph), m.model, np.float32, "cpu")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, S, m.model["hidden_size"])) * 0.02).astype(dec.dtype)
    dec.reserve(1, S + 32)

    def prefill(chunk: int):
        dec.prefill_chunk = chunk
        dec.reset(1)
        logits = dec.forward(x)
        return logits, [p.copy() for p in dec.past()[:2]]

    ref_logits, ref_kv = prefill(0)
    wall = {c: [] for c in chunks}
    cpu = {c: [] for c in chunks}
    diff = {}
    for c in chunks:
        lg, kv = prefill(c)
        diff[c] = (float(np.abs(lg - ref_logits).max()), max(float(np.abs(a - b).max()) for a, b in zip(kv, ref_kv)))
    for _ in range(iters):
        for c in chunks:
            t0, c0 = time.perf_counter(), time.process_time()
            prefill(c)
            wall[c].append((time.perf_counter() - t0) * 1e3)
            cpu[c].append((time.process_time() - c0) * 1e3)
    print(f"{export}: decoder {graph}, prefill of {S} positions, {threads} threads, median of {iters}")
    print(f"{'chunk':>6s} {'wall ms':>9s} {'cpu ms':>9s} {'vs one run (cpu)':>17s} {'logits diff':>12s} {'kv diff':>9s}")
    base = statistics.median(cpu[chunks[0]])
    for c in chunks:
        w, t = statistics.median(wall[c]), statistics.median(cpu[c])
        print(f"{c or S:6d} {w:9.1f} {t:9.1f} {base / t:16.2f}x {diff[c][0]:12.2e} {diff[c][1]:9.2e}")


if __name__ == "__main__":
    main()
