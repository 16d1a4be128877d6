#!/usr/bin/env python
"""The package's shape, read from the source (AST only, nothing imported): import cycles, imports against the layer
order of the README's Architecture section, the longest functions, the largest files and the modules that build a
graph feed by hand.

    python tools/architecture.py [--src src/ppllava_edge] [--readme README.md]

tests/test_architecture.py asserts no cycles and no upward imports with the same functions.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "ppllava_edge"
LAYERS_MARK = "<!-- layers -->"  # the README's layer list follows this line, one layer a line, bottom first
# the graph inputs a feed dict is built from (a literal dict with one of these keys = a feed built by hand) ...
FEED_KEYS = ("pixel_values", "clip_ids", "inputs_embeds")
# ... unless it also holds what the route produces: then it is a record of a run (the --dump arrays), not a feed
RECORD_KEYS = ("relevance", "visual_tokens", "output_ids")


def modules(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `src` (a package's __init__ is the package's name)."""
    out = {}
    for f in sorted(src.rglob("*.py")):
        parts = [PACKAGE, *f.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve(name: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return name
    base = current.split(".")
    base = base[: len(base) - level + (1 if is_package else 0)]
    return ".".join([*base, *([name] if name else [])])


def imports(src: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth: function-local imports count too)."""
    mods = modules(src)
    graph: dict[str, set[str]] = {}
    for mod, f in mods.items():
        deps: set[str] = set()
        is_package = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, mod, is_package)
                # `from . import x` / `from .pkg import name`: the submodule when it is one, else the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t.startswith(PACKAGE + ".") and t != mod:
                    deps.add(t)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def read_layers(readme: Path) -> list[list[str]]:
    """The layer order from the README: after LAYERS_MARK, a fenced block, one layer a line, bottom first:
    `N. name, name/ ...` (a name ending in / is a package; a line's parenthesised text is a comment)."""
    text = readme.read_text()
    if LAYERS_MARK not in text:
        raise ValueError(f"{readme}: no {LAYERS_MARK} line (the Architecture section's layer order)")
    block = text.split(LAYERS_MARK, 1)[1].split("```", 2)[1]
    layers = []
    for line in block.strip().splitlines():
        line = re.sub(r"\(.*?\)", "", line.split(".", 1)[1] if re.match(r"\s*\d+\.", line) else line)
        layers.append([n.strip().rstrip("/") for n in line.split(",") if n.strip()])
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index of the layer naming `module` or its top-level package (ppllava_edge.runtime.stages -> "runtime")."""
    parts = module.split(".")[1:]
    for depth in (2, 1):
        name = "/".join(parts[:depth])
        for i, layer in enumerate(layers):
            if name in layer:
                return i
    return None


def upward(graph: dict[str, set[str]], layers: list[list[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module sits in a higher layer."""
    out = []
    for mod, deps in sorted(graph.items()):
        lm = layer_of(mod, layers)
        for d in sorted(deps):
            ld = layer_of(d, layers)
            if lm is not None and ld is not None and ld > lm:
                out.append((mod, d))
    return out


def unlayered(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    return [m for m in sorted(graph) if m != PACKAGE and layer_of(m, layers) is None]


def functions(src: Path) -> list[tuple[int, str]]:
    """(lines, module:qualified name) of every function, longest first."""
    out = []
    for mod, f in modules(src).items():
        tree = ast.parse(f.read_text(), str(f))

        def walk(node: ast.AST, prefix: str) -> Iterable[tuple[int, str]]:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield child.end_lineno - child.lineno + 1, f"{mod}:{prefix}{child.name}"
                    yield from walk(child, f"{prefix}{child.name}.")
                elif isinstance(child, ast.ClassDef):
                    yield from walk(child, f"{prefix}{child.name}.")

        out.extend(walk(tree, ""))
    return sorted(out, reverse=True)


def feed_builders(src: Path) -> dict[str, int]:
    """Module -> count of literal dicts keyed by a graph input (FEED_KEYS) and no route output (RECORD_KEYS): feeds
    built by hand."""
    def keys(node: ast.Dict) -> set:
        return {k.value for k in node.keys if isinstance(k, ast.Constant)}

    out = {}
    for mod, f in modules(src).items():
        n = sum(1 for node in ast.walk(ast.parse(f.read_text(), str(f))) if isinstance(node, ast.Dict)
                and keys(node) & set(FEED_KEYS) and not keys(node) & set(RECORD_KEYS))
        if n:
            out[mod] = n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=ROOT / "src" / PACKAGE)
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--top", type=int, default=5)
    a = ap.parse_args()
    graph = imports(a.src)
    cyc = cycles(graph)
    print(f"import cycles: {len(cyc)}")
    for c in cyc:
        print("  " + " <-> ".join(m.removeprefix(PACKAGE + ".") for m in c))
    try:
        layers = read_layers(a.readme)
    except ValueError as exc:
        print(f"upward imports: (no layer order: {exc})")
    else:
        up = upward(graph, layers)
        print(f"upward imports: {len(up)}")
        for m, d in up:
            print(f"  {m.removeprefix(PACKAGE + '.')} -> {d.removeprefix(PACKAGE + '.')}")
        for m in unlayered(graph, layers):
            print(f"  (not in any layer: {m})")
    print("longest functions (lines):")
    for n, name in functions(a.src)[: a.top]:
        print(f"  {n:5d}  {name.removeprefix(PACKAGE + '.')}")
    sizes = sorted(((len(f.read_text().splitlines()), m) for m, f in modules(a.src).items()), reverse=True)
    print("largest files (lines):")
    for n, m in sizes[: a.top]:
        print(f"  {n:5d}  {m.removeprefix(PACKAGE + '.')}")
    feeds = feed_builders(a.src)
    print(f"modules building a graph feed by hand ({', '.join(FEED_KEYS)}): {len(feeds)}")
    for m, n in sorted(feeds.items()):
        print(f"  {m.removeprefix(PACKAGE + '.')}: {n}")


if __name__ == "__main__":
    main()
