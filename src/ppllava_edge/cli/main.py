"""`ppllava-edge` command line: a thin layer over the library (the group is in app.py, one module per command).

Library errors (PPLLaVAEdgeError) become one message on stderr and exit code 1; `--debug` shows the
traceback. Usage errors keep click's exit code 2. stdout carries results only.
"""

from __future__ import annotations

# Commands living in their own modules register themselves on `cli` when imported.
from . import bench_cmd, demo_cmd, engine_cmd, export_cmd, model_cmd, quant_cmd, runtime_cmd, serve_cmd, triton_cmd  # noqa: F401
from .app import PRESET_NAMES, cli, frames_option  # noqa: F401  (the names callers import from here)


def main() -> None:
    cli(obj={})
