"""`ppllava-edge` command line: a thin layer over the library.

Library errors (PPLLaVAEdgeError) become one message on stderr and exit code 1; `--debug` shows the
traceback. Usage errors keep click's exit code 2. stdout carries results only.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .. import __version__
from ..errors import PPLLaVAEdgeError


class Group(click.Group):
    """Maps library errors to a clean message and exit 1 (no traceback unless --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PPLLaVAEdgeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ppllava-edge")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Export, quantize, build and run PPLLaVA (prompt-guided pooling video LLM)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def frames_option(default: int = 8):
    return click.option("--frames", "num_frames", type=int, default=default, show_default=True, help="Frames sampled from a video (2..max_T).")


@cli.command("make-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "small"]), default="tiny", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default="bf16", show_default=True, help="Storage dtype (the release is bf16).")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def make_checkpoint_cmd(out: Path, preset: str, seed: int, dtype: str, force: bool) -> None:
    """Write a random-weight checkpoint in the released layout (config.json, shards + index, tokenizer files)."""
    from .._deps import require

    require("torch", "export", "make-checkpoint")
    from ..model.presets import make_checkpoint

    folder = make_checkpoint(preset, out, seed=seed, force=force, dtype=dtype)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    click.echo(f"{folder}  ({preset} preset, {size / 1e6:.1f} MB)")


@cli.command("generate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.argument("question")
@frames_option()
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="Compute dtype of the PyTorch reference.")
@click.option("--dump", type=click.Path(path_type=Path), default=None, help="Write the intermediate arrays as .npy into this folder.")
def generate_cmd(checkpoint: Path, input_path: Path, question: str, num_frames: int, max_new_tokens: int, num_beams: int, dtype: str, dump: Path | None) -> None:
    """Greedy answer from the PyTorch reference model. INPUT: a video, an image, or a .npy of preprocessed frames [T,3,H,W]."""
    from .._deps import require

    require("torch", "export", "generate (the PyTorch reference)")
    require("transformers", "export", "generate (the PyTorch reference)")
    from ..model.generate import ReferenceModel

    ref = ReferenceModel(checkpoint, dtype=dtype)
    ans = ref.answer(input_path, question, num_frames=num_frames, max_new_tokens=max_new_tokens, num_beams=num_beams)
    if dump is not None:
        from ..dump import write_dump

        write_dump(dump, ans.arrays)
        click.echo(f"dumped {len(ans.arrays)} arrays to {dump}", err=True)
    click.echo(ans.text)


def main() -> None:
    cli(obj={})


# Commands living in their own modules register themselves on `cli` when imported.
from . import bench_cmd, demo_cmd, engine_cmd, export_cmd, quant_cmd, runtime_cmd, triton_cmd  # noqa: E402,F401
