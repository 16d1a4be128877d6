"""Causal prefill attention routes on ONNX Runtime's CPU provider: python tools/prefill_attention_bench.py [S] [ITERS] [THREADS] [ROUTES]

One attention layer at the small preset's dims (12 heads x 64, packed q|k|v input [1, S, 3D], RoPE inside or before
the attention) written as a one-op graph per route, run on the same input, interleaved, ITERS times each:

- gqa:        GroupQueryAttention (what decoder.onnx runs today), past/present bound in place to one buffer
- gqa-chunkN: the same, the S positions fed as chunks of N (chunked prefill)
- mha-causal: RotaryEmbedding x2 + MultiHeadAttention(unidirectional=1)
- mha-flash:  RotaryEmbedding x2 + MultiHeadAttention without a mask (MLAS flash attention; NOT causal: the upper
              bound of that kernel, not a correct route)
- attn23:     RotaryEmbedding x2 + the standard ONNX Attention (opset 23, is_causal=1)
- matmul:     RotaryEmbedding x2 + MatMul(Q, K^T) + causal mask Add + Softmax + MatMul(P, V) in standard ops
- torch:      torch's scaled_dot_product_attention(is_causal=True) on the same q, k, v (the reference's kernel)

Prints per route the median wall ms (THREADS intra-op threads) and CPU ms (process_time), GFLOP/s of the causal
attention work (2 x 2 x S^2/2 x heads x head_dim) and the max-abs difference of its output to the gqa route's.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

H, HD = 12, 64
D = H * HD
F = TensorProto.FLOAT


def _session(nodes, inputs, outputs, inits=(), opset=23, threads=2):
    g = helper.make_graph(nodes, "a", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.intra_op_num_threads = threads
    o.inter_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), o, providers=["CPUExecutionProvider"])


def _rope_tables(n):
    inv = 1.0 / (10000 ** (np.arange(0, HD, 2, dtype=np.float32) / HD))
    f = np.outer(np.arange(n, dtype=np.float32), inv)
    return np.cos(f).astype(np.float32), np.sin(f).astype(np.float32)


def build(route: str, S: int, cap: int, threads: int):
    cos, sin = _rope_tables(2 * cap)
    qkv_in = helper.make_tensor_value_info("qkv", F, [1, "s", 3 * D])
    out = helper.make_tensor_value_info("out", F, [1, "s", D])
    tabs = [helper.make_tensor("cos", F, list(cos.shape), cos.ravel()), helper.make_tensor("sin", F, list(sin.shape), sin.ravel())]
    if route.startswith("gqa"):
        kv = [helper.make_tensor_value_info(n, F, [1, H, "cap", HD]) for n in ("pk", "pv")]
        kvo = [helper.make_tensor_value_info(n, F, [1, H, "cap", HD]) for n in ("k", "v")]
        n = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens_k", "total", "cos", "sin"], ["out", "k", "v"],
                             domain="com.microsoft", num_heads=H, kv_num_heads=H, do_rotary=1, rotary_interleaved=0, scale=HD ** -0.5)
        ins = [qkv_in, *kv, helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]), helper.make_tensor_value_info("total", TensorProto.INT32, [])]
        return _session([n], ins, [out, *kvo], tabs, threads=threads)
    pos = helper.make_tensor_value_info("pos", TensorProto.INT64, [1, "s"])
    nodes = [
        helper.make_node("Split", ["qkv"], ["q0", "k0", "v"], axis=-1, num_outputs=3),
        helper.make_node("RotaryEmbedding", ["q0", "pos", "cos", "sin"], ["q"], domain="com.microsoft", num_heads=H, interleaved=0),
        helper.make_node("RotaryEmbedding", ["k0", "pos", "cos", "sin"], ["k"], domain="com.microsoft", num_heads=H, interleaved=0),
    ]
    if route in ("mha-causal", "mha-flash"):
        nodes.append(helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=H,
                                      unidirectional=int(route == "mha-causal"), scale=HD ** -0.5))
    elif route == "attn23":
        nodes.append(helper.make_node("Attention", ["q", "k", "v"], ["out"], q_num_heads=H, kv_num_heads=H, is_causal=1, scale=HD ** -0.5))
    elif route == "matmul":
        shape4 = helper.make_tensor("shape4", TensorProto.INT64, [4], [1, -1, H, HD])
        shape3 = helper.make_tensor("shape3", TensorProto.INT64, [3], [1, -1, D])
        tabs += [shape4, shape3, helper.make_tensor("scale", F, [], [HD ** -0.5])]
        nodes += [
            helper.make_node("Reshape", ["q", "shape4"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["k", "shape4"], ["k4"]), helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", ["v", "shape4"], ["v4"]), helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", ["qt", "kt"], ["sc0"]), helper.make_node("Mul", ["sc0", "scale"], ["sc1"]),
            helper.make_node("Add", ["sc1", "mask"], ["sc"]), helper.make_node("Softmax", ["sc"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "vt"], ["o4"]), helper.make_node("Transpose", ["o4"], ["o3"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["o3", "shape3"], ["out"]),
        ]
        return _session(nodes, [qkv_in, pos, helper.make_tensor_value_info("mask", F, ["s", "s"])], [out], tabs, threads=threads)
    return _session(nodes, [qkv_in, pos], [out], tabs, threads=threads)


def main() -> None:
    S = int(sys.argv[1]) if len(sys.argv) > 1 else 1051
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    threads = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    cap = S + 31
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((1, S, 3 * D), dtype=np.float32)
    pos = np.arange(S, dtype=np.int64)[None]
    mask = np.triu(np.full((S, S), -np.inf, np.float32), 1)
    routes = sys.argv[4].split(",") if len(sys.argv) > 4 else ["gqa", "gqa-chunk256", "mha-causal", "mha-flash", "attn23", "matmul", "torch"]
    if "gqa" not in routes:
        routes.insert(0, "gqa")
    sessions = {}
    for r in routes:
        if r == "torch":
            continue
        try:
            sessions[r] = build(r, S, cap, threads)
        except Exception as exc:  # a route this onnxruntime does not take
            print(f"{r}: not available ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    buf = [np.zeros((1, H, cap, HD), np.float32) for _ in range(2)]

    def run(r: str) -> np.ndarray:
        if r.startswith("gqa"):
            sess = sessions[r]
            chunk = int(r[len("gqa-chunk"):]) if "chunk" in r else S
            outs = []
            for a in range(0, S, chunk):
                b = min(S, a + chunk)
                io = sess.io_binding()
                x = np.ascontiguousarray(qkv[:, a:b])
                io.bind_cpu_input("qkv", x)
                io.bind_cpu_input("seqlens_k", np.array([b - 1], np.int32))
                io.bind_cpu_input("total", np.array(b, np.int32))
                o = np.empty((1, b - a, D), np.float32)
                io.bind_output("out", "cpu", 0, np.float32, o.shape, o.ctypes.data)
                for nm, on, t in (("pk", "k", buf[0]), ("pv", "v", buf[1])):
                    io.bind_input(nm, "cpu", 0, np.float32, t.shape, t.ctypes.data)
                    io.bind_output(on, "cpu", 0, np.float32, t.shape, t.ctypes.data)
                sess.run_with_iobinding(io)
                outs.append(o)
            return np.concatenate(outs, axis=1)
        if r == "torch":
            import torch

            torch.set_num_threads(threads)
            cos, sin = _rope_tables(S)
            t = torch.from_numpy(qkv).view(1, S, 3, H, HD)
            c, s_ = torch.from_numpy(np.concatenate([cos, cos], -1))[:, None], torch.from_numpy(np.concatenate([sin, sin], -1))[:, None]

            def rope(x):
                x1, x2 = x[..., : HD // 2], x[..., HD // 2:]
                return x * c + torch.cat([-x2, x1], -1) * s_

            q, k, v = rope(t[:, :, 0]).transpose(1, 2), rope(t[:, :, 1]).transpose(1, 2), t[:, :, 2].transpose(1, 2)
            with torch.inference_mode():
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return o.transpose(1, 2).reshape(1, S, D).numpy()
        feed = {"qkv": qkv, "pos": pos}
        if r == "matmul":
            feed["mask"] = mask
        return sessions[r].run(None, feed)[0]

    active = [r for r in routes if r in sessions or r == "torch"]
    ref = run("gqa")
    wall = {r: [] for r in active}
    cpu = {r: [] for r in active}
    diff = {}
    for r in active:
        diff[r] = float(np.abs(run(r) - ref).max())  # also the untimed first run
    for _ in range(iters):
        for r in active:
            t0, c0 = time.perf_counter(), time.process_time()
            run(r)
            wall[r].append((time.perf_counter() - t0) * 1e3)
            cpu[r].append((time.process_time() - c0) * 1e3)
    flop = 2 * 2 * (S * S / 2) * H * HD
    print(f"S={S} heads={H} head_dim={HD} threads={threads} iters={iters} causal work {flop / 1e9:.2f} GFLOP")
    print(f"{'route':14s} {'wall ms':>9s} {'cpu ms':>9s} {'GFLOP/s':>8s} {'vs gqa':>7s} {'max|diff|':>10s}")
    base = statistics.median(wall["gqa"])
    for r in active:
        w, c = statistics.median(wall[r]), statistics.median(cpu[r])
        print(f"{r:14s} {w:9.1f} {c:9.1f} {flop / w / 1e6:8.1f} {base / w:6.2f}x {diff[r]:10.2e}")


if __name__ == "__main__":
    main()
