"""ONNX Runtime sessions with an explicit execution-provider choice (cpu, cuda, tensorrt; default: best available)."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from ..errors import InferenceError, MissingDependencyError
from ..manifest import graph_files
from ..memory import trim_heap

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
PREFERENCE = ("tensorrt", "cuda", "cpu")


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # the plain install has it; a GPU install swaps it for onnxruntime-gpu
        raise MissingDependencyError(
            "Running an export needs 'onnxruntime', which is not installed.\n"
            "Hint: pip install onnxruntime==1.32.0 (CPU) or pip install 'ppllava-edge[gpu]' (CUDA / TensorRT EP)"
        ) from exc
    return onnxruntime


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers, best first."""
    have = set(_ort().get_available_providers())
    return [p for p in PREFERENCE if PROVIDERS[p] in have]


def resolve_provider(name: str | None) -> str:
    """'auto'/None -> the best available; otherwise check the requested one exists."""
    have = available_providers()
    if name in (None, "auto"):
        return have[0]
    if name not in PROVIDERS:
        raise InferenceError(f"unknown provider {name!r}; choose one of: auto, {', '.join(PROVIDERS)}")
    if name not in have:
        raise InferenceError(
            f"provider {name!r} ({PROVIDERS[name]}) is not available in this onnxruntime build "
            f"(available: {', '.join(have)}).\n"
            "Hint: for cuda/tensorrt install the GPU build: pip uninstall -y onnxruntime && pip install 'ppllava-edge[gpu]'"
            + (" and TensorRT (pip install 'ppllava-edge[tensorrt]' or JetPack)" if name == "tensorrt" else "")
        )
    return name


def provider_list(provider: str, cache_dir: Path | None = None, fp16: bool = False) -> list:
    """ORT `providers=` argument for a resolved provider, with CPU fallback."""
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    cache = Path(cache_dir or "trt_cache")
    cache.mkdir(parents=True, exist_ok=True)
    trt_options = {
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": fp16,
    }
    return [("TensorrtExecutionProvider", trt_options), "CUDAExecutionProvider", "CPUExecutionProvider"]


class Session:
    """An onnxruntime InferenceSession whose `run` casts floating-point feeds to the dtype each input declares, so
    graphs of different precisions chain (an int8 vision graph with fp32 I/O feeding fp16 pools, an fp32-activation
    int4 decoder in an fp16 export). Everything else is the InferenceSession's own (io_binding, get_inputs, ...)."""

    _FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

    _OUTPUTS = {**_FLOATS, "tensor(int64)": np.int64, "tensor(int32)": np.int32}

    def __init__(self, session, run_options=None, bind_outputs: bool = False, trim: bool = False):
        self.session = session
        self.float_inputs = {i.name: self._FLOATS[i.type] for i in session.get_inputs() if i.type in self._FLOATS}
        self.run_options = run_options  # used by `run` when the caller gives none (create_session(arena="shrink"))
        self.bind_outputs = bind_outputs  # outputs into numpy arrays, outside the arena (arena="shrink")
        self.trim = trim  # give the C heap's free pages back after every run (arena=False)

    def input_dtype(self, name: str):
        """numpy dtype of a floating-point input (None for other inputs)."""
        return self.float_inputs.get(name)

    def run(self, output_names, feed: dict, run_options=None):
        cast = {}
        for k, v in feed.items():
            want = self.float_inputs.get(k)
            cast[k] = v.astype(want) if want is not None and getattr(v, "dtype", want) != want else v
        ro = run_options if run_options is not None else self.run_options
        shapes = self.output_shapes(cast) if self.bind_outputs else None
        try:
            if shapes is not None:
                return self._run_into(output_names, cast, shapes, ro)
            return self.session.run(output_names, cast, ro)
        finally:
            if self.trim:
                trim_heap()

    def output_shapes(self, feed: dict) -> dict[str, tuple] | None:
        """Every output's shape for this feed, from the graph's symbolic dims ('frames', '576*frames') bound by the
        inputs' shapes; None when one is not computable (a dim only the run knows)."""
        from ..engine.profiles import eval_dim  # pure: integer dim expressions, no TensorRT

        env: dict[str, int] = {}
        for i in self.session.get_inputs():
            if i.name in feed:
                for d, n in zip(i.shape, np.shape(feed[i.name])):
                    if isinstance(d, str) and d.isidentifier():
                        env[d] = int(n)
        try:
            return {o.name: tuple(eval_dim(d, env) for d in o.shape) for o in self.session.get_outputs()
                    if o.type in self._OUTPUTS and None not in o.shape}
        except Exception:  # noqa: BLE001 - a symbol no input binds, an expression eval_dim does not take
            return None

    def _run_into(self, output_names, feed: dict, shapes: dict[str, tuple], run_options):
        """`run` with every output written into a numpy array allocated here (IO binding), so that no output lives
        in ONNX Runtime's arena: with `arena="shrink"` the arena then gives back *all* of the run's memory, where
        a region holding an output stayed reserved until the next run (0.75 GB after a 32-frame CLIP-L run)."""
        outs = self.session.get_outputs()
        if len(shapes) != len(outs):
            return self.session.run(output_names, feed, run_options)
        binding = self.session.io_binding()
        inputs = {k: np.ascontiguousarray(v) for k, v in feed.items()}  # alive until the run returns
        for k, v in inputs.items():
            binding.bind_cpu_input(k, v)
        arrays = {}
        for o in outs:
            a = arrays[o.name] = np.empty(shapes[o.name], self._OUTPUTS[o.type])
            binding.bind_output(o.name, "cpu", 0, a.dtype, a.shape, a.ctypes.data)
        self.session.run_with_iobinding(binding, run_options)
        return [arrays[n] for n in (output_names or [o.name for o in outs])]

    def __getattr__(self, name):
        return getattr(self.session, name)


OPTIMIZE = ("all", "basic")
CACHED_GRAPH = "model.onnx"  # in EXPORT/ort_cache/<graph>-<key>/, with its external data beside it


def _cache_key(path: Path, provider: str, threads: int | None) -> str:
    """Changes when ONNX Runtime, the graph (size, mtime), the provider, the thread count or the CPU changes."""
    import hashlib
    import platform

    ort = _ort()
    h = hashlib.sha256()
    for part in (ort.__version__, provider, str(threads), platform.machine(), platform.processor()):
        h.update(part.encode() + b"\0")
    for f in graph_files(path):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode() + b"\0")
    return h.hexdigest()[:16]


def create_session(path: Path, provider: str, threads: int | None = None, cache_dir: Path | None = None, fp16: bool = False,
                   optimize: str = "all", graph_cache: Path | None = None, arena: bool | str = True) -> Session:
    """An ONNX Runtime session over `path`.

    Args:
        optimize: "all" (ONNX Runtime's full graph optimisation: traced graphs need its fusions) or "basic" (graphs
            written already fused, such as the in-place decoder: the full pass finds nothing and costs load time).
        graph_cache: a folder for ONNX Runtime's optimised copy of a traced graph (CPU only): the first load writes it
            (atomically), later loads read it without optimising again. Keyed by ONNX Runtime's version, the graph
            files' size and mtime, the provider, thread count and CPU. The cache never stops a load: a folder that
            cannot be written (read-only, disk full) is skipped with a warning and nothing half-written is
            published; an entry that does not load is removed with a warning and the graph is optimised again.
        arena: True: ONNX Runtime's CPU memory arena with its memory pattern (activations stay reserved for the
            next run; the decoder). "shrink": the arena without the memory pattern, its free regions given back to
            the system after every `run`, whose outputs are written into numpy arrays outside the arena so that no
            region outlives the run (the pools). False: no arena, every activation from malloc, and the C heap
            trimmed after every run (the vision graph: the lowest peak and nothing kept at CLIP-L width, README
            "Vision at 2 threads")
    """
    ort = _ort()
    run_options = None
    shrink = arena == "shrink" and provider == "cpu"
    if shrink:
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    path = Path(path)

    def wrap(session):
        return Session(session, run_options, bind_outputs=shrink, trim=arena is False and provider == "cpu")

    def options(level=None):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not arena:
            so.enable_cpu_mem_arena = False
        if arena is not True:
            so.enable_mem_pattern = False
        if level is not None:
            so.graph_optimization_level = level
        return so

    def open_session(load: Path, so):
        return ort.InferenceSession(os.fspath(load), so, providers=provider_list(provider, cache_dir, fp16))

    try:
        if optimize == "basic":
            return wrap(open_session(path, options(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)))
        if graph_cache is None or provider != "cpu":
            return wrap(open_session(path, options()))
        # one folder per key, written under a private temporary name and renamed: processes that open the same
        # export at once (Triton's instances) never see or write each other's half-written files
        entry = Path(graph_cache) / f"{path.stem}-{_cache_key(path, provider, threads)}"
        if (entry / CACHED_GRAPH).is_file():
            try:
                return wrap(open_session(entry / CACHED_GRAPH, options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)))
            except Exception as exc:  # noqa: BLE001 - a damaged entry (an older version's failed write): drop it, optimise again
                log.warning("%s: the cached optimised graph does not load (%s: %s); removing it and optimising %s again",
                            entry, type(exc).__name__, _first_line(exc), path.name)
                _discard(entry)
        return wrap(_open_and_cache(path, entry, options, open_session))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise InferenceError(f"{path}: onnxruntime could not load the graph ({type(exc).__name__}: {exc})") from exc


log = logging.getLogger(__name__)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def _open_and_cache(path: Path, entry: Path, options, open_session):
    """Open `path` with full optimisation and write ONNX Runtime's optimised copy to the cache `entry`; publish the
    copy (rename into place) only when the session loaded and every file was written and flushed. A cache that
    cannot be written is skipped with a warning: the session opens without it."""
    writing = entry.with_name(f".{entry.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        writing.mkdir(parents=True)
    except OSError as exc:  # a read-only export folder, a full disk: no cache
        log.warning("%s: ONNX Runtime graph cache skipped (%s)", entry.parent, exc.strerror or exc)
        return open_session(path, options())
    so = options()
    so.optimized_model_filepath = os.fspath(writing / CACHED_GRAPH)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", CACHED_GRAPH + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        try:
            session = open_session(path, so)
        except Exception as exc:  # noqa: BLE001 - writing the optimised copy failed (disk full) or the graph is bad
            session = open_session(path, options())  # a bad graph raises again here: then the cache was not the cause
            log.warning("%s: ONNX Runtime graph cache skipped: writing the optimised copy failed (%s)", entry.parent, _first_line(exc))
            return session
        if _flushed(writing):
            try:
                writing.rename(entry)  # atomic; refused when another process renamed its copy first
            except OSError:
                pass
            if (entry / CACHED_GRAPH).is_file():
                # the optimising session keeps the graph's weights in the heap (its optimisers copy them): answer from
                # the saved copy, as a second process does (weights memory-mapped), and give that memory back
                del session
                trim_heap()
                try:
                    return open_session(entry / CACHED_GRAPH, options(_ort().GraphOptimizationLevel.ORT_DISABLE_ALL))
                except Exception as exc:  # noqa: BLE001 - the next process removes and rewrites a bad entry
                    log.warning("%s: the optimised copy just written does not load (%s); using %s", entry, _first_line(exc), path.name)
                    return open_session(path, options())
        else:
            log.warning("%s: ONNX Runtime graph cache skipped: the optimised copy was not written completely", entry.parent)
        return session
    finally:
        shutil.rmtree(writing, ignore_errors=True)


def _flushed(folder: Path) -> bool:
    """A freshly written cache entry's graph non-empty and every file on disk (fsync), so a crash or a full disk
    after the rename cannot leave a published entry with an empty graph."""
    try:
        files = [f for f in folder.iterdir() if f.is_file()]
        if not (folder / CACHED_GRAPH).is_file() or (folder / CACHED_GRAPH).stat().st_size == 0:
            return False
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return True
    except OSError:
        return False


def _discard(entry: Path) -> None:
    """Remove a cache entry without exposing a half-removed one: rename it away first, then delete."""
    gone = entry.with_name(f".{entry.name}.{os.getpid()}-{threading.get_ident()}.gone")
    try:
        entry.rename(gone)
    except OSError:
        return  # another process removed (or replaced) it first
    shutil.rmtree(gone, ignore_errors=True)
