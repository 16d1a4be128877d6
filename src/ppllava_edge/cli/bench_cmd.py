"""`ppllava-edge bench`: per-stage latency, percentiles, memory and the paper's baselines, side by side; or, with
`--server URL`, a load test of a running `ppllava-edge serve`.

    ppllava-edge bench E2 --video clip.mp4 --frames 32 --backend ort,torch --baseline nopool,avgpool \\
        --iterations 3 --warmup 1 --max-new-tokens 32 --json bench.json --csv bench.csv --plot bench.png
    ppllava-edge bench --server http://127.0.0.1:8000 --video clip.mp4 --concurrency 1,4 --requests 20 --stream

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
from .app import cli


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
@click.argument("exports", metavar="[EXPORT ...]", nargs=-1, type=click.Path(path_type=Path))
@click.option("--server", "server_url", default=None, metavar="URL", help="Load-test this running server instead of benchmarking EXPORT folders.")
@click.option("--concurrency", default="1", show_default=True, metavar="LIST", help="With --server: client threads, e.g. 1,4 (one run per value).")
@click.option("--requests", "num_requests", type=int, default=20, show_default=True, help="With --server: timed requests per concurrency level.")
@click.option("--stream", is_flag=True, help="With --server: stream the answers (needed for time to first token).")
@click.option("--api-key", default=None, envvar="PPLLAVA_API_KEY", help="With --server: bearer key (also $PPLLAVA_API_KEY).")
@click.option("--video", type=click.Path(path_type=Path), default=None, help="Video to sample frames from (the same for every variant).")
@click.option("--synthetic", is_flag=True, help="Use a generated 640x360 clip (the default when --video is not given).")
@click.option("--image", multiple=True, type=click.Path(path_type=Path),
              help="Bench an image instead of a video (anyres tiles; reports its tiles and visual tokens); repeat it for one question about several images.")
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
@click.option("--cold-start", is_flag=True, help="After the runs: one fresh-process `ask` of the first ORT export; its wall time minus the warm answer (target <= 1.0 s).")
@click.option("--no-hardware", is_flag=True, help="Skip the memory-bandwidth and GEMM probes (no efficiencies).")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.pass_context
def bench_command(ctx, exports, server_url, concurrency, num_requests, stream, api_key, video, synthetic, image, frames, questions, max_new_tokens,
                  warmup, iterations, provider, threads, backends, baselines, engines, json_path, csv_path, plot_path, output, cold_start, no_hardware, quiet):
    """Benchmark EXPORT folders (and the PyTorch reference and the no-pooling baselines) on one video (or, with
    --image, one image: its anyres tiles stand in for the frames; several --image: one question about all of them, the
    images stand in for the frames): per-stage
    latency (min/mean/p50/p90/p95/p99/stddev), tokens/s, memory, feature-cache gain, distance to the hardware limit.

    With --server URL: load-test a running `ppllava-edge serve` (requests/s, TTFT and end-to-end p50/p90/p99,
    tokens/s, errors) at each --concurrency level."""
    if server_url is not None:
        if exports:
            raise click.UsageError("give either EXPORT folders or --server URL, not both")
        for name, value in (("--backend", backends), ("--baseline", baselines), ("--plot", plot_path), ("--engines", engines or None)):
            if value is not None:
                raise click.UsageError(f"{name} does not apply to a --server load test")
        _loadtest(ctx, server_url, concurrency, num_requests, stream, api_key, video, image, synthetic, frames, questions, max_new_tokens, warmup,
                  json_path, csv_path, output, quiet)
        return
    if not exports:
        raise click.UsageError("give at least one EXPORT folder (or --server URL for a load test)")
    from ..bench import report
    from ..bench.plan import BACKENDS, BASELINES, BenchOptions, parse_choices
    from ..bench.runner import run_bench

    backend_list = parse_choices(backends, BACKENDS, "backend") if backends is not None else (("ort", "trt") if engines else ("ort",))
    baseline_list = parse_choices(baselines, BASELINES, "baseline") if baselines is not None else ()
    opts = BenchOptions(
        exports=list(exports), video=video, synthetic=synthetic, image=tuple(image), frames=frames, questions=questions, max_new_tokens=max_new_tokens,
        warmup=warmup, iterations=iterations, provider=provider, backends=backend_list, baselines=baseline_list, threads=threads,
        engines=tuple(engines), hardware=not no_hardware, cold_start=cold_start, raise_errors=bool(ctx.obj and ctx.obj.get("debug")),
        command=("ppllava-edge " + shlex.join(sys.argv[1:])) if "bench" in sys.argv[1:] else None,
    )
    progress = _Progress(quiet)
    try:
        result = run_bench(opts, progress=progress)
    finally:
        progress.close()
    _emit(result, output, report.markdown, report.csv_header, report.csv_rows, json_path, csv_path)
    if plot_path is not None:
        report.write_plot(result, plot_path)
        err_console.print(f"wrote {plot_path}")
    if result["failed"]:
        err_console.print(f"error: {result['failed']} variant run(s) failed")
        ctx.exit(1)


def _emit(result: dict, output: str, markdown, csv_header, csv_rows, json_path: Path | None, csv_path: Path | None) -> None:
    """The result on stdout (md / json / csv) and in the --json / --csv files."""
    from ..bench import report

    if output == "json":
        click.echo(json.dumps(report._clean(result), indent=2))
    elif output == "csv":
        click.echo(report.csv_text(csv_header(), csv_rows(result)), nl=False)
    else:
        click.echo(markdown(result), nl=False)
    if json_path is not None:
        report.write_json(result, json_path)
        err_console.print(f"wrote {json_path}")
    if csv_path is not None:
        report.write_csv(result, csv_path, csv_header(), csv_rows(result))
        err_console.print(f"wrote {csv_path}")


def _loadtest(ctx, url, concurrency, num_requests, stream, api_key, video, image, synthetic, frames, questions, max_new_tokens, warmup, json_path, csv_path,
              output, quiet):
    from ..bench import loadtest
    from ..errors import InputError

    try:
        levels = [int(c) for c in str(concurrency).split(",") if c.strip()]
    except ValueError:
        raise InputError(f"--concurrency {concurrency!r}: expected integers such as 1,4") from None
    frame_list = None
    if frames is not None:
        from ..bench.plan import parse_frames

        frame_list = parse_frames(frames)
        if len(frame_list) != 1:
            raise InputError("--frames: a load test uses one frame count")
    opts = loadtest.LoadTestOptions(
        url=url, video=video, image=tuple(image), synthetic=synthetic, concurrency=levels, requests=num_requests, warmup=warmup, stream=stream,
        max_new_tokens=max_new_tokens, frames=frame_list[0] if frame_list else None, questions=questions,
        api_key=api_key, command=("ppllava-edge " + shlex.join(sys.argv[1:])) if "bench" in sys.argv[1:] else None,
    )
    progress = _Progress(quiet)
    try:
        result = loadtest.run_loadtest(opts, progress=progress)
    finally:
        progress.close()
    _emit(result, output, loadtest.markdown, loadtest.csv_header, loadtest.csv_rows, json_path, csv_path)
    if result["failed"]:
        err_console.print(f"error: {result['failed']} request(s) failed")
        ctx.exit(1)
