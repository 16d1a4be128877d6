"""`ppllava-edge bench`: per-stage latency, percentiles, memory and the paper's baselines, side by side.

    ppllava-edge bench E2 --video clip.mp4 --frames 32 --backend ort,torch --baseline nopool,avgpool \\
        --iterations 3 --warmup 1 --max-new-tokens 32 --json bench.json --csv bench.csv --plot bench.png

stdout gets the result only (markdown table by default, or -o json / csv); progress goes to stderr between timed
runs (never inside one). Exit code 1 when the options are invalid or any variant failed (the others still run).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click

from ._progress import err_console
from .main import cli


class _Progress:
    """A bar on a terminal (refreshed only when called, so nothing draws during a timed run), else one line per step."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int, message: str) -> None:
        if self.quiet:
            return
        if not sys.stderr.isatty():
            err_console.print(f"[{done}/{total}] {message}")
            return
        if self.bar is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
                                console=err_console, auto_refresh=False, transient=False)
            self.bar.start()
            self.task = self.bar.add_task(message, total=total)
        self.bar.update(self.task, completed=done, total=total, description=message)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@cli.command("bench")
@click.argument("exports", metavar="EXPORT [EXPORT2 ...]", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--video", type=click.Path(path_type=Path), default=None, help="Video to sample frames from (the same for every variant).")
@click.option("--synthetic", is_flag=True, help="Use a generated 640x360 clip (the default when --video is not given).")
@click.option("--image", type=click.Path(path_type=Path), default=None, help="Bench an image instead of a video (anyres tiles; reports its tiles and visual tokens).")
@click.option("--frames", "frames", default=None, metavar="LIST", help="Even frame counts, e.g. 8,16,32,64 (default: those of 8,16,32,64 every export supports).")
@click.option("--questions", type=int, default=2, show_default=True, help="Questions per iteration on the same video; questions 2.. hit the feature cache.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Tokens every run generates (EOS ignored).")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed runs per variant and frames.")
@click.option("-r", "--iterations", type=int, default=5, show_default=True, help="Timed runs per variant and frames.")
@click.option("--provider", default="auto", show_default=True, help="ONNX Runtime provider: auto, cpu, cuda, tensorrt.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (ONNX Runtime and torch; default: their own).")
@click.option("--backend", "backends", default=None, metavar="LIST", help="ort, trt, torch (several compared side by side) [default: ort, plus trt with --engines].")
@click.option("--baseline", "baselines", default=None, metavar="LIST", help="nopool (8 frames x all patch tokens), avgpool (frames averaged).")
@click.option("--engines", multiple=True, type=click.Path(path_type=Path), help="TensorRT engine folder for --backend trt, one per EXPORT in order (default: EXPORT/engines).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the full report as JSON.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), default=None, help="Write one CSV row per variant and frames.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None, help="Write a PNG (stacked stages per variant, latency vs frames).")
@click.option("-o", "--output", type=click.Choice(["md", "json", "csv"]), default="md", show_default=True, help="Format printed on stdout.")
@click.option("--no-hardware", is_flag=True, help="Skip the memory-bandwidth and GEMM probes (no efficiencies).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.pass_context
def bench_command(ctx, exports, video, synthetic, image, frames, questions, max_new_tokens, warmup, iterations, provider, threads, backends, baselines, engines,
                  json_path, csv_path, plot_path, output, no_hardware, quiet):
    """Benchmark EXPORT folders (and the PyTorch reference and the no-pooling baselines) on one video (or, with
    --image, one image: its anyres tiles stand in for the frames): per-stage
    latency (min/mean/p50/p90/p95/p99/stddev), tokens/s, memory, feature-cache gain, distance to the hardware limit."""
    from ..bench import report
    from ..bench.runner import BACKENDS, BASELINES, BenchOptions, parse_choices, run_bench

    backend_list = parse_choices(backends, BACKENDS, "backend") if backends is not None else (("ort", "trt") if engines else ("ort",))
    baseline_list = parse_choices(baselines, BASELINES, "baseline") if baselines is not None else ()
    opts = BenchOptions(
        exports=list(exports), video=video, synthetic=synthetic, image=image, frames=frames, questions=questions, max_new_tokens=max_new_tokens,
        warmup=warmup, iterations=iterations, provider=provider, backends=backend_list, baselines=baseline_list, threads=threads,
        engines=tuple(engines), hardware=not no_hardware, raise_errors=bool(ctx.obj and ctx.obj.get("debug")),
        command=("ppllava-edge " + shlex.join(sys.argv[1:])) if "bench" in sys.argv[1:] else None,
    )
    progress = _Progress(quiet)
    try:
        result = run_bench(opts, progress=progress)
    finally:
        progress.close()
    if output == "json":
        click.echo(json.dumps(report._clean(result), indent=2))
    elif output == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=report.csv_header())
        w.writeheader()
        for row in report.csv_rows(result):
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        click.echo(buf.getvalue(), nl=False)
    else:
        click.echo(report.markdown(result), nl=False)
    for path, writer in ((json_path, report.write_json), (csv_path, report.write_csv), (plot_path, report.write_plot)):
        if path is not None:
            writer(result, path)
            err_console.print(f"wrote {path}")
    if result["failed"]:
        err_console.print(f"error: {result['failed']} variant run(s) failed")
        ctx.exit(1)
