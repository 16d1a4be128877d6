"""`ppllava-edge calibrate` and `ppllava-edge quantize`: real-data calibration, Q/DQ and weight-only graphs, accuracy gate.

    ppllava-edge calibrate export/ --videos videos/ --questions questions.jsonl --out calib/ --frames 8
    ppllava-edge quantize export/ --calib calib/ --out export-int8/ --llm int4-weight
    ppllava-edge ask export-int8/ clip.mp4 "What happens?"
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ._progress import err_console, out_console, stages, table
from .app import cli


def _frames(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected N or N,M,... (frame counts), got {value!r}") from None
    if not out:
        raise click.BadParameter("no frame count given")
    return out


class _Bar:
    """progress(done, total) on stderr: a bar on a terminal, a line per 10 % otherwise."""

    def __init__(self, label: str):
        self.label, self.bar, self.last = label, None, -1

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
                self.bar.__enter__()
            self.bar.length = total
            self.bar.update(done - self.bar.pos)
            return
        step = max(1, total // 10)
        if done == total or done // step != self.last:
            self.last = done // step
            err_console.print(f"{self.label}: {done}/{total}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@cli.command("calibrate")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--videos", "videos", required=True, type=click.Path(path_type=Path), help="Folder of videos (files directly inside it).")
@click.option("--questions", required=True, type=click.Path(path_type=Path),
              help='JSON Lines: {"video": "name.mp4", "question": "..."} or {"question": "..."} (asked about every video).')
@click.option("--out", required=True, type=click.Path(path_type=Path), help="CALIB folder to write.")
@click.option("--frames", "frames", default=None, help="Frames per clip: N, or N,M,... cycled over videos (mixed shapes). Default: the export's opt.")
@click.option("--samples", type=int, default=32, show_default=True, help="Maximum (video, question) pairs, round-robin over videos.")
@click.option("--decode-steps", type=int, default=2, show_default=True, help="Decode-step feeds (with their KV cache) per pair. 0: prefill feeds only and the decoder is not loaded (enough for weight-only --llm modes; an fp16 7B decoder would not fit in RAM on a CPU).")
@click.option("--holdout", type=float, default=0.25, show_default=True, help="Fraction of videos kept out of calibration for the accuracy gate.")
@click.option("--on-bad-video", type=click.Choice(["skip", "fail"]), default="skip", show_default=True, help="Unreadable videos: list and skip them, or stop.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def calibrate_command(export_dir, videos, questions, out, frames, samples, decode_steps, holdout, on_bad_video, threads, force):
    """Run the fp32 EXPORT over videos × questions and store calibration feeds for every graph in --out."""
    from ..calibration.collect import collect_calibration

    bar = _Bar("calibrate")
    try:
        summary = collect_calibration(export_dir, videos, questions, out, frames=_frames(frames), samples=samples, decode_steps=decode_steps,
                                      holdout=holdout, on_bad_video=on_bad_video, force=force, progress=bar, threads=threads)
    finally:
        bar.close()
    for video, reason in summary.skipped:
        err_console.print(f"skipped {video}: {reason}")
    title = (f"calibration: {summary.sources} (video, question) pairs from {summary.videos} videos, "
             f"{summary.holdout_sources} held out; {summary.bytes / 1e6:.1f} MB in {summary.seconds:.1f} s")
    err_console.print(table(title, summary.HEADER, summary.rows(), right={1}))
    for note in summary.notes:
        err_console.print(f"note: {note}")
    out_console.print(str(out))


def _thresholds(export_dir: Path, given: dict):
    """The gate thresholds with the --min-* / --max-* options given on top of the export's defaults (None: none given,
    the export's defaults)."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    import dataclasses

    from ..calibration.options import default_thresholds
    from ..manifest import load_manifest

    return dataclasses.replace(default_thresholds(load_manifest(export_dir)), **given)


@cli.command("quantize")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--calib", "calib_dir", required=True, type=click.Path(path_type=Path), help="CALIB folder from `ppllava-edge calibrate`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Quantized export folder to write.")
@click.option("--vision", type=click.Choice(["int8", "fp16", "fp32"]), default="int8", show_default=True)
@click.option("--pool", type=click.Choice(["int8", "fp32"]), default="int8", show_default=True, help="prompt_pool and image_pool.")
@click.option("--llm", type=click.Choice(["auto", "int8", "int8-weight", "int4-weight", "fp32"]), default="auto", show_default=True,
              help="ONNX Runtime's decoder. auto: int8-weight (faster than fp32, passes the gate on trained weights). int8 (static Q/DQ) is refused: ONNX Runtime runs it ~100x slower than fp32.")
@click.option("--llm-trt", type=click.Choice(["auto", "int8", "int8-weight", "int4-weight", "fp32"]), default="auto", show_default=True,
              help="TensorRT's decoder_trt (exports made with --tensorrt). auto: the --llm mode as DequantizeLinear weights (TensorRT's weight-only pattern); int8: static Q/DQ (with --trt-cache, its calibration cache).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax", show_default=True, help="Activation calibration (int8).")
@click.option("--op-types", type=click.Choice(["weights", "matmul", "all"]), default="weights", show_default=True,
              help="int8 scope: weight MatMul/Gemm/Conv; + activation MatMuls; or every op type (breaks accuracy; for tests).")
@click.option("--exclude-node", "exclude_nodes", multiple=True, help="Keep this node float (NAME or GRAPH:NAME); repeatable.")
@click.option("--block-size", type=int, default=32, show_default=True, help="Weight-only block size.")
@click.option("--min-cosine", type=float, default=None, help="Gate: vision / pool output cosine (default 0.99).")
@click.option("--min-logits-cosine", type=float, default=None, help="Gate: decoder logits cosine (default 0.98).")
@click.option("--min-top1", type=float, default=None, help="Gate: decoder top-1 agreement (default 0.60).")
@click.option("--min-greedy", type=float, default=None, help="Gate: greedy prefix agreement (default: reported only).")
@click.option("--min-quality-top1", type=float, default=None, help="Gate: pipeline top-1 agreement, prefill positions and decode steps (trained LLM default 0.90).")
@click.option("--max-quality-kl", type=float, default=None, help="Gate: pipeline mean KL(fp32 || Q) in nats (trained LLM default 0.05).")
@click.option("--max-ppl-change", type=float, default=None, help="Gate: relative perplexity change of the fp32 answers under Q (trained LLM default 0.10 = +10 %).")
@click.option("--greedy-tokens", type=int, default=16, show_default=True)
@click.option("--quality-tokens", type=int, default=32, show_default=True, help="Answer tokens of the quality rows (0: skip them).")
@click.option("--quality-pairs", type=int, default=None, help="At most this many held-out pairs for the quality rows (default: all).")
@click.option("--prefill-positions", type=int, default=8, show_default=True, help="Gate: prefix cuts per held-out prompt for decoder top-1.")
@click.option("--llm-activations", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Activations of a weight-only decoder quantized from an fp16 export (fp32: what a CPU runs fast).")
@click.option("--gate", type=click.Choice(["auto", "full", "truncated"]), default="auto", show_default=True,
              help="Decoder gate on the whole decoders, or on depth-truncated copies built from the checkpoint (auto: when the source decoder takes over a quarter of RAM, e.g. 7B).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="Weight-only decoder compute (ONNX Runtime MatMulNBits): 0 fp32 activations, 4 int8 activations. Default: per bit width (README).")
@click.option("--asymmetric/--symmetric", default=None,
              help="Weight-only min/max blocks with zero points, or symmetric ones (default: asymmetric int4, symmetric int8; README). ONNX Runtime's decoder only: TensorRT's decoder_trt is always symmetric.")
@click.option("--weight-algorithm", type=click.Choice(["auto", "rtn", "hqq", "gptq"]), default="auto", show_default=True,
              help="How the weight-only decoder's values are chosen: round to nearest, HQQ (int4 asymmetric), or GPTQ calibrated on CALIB's decoder feeds. auto: per bit width (README).")
@click.option("--trt-cache", is_flag=True, help="Also write TensorRT calibration caches (trt_calibration/<graph>.cache) for int8 graphs.")
@click.option("--accept-degraded", is_flag=True, help="Write --out even if the accuracy gate fails.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def quantize_command(export_dir, calib_dir, out, vision, pool, llm, method, op_types, exclude_nodes, block_size, min_cosine, min_logits_cosine,
                     min_top1, min_greedy, min_quality_top1, max_quality_kl, max_ppl_change, greedy_tokens, quality_tokens, quality_pairs,
                     prefill_positions, llm_activations, gate, trt_cache, accept_degraded, force, llm_trt, accuracy_level, asymmetric,
                     weight_algorithm):
    """Write a quantized copy of the fp32 or fp16 EXPORT to --out (same manifest format; `ask` runs it) and gate its accuracy."""
    from ..calibration.options import QuantizeOptions

    given = {"cosine": min_cosine, "decoder_cosine": min_logits_cosine, "top1": min_top1, "greedy": min_greedy,
             "quality_top1": min_quality_top1, "quality_kl": max_quality_kl, "quality_ppl": max_ppl_change}
    # built once, here: a combination that can never work (--llm int8, hqq on int8 ...) is refused before the export
    # is read (only --min-* / --max-* read its defaults first)
    options = QuantizeOptions(vision=vision, pool=pool, llm=llm, llm_trt=llm_trt, method=method, op_types=op_types,
                              exclude_nodes=exclude_nodes, block_size=block_size, accuracy_level=accuracy_level, asymmetric=asymmetric,
                              weight_algorithm=weight_algorithm, llm_activations=llm_activations, trt_cache=trt_cache, gate=gate,
                              thresholds=_thresholds(export_dir, given), prefill_positions=prefill_positions,
                              greedy_tokens=greedy_tokens, quality_tokens=quality_tokens, quality_pairs=quality_pairs,
                              accept_degraded=accept_degraded)
    from .._deps import require

    require("onnx", "export", "quantize")
    from ..calibration.quantize import quantize_export
    from ..errors import AccuracyError

    try:
        with stages("quantize") as log:
            result = quantize_export(export_dir, calib_dir, out, options, force=force, on_stage=log)
    except AccuracyError as exc:
        report = getattr(exc, "report", None)
        if report is not None:
            err_console.print(table("accuracy vs fp32 (FAILED)", report.HEADER, report.rows(), right={3, 5}))
        raise
    steps = result.manifest["quantization"].get("steps", {})
    rows = [[g, i["precision"], f"{i['bytes'] / 1e6:.1f}", f"{i['seconds']:.1f}", f"{steps.get(g, {}).get('peak_rss_mb', 0):.0f}"] for g, i in result.graphs.items()]
    err_console.print(table(f"graphs (peak RSS {result.manifest['quantization'].get('peak_rss_mb', 0):.0f} MB)", ["graph", "precision", "MB", "s", "peak RSS MB"], rows, right={2, 3, 4}))
    report = result.report
    status = "passed" if report.passed else "FAILED (written anyway: --accept-degraded)"
    err_console.print(table(f"accuracy vs fp32 ({report.thresholds.profile} thresholds): {status}", report.HEADER, report.rows(), right={3, 5}))
    for note in report.notes:
        err_console.print(f"note: {note}")
    out_console.print(str(out))
