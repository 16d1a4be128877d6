"""Quantize an fp32 export folder into a complete export folder Q, then gate it on accuracy.

    options = QuantizeOptions(vision="int8", pool="int8", llm="int4-weight")  # options.py: modes, settings, gate
    result = quantize_export("export/", "calib/", "export-int8/", options)
    print(result.report.passed, result.folder)

Per graph (`export.json` records the precision of each graph and a `quantization` block; `ask` runs Q unchanged)
the precision modes of `convert.py` (static int8, weight-only int8/int4, fp16, copy); then the accuracy gate of
`gate.py` (written to ``Q/accuracy.json``). Below a threshold, `quantize_export` raises AccuracyError (nothing is
written to `out`) unless `options.accept_degraded`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from ..atomic import AtomicDir
from ..errors import AccuracyError, InputError
from ..integrity import file_digests
from ..manifest import MANIFEST_NAME, WEIGHTS_KEY, load_manifest
from ..memory import StepRecorder
from .convert import _exclude_target, _quantize_graph, _split_excludes
from .gate import ACCURACY_NAME, AccuracyReport, _gate_mode, evaluate_accuracy, evaluate_accuracy_truncated
from .options import QuantizeOptions, Thresholds, default_thresholds
from .readers import load_calibration

log = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    folder: Path
    manifest: dict
    report: AccuracyReport
    graphs: dict[str, dict]  # graph -> {"precision", "seconds", "bytes", "nodes_quantized"}
    seconds: float


# ---- the whole folder ------------------------------------------------------------------------------------
def quantize_export(export_dir: str | Path, calib_dir: str | Path, out: str | Path, options: QuantizeOptions | None = None, *,
                    force: bool = False, on_stage: Callable[[str], None] | None = None, **overrides) -> QuantizeResult:
    """Write a complete quantized export folder `out` from the fp32 `export_dir` and CALIB, then gate it.

    Args:
        export_dir: the fp32 (or fp16) export folder CALIB was collected on.
        calib_dir: CALIB from `collect_calibration` (needed for any int8; weight-only / fp16 only use it for the gate).
        out: the folder to write (atomically: it appears only when everything, gate included, succeeded).
        options: the modes, conversion settings and gate (`QuantizeOptions`; None: the defaults); `overrides` replace
            single fields (`quantize_export(e, c, o, llm="int4-weight")`).
        force: replace a non-empty `out`.
        on_stage: called with a stage label before each stage (for progress output).

    Raises:
        InputError: bad option values, an export that cannot take these modes, unknown --exclude-node names.
        CalibrationError: CALIB missing / from another model / quantization failed.
        AccuracyError: the gate failed (the report is `exc.report`) and `options.accept_degraded` is False.
    """
    t_start = time.perf_counter()
    options = options or QuantizeOptions()
    if overrides:
        options = replace(options, **overrides)
    stage = on_stage or (lambda s: None)
    manifest = load_manifest(export_dir)
    _check_source(manifest, options, export_dir)
    calib = load_calibration(calib_dir, manifest)
    gate = _gate_mode(options.gate, manifest)
    thresholds = options.thresholds or default_thresholds(manifest)
    precisions = options.precisions(manifest.graph_names)
    steps = StepRecorder()
    with AtomicDir(out, force) as tmp, contextlib.closing(steps):
        data = manifest.to_dict()
        for entry in manifest.data_files():
            shutil.copyfile(entry, tmp / entry.name)
        graphs_info = _convert_graphs(manifest, calib, precisions, options, tmp, steps, stage)
        for g, info in graphs_info.items():
            data["graphs"][g].update(file=info["file"], precision=info["precision"], quantization=info["quantization"])
        data["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")  # new id: feature caches must not mix exports
        data["quantization"] = _quantization_record(export_dir, manifest, calib_dir, calib, options, precisions, gate)
        data[WEIGHTS_KEY] = file_digests(tmp, data)  # this folder's files, not the source export's
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        stage("accuracy gate" + (" (depth-truncated decoder)" if gate == "truncated" else ""))
        with steps.step("accuracy gate"):
            report = _run_gate(export_dir, manifest, tmp, calib, precisions, options, thresholds, gate)
        data["quantization"].update(steps=steps.as_dict(), peak_rss_mb=steps.peak_rss_mb, accuracy={"passed": report.passed, "file": ACCURACY_NAME})
        (tmp / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
        (tmp / ACCURACY_NAME).write_text(json.dumps(report.as_dict(), indent=2))
        if not report.passed and not options.accept_degraded:
            raise _gate_failed(report, out)
    graphs = {g: {"precision": i["precision"], **i["quantization"]} for g, i in graphs_info.items()}
    return QuantizeResult(Path(out), data, report, graphs, time.perf_counter() - t_start)


def _check_source(manifest, options: QuantizeOptions, export_dir) -> None:
    """Refuse an export these options cannot quantize: one already quantized, static int8 from an fp16 export, a
    TensorRT decoder mode for an export without decoder_trt."""
    src_prec = {g: manifest.precision(g) for g in manifest.graph_names}
    if any(p != manifest.dtype for p in src_prec.values()):
        raise InputError(f"{export_dir} is already quantized ({src_prec}); quantize the fp32 or fp16 export instead.")
    if manifest.dtype == "fp16":
        for name, value in (("--pool", options.pool), ("--llm-trt", options.llm_trt)):
            if value == "int8":
                raise InputError(f"{name} int8 (static Q/DQ) needs an fp32 export; {export_dir} is fp16.\n"
                                 "Hint: use --llm int8-weight / int4-weight (weight-only) or export with --dtype fp32.")
    llm_trt = options.decoder_trt_precision
    if llm_trt not in ("fp32", options.decoder_precision) and "decoder_trt" not in manifest.graph_names:
        raise InputError(f"--llm-trt {llm_trt}: {export_dir} has no TensorRT decoder (decoder_trt).\n"
                         "Hint: export with `ppllava-edge export CHECKPOINT OUT --tensorrt`, or leave --llm-trt out.")


def _convert_graphs(manifest, calib, precisions: dict[str, str], options: QuantizeOptions, tmp: Path, steps: StepRecorder,
                    stage: Callable[[str], None]) -> dict[str, dict]:
    """Every graph into `tmp` at its mode; graph -> {"file", "precision", "quantization"} (the manifest entry's new
    values). Refuses --exclude-node names found in no quantized graph."""
    work = tmp / ".work"
    work.mkdir()
    trt_dir = tmp / "trt_calibration" if options.trt_cache else None
    out: dict[str, dict] = {}
    present: dict[str, set[str]] = {}  # graph -> --exclude-node names found in it
    for g, prec in precisions.items():
        t0 = time.perf_counter()
        suffix = "" if prec == "fp32" else f".{prec}"
        dst = tmp / f"{Path(manifest.graph(g)['file']).stem}{suffix}.onnx"
        if prec != "fp32":
            stage(f"{g} -> {prec}")
        with steps.step(g):
            info = _quantize_graph(manifest, g, prec, dst, calib, options, work, trt_dir)
        if prec == "fp32":
            prec = manifest.dtype
        else:
            present[g] = set(_split_excludes(options.exclude_nodes, g)) - set(info.pop("unknown_excludes", []))
        info["seconds"] = round(time.perf_counter() - t0, 3)
        info["bytes"] = sum(f.stat().st_size for f in tmp.glob(dst.name + "*"))
        out[g] = {"file": dst.name, "precision": prec, "quantization": info}
    missing = [e for e in options.exclude_nodes if not any(_exclude_target(e, g) in names for g, names in present.items())]
    if missing:
        raise InputError(
            f"--exclude-node {', '.join(missing)}: no such node in the quantized graph(s) {', '.join(sorted(present)) or '(none)'}.\n"
            "Hint: use node names of the exported graph (e.g. node_MatMul_17), optionally as GRAPH:NAME."
        )
    shutil.rmtree(work)
    return out


def _quantization_record(export_dir, manifest, calib_dir, calib, options: QuantizeOptions, precisions: dict[str, str], gate: str) -> dict:
    """`export.json` `quantization`: where Q came from (source export, CALIB) and the options it was made with."""
    return {
        "source_export": {"path": str(Path(export_dir).resolve()), "created": manifest.created},
        "calibration": {"path": str(Path(calib_dir).resolve()), "created": calib.index.get("created"),
                        "sources": len(calib.index["sources"]), "held_out": calib.has_holdout()},
        **options.record(precisions.get("decoder_trt"), gate),
        "tool": {"onnxruntime": _ort_version()},
    }


def _run_gate(export_dir, manifest, tmp: Path, calib, precisions: dict[str, str], options: QuantizeOptions, thresholds: Thresholds,
              gate: str) -> AccuracyReport:
    """The accuracy gate of the folder being written (`tmp`) against the source export."""
    if gate == "truncated":
        return evaluate_accuracy_truncated(manifest, tmp, calib, precisions, thresholds, options, tmp / ".gate")
    return evaluate_accuracy(export_dir, tmp, calib, precisions, thresholds, options.prefill_positions, options.greedy_tokens,
                             options.quality_tokens, options.quality_pairs)


def _gate_failed(report: AccuracyReport, out) -> AccuracyError:
    """The AccuracyError of a failed gate: the failing rows and what to change (the report is `exc.report`)."""
    fails = "; ".join(f"{c.graph} {c.metric} = {c.value:.4f} {'>' if c.lower_is_better else '<'} {c.threshold:g}" for c in report.failures())
    err = AccuracyError(
        f"accuracy gate failed: {fails}.\nNothing was written to {out}.\n"
        "Hint: keep the failing graph in higher precision (--vision/--pool/--llm), exclude nodes (--exclude-node), "
        "try another --method, or pass --accept-degraded to write it anyway."
    )
    err.report = report  # type: ignore[attr-defined]
    return err


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__
