"""`ppllava-edge build` (ONNX export -> TensorRT engines), `ppllava-edge engines` (inspect / check / load an engine
folder) and `ppllava-edge env` (the machine: CPU, GPU, CUDA, TensorRT, onnxruntime, Jetson power mode).

    ppllava-edge build export/ --out engines/ --fp16 --timing-cache tc.bin
    ppllava-edge build export/ --out engines/ --dry-run        # plan + trtexec commands, no TensorRT needed
    ppllava-edge engines engines/ --load
    ppllava-edge env --json
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._progress import err_console, out_console, stages, table
from .app import cli, cuda_graph_option


def _frames(ctx, param, value):
    if value is None:
        return None
    from ..engine.profiles import parse_frames_spec
    from ..errors import InputError

    try:
        return parse_frames_spec(value)
    except InputError as exc:
        raise click.BadParameter(str(exc)) from exc


def _target_for_dry_run() -> tuple[str, str]:
    """(TensorRT version, SM) for engine names in a dry run: the installed ones when known, else 'unknown'."""
    from ..engine.availability import tensorrt_version
    from ..engine.environment import current_gpu

    sm = current_gpu()["sm"]
    return tensorrt_version() or "unknown", str(sm) if sm is not None else "unknown"


@cli.command("build")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Engine folder to write (engines + engines.json).")
@click.option("--fp16", is_flag=True, help="fp32 exports: allow fp16 kernels (TensorRT 10 weak typing). fp16 exports and symmetric Q/DQ graphs are strongly typed anyway.")
@click.option("--int8", is_flag=True, help="Require int8 graphs (an export from `ppllava-edge quantize`); see README: TensorRT / Jetson.")
@click.option("--frames", "frames", callback=_frames, default=None, metavar="MIN:OPT:MAX", help="Frame range of the vision / prompt_pool profiles (default: the export's).")
@click.option("--max-input-len", type=int, default=None, help="Longest prefill in tokens (default: visual tokens at MAX frames + 256).")
@click.option("--max-seq-len", type=int, default=None, help="Longest context, prompt + answer (default: the LLM's max_position_embeddings).")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Decoder batch (beam search needs >= --num-beams).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None, help="Timing cache file, loaded if present and saved after every engine.")
@click.option("--workspace", "workspace_mb", type=int, default=None, metavar="MB", help="Builder workspace limit in MiB (default: TensorRT's).")
@click.option("--builder-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level 0-5 (TensorRT default 3).")
@click.option("--dla-core", type=int, default=None, help="Build the vision engine for this DLA core, with GPU fallback (Jetson AGX Orin / Orin NX, TensorRT <= 10.7: from an fp32 export, built FP16 as trtexec --useDLACore does; >= 11.4.1: from an fp16 export). DLA has no dynamic shapes: needs --frames N:N:N (one frame count; images then need a GPU engine folder).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--dry-run", is_flag=True, help="Print the plan and the equivalent trtexec commands; build nothing (works without TensorRT).")
def build_command(export_dir, out, fp16, int8, frames, max_input_len, max_seq_len, max_batch, timing_cache, workspace_mb, builder_level, dla_core, force, dry_run):
    """Build TensorRT engines from an EXPORT folder: one profile over T for vision / prompt_pool, two (context,
    generation) for the decoder; engines named NAME.trtVERSION.smXY.engine, described in engines.json."""
    from ..engine.build import build_engines
    from ..engine.plan import BuildOptions, plan_build, trtexec_command
    from ..engine.profiles import format_symbols, resolve_limits
    from ..manifest import load_manifest

    opts = BuildOptions(
        fp16=fp16, int8=int8, frames=frames, max_input_len=max_input_len, max_seq_len=max_seq_len, max_batch=max_batch,
        timing_cache=timing_cache, workspace_mb=workspace_mb, builder_level=builder_level, dla_core=dla_core, force=force,
    )
    if dry_run:
        manifest = load_manifest(export_dir)
        limits = resolve_limits(manifest, frames, max_input_len, max_seq_len, max_batch)
        version, sm = _target_for_dry_run()
        plans = plan_build(manifest, out, opts, version, sm, limits)
        err_console.print(
            f"dry run (TensorRT {version}, sm {sm}): frames {':'.join(map(str, limits.frames))}, max_input_len {limits.max_input_len}, "
            f"max_seq_len {limits.max_seq_len}, max_batch {limits.max_batch}"
        )
        rows = [[p.graph, p.engine_file, p.precision, "strong" if p.strongly_typed else "weak", p.device,
                 "\n".join(f"{n}: {format_symbols(sym)}" for n, sym in zip(p.profile_names, p.symbols))] for p in plans]
        err_console.print(table("engine plan", ["graph", "engine", "precision", "typing", "device", "profiles"], rows))
        for p in plans:
            click.echo(trtexec_command(p, out, opts, version))
        return

    with stages("build") as log:
        result = build_engines(export_dir, out, opts, on_engine=lambda g: log(f"{g} engine"))
    rows = [[e.plan.graph, e.plan.engine_file, e.plan.precision, e.plan.device, str(len(e.plan.profiles)), f"{e.build_seconds:.1f}", f"{e.size_bytes / 1e6:.1f}"]
            for e in result.engines]
    err_console.print(table(f"engines (TensorRT {result.metadata['tensorrt']}, {result.metadata['gpu']['name']} sm{result.metadata['gpu']['sm']})",
                            ["graph", "engine", "precision", "device", "profiles", "build s", "MB"], rows, right={4, 5, 6}))
    err_console.print("equivalent trtexec commands:")
    for e in result.engines:
        err_console.print(f"  {e.trtexec}")
    if timing_cache is not None:
        err_console.print(f"timing cache saved to {timing_cache}")
    err_console.print(f"built {len(result.engines)} engines in {result.seconds:.1f} s")
    out_console.print(str(out))


@cli.command("engines")
@click.argument("engines_dir", metavar="ENGINES", type=click.Path(path_type=Path))
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None, help="Export folder the engines serve (default: the one recorded in engines.json).")
@click.option("--load", is_flag=True, help="Also deserialize every engine with the native TensorRT backend (needs TensorRT and a GPU).")
@cuda_graph_option
def engines_command(engines_dir, export_dir, load):
    """Show an engine folder (engines.json), check it against this machine, optionally load it."""
    from ..engine.availability import tensorrt_version
    from ..engine.metadata import check_compatible, load_metadata
    from ..engine.profiles import format_symbols
    from ..errors import EngineBuildError
    meta = load_metadata(engines_dir)
    gpu = meta.get("gpu", {})
    rows = [[g, e["file"], e["precision"], e["device"], "\n".join(f"{p['name']}: {format_symbols({k: tuple(v) for k, v in p.get('dims', {}).items()})}" for p in e["profiles"]),
             f"{e['size_bytes'] / 1e6:.1f}"] for g, e in meta["engines"].items()]
    err_console.print(table(f"{engines_dir}: TensorRT {meta['tensorrt']}, {gpu.get('name', '?')} sm{gpu.get('sm', '?')}, built {meta.get('created', '?')}",
                            ["graph", "engine", "precision", "device", "profiles", "MB"], rows, right={5}))
    lim = meta.get("limits", {})
    err_console.print(f"limits: frames {':'.join(map(str, lim.get('frames', [])))}, max_input_len {lim.get('max_input_len')}, max_seq_len {lim.get('max_seq_len')}, max_batch {lim.get('max_batch')}")
    have = tensorrt_version()
    if have is None:
        status = "cannot check here: TensorRT is not installed"
    else:
        from ..engine.environment import current_gpu

        here = current_gpu()
        what = ", ".join(x for x in (here["name"], f"sm{here['sm']}" if here["sm"] is not None else None, here["module"]) if x)
        unknown = [k for k in ("name", "sm") if here[k] is None]
        try:
            check_compatible(meta, have, here["sm"], here["name"], here["module"])
            status = f"compatible with this machine (TensorRT {have}" + (f", {what}" if what else "") + (
                f"; GPU {' and '.join(unknown)} not checked: {here['source']})" if unknown else f"; GPU from {here['source']})")
        except EngineBuildError as exc:
            status = f"NOT compatible: {str(exc).splitlines()[0]}"
    click.echo(status)
    if load:
        from ..manifest import load_manifest
        from ..runtime.trt_backend import open_engines

        manifest = load_manifest(export_dir or meta.get("export", {}).get("folder", ""))
        engines = open_engines(engines_dir, manifest)
        try:
            click.echo(f"loaded {len(engines.runners) + 1} engines from {engines_dir}")
        finally:
            engines.close()


@cli.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def env_command(as_json):
    """Print the environment: package, Python, CPU, memory, GPU, driver, CUDA, TensorRT, onnxruntime providers, Jetson.
    Exits 1 (after printing) when TensorRT, cuda-python, onnxruntime-gpu and the driver target different CUDA majors."""
    from ..engine.availability import check_cuda_stack
    from ..engine.environment import collect_environment, format_environment

    env = collect_environment()
    click.echo(json.dumps(env, indent=2) if as_json else format_environment(env))
    check_cuda_stack("TensorRT", env["cuda_stack"], ort=True)
