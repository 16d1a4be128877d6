"""Read a CALIB folder (written by `collect.py`) as feed dicts and as ONNX Runtime `CalibrationDataReader`s.

    calib = load_calibration("calib/")
    reader = make_reader(calib, "decoder", split="calib")   # for quantize_static
    for feed in calib.feeds("vision", split="holdout"): ...

`onnxruntime.quantization` (which imports `onnx`, part of the `export` extra) is imported only inside
`make_reader` and `histogram_shape_fix`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CalibrationError
from ..jsonfile import read_json
from ..runtime.decoder import adapt_feed
from ..runtime.stages import decoder_feed, vision_feed
from .collect import GRAPHS, INDEX_FORMAT, INDEX_NAME

_POOL_INPUTS = ("clip_ids", "clip_mask", "keys", "values")  # clip_mask: SigLIP exports only


@dataclass(frozen=True)
class CalibrationSet:
    folder: Path
    index: dict

    def records(self, graph: str, split: str = "calib") -> list[dict]:
        """Feed records of `graph` in split 'calib', 'holdout' or 'all'."""
        graph = _feed_graph(graph)
        if graph not in GRAPHS:
            raise CalibrationError(f"no calibration feeds for graph {graph!r} (CALIB has {', '.join(GRAPHS)})")
        recs = self.index["records"][graph]
        return recs if split == "all" else [r for r in recs if r["split"] == split]

    def has_holdout(self) -> bool:
        return any(s["split"] == "holdout" for s in self.index["sources"])

    def eval_records(self, graph: str) -> list[dict]:
        """The held-out records, or all records when CALIB has no held-out split."""
        return self.records(graph, "holdout") if self.has_holdout() else self.records(graph, "all")

    def load(self, record: dict) -> dict[str, np.ndarray]:
        path = self.folder / record["file"]
        try:
            with np.load(path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path}: cannot read calibration feed ({exc})") from exc

    def feed(self, graph: str, record: dict, arrays: dict[str, np.ndarray] | None = None, input_names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The graph's input dict for one record (decoder masks / positions / past slices built here).

        With `input_names` (the graph's inputs) the feed is fitted to that graph: entries it does not take are
        dropped, and a decoder feed follows the graph's KV contract (the in-place decoder takes seqlens_k /
        total_sequence_length instead of attention_mask / position_ids)."""
        graph = _feed_graph(graph)
        feed = self._feed(graph, record, arrays if arrays is not None else self.load(record))
        if input_names is None:
            return feed
        names = set(input_names)
        if graph == "decoder":
            feed = adapt_feed(feed, names)
        return {k: v for k, v in feed.items() if k in names}

    def _feed(self, graph: str, record: dict, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if graph == "vision":
            return vision_feed(a["pixel_values"])
        if graph in ("prompt_pool", "image_pool"):
            return {k: a[k] for k in _POOL_INPUTS if k in a}
        past = [a[k] for k in sorted((k for k in a if k.startswith("past.")), key=_past_order)]
        if record["kind"] == "prefill":  # the stored past is the prefill's output: the feed's cache is empty
            return decoder_feed(a["inputs_embeds"], [np.zeros((*p.shape[:2], 0, p.shape[3]), p.dtype) for p in past])
        j, p = record["step"], record["past"]
        return decoder_feed(a["step_embeds"][j:j + 1], [np.ascontiguousarray(x[:, :, :p]) for x in past])

    def feeds(self, graph: str, split: str = "calib") -> Iterator[dict[str, np.ndarray]]:
        for r in self.records(graph, split):
            yield self.feed(graph, r)


def _feed_graph(graph: str) -> str:
    """A TensorRT twin graph (decoder_trt, vision_trt) is calibrated on its stage's feeds (same inputs; the decoder's
    in the concat contract)."""
    return graph.removesuffix("_trt")


def _past_order(name: str) -> tuple[int, int]:
    _, i, kv = name.split(".")
    return int(i), 0 if kv == "key" else 1


def load_calibration(folder: str | Path, manifest=None) -> CalibrationSet:
    """Read `<folder>/index.json`; with `manifest` (an ExportManifest), check CALIB was collected on that model."""
    folder = Path(folder)
    path = folder / INDEX_NAME
    hint = f"missing; {folder} is not a calibration folder.\nHint: create one with `ppllava-edge calibrate EXPORT --videos DIR --questions FILE.jsonl --out {folder}`."
    index = read_json(path, hint, CalibrationError, fmt=INDEX_FORMAT)
    missing = sorted({r["file"] for g in GRAPHS for r in index["records"][g] if not (folder / r["file"]).is_file()})
    if missing:
        raise CalibrationError(f"{folder}: calibration files named by index.json are missing: {', '.join(missing[:10])}")
    if manifest is not None:
        want = manifest.checkpoint["sha256"]
        got = index["export"]["checkpoint_sha256"]
        if got != want:
            raise CalibrationError(
                f"{folder} was collected on another model (checkpoint sha256 {got[:12]}…), not {manifest.folder} ({want[:12]}…).\n"
                "Hint: run `ppllava-edge calibrate` on this export."
            )
    return CalibrationSet(folder, index)


def make_reader(calib: CalibrationSet, graph: str, split: str = "calib", input_names: list[str] | None = None):
    """An `onnxruntime.quantization.CalibrationDataReader` over one graph's feeds (loaded lazily, one at a time).

    `input_names` (the model's inputs) drops feed entries the graph does not take, e.g. when a pre-processed
    graph lost an unused input.
    """
    from onnxruntime.quantization import CalibrationDataReader

    records = calib.records(graph, split)
    if not records:
        raise CalibrationError(f"{calib.folder}: no '{split}' calibration feeds for graph {graph!r}")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.pos = 0
            self.start, self.end = 0, len(records)
            self._file: tuple[str, dict] | None = None

        def __len__(self) -> int:
            return len(records)

        def _arrays(self, rec: dict) -> dict:
            if self._file is None or self._file[0] != rec["file"]:  # decode steps of one pair share a file
                self._file = (rec["file"], calib.load(rec))
            return self._file[1]

        def get_next(self):
            if self.pos >= self.end:
                return None
            rec = records[self.pos]
            self.pos += 1
            return calib.feed(graph, rec, self._arrays(rec), input_names)

        def rewind(self) -> None:
            self.pos = self.start

        def set_range(self, start_index: int, end_index: int) -> None:
            self.start, self.end = start_index, min(end_index, len(records))
            self.pos = self.start

    return _Reader()


def _flatten_lists(name_to_arr: dict) -> dict:
    """Each tensor's list of per-sample arrays (of different shapes) -> one flat array."""
    out = {}
    for k, v in name_to_arr.items():
        if isinstance(v, (list, tuple)):
            v = np.concatenate([np.asarray(a).ravel() for a in v]) if len(v) else np.zeros(0, np.float32)
        out[k] = v
    return out


@contextmanager
def histogram_shape_fix():
    """Scoped patch of ORT's HistogramCollector (Percentile / Entropy) for samples of different shapes.

    ORT 1.32 stacks each tensor's per-sample list with `np.asarray(list)`, which raises "setting an array element
    with a sequence ... inhomogeneous shape" when sequence lengths or frame counts differ (toolchain-notes
    pitfall 9). Histograms only need the values, so the list is flattened and concatenated first. The original
    method is restored on exit.
    """
    from onnxruntime.quantization import calibrate

    cls = calibrate.HistogramCollector
    original = cls.collect

    def collect(self, name_to_arr):
        return original(self, _flatten_lists(name_to_arr))

    cls.collect = collect
    try:
        yield
    finally:
        cls.collect = original
