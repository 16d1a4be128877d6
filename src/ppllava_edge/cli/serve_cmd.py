"""`ppllava-edge serve`: the OpenAI-compatible chat-completions server (needs the `serve` extra).

    ppllava-edge serve EXPORT --media-dir /data/clips --api-key "$KEY" --port 8000

The command checks its options and the export folder, binds the port, prints the URL on stderr, then loads the
model in the background (GET /ready turns 200 when it is loaded). Ctrl-C stops it (in-flight answers finish
within 10 s).
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from ._progress import err_console
from .app import cli


@cli.command("serve")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind. Anything but loopback exposes the model to the network: use --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port (0: a free port, printed at start).")
@click.option("--media-dir", "media_dirs", multiple=True, type=click.Path(path_type=Path), help="Folder whose files requests may name (file:// or a path); repeatable. Without it, no path access at all.")
@click.option("--api-key", default=None, envvar="PPLLAVA_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $PPLLAVA_API_KEY).")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True, help="Largest inline (base64) upload, decoded size.")
@click.option("--max-images", type=click.IntRange(1, 32), default=8, show_default=True,
              help="image_url parts one request may hold (several images: one question about all of them; at most 32, and the export's frame range).")
@click.option("--frames", "num_frames", type=int, default=8, show_default=True, help="Frames sampled from a video when a request does not say ('frames' field).")
@click.option("--max-queue", type=click.IntRange(min=0), default=8, show_default=True, help="Requests that may wait for a worker; more get 503 with Retry-After.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Requests answered at once (one KV-cache decoder each; see README for the measured trade-off).")
@click.option("--decoders", type=click.IntRange(min=1), default=None, help="KV-cache decoders shared by the workers (default: one per worker; 1 = generation under a lock).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Also keep per-video features on disk here (shared by all requests either way).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="max_tokens of a request that gives none.")
@click.option("--model-name", default=None, help="Model id clients send (default: the export folder's name).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda", "tensorrt"]), default="auto", show_default=True, help="ONNX Runtime execution provider.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per graph run.")
@click.option("--read-timeout", type=click.FloatRange(min=0, min_open=True), default=30.0, show_default=True, help="Seconds a client has to send a request's headers, and between two pieces of its body (408 / closed after).")
@click.option("--body-timeout", type=click.FloatRange(min=0, min_open=True), default=300.0, show_default=True, help="Seconds a client has to send a whole request body (408 after).")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
@click.pass_context
def serve_command(ctx, export_dir, host, port, media_dirs, api_key, max_upload_mb, max_images, num_frames, max_queue, workers, decoders, cache_dir, max_tokens, model_name, provider, threads, read_timeout, body_timeout, access_log):
    """Serve EXPORT over HTTP with the OpenAI chat-completions API (video_url / image_url content parts)."""
    from ..errors import InputError
    from ..manifest import load_manifest
    from ..serve.scheduler import ServeOptions
    from ..serve.run import run_server

    manifest = load_manifest(export_dir)  # a missing or broken export fails here, before binding
    fmin, _, fmax = manifest.frames
    if not max(fmin, 2) <= num_frames <= fmax:
        raise InputError(f"--frames {num_frames} is outside this export's frame range {max(fmin, 2)}..{fmax}")
    for d in media_dirs:
        if not d.is_dir():
            raise InputError(f"--media-dir {d}: no such directory")
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key must not be empty")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err_console.print(f"warning: --host {host} without --api-key: anyone who can reach this address can use the model")
    opts = ServeOptions(
        export=Path(export_dir), host=host, port=port, media_dirs=tuple(Path(os.path.abspath(d)) for d in media_dirs), api_key=api_key,
        max_upload_mb=max_upload_mb, max_images=max_images, frames=num_frames, max_queue=max_queue, workers=workers, decoders=decoders, cache_dir=cache_dir, provider=provider,
        threads=threads, model_name=model_name, max_tokens=max_tokens, read_timeout=read_timeout, body_timeout=body_timeout,
    )
    verbose = bool(ctx.obj and ctx.obj.get("verbose"))

    def listening(url: str) -> None:
        dirs = ", ".join(str(d) for d in opts.media_dirs) or "none (no path access)"
        err_console.print(f"ppllava-edge serve: listening on {url} | model {opts.model_name or export_dir.name} | "
                          f"media dirs: {dirs} | api key: {'required' if api_key else 'off'} | workers {workers}, decoders {decoders or workers}, queue {max_queue}", soft_wrap=True)

    run_server(opts, on_listening=listening, log_level="info" if verbose else "warning", access_log=access_log)
