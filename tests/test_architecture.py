"""The package's import structure, read from the source (AST; nothing is imported): no import cycles, and no module
imports a module of a higher layer than its own, in the layer order written in the README's Architecture section
(tools/architecture.py reads both; `python tools/architecture.py` prints the same findings and more)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "ppllava_edge"

# Imports against the layer order that another branch removes; each names who and why. Empty when none is pending.
PENDING: dict[tuple[str, str], str] = {}


def _tool():
    spec = importlib.util.spec_from_file_location("architecture_tool", ROOT / "tools" / "architecture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def arch():
    return _tool()


@pytest.fixture(scope="module")
def graph(arch):
    return arch.imports(SRC)


def test_no_import_cycles(arch, graph):
    assert arch.cycles(graph) == []


def test_no_module_imports_a_higher_layer(arch, graph):
    layers = arch.read_layers(ROOT / "README.md")
    upward = [pair for pair in arch.upward(graph, layers) if pair not in PENDING]
    assert upward == [], "imports against the README's layer order (importer, imported)"


def test_every_module_has_a_layer(arch, graph):
    assert arch.unlayered(graph, arch.read_layers(ROOT / "README.md")) == []


def test_pending_exceptions_are_still_needed(arch, graph):
    """An exception whose import is gone must leave the list (so the list never hides a new upward import)."""
    layers = arch.read_layers(ROOT / "README.md")
    assert set(PENDING) <= set(arch.upward(graph, layers))


def test_the_checker_finds_a_cycle_and_an_upward_import(arch, tmp_path):
    """The reading itself: a two-module cycle, a relative `from .. import` and a function-local upward import."""
    pkg = tmp_path / "ppllava_edge"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from . import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from ..high import c\n    from .a import x\n")
    (pkg / "high" / "c.py").write_text("from ..low.a import y\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"{arch.LAYERS_MARK}\n```\n1. low/ (the bottom)\n2. high/\n```\n")
    g = arch.imports(pkg)
    assert g["ppllava_edge.low.a"] == {"ppllava_edge.low.b"}
    assert g["ppllava_edge.low.b"] == {"ppllava_edge.high.c", "ppllava_edge.low.a"}
    assert arch.cycles(g) == [["ppllava_edge.high.c", "ppllava_edge.low.a", "ppllava_edge.low.b"]]
    assert arch.upward(g, arch.read_layers(readme)) == [("ppllava_edge.low.b", "ppllava_edge.high.c")]


def test_graph_feeds_are_built_by_the_runtime_only(arch, tmp_path):
    """A graph's feed is built by the stage functions (runtime/stages.py) or by the runners that bind their own inputs
    (the KV decoders, the native TensorRT runner); a dict that also holds what the route produces is a record of a
    run (--dump arrays), not a feed. The PyTorch reference (model/) runs no graph: its inputs only share the names."""
    allowed = {"ppllava_edge.runtime.stages", "ppllava_edge.runtime.decoder", "ppllava_edge.runtime.trt_backend"}
    assert {m for m in arch.feed_builders(SRC) if not m.startswith("ppllava_edge.model.")} <= allowed
    pkg = tmp_path / "ppllava_edge"
    pkg.mkdir()
    (pkg / "m.py").write_text('def f(s, px, ids):\n    s.run(None, {"pixel_values": px})\n'
                              '    return {"pixel_values": px, "output_ids": ids}\n')
    assert arch.feed_builders(pkg) == {"ppllava_edge.m": 1}
