"""`ppllava-edge export CKPT OUT`."""

from __future__ import annotations

from pathlib import Path

import click

from ._progress import err_console, out_console, stages, table
from .app import cli


@cli.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--frames", "frames_spec", default="2:8:64", show_default=True, help="Frame-count range MIN:OPT:MAX of the vision graph (TensorRT profiles use it).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=20, show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
@click.option("--no-validate", is_flag=True, help="Skip the PyTorch vs ONNX Runtime validation pass (same as --validate none).")
@click.option("--validate", "validation", type=click.Choice(["auto", "full", "truncated", "none"]), default="auto", show_default=True,
              help="Validation depth: full (every layer), truncated (a copy with the first layers of each tower and of the LLM, real weights), auto (full when the fp32 reference fits in a quarter of RAM).")
@click.option("--tensorrt", is_flag=True, help="Also write decoder_trt.onnx (standard ONNX ops) for `ppllava-edge build`: the in-place decoder.onnx uses ONNX Runtime contrib ops.")
def export_command(checkpoint: Path, out: Path, frames_spec: str, dtype: str, opset: int, force: bool, no_validate: bool, validation: str, tensorrt: bool) -> None:
    """Export CHECKPOINT to ONNX graphs in OUT (vision, prompt_pool, image_pool, decoder) + export.json, then validate."""
    from .._deps import require

    for mod in ("torch", "transformers", "onnx", "onnxscript"):
        require(mod, "export", "export")
    from ..config import load_config
    from ..export.exporter import ExportOptions, export_checkpoint, parse_frames

    frames = parse_frames(frames_spec, load_config(checkpoint).max_frames)
    opts = ExportOptions(frames=frames, dtype=dtype, opset=opset, force=force, validate=not no_validate, validation=validation, tensorrt=tensorrt)
    with stages("export") as log:
        result = export_checkpoint(checkpoint, out, opts, on_stage=log, on_progress=log.progress)
    m = result.manifest
    if result.report.checks:
        err_console.print(table(f"validation (PyTorch vs ONNX Runtime; {result.report.mode} depth)" if result.report.mode == "full"
                                else f"validation (PyTorch vs ONNX Runtime; {result.report.mode})", result.report.HEADER, result.report.rows(), right={3, 4, 5}))
    wc = m.get("weights_check")
    if wc:
        err_console.print(f"weights check: {wc['initializers']} initializers ({wc['bytes'] / 1e6:.1f} MB) traced to the checkpoint by digest, all match")
    rows = []
    for name, g in m["graphs"].items():
        size = sum(p.stat().st_size for p in out.glob(f"{name}.onnx*"))
        rows.append([g["file"], f"{g['export_seconds']:.1f}", f"{size / 1e6:.1f}"])
    err_console.print(table("graphs", ["file", "export s", "MB"], rows, right={1, 2}))
    steps = m.get("steps") or {}
    err_console.print(table(f"steps (peak RSS {m.get('peak_rss_mb', 0):.0f} MB)", ["step", "s", "peak RSS MB"],
                            [[k, f"{v['seconds']:.1f}", f"{v['peak_rss_mb']:.0f}"] for k, v in steps.items()], right={1, 2}))
    out_console.print(str(out))


@cli.command("verify")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
def verify_command(export_dir: Path) -> None:
    """Hash every file of EXPORT and compare with the digests export.json records; exit 1 if any differs.

    Loading an export already checks each file's size and a sampled digest; this reads every byte, so it also
    finds a few flipped bytes inside a large weight file."""
    from ..errors import ConfigError
    from ..integrity import verify_export

    with stages("verify") as log:
        log("sha256 of every file")
        report = verify_export(export_dir, progress=log.progress)
    err_console.print(table(f"{report.folder}", ["file", "status", "detail"], [[f.name, f.status, f.detail] for f in report.files]))
    if not report.recorded:
        out_console.print(f"{report.folder}: export.json records no digests (an export made before they were recorded): "
                          f"{len(report.files)} files present, content not verified. Re-export to record them.")
        return
    bad = [f for f in report.files if f.status != "ok"]
    if bad:
        raise ConfigError(f"{report.folder}: {len(bad)} of {len(report.files)} files differ from export.json: "
                          + "; ".join(f"{f.name} ({f.detail or f.status})" for f in bad)
                          + ".\nHint: export (or copy) the folder again.")
    out_console.print(f"{report.folder}: all {len(report.files)} files match export.json (sha256)")
