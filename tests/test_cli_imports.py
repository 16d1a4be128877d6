"""A fresh `ppllava-edge` process imports only what its command needs (cold start of `ask`, issue 24)."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("onnxruntime", "torch", "transformers", "av", "tokenizers", "PIL", "starlette", "uvicorn", "tritonclient", "matplotlib")


def _modules(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_cli_import_loads_no_heavy_module():
    mods = _modules("import ppllava_edge.cli.main")
    assert not [m for m in HEAVY if m in mods]


def test_help_of_every_command_loads_no_heavy_module():
    mods = _modules("from click.testing import CliRunner\nfrom ppllava_edge.cli.main import cli\n"
                    "for c in sorted(cli.commands):\n    assert CliRunner().invoke(cli, [c, '--help']).exit_code == 0, c")
    assert not [m for m in HEAVY if m in mods]


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "ppllava_edge", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ask" in out.stdout and "bench" in out.stdout
