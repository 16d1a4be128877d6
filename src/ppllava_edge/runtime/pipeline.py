"""Torch-free pipeline over an export folder: video / image / .npy in, answer out, with per-stage timings.

    pipe = Pipeline.from_export("export/", provider="cpu")
    result = pipe.ask("clip.mp4", "What happens?", num_frames=8)
    print(result.text, result.timings.line())

Thread safety: one Pipeline may be shared by many threads and gives each call exactly the answer it gives
sequentially. ONNX Runtime sessions are thread-safe, and so are the TensorRT stage runners (each locks its one
execution context and buffers for a run); the KV-cache decoder is not, so each `ask` borrows a decoder
from a small pool (`max_decoders`, made on demand by `_new_decoder()`; a call waits when all are busy; with
`max_decoders=1` that is a lock around generation). The feature cache has its own lock, and concurrent first
questions on the same video run the vision graph once (the others wait for it and hit the cache).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..media.anyres import ImageLayout, assemble_tokens
from ..errors import ConfigError, ContextLengthError, InferenceError, InputError
from ..integrity import check_files
from ..manifest import ExportManifest, graph_files, load_manifest
from ..media import check_image_paths, check_input_file, check_num_images, input_kind, load_npy_pixel_values, read_image_size, read_npy_shape
from ..tokenization import SiglipTextTokenizer
from .cache import FeatureCache, content_key, file_digest
from .decoder import graph_dtype, open_decoder
from .generation import GenerationConfig, generate
from .session import create_session, resolve_provider
from .stages import Frames, encode, encode_tiles, pool, read_frames, read_image_tiles, read_images, splice

# stands for the input file's path in cached warnings (memory and .npz), so each request sees its own file named
_CACHED_INPUT = "\x1finput\x1f"


@dataclass
class Timings:
    """Milliseconds per stage of one answer (decode_video/preprocess/vision are 0 on a cache hit)."""

    decode_video: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    pool: float = 0.0
    prefill: float = 0.0
    decode_steps: list[float] = field(default_factory=list)
    e2e: float = 0.0
    cache_hit: bool = False

    @property
    def decode(self) -> float:
        return float(sum(self.decode_steps))

    def as_dict(self) -> dict:
        return {
            "decode_video": self.decode_video, "preprocess": self.preprocess, "vision": self.vision, "pool": self.pool,
            "prefill": self.prefill, "decode": self.decode, "decode_steps": list(self.decode_steps), "e2e": self.e2e, "cache_hit": self.cache_hit,
        }

    def line(self) -> str:
        tpot = self.decode / len(self.decode_steps) if self.decode_steps else 0.0
        hit = " (feature cache hit)" if self.cache_hit else ""
        return (
            f"decode {self.decode_video:.1f} ms | preprocess {self.preprocess:.1f} ms | vision {self.vision:.1f} ms | "
            f"pool {self.pool:.1f} ms | prefill {self.prefill:.1f} ms | {len(self.decode_steps)} steps x {tpot:.1f} ms | "
            f"total {self.e2e:.1f} ms{hit}"
        )


@dataclass
class AskResult:
    text: str
    ids: list[int]
    timings: Timings
    visual_tokens: int
    context_len: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # e.g. a truncated video (names the file and frames decoded)
    stopped: bool = False  # on_token asked to stop (a stop string, or the caller went away)


@dataclass
class VideoInput:
    """Pixels (or only a cache key when the cache already holds the features)."""

    key: str
    kind: str
    pixel_values: np.ndarray | None
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PipelineOptions:
    """How a Pipeline runs an export: one object that the CLI, the server, Triton's model and the bench build once
    and pass through unchanged (`Pipeline.from_export(export, options)`; `dataclasses.replace` for a variant).

    `decoder=False`: the vision and pooling side only (no decoder session, `ask` unavailable) - what calibrating a
    weight-only LLM needs; an fp16 7B decoder would take twice its size in RAM on a CPU, where ONNX Runtime upcasts
    fp16 weights it has no kernels for. `background_load=True`: the constructor returns before the sessions exist;
    vision, prompt_pool and the decoder are created on a background thread while the caller decodes and
    preprocesses the video (a one-question `ask` process: start-up overlaps the work); each stage's first use
    waits for that stage only."""

    provider: str = "auto"
    threads: int | None = None
    backend: str = "ort"  # "ort" (ONNX Runtime) | "trt" (native TensorRT engines)
    engines: str | Path | None = None  # engine folder for backend "trt" (default: EXPORT/engines)
    cache_dir: str | Path | None = None  # also keep per-video features on disk here (from_export)
    cache_bytes: int = 2 << 30  # in-memory feature cache (from_export)
    trt_cache_dir: Path | None = None  # ONNX Runtime's TensorRT EP engine cache (default: EXPORT/trt_cache)
    max_decoders: int = 1  # KV decoders shared by concurrent `ask` calls
    decoder: bool = True
    background_load: bool = False


ORT_CACHE = "ort_cache"
EAGER_STAGES = ("vision", "prompt_pool", "decoder")


class LazySessions(dict):
    """stage -> session; a stage with a factory and no session yet is created on first access (thread-safe: one
    lock per stage, so a stage loading on a background thread (`preload`) does not hold up the others).
    `load_ms` records how long each creation took (the `load` stage of `ask --json` and the bench)."""

    def __init__(self, factories: dict[str, Callable], ready: dict | None = None):
        super().__init__(ready or {})
        self._factories = factories
        self._lock = threading.Lock()
        self._stage_locks: dict[str, threading.Lock] = {}
        self._errors: dict[str, BaseException] = {}
        self._cancel = threading.Event()
        self._threads: list[threading.Thread] = []
        self.load_ms: dict[str, float] = {}
        self.wait_ms = 0.0  # time callers spent waiting for a stage another thread (preload) was creating

    def __missing__(self, stage: str):
        if stage not in self._factories:
            raise KeyError(stage)
        with self._lock:
            lock = self._stage_locks.setdefault(stage, threading.Lock())
        t_wait = time.perf_counter()
        with lock:
            if dict.__contains__(self, stage):
                self.wait_ms += (time.perf_counter() - t_wait) * 1e3
                return dict.__getitem__(self, stage)
            if stage in self._errors:  # a background load failed: raise its error here, in the caller's thread
                raise self._errors.pop(stage)
            t0 = time.perf_counter()
            session = self._factories[stage]()
            self.load_ms[stage] = (time.perf_counter() - t0) * 1e3
            self[stage] = session
            return session

    def preload(self, *groups: Sequence[str]) -> None:
        """Create each group's stages on a background thread of its own, in order; an access meanwhile waits for
        that stage only. A failure is kept and raised by the first access to the stage. `close()` stops and joins
        the threads."""

        def run(todo: list[str]) -> None:
            for stage in todo:
                if self._cancel.is_set():
                    return
                try:
                    self[stage]
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread by __missing__
                    self._errors[stage] = exc

        for group in groups:
            todo = [s for s in group if s in self._factories and not dict.__contains__(self, s)]
            if todo:
                # not a daemon: the interpreter waits for it at exit. A process that exits while this thread is
                # inside ONNX Runtime's session creation aborts ("terminate called without an active exception")
                thread = threading.Thread(target=run, args=(todo,), name="ppllava-preload")
                self._threads.append(thread)
                thread.start()

    def close(self) -> None:
        """Stop a background load after the stage it is creating (ONNX Runtime cannot be interrupted inside one)
        and wait for it; what the thread created stays usable."""
        self._cancel.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join()

    def available(self) -> list[str]:
        return sorted(set(self) | set(self._factories))


def _open_graph(manifest: ExportManifest, path: Path, *args, **kwargs):
    """create_session after the cheap check of the graph's files against export.json (a damaged file is an
    InferenceError naming it, raised where a graph that does not load raises)."""
    check_files(manifest, graph_files(path), InferenceError)
    return create_session(path, *args, **kwargs)


def _load_table(path: Path, mmap: bool = False) -> np.ndarray:
    """An export's .npy table (embeddings, image newline); a damaged file is a ConfigError naming it."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"{path}: not a readable .npy table ({exc}); the export is damaged.\n"
                          f"Hint: ppllava-edge verify {path.parent} lists the damaged files; re-export to replace them.") from exc


def _later(fns: Sequence[Callable], background: bool) -> list[Future]:
    """Each `fn()` as a Future: computed now, or in order on one daemon thread when `background` (an error is raised
    by that future's `result()`, in the caller's thread). The tokenizers (0.2–0.6 s at start-up, most of it holding
    the GIL inside `tokenizers`' parser, so one thread after the other is as fast as two) then overlap the session
    loads: `ask` waits for the LLM's tokenizer (the prompt's length is checked before any work) and gets the pools'
    text tower's while the video is decoded. A daemon thread: it only builds Python objects and holds no session."""
    futures: list[Future] = [Future() for _ in fns]
    if not background:
        for fut, fn in zip(futures, fns):
            fut.set_result(fn())  # a damaged tokenizer file raises from the constructor, as before
        return futures

    def run() -> None:
        for fut, fn in zip(futures, fns):
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised by result() in the caller's thread
                fut.set_exception(exc)

    threading.Thread(target=run, name="ppllava-tokenizers", daemon=True).start()
    return futures


class Pipeline:
    def __init__(self, manifest: ExportManifest, options: PipelineOptions | None = None, *, cache: FeatureCache | None = None,
                 runners: dict | None = None, **overrides):
        """`options` (PipelineOptions; keyword `overrides` replace its fields, e.g. `provider="cpu"`). `runners` maps
        a stage ("vision", "prompt_pool", ...) to an object with ONNX Runtime's `run(output_names, feed) -> [arrays]`
        that runs it instead of a local session (Triton's BLS requests, see triton/python_model.py). `cache`: the
        feature cache (default: in memory, 2 GiB)."""
        options = replace(options or PipelineOptions(), **overrides)
        self.options = options
        provider, threads, backend, engines = options.provider, options.threads, options.backend, options.engines
        trt_cache_dir, max_decoders = options.trt_cache_dir, options.max_decoders
        decoder, background_load = options.decoder, options.background_load
        if not isinstance(max_decoders, int) or max_decoders < 1:
            raise InputError(f"max_decoders must be an int >= 1, got {max_decoders!r}")
        self.manifest = manifest
        m = manifest.model
        fp16 = manifest.dtype == "fp16"
        self._dtype = np.float16 if fp16 else np.float32
        self.trt = None
        if backend not in ("ort", "trt"):
            raise InputError(f"--backend {backend!r}: choose ort (ONNX Runtime) or trt (native TensorRT engines)")
        if backend == "trt":
            from .trt_backend import open_engines  # lazy: needs tensorrt + cuda-python + a GPU

            self.trt = open_engines(engines or manifest.folder / "engines", manifest)
        self.provider = "tensorrt-native" if self.trt is not None else resolve_provider(provider)
        ort_provider = "cpu" if self.trt is not None else self.provider
        trt_cache = trt_cache_dir or manifest.folder / "trt_cache"
        # sessions are keyed by stage; export.json says which graph ONNX Runtime runs for each stage. vision,
        # prompt_pool and the decoder open now; image_pool (images) and projector_head (the bench's baselines) on
        # first use. Traced graphs reuse ONNX Runtime's optimised copy from EXPORT/ort_cache; graphs written already
        # fused (the decoder) skip the full optimisation pass.
        factories = {}
        for stage, graph in manifest.backend_graphs("ort").items():
            fused = manifest.graph(graph).get("contract") is not None
            # the decoder keeps its arena (the decode steps reuse it); the other graphs run once per request and
            # give their memory back after each run: vision without an arena (the lowest peak at CLIP-L), the pools
            # on a shrinking arena (README "Vision at 2 threads")
            factories[stage] = functools.partial(_open_graph, manifest, manifest.path(graph), ort_provider, threads, trt_cache, fp16,
                                                 "basic" if fused else "all", None if fused else manifest.folder / ORT_CACHE,
                                                 arena={"decoder": True, "vision": False}.get(stage, "shrink"))
        self.sessions = LazySessions(factories, {**(self.trt.runners if self.trt is not None else {}), **(runners or {})})
        if not decoder:
            factories.pop("decoder", None)
        if background_load and self.trt is None:
            # the decoder on a thread of its own: its session (weights pre-packed; 0.55 s for SmolLM2's 540 MB,
            # 15-20 s at 7B) then overlaps the tokenizers and the video decode rather than the vision run, and the
            # vision session (from ort_cache) does not queue behind it
            self.sessions.preload(["decoder"], [s for s in EAGER_STAGES if s != "decoder"])
        else:
            for stage in EAGER_STAGES:
                if stage in factories:
                    self.sessions[stage]
        try:
            self._open_rest(manifest, cache, max_decoders, decoder, background_load)
        except BaseException:  # a damaged export file: stop the background loader before the error leaves (see close)
            self.sessions.close()
            raise

    def _open_rest(self, manifest: ExportManifest, cache: FeatureCache | None, max_decoders: int, decoder: bool, background_load: bool) -> None:
        """Everything of the constructor after the sessions: tables, tokenizers, the decoder pool, the caches."""
        check_files(manifest, manifest.data_files())  # size + sampled digest against export.json (integrity.py)
        # the decoder graph's own activation dtype (an int4 decoder may run fp32 in an fp16 export), read on first use
        self._dtype_from_decoder = self.trt is None and decoder
        self._lazy = threading.RLock()  # re-entered: opening the decoder reads `dtype`
        self.embed_table = _load_table(manifest.path("embeddings"), mmap=True)
        # the two tokenizers (the LLM's with the export's template, and the pools' text tower's) are parsed on a
        # thread of their own with background_load: a fresh `ask` process decodes the video meanwhile
        self._llama, self._clip = _later([manifest.llama_tokenizer, manifest.relevance_tokenizer], background_load)
        self.eos_token_id = manifest.eos_token_id
        # decoder pool (see the module docstring); the TensorRT backend has one execution context, so one decoder
        self.max_decoders = 1 if self.trt is not None else max_decoders
        self._pool = threading.Condition()
        self.decoder = None
        self._decoder_pending = decoder  # opened on first use (after the setter above, which clears it)
        if decoder and not background_load:
            self._ensure_decoder()
        self.cache = cache if cache is not None else FeatureCache()
        self.vision_runs = 0
        self._key_locks: dict[str, list] = {}  # content key -> [lock, users]: one vision run per video at a time
        self.image_spec = manifest.image_rules  # anyres rules (None: an export from before image tiles)
        has_newline = bool(self.image_spec and self.image_spec.get("newline"))
        self.image_newline = _load_table(manifest.path("image_newline")) if has_newline else None
        self.export_id = manifest.export_id

    @property
    def llama(self):
        """The LLM's prompt tokenizer (tokenization.LlamaPromptTokenizer) with the export's conversation template."""
        return self._llama.result()

    @property
    def clip(self):
        """The pools' text-tower tokenizer: SigLIP's sentencepiece model (Qwen2 + SigLIP exports) or CLIP's BPE."""
        return self._clip.result()

    @property
    def dtype(self):
        """Activation dtype of the embeddings fed to the decoder (its graph's `inputs_embeds`)."""
        if self._dtype_from_decoder:
            with self._lazy:
                if self._dtype_from_decoder:
                    self._dtype = graph_dtype(self.sessions["decoder"], default=self._dtype)
                    self._dtype_from_decoder = False
        return self._dtype

    def _ensure_decoder(self) -> None:
        """Open the pool's first decoder once its session exists (at construction, or on first use after a
        background load)."""
        if self._decoder_pending:
            with self._lazy:
                if not self._decoder_pending:
                    return
                self.decoder = self._new_decoder()  # the setter clears _decoder_pending

    def _new_decoder(self):
        """One KV-cache decoder (its own buffers) over the shared decoder session."""
        if self.trt is not None:
            return self.trt.decoder
        if "decoder" not in self.sessions.available():
            raise InputError("this Pipeline was opened without its decoder (decoder=False): it cannot generate")
        entry = self.manifest.graph(self.manifest.graph_for("decoder", "ort"))
        return open_decoder(self.sessions["decoder"], entry, self.manifest.model, self.dtype, self.provider)

    @property
    def decoder(self):
        """The first decoder of the pool (what single-threaded callers such as the bench and calibration use)."""
        self._ensure_decoder()
        return self._decoder

    @decoder.setter
    def decoder(self, dec) -> None:
        """Replacing the decoder restarts the pool with it."""
        self._decoder_pending = False
        with self._pool:
            self._decoder = dec
            self._idle = [dec] if dec is not None else []
            self._made = int(dec is not None)
            self._pool.notify_all()

    @contextmanager
    def _borrow_decoder(self) -> Iterator:
        """A decoder no other thread uses until it is given back (waits while `max_decoders` are busy)."""
        self._ensure_decoder()
        with self._pool:
            while not self._idle and self._made >= self.max_decoders:
                self._pool.wait()
            dec = self._idle.pop() if self._idle else None
            if dec is None:
                self._made += 1
        if dec is None:
            try:
                dec = self._new_decoder()
            except BaseException:
                with self._pool:
                    self._made -= 1
                    self._pool.notify()
                raise
        try:
            yield dec
        finally:
            with self._pool:
                self._idle.append(dec)
                self._pool.notify()

    @contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        with self._pool:
            entry = self._key_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._pool:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._key_locks[key]

    def close(self) -> None:
        """Stop and join a background session load (`background_load`), release TensorRT engines. A process that
        made a Pipeline with background_load must close it before it exits, on errors too."""
        self.sessions.close()
        if self.trt is not None:
            self.trt.close()

    @classmethod
    def from_export(cls, folder: str | Path, options: PipelineOptions | None = None, *, runners: dict | None = None, **overrides) -> Pipeline:
        """The Pipeline of an export folder, its feature cache sized by `options.cache_bytes` / `cache_dir`."""
        options = replace(options or PipelineOptions(), **overrides)
        return cls(load_manifest(folder), options, cache=FeatureCache(options.cache_bytes, options.cache_dir), runners=runners)

    # ---- inputs -----------------------------------------------------------------------------
    def frame_range(self) -> tuple[int, int]:
        """(min, max) frames a video may be sampled at with this export (and its engines)."""
        fmin, _, fmax = self.manifest.frames
        if self.trt is not None:  # engines may have been built for a narrower range
            fmin, _, fmax = self.trt.metadata["limits"]["frames"]
        return max(fmin, 2), fmax

    def _check_frames(self, num_frames: int) -> None:
        fmin, fmax = self.frame_range()
        if not (fmin <= num_frames <= fmax):
            raise InputError(
                f"--frames {num_frames} is outside this export's frame range {fmin}..{fmax}.\n"
                "Hint: re-export with --frames MIN:OPT:MAX covering it."
            )

    def _check_npy_frames(self, path: Path, count: int) -> None:
        fmin, fmax = self.frame_range()
        if not (fmin <= count <= fmax):
            raise InputError(
                f"{path}: the .npy holds {count} frames, outside this export's frame range {fmin}..{fmax} "
                "(or 1 for an image).\nHint: save between "
                f"{fmin} and {fmax} preprocessed frames [T, 3, S, S], or re-export with --frames MIN:OPT:MAX covering {count}."
            )

    def _pixels(self, path: Path, kind: str, num_frames: int, t: Timings, warnings: list[str]) -> np.ndarray:
        size = self.manifest.model["image_size"]
        t0 = time.perf_counter()
        if kind == "npy":
            px = load_npy_pixel_values(path, size)
            t.decode_video = (time.perf_counter() - t0) * 1e3
            if px.shape[0] > 1:
                self._check_npy_frames(path, px.shape[0])
            return px
        frames = read_frames(path, num_frames, size, self.manifest.preprocess)
        warnings.extend(frames.warnings)
        t.decode_video, t.preprocess = frames.decode_ms, frames.preprocess_ms
        return frames.pixel_values

    def features(self, path: str | Path, num_frames: int, t: Timings, need_pixels: bool = False) -> tuple[np.ndarray, np.ndarray, VideoInput]:
        """(values, keys) for an input file, from the cache or the vision graph (an image: of its anyres tiles)."""
        path = Path(path)
        kind = input_kind(path)
        if kind == "video":
            self._check_frames(num_frames)
        check_input_file(path)
        if kind == "image":
            return self.image_features(path, t, need_pixels)
        frames_key = num_frames if kind == "video" else 1
        key = content_key(file_digest(path), frames_key, self.export_id)
        warnings: list[str] = []
        with self._key_lock(key):  # concurrent first questions on one video: one vision run, the others hit
            hit = self.cache.get_entry(key)
            px = None
            if hit is None or need_pixels:
                px = self._pixels(path, kind, num_frames, t, warnings)
            if hit is not None:
                t.cache_hit = True
                values, keys, cached_warnings = hit
                warnings = [w.replace(_CACHED_INPUT, str(path)) for w in cached_warnings]  # this request's file name
            else:
                t0 = time.perf_counter()
                values, keys = encode(self.sessions["vision"], px)
                t.vision = (time.perf_counter() - t0) * 1e3
                with self._pool:
                    self.vision_runs += 1
                self.cache.put(key, values, keys, [w.replace(str(path), _CACHED_INPUT) for w in warnings])
        actual_kind = "image" if kind == "image" or values.shape[0] == 1 else "video"
        return values, keys, VideoInput(key, actual_kind, px, warnings)

    # ---- images (LLaVA-NeXT anyres, see media/anyres.py) -------------------------------------------
    def image_layout(self, path: str | Path | None) -> ImageLayout:
        """Token layout of an image file (from its header: EXIF-oriented size); None: a lone tile (a 1-row .npy)."""
        return self.manifest.image_layout(None if path is None else read_image_size(path))

    def image_features(self, path: str | Path, t: Timings, need_pixels: bool = False) -> tuple[np.ndarray, np.ndarray, VideoInput]:
        """(values, keys) of an image's anyres tiles, each run through the vision graph with T = 1; cached by the
        file's content like a video's features."""
        self.manifest.image_layout(None)  # an export from before image tiles: a clear error
        r = self.image_spec
        path = Path(path)
        key = content_key(file_digest(path), "anyres-image", self.export_id)
        values, keys, px = self._cached_features(key, lambda: read_image_tiles(path, r["tile_size"], r["grid_pinpoints"], self.manifest.preprocess),
                                                 lambda px: encode_tiles(self.sessions["vision"], px), t, need_pixels)
        return values, keys, VideoInput(key, "image", px)

    def images_features(self, paths: Sequence[str | Path], t: Timings, need_pixels: bool = False) -> tuple[np.ndarray, np.ndarray, VideoInput]:
        """(values, keys) of several images of one question (the authors' multi-image path): each preprocessed as a
        video frame by the export's spec, all through the vision graph as one clip (T = N: the BT-Adapter's temporal attention sees them
        together, so the features belong to the ordered set, not to each image); cached by the files' contents in
        order."""
        self.manifest.image_layout(None)  # an export from before image tiles has no image_pool: a clear error
        paths = [Path(p) for p in paths]
        for p in paths:
            check_input_file(p)
        key = content_key(*(file_digest(p) for p in paths), "multi-image", self.export_id)
        values, keys, px = self._cached_features(key, lambda: read_images(paths, self.manifest.model["image_size"], self.manifest.preprocess),
                                                 lambda px: encode(self.sessions["vision"], px), t, need_pixels)
        return values, keys, VideoInput(key, "images", px)

    def _cached_features(self, key: str, read: Callable[[], Frames], run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                         t: Timings, need_pixels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(values, keys, pixels or None) from the feature cache, or `read()` then `run(pixels)` once per key at a time
        (concurrent first questions on one image or image set run the vision graph once; the others hit)."""
        with self._key_lock(key):
            hit = self.cache.get(key)
            px = None
            if hit is None or need_pixels:
                frames = read()
                px = frames.pixel_values
                t.decode_video, t.preprocess = frames.decode_ms, frames.preprocess_ms
            if hit is not None:
                t.cache_hit = True
                values, keys = hit
            else:
                t0 = time.perf_counter()
                values, keys = run(px)
                t.vision = (time.perf_counter() - t0) * 1e3
                with self._pool:
                    self.vision_runs += 1
                self.cache.put(key, values, keys)
        return values, keys, px

    # ---- answer -----------------------------------------------------------------------------
    def relevance_query(self, question: str) -> tuple[np.ndarray, np.ndarray | None]:
        """The question for the pool graph's text tower: its ids [L] and, for a SigLIP pool, the padding mask [L]
        (None for CLIP's causal tower)."""
        length = self.manifest.model["clip_text_length"]
        if isinstance(self.clip, SiglipTextTokenizer):
            return self.clip.encode(question, length)
        return self.clip.encode(question, length), None

    def ask(
        self,
        path: str | Path | Sequence[str | Path],
        question: str,
        num_frames: int = 8,
        generation: GenerationConfig | None = None,
        on_token: Callable[[int], bool | None] | None = None,
        keep_arrays: bool = False,
        history: Sequence[tuple[str, str]] = (),
        system: str | None = None,
    ) -> AskResult:
        """Answer `question` about the video / image / .npy at `path`, or about several images (a list of paths: the
        authors' multi-image path, one `<image>` slot per image, `images_features`). Thread-safe.

        `history` holds earlier (user, assistant) turns and `system` a system prompt, rendered with the checkpoint's
        conversation template (`LlamaPromptTokenizer.chat_prompt_ids`); the relevance query (CLIP text) is
        `question`, the latest user turn, as in the authors' demo. `on_token` sees each new id; returning True
        ends generation after it.
        """
        gen = generation or self.generation_config()
        t = Timings()
        start = time.perf_counter()
        paths = [Path(path)] if isinstance(path, (str, Path)) else check_image_paths(path)
        slots = len(paths)
        if slots > 1:
            check_num_images(slots, self.frame_range()[1])
        if history or system:
            prompt = self.llama.chat_prompt_ids(question, history, system, images=slots)
        else:
            prompt = self.llama.prompt_ids(question, images=slots)
        input_ids = np.asarray(prompt, dtype=np.int64)
        n_vis, layout = self._visual_count(paths, num_frames)
        context = len(input_ids) - slots + n_vis
        limit = self.manifest.model["max_position_embeddings"]
        if context + gen.max_new_tokens - 1 > limit:  # the last new token is never fed back
            raise ContextLengthError(
                f"prompt of {context} tokens ({n_vis} visual) + max_new_tokens={gen.max_new_tokens} exceeds the LLM context of {limit} "
                f"(at most {max(limit - context + 1, 0)} new tokens fit).\n"
                "Hint: use fewer frames, a shorter question or fewer new tokens.",
                prompt_too_long=context > limit,
            )
        if slots > 1:
            values, keys, vin = self.images_features(paths, t, need_pixels=keep_arrays)
        else:
            values, keys, vin = self.features(paths[0], num_frames, t, need_pixels=keep_arrays)
        graph = "prompt_pool" if vin.kind == "video" else "image_pool"
        clip_ids, clip_mask = self.relevance_query(question)  # (its tokenizer may still be parsing on a fresh start)
        t0 = time.perf_counter()
        tokens, relevance = pool(self.sessions[graph], clip_ids, keys, values, clip_mask)
        if vin.kind == "image":  # base tile, then the unpadded crop map with image_newline rows
            tokens = assemble_tokens(np.asarray(tokens), self.image_newline, layout or self.image_layout(None))
        t.pool = (time.perf_counter() - t0) * 1e3
        del values, keys  # the feature cache keeps its own reference if it holds them; prefill does not need them
        embeds = self.embed_prompt(input_ids, tokens, slots)
        with self._borrow_decoder() as decoder:
            out = generate(decoder, self.embed, embeds, gen, on_token=on_token)
        t.prefill, t.decode_steps = out.prefill_ms, list(out.step_ms)
        t.e2e = (time.perf_counter() - start) * 1e3
        arrays = {}
        if keep_arrays:
            arrays = {
                "pixel_values": vin.pixel_values.astype(np.float32),
                "clip_ids": clip_ids,
                **({} if clip_mask is None else {"clip_mask": clip_mask}),
                "input_ids": input_ids,
                "relevance": np.asarray(relevance, np.float32),
                "visual_tokens": np.asarray(tokens, np.float32),
                "output_ids": np.asarray(out.ids, np.int64),
            }
        return AskResult(
            self.llama.decode(out.ids), list(out.ids), t, int(tokens.shape[0]), int(embeds.shape[0]), arrays,
            warnings=list(vin.warnings), stopped=out.stopped,
        )

    def _visual_count(self, paths: list[Path], num_frames: int) -> tuple[int, ImageLayout | None]:
        """(visual tokens, image layout or None) of a question's inputs, from file headers before any compute: a
        video's pooled frames, an image's anyres layout, a .npy's rows, or g*g per image of several images."""
        if len(paths) > 1:
            self.manifest.image_layout(None)  # an export from before image tiles: a clear error
            return len(paths) * self.image_spec["pooled_grid"] ** 2, None
        path = paths[0]
        kind = input_kind(path)
        layout = self.image_layout(path) if kind == "image" else None
        frames = num_frames
        if kind == "npy":  # the file brings its own frame count: read from its header, before any compute
            frames = read_npy_shape(path, self.manifest.model["image_size"])[0]
            if frames == 1:
                layout = self.image_layout(None)
            else:
                self._check_npy_frames(path, frames)
        return (layout.num_tokens if layout is not None else self.manifest.visual_tokens(frames)), layout

    def generation_config(self, **options) -> GenerationConfig:
        """GenerationConfig with this export's EOS id (options as GenerationConfig's)."""
        return GenerationConfig(**{"eos_token_id": self.eos_token_id, **options})

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """[B] ids -> [B, 1, D] embeddings (a gather on the exported table)."""
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=self.dtype)[:, None, :]

    def embed_prompt(self, input_ids: np.ndarray, visual_tokens: np.ndarray, slots: int = 1) -> np.ndarray:
        """[L-slots+N, D]: text embeddings with the `slots` image tokens replaced by the visual tokens (`splice`)."""
        return splice(self.embed_table, input_ids, visual_tokens, self.manifest.image_token_id, self.dtype, slots)
