"""Every initializer of an export traced back to the checkpoint tensor(s) it came from, checked by checksum.

At export time each graph gets a **weight map** (stored in export.json, `graphs.<g>.weights`):

- `map`: initializer -> [transform, [checkpoint tensor, ...]] with transform one of
  `identity` (the tensor as is), `transpose` (a Linear weight [out, in] stored as a MatMul operand [in, out]),
  `concat_transpose` (several Linear weights concatenated along `out`, then transposed: the decoder's packed q|k|v
  and gate|up) and `clip_positions` (the folded 248-row CLIP position table: rows < 20 of `position_embedding`,
  the rest of `position_embedding_res`) and `value_slice` (the last third of a packed q|k|v in-projection, rows
  [2E, 3E), transposed when 2-D: the V slice of SigLIP's MAP head `clip_visual_head.attention.in_proj_*`);
- `expected`: the checkpoint tensors the graph must hold (those the traced program uses, or the builder wrote);
- `derived`: initializers computed at export (rotary tables, folded constants, small shape tensors), whose bytes
  are not checkpoint tensors.

`check_weights` then reads every mapped initializer from the written files (memory-mapped) and the checkpoint's
shards (one tensor at a time), applies the transform and the export dtype cast, and compares SHA-256 digests. It
reports initializers that do not match their source (and says `transposed` when the other layout matches),
expected checkpoint tensors no initializer holds (`missing`), and unmapped initializers that repeat a checkpoint
tensor another initializer already holds (`duplicated`). Peak memory: one tensor (and its transform).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..external_data import read_initializer

TRANSFORMS = ("identity", "transpose", "concat_transpose", "clip_positions", "value_slice")
CLIP_KEEP_LEN = 20
MIN_ELEMENTS = 8  # smaller float initializers (scalars, eps, shape-like constants) are not traced to the checkpoint


def digest(array: np.ndarray) -> str:
    a = np.ascontiguousarray(array)
    return hashlib.sha256(memoryview(a).cast("B")).hexdigest()


def apply_transform(transform: str, sources: list[np.ndarray]) -> np.ndarray:
    if transform == "identity":
        (a,) = sources
        return a
    if transform == "transpose":
        (a,) = sources
        return a.T
    if transform == "concat_transpose":
        return np.concatenate(sources, axis=0).T
    if transform == "clip_positions":
        pe, res = sources
        return np.concatenate((pe[:CLIP_KEEP_LEN], res[CLIP_KEEP_LEN:]), axis=0)
    if transform == "value_slice":
        (a,) = sources
        v = a[2 * a.shape[0] // 3 :]
        return v.T if v.ndim == 2 else v
    raise ValueError(f"unknown weight transform {transform!r}")


def checkpoint_name(init_name: str, keys: set[str] | dict) -> str | None:
    """The checkpoint tensor an initializer is named after (wrapper prefixes such as `model.` or `lm.` stripped):
    the longest dotted suffix of the name that is a checkpoint key or the unique dotted suffix of one."""
    parts = init_name.split(".")
    for i in range(len(parts)):
        rest = ".".join(parts[i:])
        if rest in keys:
            return rest
        hits = [k for k in keys if k.endswith("." + rest)]
        if len(hits) == 1 and i < len(parts) - 1:
            return hits[0]
    return None


@dataclass
class WeightMap:
    map: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    expected: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"map": {k: [t, list(s)] for k, (t, s) in self.map.items()}, "expected": sorted(set(self.expected)), "derived": sorted(set(self.derived))}

    @classmethod
    def from_json(cls, d: dict) -> WeightMap:
        return cls({k: (v[0], list(v[1])) for k, v in d["map"].items()}, list(d["expected"]), list(d["derived"]))


def map_traced_graph(onnx_path: Path, params: dict[str, np.ndarray], used: Iterable[str], dtype,
                     composites: Iterable[tuple[str, list[str]]] = ()) -> WeightMap:
    """The weight map of a graph traced from PyTorch: named initializers by name, the exporter's folded copies
    (`val_*`, Linear weights transposed for MatMul) by content among the checkpoint tensors the program uses.

    Args:
        onnx_path: the written graph (its external data beside it).
        params: checkpoint name -> the tensor the export read (any dtype; cast to `dtype` here).
        used: checkpoint names of the parameters the traced program uses (the `expected` set).
        dtype: the export's numpy dtype (float32 / float16).
        composites: (transform, sources) tensors the graph may hold that are computed from several checkpoint
            tensors (the folded CLIP position table); their sources join `expected`.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    wm = WeightMap(expected=[u for u in used if params[u].size >= MIN_ELEMENTS])
    index: dict[str, tuple[str, str]] = {}  # digest of the cast (and transposed) bytes -> (transform, source)
    composite_index: dict[str, tuple[str, list[str]]] = {}
    for transform, sources in composites:
        wm.expected += [s for s in sources if s not in wm.expected]
        a = np.ascontiguousarray(apply_transform(transform, [np.asarray(params[s]) for s in sources])).astype(dtype)
        composite_index[digest(a)] = (transform, list(sources))
    for name in wm.expected:
        a = np.asarray(params[name]).astype(dtype)
        index.setdefault(digest(a), ("identity", name))
        if a.ndim == 2:
            index.setdefault(digest(np.ascontiguousarray(a.T)), ("transpose", name))
    for t in model.graph.initializer:
        arr = read_initializer(t, onnx_path.parent)
        if not np.issubdtype(arr.dtype, np.floating) or arr.size < MIN_ELEMENTS:
            wm.derived.append(t.name)
            continue
        named = checkpoint_name(t.name, params)
        if named is not None and named in wm.expected:
            wm.map[t.name] = ("identity", [named])
            continue
        d = digest(arr)
        if d in composite_index:
            wm.map[t.name] = composite_index[d]
        elif d in index:
            wm.map[t.name] = (index[d][0], [index[d][1]])
        else:
            wm.derived.append(t.name)
    return wm


@dataclass
class Finding:
    graph: str
    kind: str  # mismatch | transposed | missing | duplicated | unknown
    initializer: str | None
    detail: str


@dataclass
class WeightsReport:
    checked: int
    bytes: int
    findings: list[Finding]

    @property
    def passed(self) -> bool:
        return not self.findings

    def text(self) -> str:
        head = f"{self.checked} initializers ({self.bytes / 1e6:.1f} MB) traced to the checkpoint"
        if self.passed:
            return head + ": all match"
        return head + f"; {len(self.findings)} problem(s):\n" + "\n".join(f"  {f.graph}: {f.kind}: {f.initializer or ''} {f.detail}".rstrip() for f in self.findings)

    def to_json(self) -> dict:
        return {"passed": self.passed, "initializers": self.checked, "bytes": self.bytes, "findings": [f.__dict__ for f in self.findings]}


def check_weights(folder: Path, graphs: dict[str, dict], read: Callable[[str], np.ndarray], dtype,
                  on_progress: Callable[[int, int], None] | None = None) -> WeightsReport:
    """Check the written graphs of an export folder against the checkpoint (see the module doc).

    Args:
        folder: the export folder (graphs and their external data).
        graphs: export.json `graphs` entries that carry a `weights` map.
        read: checkpoint tensor by name (e.g. from the safetensors shards; one at a time).
        dtype: the export's numpy dtype.
    """
    import onnx

    findings: list[Finding] = []
    checked = nbytes = 0
    work = [(g, e) for g, e in graphs.items() if "weights" in e]
    total = sum(len(e["weights"]["map"]) for _, e in work)
    for g, entry in work:
        wm = WeightMap.from_json(entry["weights"])
        model = onnx.load(str(folder / entry["file"]), load_external_data=False)
        inits = {t.name: t for t in model.graph.initializer}
        present_sources: dict[str, str] = {}
        for name, (transform, sources) in wm.map.items():
            t = inits.get(name)
            if t is None:
                findings.append(Finding(g, "missing", name, f"(holds {', '.join(sources)}) is not in {entry['file']}"))
                continue
            got = np.asarray(read_initializer(t, folder))
            srcs = [read(s) for s in sources]
            want = np.ascontiguousarray(apply_transform(transform, srcs)).astype(dtype)
            checked += 1
            nbytes += got.nbytes
            if got.shape == want.shape and digest(got) == digest(want):
                for s in sources:
                    present_sources.setdefault(s, name)
            else:
                flipped = {"identity": "transpose", "transpose": "identity"}.get(transform)
                if flipped and got.ndim == 2 and digest(np.ascontiguousarray(got.T)) == digest(want):
                    findings.append(Finding(g, "transposed", name, f"holds {sources[0]} transposed (expected {transform})"))
                else:
                    findings.append(Finding(g, "mismatch", name, f"does not equal {transform}({', '.join(sources)}) cast to {np.dtype(dtype).name}"))
            if on_progress is not None:
                on_progress(checked, total)
        for s in wm.expected:
            if s not in present_sources and not any(f.kind in ("mismatch", "transposed") and s in f.detail for f in findings):
                findings.append(Finding(g, "missing", None, f"checkpoint tensor {s} is held by no initializer"))
        # initializers the map does not know: a second copy of a checkpoint tensor is a duplicate
        known = set(wm.map) | set(wm.derived)
        extra = [t for n, t in inits.items() if n not in known]
        if extra:
            index = {}
            for s in present_sources:
                a = read(s).astype(dtype)
                index[digest(a)] = s
                if a.ndim == 2:
                    index[digest(np.ascontiguousarray(a.T))] = s
            for t in extra:
                arr = np.asarray(read_initializer(t, folder))
                src = index.get(digest(arr)) if np.issubdtype(arr.dtype, np.floating) else None
                if src is not None:
                    findings.append(Finding(g, "duplicated", t.name, f"repeats {src}, already held by {present_sources[src]}"))
                elif np.issubdtype(arr.dtype, np.floating) and arr.size >= MIN_ELEMENTS:
                    findings.append(Finding(g, "unknown", t.name, "is in no weight map (not from the checkpoint, not derived at export)"))
    return WeightsReport(checked, nbytes, findings)
