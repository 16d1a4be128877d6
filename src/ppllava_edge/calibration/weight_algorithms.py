"""How the integer values of a weight-only (MatMulNBits) decoder are chosen: `quantize --weight-algorithm`.

    hessians = collect_hessians(decoder_path, calib)                  # GPTQ only: {weight name: H = XᵀX}, from CALIB
    q, grid = refine("gptq", w, grid, bits, block_size, hessians[weight_name])  # w [K, N] float32, grid from the writer

The writer (`convert._quantize_nbits`) first fixes each block's grid exactly as it always did - ONNX Runtime's
symmetric blocks (zero point 8 / 128), its uint8 zero points, or our min/max blocks with float zero points - and
this module only changes what lands on that grid, so every algorithm is stored by the same kernel:

- ``rtn``: round to nearest (the writer's own bytes, unchanged).
- ``hqq``: Half-Quadratic Quantization (Badri & Shaji, 2023, mobiusml/hqq ``optimize_weights_proximal_legacy``):
  data-free; per block, the zero point is re-fitted to minimise an l_p (p = 0.7) weight error by half-quadratic
  splitting, scale kept. Needs float zero points: int4 asymmetric blocks only (elsewhere it is refused).
- ``gptq``: GPTQ (Frantar et al., 2022, IST-DASLab/gptq ``fasterquant``) fed the pipeline's own calibration: each
  MatMul's input activations X over the `calibrate` step's decoder feeds (text embeddings with the pooled visual
  tokens spliced in, and decode steps), H = XᵀX, then K rows quantized one at a time in order, each row's rounding
  error pushed onto the rows not yet quantized through the Cholesky factor of H⁻¹ ("static groups": the grid is the
  one fixed above from the original weights, so a block that is already on its grid - a dequantized Q4_1 block at
  block 32 - stays exact). The held-out split is never used here: the gate measures on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

ALGORITHMS = ("auto", "rtn", "hqq", "gptq")


@dataclass
class Grid:
    """Per output column and block of K: w ≈ (q - zero) * scale, q in [0, 2^bits - 1]. Arrays [N, blocks] float32."""

    scale: np.ndarray
    zero: np.ndarray


def check_algorithm(name: str, bits: int, symmetric: bool) -> None:
    if name not in ALGORITHMS:
        raise InputError(f"--weight-algorithm {name!r} is not one of {', '.join(ALGORITHMS)}")
    if name == "hqq" and (bits != 4 or symmetric):
        raise InputError(f"--weight-algorithm hqq re-fits float zero points: it needs int4-weight with asymmetric blocks "
                         f"(got {bits}-bit {'symmetric' if symmetric else 'asymmetric'}); use --weight-algorithm gptq or rtn")


def _nibbles(a: np.ndarray) -> np.ndarray:
    """uint8 [..., m] of two 4-bit values each -> [..., 2m], low nibble first (MatMulNBits' packing)."""
    out = np.empty((*a.shape[:-1], a.shape[-1] * 2), np.uint8)
    out[..., 0::2], out[..., 1::2] = a & 0x0F, a >> 4
    return out


def _per_row(a: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """A per-block array [N, blocks] -> one row per input k [K, N] (each block's value repeated over its rows)."""
    return np.repeat(a.T, block_size, axis=0)[:k]


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """MatMulNBits' packed [N, blocks, B * bits / 8] -> q [K, N] uint8 (low nibble first)."""
    n = packed.shape[0]
    q = (packed if bits == 8 else _nibbles(packed)).reshape(n, -1)
    return np.ascontiguousarray(q[:, :k].T)


def pack(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """q [K, N] (K padded with the grid's zero where needed by the caller) -> MatMulNBits' [N, blocks, B * bits / 8]."""
    k, n = q.shape
    kb = -(-k // block_size)
    blocks = np.zeros((n, kb * block_size), np.uint8)
    blocks[:, :k] = q.T
    blocks = blocks.reshape(n, kb, block_size)
    return np.ascontiguousarray(blocks if bits == 8 else (blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8))


def unpack_zero_points(zp: np.ndarray, bits: int, blocks: int) -> np.ndarray:
    """MatMulNBits' uint8 zero points [N, ceil(blocks * bits / 8)] -> [N, blocks] float32."""
    return (zp if bits == 8 else _nibbles(zp))[:, :blocks].astype(np.float32)


def dequantize(q: np.ndarray, grid: Grid, block_size: int) -> np.ndarray:
    """q [K, N] on `grid` -> float32 [K, N]: what MatMulNBits multiplies by."""
    k = q.shape[0]
    s, z = _per_row(grid.scale, block_size, k), _per_row(grid.zero, block_size, k)
    return ((q.astype(np.float32) - z) * s).astype(np.float32)


def _round(w: np.ndarray, s: np.ndarray, z: np.ndarray, top: int) -> np.ndarray:
    return np.clip(np.rint(w / s + z), 0, top)


def hqq_zero(w: np.ndarray, grid: Grid, bits: int, block_size: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
             kappa: float = 1.01) -> tuple[np.ndarray, Grid]:
    """HQQ's proximal zero-point fit (mobiusml/hqq, optimize_weights_proximal_legacy, its defaults) per block, scale
    fixed. Returns (q [K, N], the grid with the new float zero points). Keeps the best iterate (by mean |error|), so it
    never ends worse than its start, the min/max zero point."""
    k, n = w.shape
    kb = grid.scale.shape[1]
    top = (1 << bits) - 1
    wb = np.zeros((n, kb * block_size), np.float32)
    wb[:, :k] = w.T
    wb = wb.reshape(n, kb, block_size)
    s, z = grid.scale[..., None].astype(np.float32), grid.zero[..., None].astype(np.float32)

    def err_of(zz):
        return np.abs(wb - (_round(wb, s, zz, top) - zz) * s).mean(axis=2, keepdims=True)

    best_z, best_err = z.copy(), err_of(z)
    for _ in range(iters):
        wq = _round(wb, s, z, top)
        e = wb - (wq - z) * s
        we = np.sign(e) * np.maximum(np.abs(e) - np.power(np.abs(e) + 1e-8, p - 1) / beta, 0)  # l_p shrinkage
        z = (wq - (wb - we) / s).mean(axis=2, keepdims=True)
        beta *= kappa
        err = err_of(z)
        better = err < best_err
        best_z, best_err = np.where(better, z, best_z), np.minimum(err, best_err)
    q = _round(wb, s, best_z, top).astype(np.uint8).reshape(n, -1)[:, :k].T
    return np.ascontiguousarray(q), Grid(grid.scale, best_z[..., 0].astype(np.float32))


def gptq(w: np.ndarray, grid: Grid, bits: int, block_size: int, h: np.ndarray, damp: float = 0.01, lazy: int = 128) -> np.ndarray:
    """GPTQ on w [K, N] (y = x @ w) with H = XᵀX [K, K], on a fixed grid. Returns q [K, N] uint8.

    IST-DASLab/gptq `fasterquant`: dead inputs (H_kk = 0) get H_kk = 1 and w_k = 0; H += damp * mean(diag H) * I;
    U = chol(H⁻¹) upper; for each k in order: q_k = round(w_k), err = (w_k - deq(q_k)) / U_kk, w_j -= U_kj * err for
    j > k (lazily, `lazy` rows at a time)."""
    k, n = w.shape
    top = (1 << bits) - 1
    w = np.array(w, dtype=np.float64)
    h = np.array(h, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    s = _per_row(grid.scale, block_size, k).astype(np.float64)
    z = _per_row(grid.zero, block_size, k).astype(np.float64)
    q = np.empty((k, n), np.uint8)
    for i0 in range(0, k, lazy):
        i1 = min(i0 + lazy, k)
        wb = w[i0:i1].copy()
        errs = np.empty_like(wb)
        for i in range(i1 - i0):
            row = i0 + i
            qi = _round(wb[i], s[row], z[row], top)
            q[row] = qi
            e = (wb[i] - (qi - z[row]) * s[row]) / u[row, row]
            wb[i + 1:] -= np.outer(u[row, row + 1:i1], e)
            errs[i] = e
        w[i1:] -= u[i0:i1, i1:].T @ errs
    return q


def refine(algorithm: str, w: np.ndarray, grid: Grid, bits: int, block_size: int, h: np.ndarray | None) -> tuple[np.ndarray, Grid]:
    """(q [K, N], grid) for `algorithm` ("hqq" may move the zero points; "gptq" needs H, without one it falls back to
    round-to-nearest on the same grid, logged)."""
    if algorithm == "hqq":
        return hqq_zero(w, grid, bits, block_size)
    if algorithm == "gptq" and h is not None:
        return gptq(w, grid, bits, block_size, h), grid
    if algorithm == "gptq":
        log.warning("gptq: no calibration activations for a weight of shape %s: round to nearest", w.shape)
    k = w.shape[0]
    return _round(w, _per_row(grid.scale, block_size, k), _per_row(grid.zero, block_size, k), (1 << bits) - 1).astype(np.uint8), grid


def _activation_source(model, x_name: str) -> str:
    """The tensor whose every row a MatMul's input is taken from: the input itself, or - for the head, which reads
    only the last position - the [.., seq, K] hidden state it is sliced / gathered from."""
    producer = {o: nd for nd in model.graph.node for o in nd.output}
    nd = producer.get(x_name)
    while nd is not None and nd.op_type in ("Slice", "Gather", "Squeeze", "Unsqueeze"):
        x_name = nd.input[0]
        nd = producer.get(x_name)
    return x_name


def collect_hessians(decoder: Path, calib, weights: set[str] | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """{weight initializer name: H = Σ XᵀX (float64 [K, K])} for every MatMul with a 2-D initializer weight, over
    the CALIB split's decoder feeds (prefills with visual tokens, decode steps). The fp32 decoder is run once per
    feed with each distinct MatMul input added as a graph output (the graph from memory, its weights read from the
    export's own external data file)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(decoder), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    by_input: dict[str, list[str]] = {}
    for nd in model.graph.node:
        if nd.op_type == "MatMul" and nd.input[1] in inits and len(inits[nd.input[1]].dims) == 2 and (weights is None or nd.input[1] in weights):
            by_input.setdefault(_activation_source(model, nd.input[0]), []).append(nd.input[1])
    dims = {x: inits[ws[0]].dims[0] for x, ws in by_input.items()}
    need = sum(8 * int(k) ** 2 for k in dims.values())  # every H at once, float64
    import psutil

    if need > psutil.virtual_memory().available // 2:
        raise InputError(f"{decoder.name}: --weight-algorithm gptq holds H = XᵀX for {len(dims)} MatMul inputs ({need / 1e9:.1f} GB), over half "
                         f"the available RAM; use --weight-algorithm rtn (or hqq) for this decoder")
    have = {o.name for o in model.graph.output}
    for name in by_input:
        if name not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
    # the graph (without its weights) from memory; its weights read in place from the export's own data file - no
    # copy, and no link to the export's file (onnx.checker refuses hard-linked data files)
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(decoder.parent.resolve()))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    wanted = list(by_input)
    hs: dict[str, np.ndarray] = {}
    records = calib.records("decoder", "calib")
    if not records:
        raise InputError(f"{calib.folder}: no calibration decoder feeds (split 'calib') for --weight-algorithm gptq; run calibrate again")
    for j, rec in enumerate(records):
        outs = sess.run(wanted, calib.feed("decoder", rec, input_names=names))
        for name, x in zip(wanted, outs):
            x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
            hs[name] = hs.get(name, 0) + x.T @ x
        if progress:
            progress(j + 1, len(records))
    del sess
    return {w: hs[x] for x, ws in by_input.items() for w in ws}


def refine_packed(algorithm: str, w: np.ndarray, packed: np.ndarray, scales: np.ndarray, zero: np.ndarray | float,
                  bits: int, block_size: int, h: np.ndarray | None, float_zero: bool) -> tuple[np.ndarray, np.ndarray | float]:
    """The writer's hook: `packed` / `scales` / `zero` (a constant for symmetric blocks, [N, blocks] otherwise) as the
    writer made them by round-to-nearest, for w [K (padded to whole blocks), N]; returns (packed, zero) for
    `algorithm`. HQQ moves zero points, so it runs only where they are stored as floats (`float_zero`); elsewhere
    the weight keeps round-to-nearest."""
    if algorithm == "rtn" or (algorithm == "hqq" and not float_zero):
        return packed, zero
    k = w.shape[0]
    grid = Grid(scales.astype(np.float32), np.broadcast_to(np.asarray(zero, np.float32), scales.shape).astype(np.float32))
    if h is not None and h.shape[0] != k:  # K padded to whole blocks: the padded inputs are dead
        h = np.pad(h, ((0, k - h.shape[0]), (0, k - h.shape[0])))
    q, grid = refine(algorithm, w, grid, bits, block_size, h)
    return pack(q, bits, block_size), (grid.zero if float_zero else zero)
