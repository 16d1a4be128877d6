"""Native TensorRT backend: the engines of `ppllava-edge build`, run with cuda-python device buffers.

- `TrtGraphRunner` runs one engine (vision, prompt_pool, image_pool, projector_head) with the same
  `run(output_names, feed) -> list[np.ndarray]` call as an onnxruntime InferenceSession, so the pipeline can
  swap it in for a session.
- `TrtKVDecoder` implements runtime.generation.KVDecoder over the decoder engine: one execution context per
  optimization profile (context = prefill, generation = one token), the KV cache preallocated on the device as
  two ping-pong buffer sets sized for max_batch x max_seq_len (TensorRT writes `present.*` straight into the
  other set, as ConcatKVDecoder does on the CPU).
- Every execution context is created with ExecutionContextAllocationStrategy.USER_MANAGED on one shared
  activation buffer sized for the largest engine (device_memory_size_v2): the contexts run one after another on
  one stream, and TensorRT's default (STATIC) would give each of the decoder's two contexts its own maximum-size
  block - twice the activation memory, which matters on Jetson.
- Every set_input_shape / set_tensor_address / execute_async_v3 result is checked and fails with the tensor's name.
- Thread safety: each stage runner locks its context and buffers for one `run` at a time; the decoder (one KV
  cache) is borrowed by one `ask` at a time (the Pipeline's decoder pool of one).
- CUDA graphs are refused (`--cuda-graph`, by the CLI: cli/app.py `cuda_graph_option`): the decoder's KV cache grows every step, so each decode step is a new
  shape, and TensorRT needs an uncaptured enqueue after every shape change before a capture (trtexec:
  sampleInference.cpp) - which already runs the step; the graph could only run it again.
- `open_engines(engines_dir, manifest)` checks engines.json against this machine (TensorRT version, GPU SM and
  model) and the export, then loads everything.

Shape bookkeeping, profile choice and the pre-load checks are pure functions (tested without a GPU); tensorrt
and cuda-python are imported only when an engine is opened.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.metadata import check_compatible, check_export, load_metadata
from ..engine.profiles import CONTEXT, GENERATION, Profile, profiles_from_json, select_profile
from ..errors import EngineBuildError, InferenceError
from ..manifest import ExportManifest
from .decoder import kv_names

RUNNER_GRAPHS = ("vision", "prompt_pool", "image_pool", "projector_head")
# TensorRT DataType (python enum name) -> numpy; BF16, FP8, INT4, FP4 and E8M0 have no numpy type (TensorRT's own
# trt.nptype raises TypeError for them: python/packaging/bindings_wheel/tensorrt/__init__.py)
NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}
CUDA_GRAPH_REFUSAL = (
    "--cuda-graph is not supported by the TensorRT decoder: its KV cache grows by one position every step, so every decode "
    "step has new input shapes, and TensorRT needs one uncaptured enqueue after each shape change before a capture (as trtexec "
    "does) - that enqueue already computes the step, so a captured graph could only run it a second time.\n"
    "Hint: drop --cuda-graph. Graphs need a decoder with fixed shapes (a max-length KV buffer and a length input)."
)


# ---- pure helpers (tested without TensorRT) --------------------------------------------------------
def decoder_input_shapes(batch: int, past: int, seq: int, num_layers: int, num_kv_heads: int, head_dim: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Input shapes of one decoder call with `past` cached positions and `seq` new ones."""
    shapes: dict[str, tuple[int, ...]] = {
        "inputs_embeds": (batch, seq, hidden),
        "attention_mask": (batch, past + seq),
        "position_ids": (batch, seq),
    }
    for name in kv_names(num_layers)[0]:
        shapes[name] = (batch, num_kv_heads, past, head_dim)
    return shapes


def plan_forward(length: int, seq: int, max_input_len: int, max_seq_len: int) -> list[tuple[int, int, int]]:
    """How to run `seq` new positions after `length` cached ones: [(profile, start, stop)] over the new positions.

    An empty cache takes up to max_input_len positions in one context-profile call; everything else (a longer
    prompt's tail, or several positions after a non-empty cache, which neither profile covers) runs one position
    at a time with the generation profile - the same attention, just slower.
    """
    if seq < 1:
        raise InferenceError(f"decoder: nothing to run (seq={seq})")
    if length + seq > max_seq_len:
        raise InferenceError(
            f"decoder: {length + seq} positions exceed the engines' max_seq_len {max_seq_len}.\n"
            "Hint: rebuild with a larger --max-seq-len, or use fewer frames / new tokens."
        )
    steps: list[tuple[int, int, int]] = []
    start = 0
    if length == 0:
        first = min(seq, max_input_len)
        steps.append((CONTEXT, 0, first))
        start = first
    steps += [(GENERATION, i, i + 1) for i in range(start, seq)]
    return steps


def reorder_copies(beam_idx: np.ndarray, row_bytes: int) -> list[tuple[int, int, int]]:
    """(dst_offset, src_offset, nbytes) device copies that gather cache rows `beam_idx` into a new buffer.

    Consecutive rows that stay consecutive are merged into one copy.
    """
    copies: list[tuple[int, int, int]] = []
    for dst, src in enumerate(np.asarray(beam_idx, dtype=np.int64).tolist()):
        if copies and copies[-1][1] + copies[-1][2] == src * row_bytes and copies[-1][0] + copies[-1][2] == dst * row_bytes:
            d, s, n = copies[-1]
            copies[-1] = (d, s, n + row_bytes)
        else:
            copies.append((dst * row_bytes, src * row_bytes, row_bytes))
    return copies


def check_engine_dir(
    meta: dict, trt_version: str, sm: int, manifest: ExportManifest | None = None, need: tuple[str, ...] = ("decoder",), gpu_name: str | None = None,
    module: str | None = None,
) -> None:
    """Everything checked before any engine is deserialized: TensorRT version, GPU SM, model and Jetson module, export,
    graphs present."""
    check_compatible(meta, trt_version, sm, gpu_name, module)
    if manifest is not None:
        check_export(meta, manifest)
    missing = [g for g in need if g not in meta.get("engines", {})]
    if missing:
        raise EngineBuildError(f"the engine folder has no {', '.join(missing)} engine(s) (has: {', '.join(meta.get('engines', {}))}).\nHint: rebuild it with `ppllava-edge build`.")


def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, max_batch: int, max_seq_len: int, itemsize: int) -> int:
    """Device memory of the preallocated KV cache (two ping-pong sets)."""
    return 2 * 2 * num_layers * max_batch * num_kv_heads * max_seq_len * head_dim * itemsize


def numpy_dtype(trt_dtype: Any, tensor: str, engine: str) -> np.dtype:
    """numpy dtype of a TensorRT DataType, or EngineBuildError naming the tensor (bf16 / fp8 / 4-bit I/O)."""
    name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
    if name not in NUMPY_DTYPES:
        raise EngineBuildError(
            f"{engine}: tensor {tensor!r} is {name}, which numpy cannot hold, so the runtime cannot feed or read it.\n"
            "Hint: rebuild from an export whose inputs and outputs are fp16 / fp32 (`ppllava-edge build` refuses others)."
        )
    return np.dtype(NUMPY_DTYPES[name])


def dla_core_of(device: str) -> int | None:
    """'dla:1' -> 1, 'gpu' -> None (engines.json `device`)."""
    return int(device.split(":")[1]) if str(device).startswith("dla:") else None


def set_shape(ctx: Any, name: str, shape: tuple[int, ...], where: str) -> None:
    if not ctx.set_input_shape(name, shape):  # NvInferRuntime.h, setInputShape: false when out of the profile's range
        raise InferenceError(f"{where}: TensorRT refused shape {tuple(shape)} for {name!r} (set_input_shape returned False)")


def set_address(ctx: Any, name: str, ptr: int, where: str) -> None:
    if not ctx.set_tensor_address(name, ptr):  # NvInferRuntime.h, setTensorAddress: false for an unknown name or bad alignment
        raise InferenceError(f"{where}: TensorRT refused the device address of {name!r} (set_tensor_address returned False)")


def enqueue(ctx: Any, stream: Any, where: str) -> None:
    if not ctx.execute_async_v3(stream.handle):  # NvInferRuntime.h, enqueueV3: false if the kernels were not enqueued
        raise InferenceError(f"{where}: TensorRT could not enqueue the inference (execute_async_v3 returned False; see the TensorRT log above)")


# ---- TensorRT objects ----------------------------------------------------------------------------
class TrtEngine:
    """A deserialized engine, its I/O tensors and (after create_contexts) one execution context per profile."""

    def __init__(self, trt: Any, runtime: Any, path: Path, profiles: list[Profile], dla_core: int | None = None):
        self.trt, self.path = trt, Path(path)
        if dla_core is not None:  # IRuntime::setDLACore: the core a DLA engine runs on
            runtime.DLA_core = dla_core
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EngineBuildError(f"{path}: TensorRT could not deserialize the engine.\nHint: rebuild it with `ppllava-edge build ... --force`.")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: numpy_dtype(self.engine.get_tensor_dtype(n), n, self.path.name) for n in names}
        self.profiles = profiles
        self.contexts: list[Any] = []

    @property
    def activation_bytes(self) -> int:
        """Activation (scratch) memory one context needs, the maximum over the profiles (getDeviceMemorySizeV2)."""
        return int(self.engine.device_memory_size_v2)

    def create_contexts(self, stream: Any, memory: int, nbytes: int) -> None:
        """One execution context per profile, all on the caller's activation memory (USER_MANAGED): they must run
        one after another (TensorRT uses the memory from enqueue until the work completes)."""
        if nbytes < self.activation_bytes:
            raise EngineBuildError(f"{self.path.name}: shared activation memory of {nbytes} bytes is smaller than the {self.activation_bytes} it needs")
        n = self.engine.num_optimization_profiles
        for idx in range(max(1, n)):
            ctx = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise EngineBuildError(f"{self.path.name}: could not create an execution context (see the TensorRT log above)")
            ctx.set_device_memory(memory, nbytes)
            if n > 1:
                try:  # the binding raises RuntimeError when setOptimizationProfileAsync returns false (pyCore.cpp)
                    ctx.set_optimization_profile_async(idx, stream.handle)
                except RuntimeError as exc:
                    raise EngineBuildError(f"{self.path.name}: TensorRT refused optimization profile {idx}: {exc}") from exc
            self.contexts.append(ctx)
        stream.synchronize()

    def max_shape(self, name: str, profile: int = 0) -> tuple[int, ...]:
        shape = tuple(self.engine.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return shape
        return tuple(self.engine.get_tensor_profile_shape(name, profile)[2])


class TrtGraphRunner:
    """One non-decoder engine with an onnxruntime-like `run(output_names, feed)`; buffers sized for the profile max.

    Thread-safe as an ONNX Runtime session is: its one execution context and input / output buffers are used by one
    `run` at a time (a lock), so two threads asking about two videos cannot overwrite each other's shapes and pixels.
    Runs of different runners (and the decoder) may interleave: they enqueue on one stream, which runs their kernels
    one after another, as the activation memory all contexts share requires."""

    def __init__(self, engine: TrtEngine, output_order: list[str], stream: Any):
        from ..device import DeviceBuffer

        self._lock = threading.Lock()
        self.engine, self.stream = engine, stream
        self.output_order = output_order
        self.ctx = engine.contexts[0]
        self.name = engine.path.name
        self.buffers = {}
        for name in engine.inputs:
            shape = engine.max_shape(name)
            set_shape(self.ctx, name, shape, self.name)
            self.buffers[name] = DeviceBuffer(int(np.prod(shape)) * engine.dtypes[name].itemsize)
        for name in engine.outputs:
            shape = tuple(self.ctx.get_tensor_shape(name))  # at the max input shapes
            self.buffers[name] = DeviceBuffer(int(np.prod(shape)) * engine.dtypes[name].itemsize)
        for name, buf in self.buffers.items():
            set_address(self.ctx, name, buf.ptr, self.name)

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            return self._run(output_names, feed)

    def _run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        shapes = {k: tuple(np.shape(v)) for k, v in feed.items()}
        if self.engine.profiles and select_profile(self.engine.profiles, shapes) < 0:
            prof = self.engine.profiles[0]
            if all(lo == hi for lo, _, hi in prof.values()):  # a static engine (e.g. vision on DLA)
                built = {k: lo for k, (lo, _, _) in prof.items()}
                raise InferenceError(f"{self.name}: input shapes {shapes} differ from the only shapes this static engine runs, {built}.\n"
                                     "Hint: ask with that frame count, or build a GPU engine folder (without --dla-core) for other frame counts and images.")
            raise InferenceError(f"{self.name}: input shapes {shapes} are outside the engine's profile.\nHint: rebuild with a wider --frames range.")
        for name in self.engine.inputs:
            if name not in feed:
                raise InferenceError(f"{self.name}: missing input {name!r}")
            arr = np.ascontiguousarray(feed[name], dtype=self.engine.dtypes[name])
            set_shape(self.ctx, name, arr.shape, self.name)
            self.buffers[name].copy_from_host(arr, self.stream)
        enqueue(self.ctx, self.stream, self.name)
        outs = {}
        for name in self.engine.outputs:
            host = np.empty(tuple(self.ctx.get_tensor_shape(name)), self.engine.dtypes[name])
            self.buffers[name].copy_to_host(host, self.stream)
            outs[name] = host
        self.stream.synchronize()
        return [outs[n] for n in (output_names or self.output_order)]

    def close(self) -> None:
        for buf in self.buffers.values():
            buf.free()


class TrtKVDecoder:
    """runtime.generation.KVDecoder over the decoder engine, with the KV cache on the device."""

    def __init__(self, engine: TrtEngine, model: dict, limits: dict, stream: Any):
        from ..device import DeviceBuffer, HostBuffer

        if len(engine.contexts) < 2:
            raise EngineBuildError(f"{engine.path.name}: expected the context and generation profiles, found {len(engine.contexts)} profile(s).\nHint: rebuild with `ppllava-edge build`.")
        self.engine, self.stream = engine, stream
        self.layers, self.kv, self.hd, self.hidden = model["num_layers"], model["num_kv_heads"], model["head_dim"], model["hidden_size"]
        self.vocab = model["vocab_size"]
        self.max_batch, self.max_input_len, self.max_seq_len = limits["max_batch"], limits["max_input_len"], limits["max_seq_len"]
        self.past_names, self.present_names = kv_names(self.layers)
        self.kv_dtype = engine.dtypes[self.past_names[0]]
        self.embed_dtype = engine.dtypes["inputs_embeds"]
        self.logits_dtype = engine.dtypes["logits"]
        b, t = self.max_batch, self.max_seq_len
        kv_bytes = b * self.kv * t * self.hd * self.kv_dtype.itemsize
        self.kv_sets = [[DeviceBuffer(kv_bytes) for _ in self.past_names] for _ in range(2)]
        self.embeds = DeviceBuffer(b * self.max_input_len * self.hidden * self.embed_dtype.itemsize)
        self.mask_dtype, self.pos_dtype = engine.dtypes["attention_mask"], engine.dtypes["position_ids"]
        self.mask = DeviceBuffer(b * t * self.mask_dtype.itemsize)
        self.mask.copy_from_host(np.ones(b * t, self.mask_dtype), stream)  # the mask is all ones; only its shape changes
        self.positions = DeviceBuffer(b * self.max_input_len * self.pos_dtype.itemsize)
        self.logits = DeviceBuffer(b * self.vocab * self.logits_dtype.itemsize)
        self.host_logits = HostBuffer((b, self.vocab), self.logits_dtype)
        self.batch = self.length = 0
        self._cur = 0
        stream.synchronize()

    # -- KVDecoder protocol ---------------------------------------------------------------------
    def reset(self, batch: int) -> None:
        if not 1 <= batch <= self.max_batch:
            raise InferenceError(f"decoder: batch {batch} outside the engines' 1..{self.max_batch}.\nHint: rebuild with --max-batch {batch} (beam search needs --max-batch >= --num-beams).")
        self.batch, self.length = batch, 0

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        b, s, d = inputs_embeds.shape
        if b != self.batch:
            raise InferenceError(f"decoder: inputs_embeds batch {b} != cache batch {self.batch}")
        if d != self.hidden:
            raise InferenceError(f"decoder: inputs_embeds hidden size {d} != {self.hidden}")
        logits = None
        for profile, start, stop in plan_forward(self.length, s, self.max_input_len, self.max_seq_len):
            logits = self._step(profile, inputs_embeds[:, start:stop])
        assert logits is not None
        return logits

    def reorder(self, beam_idx: np.ndarray) -> None:
        beam_idx = np.asarray(beam_idx, dtype=np.int64)
        new_b = int(beam_idx.shape[0])
        if new_b > self.max_batch:
            raise InferenceError(f"decoder: {new_b} beams exceed the engines' max batch {self.max_batch}.\nHint: rebuild with --max-batch {new_b}.")
        if beam_idx.size and (beam_idx.min() < 0 or beam_idx.max() >= self.batch):
            raise InferenceError(f"decoder: beam_idx {beam_idx.tolist()} out of range for batch {self.batch}")
        row = self.kv * self.length * self.hd * self.kv_dtype.itemsize
        nxt = 1 - self._cur
        copies = reorder_copies(beam_idx, row)
        for src_buf, dst_buf in zip(self.kv_sets[self._cur], self.kv_sets[nxt]):
            for dst, src, n in copies:
                dst_buf.copy_from_device(src_buf, n, self.stream, dst_offset=dst, src_offset=src)
        self._cur, self.batch = nxt, new_b

    # -- one engine call ------------------------------------------------------------------------
    def _step(self, profile: int, chunk: np.ndarray) -> np.ndarray:
        b, s, _ = chunk.shape
        past, total = self.length, self.length + s
        ctx = self.engine.contexts[profile]
        self.embeds.copy_from_host(np.ascontiguousarray(chunk, dtype=self.embed_dtype), self.stream)
        self.positions.copy_from_host(np.broadcast_to(np.arange(past, total, dtype=self.pos_dtype), (b, s)).copy(), self.stream)
        self._bind(ctx, b, past, s)
        enqueue(ctx, self.stream, "decoder")
        host = self.host_logits.array[:b]
        self.logits.copy_to_host(host, self.stream)
        self.stream.synchronize()
        self._cur, self.length = 1 - self._cur, total
        return np.asarray(host, dtype=np.float32).copy()

    def _bind(self, ctx: Any, b: int, past: int, s: int) -> None:
        for name, shape in decoder_input_shapes(b, past, s, self.layers, self.kv, self.hd, self.hidden).items():
            set_shape(ctx, name, shape, "decoder")
        addresses = {"inputs_embeds": self.embeds.ptr, "attention_mask": self.mask.ptr, "position_ids": self.positions.ptr, "logits": self.logits.ptr}
        for i, (pn, qn) in enumerate(zip(self.past_names, self.present_names)):
            addresses[pn] = self.kv_sets[self._cur][i].ptr
            addresses[qn] = self.kv_sets[1 - self._cur][i].ptr
        for name, ptr in addresses.items():
            set_address(ctx, name, ptr, "decoder")

    def close(self) -> None:
        for bufs in self.kv_sets:
            for buf in bufs:
                buf.free()
        for buf in (self.embeds, self.mask, self.positions, self.logits):
            buf.free()
        self.host_logits.free()


@dataclass
class TrtEngines:
    """Everything `ppllava-edge ask --backend trt` needs: runners replacing the ORT sessions, and the decoder."""

    folder: Path
    metadata: dict
    runners: dict[str, TrtGraphRunner]
    decoder: TrtKVDecoder
    stream: Any
    activations: Any = None  # the DeviceBuffer every execution context shares

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        self.decoder.close()
        if self.activations is not None:
            self.activations.free()
        self.stream.close()


def open_engines(engines_dir: str | Path, manifest: ExportManifest) -> TrtEngines:
    """Check and load an engine folder for `manifest`'s export.

    Raises MissingDependencyError without TensorRT /
    cuda-python / GPU or with mismatched CUDA majors, EngineBuildError when the engines were built by another
    TensorRT version, for another GPU SM or model, or from another export (the message says to rebuild).
    """
    from ..engine.availability import require_tensorrt

    trt, _ = require_tensorrt("The TensorRT backend (--backend trt)")
    from ..device import DeviceBuffer, Stream, device_info

    folder = Path(engines_dir)
    meta = load_metadata(folder)
    dev = device_info(0)
    from ..engine.jetson import device_tree

    check_engine_dir(meta, trt.__version__, dev["sm"], manifest, gpu_name=dev["name"], module=device_tree()["module"])
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    engines = {
        graph: TrtEngine(trt, runtime, folder / entry["file"], profiles_from_json(entry["profiles"]), dla_core_of(entry.get("device", "gpu")))
        for graph, entry in meta["engines"].items()
    }
    stream = Stream()
    activations = DeviceBuffer(max([256] + [e.activation_bytes for e in engines.values()]))
    for eng in engines.values():
        eng.create_contexts(stream, activations.ptr, activations.nbytes)
    runners: dict[str, TrtGraphRunner] = {}
    for graph, eng in engines.items():
        if graph != "decoder":
            source = meta["engines"][graph].get("graph") or manifest.graph_for(graph, "trt")
            runners[graph] = TrtGraphRunner(eng, [o["name"] for o in manifest.graph(source)["outputs"]], stream)
    decoder = TrtKVDecoder(engines["decoder"], manifest.model, meta["limits"], stream)
    return TrtEngines(folder, meta, runners, decoder, stream, activations)
