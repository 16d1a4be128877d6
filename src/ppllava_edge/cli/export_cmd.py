"""`ppllava-edge export CKPT OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from ._progress import err_console, out_console, stages, table
from .main import cli


@cli.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--frames", "frames_spec", default="2:8:64", show_default=True, help="Frame-count range MIN:OPT:MAX of the vision graph (TensorRT profiles use it).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=20, show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--no-validate", is_flag=True, help="Skip the PyTorch vs ONNX Runtime validation pass.")
@click.option("--tensorrt", is_flag=True, help="Also write decoder_trt.onnx (standard ONNX ops) for `ppllava-edge build`: the in-place decoder.onnx uses ONNX Runtime contrib ops.")
def export_command(checkpoint: Path, out: Path, frames_spec: str, dtype: str, opset: int, force: bool, no_validate: bool, tensorrt: bool) -> None:
    """Export CHECKPOINT to ONNX graphs in OUT (vision, prompt_pool, image_pool, decoder) + export.json, then validate."""
    from .._deps import require

    for mod in ("torch", "transformers", "onnx", "onnxscript"):
        require(mod, "export", "export")
    from ..config import load_config
    from ..export.exporter import ExportOptions, export_checkpoint, parse_frames

    frames = parse_frames(frames_spec, load_config(checkpoint).max_frames)
    opts = ExportOptions(frames=frames, dtype=dtype, opset=opset, force=force, validate=not no_validate, tensorrt=tensorrt)
    with stages("export") as log:
        result = export_checkpoint(checkpoint, out, opts, on_stage=log)
    if result.report.checks:
        err_console.print(table("validation (PyTorch vs ONNX Runtime)", result.report.HEADER, result.report.rows(), right={3, 4, 5}))
    rows = []
    for name, g in result.manifest["graphs"].items():
        size = sum(p.stat().st_size for p in out.glob(f"{name}.onnx*"))
        rows.append([g["file"], f"{g['export_seconds']:.1f}", f"{size / 1e6:.1f}"])
    err_console.print(table("graphs", ["file", "export s", "MB"], rows, right={1, 2}))
    out_console.print(str(out))
