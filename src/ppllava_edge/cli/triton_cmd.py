"""`ppllava-edge triton-repo` and `ppllava-edge triton-serve` (NVIDIA Triton Inference Server)."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from ._progress import err_console
from .app import cli


@cli.command("triton-repo")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--instances", type=int, default=1, show_default=True, help="Instances of every model (per GPU with --kind gpu).")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="cpu: every stage in the Python model; gpu: vision and pool stages as their own GPU models, called with BLS.")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="--kind gpu stage models: ort (onnxruntime backend with the TensorRT accelerator) or trt (tensorrt_plan engines).")
@click.option("--engines", type=click.Path(path_type=Path), default=None, help="Engine folder of `ppllava-edge build` for --backend trt (default: EXPORT/engines).")
@click.option("--frames", "num_frames", type=int, default=8, show_default=True, help="Frames per video when a request does not send `frames`.")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="New tokens when a request does not send `max_tokens`.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per instance (default: CPU cores / instances).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Feature cache folder shared on disk by every instance.")
@click.option("--cache-mb", type=int, default=2048, show_default=True, help="In-memory feature cache per instance.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUT.")
def triton_repo_cmd(export_dir, out, instances, kind, backend, engines, num_frames, max_tokens, threads, cache_dir, cache_mb, force):
    """Write a Triton model repository (model `ppllava`, streaming) for the export folder EXPORT into OUT."""
    from ..triton.repository import RepositoryOptions, write_repository

    opts = RepositoryOptions(instances=instances, kind=kind, backend=backend, engines=engines, frames=num_frames, max_tokens=max_tokens,
                             threads=threads, cache_dir=cache_dir, cache_mb=cache_mb)
    repo = write_repository(export_dir, out, opts, force=force)
    models = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    err_console.print(f"models: {', '.join(models)} ({kind}, {instances} instance{'s' if instances > 1 else ''} each)")
    click.echo(str(repo))


@cli.command("triton-serve")
@click.argument("repo", type=click.Path(path_type=Path))
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--server-dir", type=click.Path(path_type=Path), default=None,
              help="Folder with the server files (pip install --no-deps --target DIR nvidia-pytriton==0.7.0 numpy==1.26.4); default: <venv>/triton.")
@click.option("--ready-timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for every model to load.")
def triton_serve_cmd(repo, http_port, grpc_port, metrics_port, server_dir, ready_timeout):
    """Run tritonserver on REPO, on 127.0.0.1 only; Ctrl-C stops it cleanly."""
    from ..errors import InferenceError
    from ..triton.server import TritonServer

    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, server_dir=server_dir)
    # Ctrl-C and SIGTERM (docker stop, Kubernetes) both stop the server gracefully, even where a shell started us in
    # the background with SIGINT ignored; a second signal during the stop kills it at once
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        server.start()
        server.wait_ready(ready_timeout)
        err_console.print(
            f"ready: gRPC {server.grpc_url} | HTTP {server.http_url} | metrics {server.metrics_url} (tritonserver pid {server.pid}); Ctrl-C stops it"
        )
        code = server.wait()
        raise InferenceError(f"tritonserver exited by itself with code {code}")
    except KeyboardInterrupt:
        err_console.print("stopping tritonserver ...")
        code = server.stop()
        err_console.print(f"stopped (tritonserver exit code {code})")
    finally:
        server.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@cli.command("triton-bench")
@click.argument("url", metavar="HOST:PORT")
@click.option("--video", type=click.Path(path_type=Path, exists=True, dir_okay=False), required=True, help="The video every request sends.")
@click.option("--concurrency", default="1,2,4", show_default=True, help="Comma-separated concurrency levels (client threads).")
@click.option("--requests", type=int, default=8, show_default=True, help="Timed requests per level.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Untimed requests before the first level.")
@click.option("--frames", "num_frames", type=int, default=None, help="Frames per request (default: the repository's).")
@click.option("--max-tokens", type=int, default=None, help="New tokens per request (default: the repository's).")
@click.option("--timeout", type=float, default=600.0, show_default=True)
@click.option("-o", "--output", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
def triton_bench_cmd(url, video, concurrency, requests, warmup, num_frames, max_tokens, timeout, fmt):
    """Closed-loop load test of the `ppllava` model of a Triton server (gRPC streaming): req/s, tok/s, latency."""
    import json

    from ..errors import InputError
    from ..triton.loadtest import LoadOptions, load_markdown, run_load

    try:
        levels = [int(c) for c in concurrency.split(",")]
    except ValueError:
        raise InputError(f"--concurrency {concurrency!r}: expected comma-separated integers, e.g. 1,2,4") from None
    opts = LoadOptions(url=url, video=video, concurrency=levels, requests=requests, warmup=warmup, frames=num_frames, max_tokens=max_tokens, timeout=timeout)
    result = run_load(opts, progress=lambda msg: err_console.print(msg))
    click.echo(json.dumps(result, indent=2) if fmt == "json" else load_markdown(result))
