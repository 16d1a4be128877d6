"""Quantize an fp32 export folder into a complete export folder Q, then gate it on accuracy.

    result = quantize_export("export/", "calib/", "export-int8/", vision="int8", pool="int8", llm="int4-weight")
    print(result.report.passed, result.folder)

Per graph (`export.json` records the precision of each graph and a `quantization` block; `ask` runs Q unchanged)
the precision modes of `convert.py` (static int8, weight-only int8/int4, fp16, copy); then the accuracy gate of
`gate.py` (written to ``Q/accuracy.json``). Below a threshold, `quantize_export` raises AccuracyError (nothing is
written to `out`) unless `accept_degraded`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import AtomicDir
from ..errors import AccuracyError, InputError
from ..integrity import WEIGHTS_KEY, file_digests
from ..manifest import MANIFEST_NAME, load_manifest
from ..memory import StepRecorder
from .convert import ASYMMETRIC, _exclude_target, _quantize_graph, _split_excludes
from .weight_algorithms import ALGORITHMS, check_algorithm
from .gate import (ACCURACY_NAME, AccuracyReport, Thresholds, _gate_mode, default_thresholds, evaluate_accuracy,
                   evaluate_accuracy_truncated)
from .readers import load_calibration

log = logging.getLogger(__name__)

VISION_PRECISIONS = ("int8", "fp16", "fp32")
POOL_PRECISIONS = ("int8", "fp32")
LLM_PRECISIONS = ("auto", "int8-weight", "int4-weight", "fp32")  # the ONNX Runtime decoder ("int8": refused, see STATIC_INT8_DECODER)
LLM_TRT_PRECISIONS = ("auto", "int8", "int8-weight", "int4-weight", "fp32")  # TensorRT's decoder_trt
AUTO_LLM = "int8-weight"  # --llm auto: passes the trained-LLM gate with margin and decodes faster than fp32 (README)
STATIC_INT8_DECODER = (
    "--llm int8 (static Q/DQ) is not offered for ONNX Runtime's decoder: ONNX Runtime leaves its activations float and "
    "dequantizes every weight at every step (1.47 s per token against ~15 ms for fp32, README \"Quantization quality on "
    "trained weights\").\nHint: use --llm int8-weight (MatMulNBits: int8 weights, faster than fp32) or int4-weight; "
    "static INT8 with a TensorRT calibration cache stays available for TensorRT's decoder: --llm-trt int8 --trt-cache.")
METHODS = ("minmax", "percentile", "entropy")
OP_TYPES = ("weights", "matmul", "all")


@dataclass
class QuantizeResult:
    folder: Path
    manifest: dict
    report: AccuracyReport
    graphs: dict[str, dict]  # graph -> {"precision", "seconds", "bytes", "nodes_quantized"}
    seconds: float


# ---- the whole folder ------------------------------------------------------------------------------------
def quantize_export(
    export_dir: str | Path,
    calib_dir: str | Path,
    out: str | Path,
    vision: str = "int8",
    pool: str = "int8",
    llm: str = "auto",
    method: str = "minmax",
    exclude_nodes: Sequence[str] = (),
    op_types: str = "weights",
    block_size: int = 32,
    accept_degraded: bool = False,
    thresholds: Thresholds | None = None,
    prefill_positions: int = 8,
    greedy_tokens: int = 16,
    quality_tokens: int = 32,
    quality_pairs: int | None = None,
    trt_cache: bool = False,
    force: bool = False,
    on_stage: Callable[[str], None] | None = None,
    llm_activations: str = "fp32",
    gate: str = "auto",
    llm_trt: str = "auto",
    accuracy_level: int | None = None,
    asymmetric: bool | None = None,
    weight_algorithm: str = "auto",
) -> QuantizeResult:
    """Write a complete quantized export folder `out` from the fp32 `export_dir` and CALIB, then gate it.

    Args:
        export_dir: the fp32 export folder CALIB was collected on.
        calib_dir: CALIB from `collect_calibration` (needed for any int8; weight-only / fp16 only use it for the gate).
        out: the folder to write (atomically: it appears only when everything, gate included, succeeded).
        vision: "int8" | "fp16" | "fp32".
        pool: "int8" | "fp32" (prompt_pool and image_pool).
        llm: "auto" | "int8-weight" | "int4-weight" | "fp32": ONNX Runtime's decoder ("auto": AUTO_LLM). "int8" (static
            Q/DQ) is refused with STATIC_INT8_DECODER: ONNX Runtime runs it far slower than fp32.
        llm_trt: TensorRT's standard-ops decoder_trt (exports made with --tensorrt): "auto" (the --llm mode: int8 /
            int4 weight-only as DequantizeLinear weights, see weight_dq.py; fp32 copied), "int8" (static Q/DQ from
            CALIB, with --trt-cache its calibration cache), "int8-weight", "int4-weight", "fp32".
        method: static calibration method "minmax" | "percentile" | "entropy".
        exclude_nodes: node names kept float ("graph:name" for one graph, or a plain name for every graph;
            names of the graph after ORT pre-processing, which keeps the exporter's names for MatMul/Gemm nodes).
        op_types: "weights" (default) | "matmul" | "all" (see module doc; "all" is the broken configuration).
        block_size: MatMulNBits block size (16, 32, 64, 128, ...).
        accept_degraded: write `out` even when the gate fails (accuracy.json records the failure).
        thresholds: gate thresholds (None: `default_thresholds` of the export: TRAINED for a trained LLM).
        quality_tokens / quality_pairs: answer length and pair count of the quality rows (0 tokens: skipped).
        prefill_positions: prefix cuts per held-out prompt for decoder top-1.
        greedy_tokens: tokens for the teacher-forced and the greedy pipeline comparison.
        trt_cache: also write `trt_calibration/<graph>.cache` (TensorRT text calibration cache) for int8 graphs.
        force: replace a non-empty `out`.
        on_stage: called with a stage label before each stage (for progress output).
        llm_activations: "fp32" (default; what a CPU runs fast) or "fp16": the activations of a weight-only decoder
            quantized from an fp16 export (an fp32 export stays fp32).
        accuracy_level: MatMulNBits compute of the weight-only decoder: 0 (fp32 activations) or 4 (int8 activations
            inside the kernel); None: ACCURACY_LEVEL[bits] (README "Quantization quality on trained weights").
        asymmetric: weight-only min/max blocks with zero points instead of symmetric ones (ONNX Runtime's decoder only;
            TensorRT requires zero points of 0, so decoder_trt stays symmetric); None: ASYMMETRIC[bits].
        weight_algorithm: how the weight-only decoder's values are chosen on their grid: "rtn" | "hqq" | "gptq"
            (weight_algorithms.py; gptq calibrates on CALIB's decoder feeds); "auto": WEIGHT_ALGORITHM[bits].
        gate: "full" (the whole quantized export against the source), "truncated" (the decoder gate on depth-truncated
            decoders built from the checkpoint - the full fp16 reference of a 7B decoder needs 13.5 GB), or "auto".

    Raises:
        InputError: bad option values, unknown --exclude-node names.
        CalibrationError: CALIB missing / from another model / quantization failed.
        AccuracyError: the gate failed (the report is `exc.report`) and `accept_degraded` is False.
    """
    t_start = time.perf_counter()
    stage = on_stage or (lambda s: None)
    if llm == "int8":
        raise InputError(STATIC_INT8_DECODER)
    for name, value, allowed in (("vision", vision, VISION_PRECISIONS), ("pool", pool, POOL_PRECISIONS), ("llm", llm, LLM_PRECISIONS),
                                 ("llm_trt", llm_trt, LLM_TRT_PRECISIONS), ("method", method, METHODS), ("op_types", op_types, OP_TYPES)):
        if value not in allowed:
            raise InputError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    if accuracy_level not in (None, 0, 1, 2, 3, 4):
        raise InputError(f"accuracy_level must be 0..4 (ONNX Runtime MatMulNBits), got {accuracy_level!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise InputError(f"block_size must be a power of two >= 16, got {block_size}")
    if llm in ("int8-weight", "int4-weight") or weight_algorithm not in ALGORITHMS:
        bits = 8 if llm == "int8-weight" else 4
        check_algorithm(weight_algorithm, bits, not (ASYMMETRIC[bits] if asymmetric is None else asymmetric))
    manifest = load_manifest(export_dir)
    src_dtype = manifest.data.get("dtype", "fp32")
    src_prec = {g: manifest.graph(g).get("precision", src_dtype) for g in manifest.data["graphs"]}
    if any(p != src_dtype for p in src_prec.values()):
        raise InputError(f"{export_dir} is already quantized ({src_prec}); quantize the fp32 or fp16 export instead.")
    if src_dtype == "fp16":
        for name, value in (("--pool", pool), ("--llm-trt", llm_trt)):
            if value == "int8":
                raise InputError(f"{name} int8 (static Q/DQ) needs an fp32 export; {export_dir} is fp16.\n"
                                 "Hint: use --llm int8-weight / int4-weight (weight-only) or export with --dtype fp32.")
    calib = load_calibration(calib_dir, manifest)
    gate = _gate_mode(gate, manifest)
    thresholds = thresholds or default_thresholds(manifest)
    llm = AUTO_LLM if llm == "auto" else llm
    # the TensorRT decoder (standard ops) follows the weight-only --llm mode as DequantizeLinear weights (weight_dq.py),
    # or --llm-trt int8: static Q/DQ (TensorRT builds it from the fp32 graph with the calibration cache)
    llm_trt = llm if llm_trt == "auto" else llm_trt
    precisions = {"vision": vision, "prompt_pool": pool, "image_pool": pool, "decoder": llm, "projector_head": "fp32",
                  "decoder_trt": llm_trt, "vision_trt": vision}
    if llm_trt not in ("auto", "fp32", llm) and "decoder_trt" not in manifest.data["graphs"]:
        raise InputError(f"--llm-trt {llm_trt}: {export_dir} has no TensorRT decoder (decoder_trt).\n"
                         "Hint: export with `ppllava-edge export CHECKPOINT OUT --tensorrt`, or leave --llm-trt out.")
    precisions = {g: p for g, p in precisions.items() if g in manifest.data["graphs"]}
    precisions.update({g: "fp32" for g in manifest.data["graphs"] if g not in precisions})

    graphs_info: dict[str, dict] = {}
    steps = StepRecorder()
    with AtomicDir(out, force) as tmp, contextlib.closing(steps):
        work = tmp / ".work"
        work.mkdir()
        trt_dir = tmp / "trt_calibration" if trt_cache else None
        data = json.loads(json.dumps(manifest.data))
        for entry in manifest.data_files():
            shutil.copyfile(entry, tmp / entry.name)
        present: dict[str, set[str]] = {}  # graph -> --exclude-node names found in it
        for g, prec in precisions.items():
            t0 = time.perf_counter()
            suffix = "" if prec == "fp32" else f".{prec}"
            dst_name = f"{Path(manifest.graph(g)['file']).stem}{suffix}.onnx"
            dst = tmp / dst_name
            excl = _split_excludes(exclude_nodes, g)
            if prec != "fp32":
                stage(f"{g} -> {prec}")
            with steps.step(g):
                info = _quantize_graph(manifest, g, prec, dst, calib, method, op_types, excl, block_size, llm, llm_activations, work, trt_dir,
                                       accuracy_level, asymmetric, weight_algorithm)
            if prec == "fp32":
                prec = src_dtype
            else:
                present[g] = set(excl) - set(info.pop("unknown_excludes", []))
            info["seconds"] = round(time.perf_counter() - t0, 3)
            info["bytes"] = sum(f.stat().st_size for f in tmp.glob(dst.name + "*"))
            graphs_info[g] = {"precision": prec, **info}
            data["graphs"][g]["file"] = dst_name
            data["graphs"][g]["precision"] = prec
            data["graphs"][g]["quantization"] = info
        missing = [e for e in exclude_nodes if not any(_exclude_target(e, g) in names for g, names in present.items())]
        if missing:
            raise InputError(
                f"--exclude-node {', '.join(missing)}: no such node in the quantized graph(s) {', '.join(sorted(present)) or '(none)'}.\n"
                "Hint: use node names of the exported graph (e.g. node_MatMul_17), optionally as GRAPH:NAME."
            )
        shutil.rmtree(work)
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")  # new id: feature caches must not mix exports
        data["quantization"] = {
            "source_export": {"path": str(Path(export_dir).resolve()), "created": manifest.data.get("created")},
            "calibration": {"path": str(Path(calib_dir).resolve()), "created": calib.index.get("created"),
                            "sources": len(calib.index["sources"]), "held_out": calib.has_holdout()},
            "vision": vision, "pool": pool, "llm": llm, "llm_trt": precisions.get("decoder_trt"), "method": method, "op_types": op_types,
            "block_size": block_size, "exclude_nodes": list(exclude_nodes), "accept_degraded": accept_degraded,
            "llm_activations": llm_activations, "gate": gate, "accuracy_level": accuracy_level, "asymmetric": asymmetric,
            "tool": {"onnxruntime": _ort_version()},
        }
        data[WEIGHTS_KEY] = file_digests(tmp, data)  # this folder's files, not the source export's
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        stage("accuracy gate" + (" (depth-truncated decoder)" if gate == "truncated" else ""))
        with steps.step("accuracy gate"):
            if gate == "truncated":
                report = evaluate_accuracy_truncated(manifest, tmp, calib, precisions, thresholds, prefill_positions, greedy_tokens, block_size,
                                                     list(exclude_nodes), llm_activations, tmp / ".gate", accuracy_level, asymmetric)
            else:
                report = evaluate_accuracy(export_dir, tmp, calib, precisions, thresholds, prefill_positions, greedy_tokens, quality_tokens, quality_pairs)
        data["quantization"]["steps"] = steps.as_dict()
        data["quantization"]["peak_rss_mb"] = steps.peak_rss_mb
        data["quantization"]["accuracy"] = {"passed": report.passed, "file": ACCURACY_NAME}
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        (tmp / ACCURACY_NAME).write_text(json.dumps(report.as_dict(), indent=2))
        if not report.passed and not accept_degraded:
            fails = "; ".join(f"{c.graph} {c.metric} = {c.value:.4f} {'>' if c.lower_is_better else '<'} {c.threshold:g}" for c in report.failures())
            err = AccuracyError(
                f"accuracy gate failed: {fails}.\nNothing was written to {out}.\n"
                "Hint: keep the failing graph in higher precision (--vision/--pool/--llm), exclude nodes (--exclude-node), "
                "try another --method, or pass --accept-degraded to write it anyway."
            )
            err.report = report  # type: ignore[attr-defined]
            raise err
    return QuantizeResult(Path(out), data, report, graphs_info, time.perf_counter() - t_start)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
