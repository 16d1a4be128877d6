"""The commands that need torch: make-checkpoint, check-activations, generate (the PyTorch reference)."""

from __future__ import annotations

from pathlib import Path

import click

from .app import PRESET_NAMES, cli, frames_option


@cli.command("make-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(PRESET_NAMES), default="tiny", show_default=True,
              help="tiny / small: small dims for tests and CPU benchmarks; mid: the released widths with 4 LLM layers; 7b: the released model; "
                   "qwen-tiny / qwen-small / qwen-7b: the same for the Qwen2 + SigLIP release.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["bf16", "fp16", "fp32"]), default=None, help="Storage dtype (default: bf16 as the release; fp32 with --llm).")
@click.option("--llm", "llm", type=click.Path(path_type=Path), default=None,
              help="A trained LLaMA-architecture LLM (a .gguf file or a Hugging Face folder): its weights, dims, tokenizer and chat template replace the preset's LLM (tiny/small only; vision stays random).")
@click.option("--tokenizer", "tokenizer", type=click.Path(path_type=Path), default=None,
              help="Qwen2's tokenizer.json to copy into a qwen preset's folder (default: a synthetic byte-level BPE with Qwen2's special ids).")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def make_checkpoint_cmd(out: Path, preset: str, seed: int, dtype: str | None, llm: Path | None, tokenizer: Path | None, force: bool) -> None:
    """Write a random-weight checkpoint in the released layout (config.json, shards + index, tokenizer files):
    the Vicuna + CLIP release, or the Qwen2 + SigLIP one with the qwen-* presets.

    With --llm the LLM is a trained model and the vision tower, projector and image_newline stay random.
    Tensors are generated and written one at a time (the 7b preset peaks below 1 GB of RAM); the folder is
    built beside OUT and renamed at the end, so an interrupted run leaves nothing.
    """
    from .._deps import require

    require("torch", "export", "make-checkpoint")
    if llm is not None:
        require("gguf" if llm.suffix.lower() == ".gguf" else "transformers", "export", "make-checkpoint --llm")
        require("jinja2", "export", "make-checkpoint --llm (reading the chat template)")
    from ..model.make import make_checkpoint
    from ._progress import stages

    with stages(f"make-checkpoint {preset}") as log:
        log(f"trained LLM from {llm}, random vision side" if llm is not None else "random weights, tensor by tensor")
        folder = make_checkpoint(preset, out, seed=seed, force=force, dtype=dtype, progress=log.progress, llm=llm, tokenizer=tokenizer)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    what = f"{preset} preset with the trained LLM {llm.name} (vision weights random, untrained)" if llm is not None else f"{preset} preset"
    click.echo(f"{folder}  ({what}, {size / 1e6:.1f} MB)")


@cli.command("check-activations")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True, help="Compute dtype of the forward pass.")
@click.option("--frames", "num_frames", type=int, default=2, show_default=True, help="Random frames through the vision tower.")
@click.option("--tokens", "num_tokens", type=int, default=32, show_default=True, help="Random prompt ids around the visual tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-layer results as JSON.")
def check_activations_cmd(checkpoint: Path, dtype: str, num_frames: int, num_tokens: int, as_json: bool) -> None:
    """Largest |activation| of every layer in one forward pass (default fp16), one layer in memory at a time.

    Prints one row per layer (stdout) and exits 1 if any activation is not finite.
    """
    from .._deps import require

    require("torch", "export", "check-activations")
    require("transformers", "export", "check-activations")
    from ..errors import AccuracyError
    from ..model.activations import check_activations
    from ._progress import out_console, stages, table

    with stages(f"check-activations {dtype}") as log:
        log("forward pass, layer by layer")
        rows = check_activations(checkpoint, dtype=dtype, num_frames=num_frames, num_tokens=num_tokens, progress=log.progress)
    if as_json:
        import json

        click.echo(json.dumps([{"module": r.module, "stage": r.stage, "max_abs": r.max_abs, "finite": r.finite} for r in rows], indent=1))
    else:
        out_console.print(table(f"max |activation| per layer ({dtype})", ["module", "max |act|", "finite"],
                                [[r.module, f"{r.max_abs:.4g}", "yes" if r.finite else "NO"] for r in rows], right={1}))
    bad = [r.module for r in rows if not r.finite]
    if bad:
        raise AccuracyError(f"{len(bad)} module(s) produced non-finite {dtype} activations, first: {bad[0]}")


@cli.command("generate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.argument("input_paths", metavar="INPUT...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.argument("question")
@frames_option()
@click.option("--max-new-tokens", type=int, default=32, show_default=True)
@click.option("--num-beams", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="Compute dtype of the PyTorch reference.")
@click.option("--dump", type=click.Path(path_type=Path), default=None, help="Write the intermediate arrays as .npy into this folder.")
def generate_cmd(checkpoint: Path, input_paths: tuple[Path, ...], question: str, num_frames: int, max_new_tokens: int, num_beams: int, dtype: str,
                 dump: Path | None) -> None:
    """Greedy answer from the PyTorch reference model. INPUT: a video, an image, or a .npy of preprocessed frames
    [T,3,H,W]; or several images (one question about all of them, each at its own <image> slot)."""
    from .._deps import require
    from ..media import check_image_paths

    check_image_paths(input_paths)  # a video among several inputs: refused before the model loads
    require("torch", "export", "generate (the PyTorch reference)")
    require("transformers", "export", "generate (the PyTorch reference)")
    from ..model.generate import ReferenceModel

    ref = ReferenceModel(checkpoint, dtype=dtype)
    ans = ref.answer(input_paths, question, num_frames=num_frames, max_new_tokens=max_new_tokens, num_beams=num_beams)
    if dump is not None:
        from ..dump import write_dump

        write_dump(dump, ans.arrays)
        click.echo(f"dumped {len(ans.arrays)} arrays to {dump}", err=True)
    click.echo(ans.text)
