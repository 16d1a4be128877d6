"""Collect calibration feeds for every graph by running the real fp32 pipeline over videos and questions.

    summary = collect_calibration("export/", "videos/", "questions.jsonl", "calib/", frames=[8], samples=32)

Questions file (JSON Lines, one object per line, blank lines ignored):

    {"video": "cooking.mp4", "question": "What is the person doing?"}   # this question, this video only
    {"question": "Describe the video."}                                  # asked about every video

`video` is a path relative to the videos folder. Unknown keys are errors (a typo such as "vidoe" must not
silently turn a per-video question into a global one). Every video gets its own questions plus the global ones;
a video with no question at all is an error.

What is stored in CALIB (numpy only, no torch; `readers.py` turns it into ONNX Runtime data readers):

- ``vision/NNNN.npz``: ``pixel_values [T,3,S,S]``, one per video (T cycles through ``frames``);
- ``prompt_pool/NNNN.npz``: ``clip_ids [1,248]`` (and ``clip_mask [1,196]`` for a SigLIP export), ``keys``, ``values`` (from the fp32 vision graph), one per
  (video, question) pair;
- ``image_pool/NNNN.npz``: the same for the video's first frame run as a single image;
- ``decoder/NNNN.npz``: ``inputs_embeds [1,L,D]`` (the real prompt: text embeddings with the pooled visual tokens
  spliced in at the image token), the fp32 greedy continuation ``step_ids [k]`` / ``step_embeds [k,1,D]``, and
  ``past.{i}.key|value [1,KV,L+k-1,HD]``, the KV cache after prefill and the first k-1 steps. Decode step j uses
  the first L+j positions of it (causal, so they equal the cache at that step); storing the longest cache once
  instead of one per step keeps CALIB small.
- ``index.json``: the export it belongs to, the (video, question) sources with their split, and one record per
  feed (graph, file, kind, shapes, split). Sources of held-out videos (the last ``holdout`` fraction, at least one,
  when there are two or more videos; otherwise held-out questions) are not used for calibration: the accuracy gate
  of ``quantize`` measures on them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..atomic import AtomicDir
from ..errors import CalibrationError, VideoError
from ..manifest import load_manifest

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
INDEX_FORMAT = "ppllava-edge-calibration"
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".gif", ".mpg", ".mpeg", ".ts", ".flv", ".wmv", ".3gp"})
GRAPHS = ("vision", "prompt_pool", "image_pool", "decoder")
_MAX_LISTED = 10

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Question:
    line: int
    question: str
    video: str | None  # None: asked about every video


@dataclass
class CalibrationSummary:
    """What `collect_calibration` stored."""

    folder: Path
    videos: int
    skipped: list[tuple[str, str]]  # (video, reason)
    sources: int
    holdout_sources: int
    feeds: dict[str, int]  # graph -> feeds stored (decode steps counted separately as 'decoder (decode)')
    shapes: dict[str, str]  # graph -> shape range, e.g. "T 4..8"
    bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    HEADER = ["graph", "feeds", "shapes"]

    def rows(self) -> list[list[str]]:
        return [[g, str(n), self.shapes.get(g, "")] for g, n in self.feeds.items()]

    def as_dict(self) -> dict:
        return {
            "videos": self.videos, "skipped": [{"video": v, "reason": r} for v, r in self.skipped],
            "sources": self.sources, "holdout_sources": self.holdout_sources, "feeds": self.feeds,
            "shapes": self.shapes, "bytes": self.bytes, "seconds": round(self.seconds, 3), "notes": self.notes,
        }


# ---- inputs ----------------------------------------------------------------------------------------
def read_questions(path: str | Path) -> list[Question]:
    """Parse the questions JSONL; every malformed line is reported (with its number) in one CalibrationError."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no such questions file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read the questions file ({exc})") from exc
    out: list[Question] = []
    problems: list[str] = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            continue
        unknown = sorted(set(obj) - {"video", "question"})
        if unknown:
            problems.append(f"{path}:{n}: unknown key(s) {', '.join(map(repr, unknown))} (allowed: 'video', 'question')")
            continue
        q, v = obj.get("question"), obj.get("video")
        if not isinstance(q, str) or not q.strip():
            problems.append(f"{path}:{n}: 'question' must be a non-empty string, got {q!r}")
            continue
        if v is not None and (not isinstance(v, str) or not v.strip()):
            problems.append(f"{path}:{n}: 'video' must be a file name (string), got {v!r}")
            continue
        out.append(Question(n, q.strip(), v.strip() if v is not None else None))
    if problems:
        more = f"\n... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise CalibrationError(
            f"{path}: {len(problems)} malformed line(s):\n" + "\n".join(problems[:_MAX_LISTED]) + more
            + '\nHint: one JSON object per line: {"video": "name.mp4", "question": "..."} or {"question": "..."} for every video.'
        )
    if not out:
        raise CalibrationError(f"{path}: no questions (the file is empty).")
    return out


def list_videos(folder: str | Path) -> list[Path]:
    """Video files directly in `folder` (by extension, sorted; hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: no such videos folder.")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS)


def _pairs(videos: list[Path], questions: list[Question], folder: Path, qpath: Path) -> list[tuple[Path, Question]]:
    """(video, question) pairs: each video's own questions, then the global ones."""
    names = {p.name: p for p in videos}
    per_video: dict[Path, list[Question]] = {p: [] for p in videos}
    missing = []
    for q in questions:
        if q.video is None:
            continue
        p = names.get(q.video)
        if p is None:
            cand = folder / q.video
            if cand.is_file() and cand.resolve().is_relative_to(folder.resolve()):
                p = cand
                per_video.setdefault(p, [])
            else:
                missing.append(f"{qpath}:{q.line}: video {q.video!r} is not in {folder}")
                continue
        per_video[p].append(q)
    if missing:
        raise CalibrationError("\n".join(missing[:_MAX_LISTED]) + ("\n..." if len(missing) > _MAX_LISTED else ""))
    shared = [q for q in questions if q.video is None]
    pairs = []
    for p in sorted(per_video):
        qs = per_video[p] + shared
        pairs.extend((p, q) for q in qs)
    return pairs


def _select(pairs: list[tuple[Path, Question]], samples: int) -> list[tuple[Path, Question]]:
    """At most `samples` pairs, round-robin over videos so every video is covered first."""
    if len(pairs) <= samples:
        return pairs
    by_video: dict[Path, list[tuple[Path, Question]]] = {}
    for pq in pairs:
        by_video.setdefault(pq[0], []).append(pq)
    chosen: list[tuple[Path, Question]] = []
    rnd = 0
    while len(chosen) < samples:
        for v in sorted(by_video):
            if rnd < len(by_video[v]) and len(chosen) < samples:
                chosen.append(by_video[v][rnd])
        rnd += 1
    return sorted(chosen, key=lambda pq: (str(pq[0]), pq[1].line))


def _range(values: Sequence[int], name: str) -> str:
    lo, hi = min(values), max(values)
    return f"{name} {lo}" if lo == hi else f"{name} {lo}..{hi}"


# ---- collection ------------------------------------------------------------------------------------
def collect_calibration(
    export_dir: str | Path,
    videos_dir: str | Path,
    questions: str | Path,
    out: str | Path,
    frames: int | Sequence[int] | None = None,
    samples: int = 32,
    decode_steps: int = 2,
    holdout: float = 0.25,
    on_bad_video: str = "skip",
    force: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
) -> CalibrationSummary:
    """Run the fp32 export over videos × questions and store per-graph calibration feeds in `out` (atomically).

    Args:
        export_dir: an fp32 export folder (the feeds are specific to it).
        videos_dir: folder of videos (files directly inside it, by extension).
        questions: JSONL file (see the module docstring).
        out: CALIB folder to create.
        frames: frame counts; video i is sampled with frames[i % len(frames)] (several values give the
            mixed-shape calibration set). Default: the export's `opt` frame count.
        samples: maximum (video, question) pairs, chosen round-robin over videos.
        decode_steps: decode-step feeds stored per pair (the fp32 greedy continuation), >= 0.
        holdout: fraction of videos (or of pairs, with one video) kept out of calibration for the accuracy gate.
        on_bad_video: "skip" (warn, list in the summary) or "fail" (CalibrationError listing all of them).
        force: replace a non-empty `out`.
        progress: called as progress(done, total) after each video and each pair.
        threads: ONNX Runtime intra-op threads.

    Raises:
        CalibrationError: empty folder, unreadable videos with on_bad_video="fail" (or all unreadable), malformed
            JSONL (line numbers), bad options.
    """
    from ..runtime.pipeline import Pipeline

    t_start = time.perf_counter()
    _check_options(on_bad_video, samples, decode_steps, holdout)
    manifest = _source_export(export_dir)
    frame_list = _frame_list(frames, manifest)
    videos_dir, qpath = Path(videos_dir), Path(questions)
    videos, pairs = _video_questions(videos_dir, qpath)
    # --decode-steps 0: prefill feeds only, taken from the prompt without running the decoder (a weight-only LLM needs
    # no decoder activations; the fp16 7B decoder would not fit in RAM on a CPU, see Pipeline's `decoder`)
    pipe = Pipeline.from_export(export_dir, provider="cpu", threads=threads, decoder=decode_steps > 0)
    counter = _Counter(progress, len(videos) + min(len(pairs), samples))
    feats, skipped = _encode_videos(pipe, videos, frame_list, counter)
    _refuse_unreadable(skipped, feats, len(videos), on_bad_video)
    pairs = _select([pq for pq in pairs if pq[0] in feats], samples)
    counter.total = counter.done + len(pairs)
    split = _Split.of(sorted(feats), pairs, holdout)
    with AtomicDir(out, force) as tmp:
        records, sources = _write_feeds(tmp, pipe, feats, pairs, split, decode_steps, videos_dir, counter)
        summary = CalibrationSummary(
            folder=Path(out), videos=len(feats), skipped=skipped, sources=len(sources),
            holdout_sources=sum(s["split"] == "holdout" for s in sources), feeds=_feed_counts(records), shapes=_feed_shapes(records),
            bytes=sum(p.stat().st_size for p in tmp.rglob("*.npz")), seconds=time.perf_counter() - t_start, notes=split.notes,
        )
        index = {
            "format": INDEX_FORMAT,
            "format_version": 1,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "export": {"path": str(Path(export_dir).resolve()), "created": manifest.created,
                       "checkpoint_sha256": manifest.checkpoint["sha256"]},
            "videos_dir": str(videos_dir.resolve()),
            "questions": str(qpath.resolve()),
            "frames": frame_list,
            "decode_steps": decode_steps,
            "holdout": holdout,
            "sources": sources,
            "records": records,
            "summary": summary.as_dict(),
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=1))
    return summary


def _check_options(on_bad_video: str, samples: int, decode_steps: int, holdout: float) -> None:
    if on_bad_video not in ("skip", "fail"):
        raise CalibrationError(f"on_bad_video must be 'skip' or 'fail', got {on_bad_video!r}")
    if samples < 1:
        raise CalibrationError(f"samples must be >= 1, got {samples}")
    if decode_steps < 0:
        raise CalibrationError(f"decode_steps must be >= 0, got {decode_steps}")
    if not 0.0 <= holdout < 1.0:
        raise CalibrationError(f"holdout must be in [0, 1), got {holdout}")


def _source_export(export_dir: str | Path):
    """The export to calibrate on: one as `ppllava-edge export` wrote it (no graph quantized)."""
    manifest = load_manifest(export_dir)
    precisions = {g: manifest.precision(g) for g in manifest.graph_names}
    if any(p != manifest.dtype for p in precisions.values()):
        raise CalibrationError(
            f"{export_dir}: calibration needs an export as written by `ppllava-edge export` (fp32 or fp16), but it holds {precisions}.\n"
            "Hint: point calibrate at the folder written by `ppllava-edge export`, not a quantized one."
        )
    return manifest


def _frame_list(frames: int | Sequence[int] | None, manifest) -> list[int]:
    """The frame counts cycled over videos (default: the export's opt), each inside the export's range."""
    fmin, fopt, fmax = manifest.frames
    frame_list = [fopt] if frames is None else ([int(frames)] if isinstance(frames, (int, np.integer)) else [int(f) for f in frames])
    bad_frames = [f for f in frame_list if not max(fmin, 2) <= f <= fmax]
    if not frame_list or bad_frames:
        raise CalibrationError(f"frames {bad_frames or frame_list} outside this export's frame range {max(fmin, 2)}..{fmax}")
    return frame_list


def _video_questions(videos_dir: Path, qpath: Path) -> tuple[list[Path], list[tuple[Path, Question]]]:
    """(every video, the (video, question) pairs); refuses an empty folder and a video no question applies to."""
    qs = read_questions(qpath)
    videos = list_videos(videos_dir)
    if not videos:
        raise CalibrationError(
            f"{videos_dir}: no video files in this folder (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})."
        )
    pairs = _pairs(videos, qs, videos_dir, qpath)
    videos = sorted({p for p, _ in pairs} | set(videos))
    lonely = [p.name for p in videos if not any(v == p for v, _ in pairs)]
    if lonely:
        raise CalibrationError(f"{qpath}: no question applies to video(s) {', '.join(lonely[:_MAX_LISTED])}.\nHint: add a line without \"video\" to ask it about every video.")
    return videos, pairs


@dataclass
class _Counter:
    """progress(done, total) after each video and each pair."""

    progress: Progress | None
    total: int
    done: int = 0

    def tick(self) -> None:
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)


@dataclass
class ClipFeatures:
    """One video's vision side, computed once and stored for every graph: its pixels, the vision graph's values /
    keys of the clip, and of its first frame run alone (the image_pool feeds)."""

    frames: int
    pixel_values: np.ndarray
    values: np.ndarray
    keys: np.ndarray
    image_values: np.ndarray
    image_keys: np.ndarray


def _encode_videos(pipe, videos: list[Path], frame_list: list[int], counter: _Counter) -> tuple[dict[Path, ClipFeatures], list[tuple[str, str]]]:
    """The vision graph on one clip per video (video i at frame_list[i % n]); unreadable videos are returned as
    (video, reason) instead, before any pair runs."""
    from ..runtime.pipeline import Timings
    from ..runtime.stages import encode

    feats: dict[Path, ClipFeatures] = {}
    skipped: list[tuple[str, str]] = []
    for i, path in enumerate(videos):
        t = frame_list[i % len(frame_list)]
        try:
            values, keys, vin = pipe.features(path, t, Timings(), need_pixels=True)
        except VideoError as exc:
            skipped.append((str(path), str(exc).splitlines()[0]))
            log.info("skipping unreadable video %s: %s", path, exc)
        else:
            px = vin.pixel_values
            iv, ik = encode(pipe.sessions["vision"], np.ascontiguousarray(px[:1]))
            feats[path] = ClipFeatures(t, px, values, keys, iv, ik)
        counter.tick()
    return feats, skipped


def _refuse_unreadable(skipped: list[tuple[str, str]], feats: dict, videos: int, on_bad_video: str) -> None:
    """One CalibrationError listing the unreadable videos with --on-bad-video fail, or when none is left."""
    if not skipped or (on_bad_video != "fail" and feats):
        return
    listed = "\n".join(f"  {v}: {r}" for v, r in skipped[:_MAX_LISTED])
    more = f"\n  ... and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
    why = "no readable video left" if not feats else "--on-bad-video fail"
    raise CalibrationError(
        f"{len(skipped)} of {videos} video(s) could not be read ({why}):\n{listed}{more}"
        + ("\nHint: --on-bad-video skip leaves them out." if feats else "")
    )


@dataclass
class _Split:
    """Which samples the accuracy gate keeps out of calibration: held-out videos (>= 2 videos) or held-out pairs
    (1 video)."""

    videos: set[Path]
    pairs: set[int]
    notes: list[str]

    @classmethod
    def of(cls, good_videos: list[Path], pairs: list, holdout: float) -> _Split:
        if holdout == 0 or len(pairs) < 2:
            return cls(set(), set(), ["no held-out samples: the accuracy gate measures on calibration samples"])
        if len(good_videos) >= 2:
            n = min(len(good_videos) - 1, max(1, math.ceil(holdout * len(good_videos))))
            return cls(set(good_videos[-n:]), set(), [])
        n = min(len(pairs) - 1, max(1, math.ceil(holdout * len(pairs))))
        return cls(set(), set(range(len(pairs) - n, len(pairs))), [])

    def __call__(self, video: Path, pair: int | None) -> str:
        return "holdout" if video in self.videos or (pair is not None and pair in self.pairs) else "calib"


def _write_feeds(tmp: Path, pipe, feats: dict[Path, ClipFeatures], pairs: list[tuple[Path, Question]], split: _Split, decode_steps: int,
                 videos_dir: Path, counter: _Counter) -> tuple[dict[str, list[dict]], list[dict]]:
    """Every graph's feeds into `tmp` (module docstring); (records per graph, sources) for index.json."""
    for g in GRAPHS:
        (tmp / g).mkdir()
    records: dict[str, list[dict]] = {g: [] for g in GRAPHS}
    video_ids = {p: k for k, p in enumerate(sorted(feats))}
    for p, k in video_ids.items():
        name = f"vision/{k:04d}.npz"
        np.savez(tmp / name, pixel_values=feats[p].pixel_values)
        records["vision"].append({"file": name, "video": k, "source": None, "split": split(p, None), "frames": feats[p].frames})
    sources = []
    for s, (path, q) in enumerate(pairs):
        f, sp, vid = feats[path], split(path, s), video_ids[path]
        common = {"source": s, "video": vid, "split": sp}
        input_ids, query, embeds = _prompt(pipe, q.question, f)
        np.savez(tmp / f"prompt_pool/{s:04d}.npz", **query, keys=f.keys, values=f.values)
        records["prompt_pool"].append({"file": f"prompt_pool/{s:04d}.npz", **common, "frames": f.frames})
        np.savez(tmp / f"image_pool/{s:04d}.npz", **query, keys=f.image_keys, values=f.image_values)
        records["image_pool"].append({"file": f"image_pool/{s:04d}.npz", **common, "frames": 1})
        L = int(embeds.shape[1])
        steps = min(decode_steps, pipe.manifest.model["max_position_embeddings"] - L)
        if steps < 0:
            raise CalibrationError(f"{q.question!r} on {path.name}: the prompt of {L} tokens exceeds the LLM context of "
                                   f"{pipe.manifest.model['max_position_embeddings']}; use fewer frames")
        ids, step_embeds, past = _greedy_steps(pipe, embeds, steps)
        np.savez(tmp / f"decoder/{s:04d}.npz", inputs_embeds=embeds.astype(np.float32), input_ids=input_ids, step_ids=np.asarray(ids, np.int64),
                 step_embeds=np.asarray(step_embeds, np.float32).reshape(steps, 1, pipe.embed_table.shape[1]), **past)
        records["decoder"].append({"file": f"decoder/{s:04d}.npz", **common, "kind": "prefill", "seq": L})
        records["decoder"] += [{"file": f"decoder/{s:04d}.npz", **common, "kind": "decode", "step": j, "past": L + j} for j in range(steps)]
        sources.append({"id": s, "video_index": vid, "video": str(path.relative_to(videos_dir)) if path.is_relative_to(videos_dir) else str(path),
                        "question": q.question, "line": q.line, "frames": f.frames, "prompt_tokens": L, "split": sp})
        counter.tick()
    return records, sources


def _prompt(pipe, question: str, f: ClipFeatures) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """(input_ids, the pools' question inputs {clip_ids [1, L] (, clip_mask [1, L]: SigLIP)}, inputs_embeds [1, L, D]):
    the real prompt, the clip's pooled visual tokens spliced in at the image token."""
    from ..runtime.stages import pool, pool_query

    input_ids = np.asarray(pipe.llama.prompt_ids(question), dtype=np.int64)
    ids, mask = pipe.relevance_query(question)
    ids, mask = ids[None].astype(np.int64), None if mask is None else mask[None].astype(np.int64)
    tokens, _ = pool(pipe.sessions["prompt_pool"], ids, f.keys, f.values, mask)
    return input_ids, pool_query(ids, mask), pipe.embed_prompt(input_ids, tokens)[None]


def _greedy_steps(pipe, embeds: np.ndarray, steps: int) -> tuple[list[int], list[np.ndarray], dict[str, np.ndarray]]:
    """The fp32 greedy continuation of the prompt: (ids, their embeddings [1, D] each, the KV cache after the prefill
    and the first steps-1 steps, [1, KV, L+steps-1, HD] per past.* name). No steps: the prefill feed's empty past,
    shaped by the model (the decoder is not run)."""
    from ..runtime.decoder import kv_names
    from ..runtime.stages import empty_past

    m = pipe.manifest.model
    if steps == 0:
        return [], [], dict(zip(kv_names(m["num_layers"])[0], empty_past(m["num_layers"], m["num_kv_heads"], m["head_dim"], np.float32)))
    ids, step_embeds = [], []
    dec = pipe.decoder
    dec.reset(1)
    logits = dec.forward(embeds)
    for j in range(steps):
        tok = int(np.argmax(logits[0]))
        ids.append(tok)
        step_embeds.append(pipe.embed(np.asarray([tok]))[0])
        if j < steps - 1:
            logits = dec.forward(step_embeds[-1][None])
    return ids, step_embeds, {n: np.array(a) for n, a in zip(dec.past_names, dec.past())}


def _feed_counts(records: dict[str, list[dict]]) -> dict[str, int]:
    """graph -> feeds stored (the decoder's prefill and decode-step feeds counted apart)."""
    return {
        "vision": len(records["vision"]),
        "prompt_pool": len(records["prompt_pool"]),
        "image_pool": len(records["image_pool"]),
        "decoder (prefill)": sum(r["kind"] == "prefill" for r in records["decoder"]),
        "decoder (decode)": sum(r["kind"] == "decode" for r in records["decoder"]),
    }


def _feed_shapes(records: dict[str, list[dict]]) -> dict[str, str]:
    """graph -> the range of its varying dimension (frames, prompt length, cached positions)."""
    shapes = {
        "vision": _range([r["frames"] for r in records["vision"]], "T"),
        "prompt_pool": _range([r["frames"] for r in records["prompt_pool"]], "T"),
        "image_pool": "T 1",
        "decoder (prefill)": _range([r["seq"] for r in records["decoder"] if r["kind"] == "prefill"], "L"),
    }
    decode = [r["past"] for r in records["decoder"] if r["kind"] == "decode"]
    if decode:
        shapes["decoder (decode)"] = _range(decode, "past")
    return shapes
