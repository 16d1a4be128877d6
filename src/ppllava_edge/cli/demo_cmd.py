"""`ppllava-edge demo`: the main job end to end on the embedded default (checkpoint and video made on the fly)."""

from __future__ import annotations

from pathlib import Path

import click

from ._progress import err_console, out_console, stages
from .main import cli


@cli.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo"), show_default=True)
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--frames", "num_frames", type=int, default=8, show_default=True)
@click.option("--question", default="What is happening in the video?", show_default=True)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
def demo_command(workdir: Path, preset: str, num_frames: int, question: str, max_new_tokens: int) -> None:
    """Make a checkpoint and a video, answer with the PyTorch reference, export to ONNX, answer torch-free, compare,
    then a one-iteration bench (runtime vs PyTorch vs the no-pooling baselines)."""
    from .._deps import require
    from ..bench.report import markdown
    from ..bench.runner import BenchOptions, run_bench

    require("torch", "export", "demo (it makes a checkpoint and exports it)")
    from ..export.exporter import ExportOptions, export_checkpoint
    from ..media import write_test_video
    from ..model.generate import ReferenceModel
    from ..model.presets import make_checkpoint
    from ..runtime.generation import GenerationConfig
    from ..runtime.pipeline import Pipeline

    ckpt, video, export_dir = workdir / f"checkpoint-{preset}", workdir / "clip.mp4", workdir / f"export-{preset}"
    with stages("demo") as log:
        log(f"make-checkpoint --preset {preset}")
        if not (ckpt / "config.json").is_file():
            make_checkpoint(preset, ckpt)
        log("write a sample video (PyAV)")
        write_test_video(video, num_frames=96, size=(320, 240))
        log("generate (PyTorch reference)")
        ref = ReferenceModel(ckpt).answer(video, question, num_frames=num_frames, max_new_tokens=max_new_tokens)
        log("export (ONNX, with validation)")
        result = export_checkpoint(ckpt, export_dir, ExportOptions(frames=(2, max(num_frames, 8), 64), force=True), on_stage=lambda s: None)
        log("ask (torch-free runtime)")
        pipe = Pipeline.from_export(export_dir, provider="cpu")
        ans = pipe.ask(video, question, num_frames=num_frames, generation=GenerationConfig(max_new_tokens=max_new_tokens))
        log(f"ask again (second question on the same video)")
        again = pipe.ask(video, "Describe the colours.", num_frames=num_frames, generation=GenerationConfig(max_new_tokens=max_new_tokens))
        del pipe
        log("bench (1 iteration: runtime vs PyTorch vs the no-pooling baselines)")
        bench_frames = max(2, num_frames - num_frames % 2)  # the bench takes even frame counts only
        bench_cmd = (f"ppllava-edge bench {export_dir} --video {video} --frames {bench_frames} --backend ort,torch "
                     f"--baseline nopool,avgpool --max-new-tokens {max_new_tokens}")
        bench = run_bench(BenchOptions(
            exports=[export_dir], video=video, frames=[bench_frames], questions=2, max_new_tokens=max_new_tokens, warmup=1, iterations=1,
            provider="cpu", backends=("ort", "torch"), baselines=("nopool", "avgpool"), bandwidth_mb=128, gemm_n=1024,
            command=bench_cmd + " --iterations 1 --warmup 1",
        ))
    worst = max(c.max_abs / max(c.scale, 1e-12) for c in result.report.checks)
    same = ans.ids == ref.output_ids
    out_console.print(f"question:        {question}")
    out_console.print(f"PyTorch answer:  {ref.text!r}")
    out_console.print(f"runtime answer:  {ans.text!r}")
    out_console.print(f"token-identical: {'yes' if same else 'NO'} ({len(ans.ids)} tokens); export validation: {len(result.report.checks)} checks passed, worst relative max-abs {worst:.1e}")
    out_console.print(f"timings:         {ans.timings.line()}")
    out_console.print(f"second question: {again.timings.line()}")
    out_console.print("")
    out_console.print(f"bench (one iteration after one warm-up; for real numbers: {bench_cmd} --iterations 5 --warmup 1):")
    click.echo(markdown(bench), nl=False)
    if not same:
        err_console.print("error: the runtime's greedy ids differ from the PyTorch reference")
        raise SystemExit(1)
