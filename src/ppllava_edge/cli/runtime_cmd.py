"""`ppllava-edge ask` and `ppllava-edge chat`: the torch-free runtime on an export folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from ..errors import InputError
from ..memory import peak_rss_mb
from ._progress import err_console
from .app import cli, cuda_graph_option, frames_option


def generation_options(f):
    opts = [
        click.option("--max-new-tokens", type=int, default=32, show_default=True),
        click.option("--temperature", type=float, default=1.0, show_default=True, help="Used with --sample."),
        click.option("--top-k", type=int, default=0, show_default=True, help="Used with --sample (0 = off)."),
        click.option("--top-p", type=float, default=1.0, show_default=True, help="Used with --sample."),
        click.option("--sample", is_flag=True, help="Sample instead of greedy decoding."),
        click.option("--seed", type=int, default=None, help="Seed for --sample."),
        click.option("--num-beams", type=int, default=1, show_default=True, help="Beam search (the authors' demo uses 5)."),
        click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider (tensorrt = ORT's TensorRT EP)."),
        click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True, help="ort: ONNX Runtime; trt: native TensorRT engines from `ppllava-edge build`."),
        click.option("--engines", type=click.Path(path_type=Path), default=None, help="Engine folder for --backend trt (default: EXPORT/engines)."),
        cuda_graph_option,
        click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Also keep per-video features on disk here."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _config(pipe, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams):
    return pipe.generation_config(max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, num_beams=num_beams)


@cli.command("ask")
@click.argument("args", nargs=-1, required=True, metavar="EXPORT INPUT... QUESTION")
@frames_option()
@generation_options
@click.option("--stream", is_flag=True, help="Print tokens as they are generated.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (text, ids, timings) instead of text.")
@click.option("--dump", type=click.Path(path_type=Path), default=None, help="Write the intermediate arrays as .npy into this folder.")
@click.option("--relevance-png", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write what the question looked at as a PNG: the pooling's relevance over each sampled frame (each image tile).")
@click.option("--triton", "triton_url", default=None, metavar="HOST:PORT",
              help="Ask the `ppllava` model of a Triton server (its gRPC address) instead; then give only INPUT... QUESTION.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="With --triton: seconds to wait for the answer.")
@click.pass_context
def ask_command(ctx, args, num_frames, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams, provider, backend, engines, threads, cache_dir, stream, as_json, dump, relevance_png, triton_url, timeout):
    """Answer QUESTION about INPUT (video, image or .npy of preprocessed frames) with the torch-free runtime.
    Several INPUT images: one question about all of them (the authors' multi-image path, one <image> slot each).

    With --triton HOST:PORT (`ask --triton URL INPUT... QUESTION`) a Triton server running `ppllava-edge triton-repo`'s
    model answers instead, streamed over gRPC; the output is the same.
    """
    if triton_url is not None:
        if len(args) < 2:
            raise click.UsageError("with --triton give INPUT... QUESTION (the export is on the server)")
        unused = [f"--{name.replace('_', '-')}" for name in TRITON_UNUSED if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]
        if unused:
            raise click.UsageError(f"{', '.join(unused)} do(es) not apply with --triton (the server's repository decides)")
        return _ask_triton(triton_url, [Path(a) for a in args[:-1]], args[-1], num_frames, max_new_tokens, temperature if sample else None, seed if sample else None, stream, as_json, timeout)
    if len(args) < 3:
        raise click.UsageError("give EXPORT INPUT... QUESTION (or --triton HOST:PORT INPUT... QUESTION)")
    from ..media import check_image_paths

    export_dir, question = Path(args[0]), args[-1]
    input_path = check_image_paths(args[1:-1])  # several inputs: images only, refused before the export opens
    input_path = input_path[0] if len(input_path) == 1 else input_path
    if relevance_png is not None and not relevance_png.parent.is_dir():
        raise InputError(f"--relevance-png {relevance_png}: no such folder {relevance_png.parent}")
    from ..runtime.pipeline import Pipeline, PipelineOptions

    t_load = time.perf_counter()
    # one question per process: an in-memory feature cache would only hold the vision features (302 MB at 7B dims,
    # 32 frames) through prefill (--cache-dir still keeps them on disk for the next command), and the sessions load
    # on a background thread while the video is decoded (session_load_ms still reports each one)
    options = PipelineOptions(provider=provider, threads=threads, cache_dir=cache_dir, cache_bytes=0, backend=backend, engines=engines, background_load=True)
    pipe = Pipeline.from_export(export_dir, options)
    load_ms = (time.perf_counter() - t_load) * 1e3
    try:
        _ask_local(pipe, input_path, question, load_ms, num_frames, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams, stream, as_json, dump, relevance_png)
    finally:  # join the background session loader: exiting while it is inside ONNX Runtime aborts the process
        pipe.close()


def _ask_local(pipe, input_path, question, load_ms, num_frames, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams, stream, as_json, dump, relevance_png):
    gen = _config(pipe, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams)
    streamer = _Streamer(pipe) if stream and not as_json else None
    result = pipe.ask(input_path, question, num_frames=num_frames, generation=gen, on_token=streamer, keep_arrays=dump is not None or relevance_png is not None)
    if relevance_png is not None:
        from ..relevance import relevance_kind, write_relevance_png

        rel = result.arrays["relevance"]
        kind = "images" if isinstance(input_path, list) else relevance_kind(input_path, rel)
        write_relevance_png(relevance_png, rel, result.arrays["pixel_values"], kind, f"relevance to: {question}", pipe.manifest.preprocess)
        err_console.print(f"relevance map ({'x'.join(map(str, rel.shape))}) written to {relevance_png}")
    if dump is not None:
        from ..dump import write_dump

        write_dump(dump, result.arrays)
        err_console.print(f"dumped {len(result.arrays)} arrays to {dump}")
    for w in result.warnings:
        err_console.print(f"warning: {w}")
    if as_json:
        click.echo(json.dumps({"text": result.text, "ids": result.ids, "visual_tokens": result.visual_tokens, "context_len": result.context_len, "provider": pipe.provider,
                               "timings_ms": result.timings.as_dict(), "load_ms": load_ms, "session_load_ms": dict(getattr(pipe.sessions, "load_ms", {})),
                               "session_wait_ms": getattr(pipe.sessions, "wait_ms", None),
                               "peak_rss_mb": peak_rss_mb(), "kv_cache_bytes": getattr(pipe.decoder, "allocated_bytes", None), "warnings": result.warnings}))
    else:
        if streamer is not None:
            streamer.finish()
        else:
            click.echo(result.text)
        err_console.print(summary_line(pipe.provider, result.visual_tokens, result.context_len, load_ms, result.timings.line(), peak_rss_mb()))


# options of a local `ask` that a Triton server decides for itself
TRITON_UNUSED = ("top_k", "top_p", "num_beams", "provider", "backend", "engines", "threads", "cache_dir", "dump", "relevance_png")


def summary_line(provider: str, visual_tokens: int, context_len: int, load_ms: float, timing_line: str, peak_rss: float) -> str:
    """The timing line `ask` prints on stderr (the same for a local and a --triton answer; with --triton, `load` is
    the time the answering instance took to open the export, and the peak RSS is that instance's)."""
    return f"provider {provider}: {visual_tokens} visual tokens, context {context_len} | load {load_ms:.1f} ms | {timing_line} | peak RSS {peak_rss:.0f} MB"


def _ask_triton(url, video, question, num_frames, max_new_tokens, temperature, seed, stream, as_json, timeout):
    from ..triton.client import ask_triton

    def show(delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    answer = ask_triton(url, video, question, frames=num_frames, max_tokens=max_new_tokens, temperature=temperature, seed=seed,
                        on_text=show if stream and not as_json else None, timeout=timeout)
    st = answer.stats
    for w in st["warnings"]:
        err_console.print(f"warning: {w}")
    if as_json:
        click.echo(json.dumps({"text": answer.text, "ids": answer.ids, "visual_tokens": st["visual_tokens"], "context_len": st["context_len"],
                               "provider": st["provider"], "timings_ms": st["timings_ms"], "load_ms": st["load_ms"], "peak_rss_mb": st["peak_rss_mb"],
                               "warnings": st["warnings"], "triton": {"instance": st["instance"], "first_text_ms": answer.first_text_ms, "total_ms": answer.total_ms}}))
    elif stream:
        sys.stdout.write("\n")
        sys.stdout.flush()
    else:
        click.echo(answer.text)
    if not as_json:
        err_console.print(summary_line(st["provider"], st["visual_tokens"], st["context_len"], st["load_ms"], st["timing_line"], st["peak_rss_mb"]))
        first = "-" if answer.first_text_ms is None else f"{answer.first_text_ms:.1f} ms"
        err_console.print(f"triton {url} ({st['instance']}): first text {first}, answer {answer.total_ms:.1f} ms (measured by this client)")


class _Streamer:
    """Prints the decoded text incrementally (re-decoding the id list keeps multi-byte pieces right)."""

    def __init__(self, pipe):
        self.pipe, self.ids, self.printed = pipe, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(int(token))
        text = self.pipe.llama.decode(self.ids)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()


@cli.command("chat")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@frames_option()
@generation_options
@click.option("-q", "--question", "questions", multiple=True, help="Questions to ask in order (otherwise read lines from stdin).")
def chat_command(export_dir, input_path, num_frames, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams, provider, backend, engines, threads, cache_dir, questions):
    """Several questions on one video or image: the vision graph runs once, later questions hit the feature cache."""
    from ..runtime.pipeline import Pipeline, PipelineOptions

    pipe = Pipeline.from_export(export_dir, PipelineOptions(provider=provider, threads=threads, cache_dir=cache_dir, backend=backend, engines=engines))
    gen = _config(pipe, max_new_tokens, temperature, top_k, top_p, sample, seed, num_beams)
    source = list(questions) if questions else (line.strip() for line in sys.stdin)
    for q in source:
        if not q:
            continue
        result = pipe.ask(input_path, q, num_frames=num_frames, generation=gen)
        for w in result.warnings:
            err_console.print(f"warning: {w}")
        click.echo(f"Q: {q}\nA: {result.text}")
        err_console.print(f"   {result.timings.line()}")
