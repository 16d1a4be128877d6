"""The `ppllava-edge` click group and the options several commands share; the commands register on `cli` from
their modules (cli/*_cmd.py), and `main.py` imports them all.

Library errors (PPLLaVAEdgeError) become one message on stderr and exit code 1; `--debug` shows the
traceback. Usage errors keep click's exit code 2. stdout carries results only.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from .. import __version__
from ..errors import InputError, PPLLaVAEdgeError, disk_full_cause, disk_full_error

PRESET_NAMES = ("tiny", "small", "vision-l", "mid", "7b", "qwen-tiny", "qwen-small", "qwen-7b")  # model.presets.PRESETS (not imported here: it needs torch)


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt


class Group(click.Group):
    """Maps library errors to a clean message and exit 1 (no traceback unless --debug). SIGTERM is handled as
    Ctrl-C, so atomic outputs (make-checkpoint, export) remove their temp folder when a run is killed."""

    def invoke(self, ctx: click.Context):
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            return super().invoke(ctx)
        except PPLLaVAEdgeError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except OSError as exc:  # a full disk outside an atomic output (ask --dump, a cache folder): one line too
            cause = disk_full_cause(exc)
            if cause is None or (ctx.obj and ctx.obj.get("debug")):
                raise
            click.echo(f"error: {disk_full_error(cause)}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ppllava-edge")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Export, quantize, build and run PPLLaVA (prompt-guided pooling video LLM)."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    ctx.obj["verbose"] = verbose
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _refuse_cuda_graph(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        from ..runtime.trt_backend import CUDA_GRAPH_REFUSAL

        raise InputError(CUDA_GRAPH_REFUSAL)


def cuda_graph_option(f):
    """--cuda-graph: accepted so that asking for it gets the reason; refused here, the one place (before anything
    loads or needs TensorRT), and never passed on."""
    return click.option("--cuda-graph", is_flag=True, expose_value=False, callback=_refuse_cuda_graph,
                        help="Refused with an explanation: the TensorRT decoder's shapes change every step (README: TensorRT / Jetson).")(f)


def frames_option(default: int = 8):
    return click.option("--frames", "num_frames", type=int, default=default, show_default=True, help="Frames sampled from a video (2..max_T).")
