"""KV-cache decoders over the exported decoder graphs (runtime.generation.KVDecoder implementations).

`InplaceKVDecoder` runs `decoder.onnx` as exported today (contract 'gqa-inplace-v1', see export/decoder_builder.py):
one KV buffer per layer tensor, bound with IO binding as both `past.*` and `present.*`. ONNX Runtime's
GroupQueryAttention writes the new positions' keys/values into it and reads the cached ones where they lie, so a
decode step reads the weights and the used part of the cache once and writes one position. The buffers are sized
for what a request needs (`reserve(batch, positions)`: context + max_new_tokens, the previous request's cache
dropped), grow only when a later request needs more (copying the cache only when it grows mid-request), never past
the model's context. Beam search reorders rows in place.

`ConcatKVDecoder` runs the standard-ops decoder graph (contract 'concat-v1': attention_mask + position_ids, present
= concat(past, new)): exports made before the in-place graph, and the TensorRT-parsable `decoder_trt.onnx` when it
runs under ONNX Runtime. It keeps two buffer sets (past / present) that swap roles each step.
"""

from __future__ import annotations

import numpy as np

from ..errors import InferenceError

INPLACE = "gqa-inplace-v1"
PREFILL_CHUNK = 256
"""Prompt positions per run of a CPU prefill (measured: tools/prefill_attention_bench.py and the README's
"Prefill attention" section)."""
CONCAT = "concat-v1"


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return past, [n.replace("past.", "present.") for n in past]


def decoder_contract(graph_entry: dict) -> str:
    """The KV contract of a decoder graph from its export.json entry (older exports: concat)."""
    return graph_entry.get("contract", CONCAT)


def adapt_feed(feed: dict[str, np.ndarray], input_names: list[str] | set[str]) -> dict[str, np.ndarray]:
    """A concat-contract feed (inputs_embeds, attention_mask, position_ids, past.* of the cached length) for a
    graph with `input_names`: the in-place graph takes seqlens_k / total_sequence_length instead of the mask and
    positions (its positions follow from seqlens_k). Used by validation, calibration and the accuracy gate."""
    names = set(input_names)
    if "seqlens_k" not in names:
        return feed
    total = int(feed["attention_mask"].shape[1])
    batch = int(feed["inputs_embeds"].shape[0])
    out = {k: v for k, v in feed.items() if k not in ("attention_mask", "position_ids")}
    out["seqlens_k"] = np.full(batch, total - 1, np.int32)
    out["total_sequence_length"] = np.asarray(total, np.int32)
    return out


def _check_step(dec, inputs_embeds: np.ndarray) -> tuple[int, int, int]:
    """(batch, new positions, total positions) of a forward step, checked against the decoder's cache and context."""
    b, s, _ = inputs_embeds.shape
    if b != dec.batch:
        raise InferenceError(f"decoder: inputs_embeds batch {b} != cache batch {dec.batch}")
    total = dec.length + s
    if total > dec.max_len:
        raise InferenceError(f"decoder: {total} positions exceed the LLM context of {dec.max_len}")
    return b, s, total


class _Logits:
    """A preallocated logits buffer [rows, V] bound as the graph's output (copy_outputs_to_cpu would copy every
    present.* tensor too)."""

    def __init__(self, session):
        out = session.get_outputs()[0]
        self.dtype = np.dtype(np.float16 if out.type == "tensor(float16)" else np.float32)
        self.vocab = int(out.shape[-1])
        self.array = np.empty((0, self.vocab), self.dtype)

    def view(self, batch: int) -> np.ndarray:
        if self.array.shape[0] < batch:
            self.array = np.empty((batch, self.vocab), self.dtype)
        return self.array[:batch]


class InplaceKVDecoder:
    """One KV buffer per `past.*` tensor, [max_batch, kv, capacity, head_dim], shared by past and present.

    On the CPU provider the buffers are numpy arrays; on a device provider ('cuda') they are OrtValues in device
    memory (reorders and growth round-trip through the host; they are rare: once per beam step, once per growth).
    """

    def __init__(self, session, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32, device: str = "cpu",
                 device_buffers: bool | None = None):
        self.session = session
        self.num_layers, self.kv, self.hd = num_layers, num_kv_heads, head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.device = device
        # OrtValue buffers (device memory); on 'cpu' numpy arrays unless asked (tests run the device path on cpu)
        self._ortvalue = device != "cpu" if device_buffers is None else device_buffers
        self._shrink = _shrink_options() if device == "cpu" else None
        # positions per prefill run on the CPU provider (0: the whole prompt in one run); device providers run
        # GroupQueryAttention's flash / memory-efficient kernels, which skip the masked positions themselves
        self.prefill_chunk = PREFILL_CHUNK if device == "cpu" else 0
        self.past_names, self.present_names = kv_names(num_layers)
        self.batch = 0
        self.length = 0
        self.max_batch = 0
        self.capacity = 0
        self._bufs: list = []  # numpy arrays (cpu) or OrtValues (device)
        self._logits = _Logits(session)
        self.allocations = 0  # buffer (re)allocations, for tests and the bench
        self.peak_used_positions = 0

    # -- buffers ------------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        return 2 * self.num_layers * self.max_batch * self.kv * self.capacity * self.hd * self.dtype.itemsize

    @property
    def used_bytes(self) -> int:
        return 2 * self.num_layers * self.batch * self.kv * self.length * self.hd * self.dtype.itemsize

    def _host(self, i: int) -> np.ndarray:
        """Buffer i as a host array (the buffer itself on cpu, a copy from a device)."""
        return self._bufs[i].numpy() if self._ortvalue else self._bufs[i]

    def _alloc(self, shape: tuple[int, ...], init: np.ndarray | None):
        if not self._ortvalue:
            buf = np.empty(shape, self.dtype)
            if init is not None:
                buf[tuple(slice(0, n) for n in init.shape)] = init
            return buf
        import onnxruntime as ort

        host = np.zeros(shape, self.dtype)
        if init is not None:
            host[tuple(slice(0, n) for n in init.shape)] = init
        return ort.OrtValue.ortvalue_from_numpy(host, self.device, 0)

    def _grow(self, batch: int, positions: int) -> None:
        """Make room for `batch` rows of `positions` positions, keeping the cached rows/positions."""
        batch, positions = max(batch, self.max_batch), max(positions, self.capacity)
        if batch == self.max_batch and positions == self.capacity:
            return
        if positions == 0:  # nothing to hold yet: allocate on the first forward, at its size
            self.max_batch = batch
            return
        if positions > self.max_len:
            raise InferenceError(f"decoder: {positions} positions exceed the LLM context of {self.max_len}")
        keep = [self._host(i)[: self.batch, :, : self.length] for i in range(len(self._bufs))] if self.length else [None] * len(self.past_names)
        self._bufs = [self._alloc((batch, self.kv, positions, self.hd), keep[i]) for i in range(len(self.past_names))]
        self.max_batch, self.capacity = batch, positions
        self.allocations += 1

    def reserve(self, batch: int, positions: int) -> None:
        """Size the cache for `batch` rows of `positions` positions (context + new tokens) before a request. The
        previous request's cache is dropped first (`reset` follows): a growth copies nothing (on a device it would
        round-trip every layer through the host)."""
        self.length = 0
        self._grow(batch, min(positions, self.max_len))

    def past(self) -> list[np.ndarray]:
        """The current cache as host arrays [B, KV, len, HD] (views on cpu; copy to keep)."""
        return [self._host(i)[: self.batch, :, : self.length] for i in range(len(self._bufs))]

    # -- KVDecoder protocol ---------------------------------------------------------------------
    def reset(self, batch: int) -> None:
        self.batch, self.length = batch, 0
        self._grow(batch, self.capacity)

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        b, s, total = _check_step(self, inputs_embeds)
        if total > self.capacity:  # nobody reserved enough: grow geometrically (amortised), within the context
            self._grow(b, min(self.max_len, max(total, 2 * self.capacity)))
        chunk = self.prefill_chunk
        if not chunk or s <= chunk:
            return self._run(inputs_embeds, b, s)
        # chunked prefill (CPU): each chunk attends to the cached positions and causally within itself, so the
        # result equals one run; ONNX Runtime's CPU GroupQueryAttention computes the whole [new, total] score block
        # per head, so chunks skip most of the masked upper triangle (see PREFILL_CHUNK)
        for a in range(0, s, chunk):
            logits = self._run(inputs_embeds[:, a : a + chunk], b, min(chunk, s - a), last=a + chunk >= s)
        return logits

    def _run(self, inputs_embeds: np.ndarray, b: int, s: int, last: bool = True) -> np.ndarray:
        """One run of the graph over `s` new positions, the cache bound in place."""
        total = self.length + s
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=self.dtype))
        io.bind_cpu_input("seqlens_k", np.full(b, total - 1, np.int32))
        io.bind_cpu_input("total_sequence_length", np.asarray(total, np.int32))
        logits = self._logits.view(b)
        io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        shape = (b, self.kv, self.capacity, self.hd)
        for buf, pn, qn in zip(self._bufs, self.past_names, self.present_names):
            ptr = buf.data_ptr() if self._ortvalue else buf.ctypes.data
            io.bind_input(pn, self.device, 0, self.dtype, shape, ptr)
            io.bind_output(qn, self.device, 0, self.dtype, shape, ptr)  # same memory: updated in place
        self.session.run_with_iobinding(io, self._shrink if s > 1 and last else None)  # None off the CPU
        self.length = total
        self.peak_used_positions = max(self.peak_used_positions, total)
        return logits.astype(np.float32)  # a copy: the buffer is reused next step

    def reorder(self, beam_idx: np.ndarray) -> None:
        beam_idx = np.asarray(beam_idx, dtype=np.int64)
        new_b = int(beam_idx.shape[0])
        if beam_idx.size and (beam_idx.min() < 0 or beam_idx.max() >= self.batch):
            raise InferenceError(f"decoder: beam_idx {beam_idx.tolist()} out of range for batch {self.batch}")
        self._grow(new_b, self.capacity)
        n = self.length
        for i in range(len(self._bufs)):
            host = self._host(i)
            host[:new_b, :, :n] = host[beam_idx, :, :n]  # the fancy index copies the source rows first
            if self._ortvalue:
                self._bufs[i].update_inplace(host)
        self.batch = new_b


def _shrink_options():
    """RunOptions that give the CPU arena's free chunks back after the run: a prefill's activations (hundreds of MB
    at 7B) are not kept reserved for the decode steps, which need a few MB."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


class ConcatKVDecoder:
    """The concat-contract graph: past / present in two preallocated buffer sets that swap roles (CPU provider,
    IO binding) or plain `run()` on other providers."""

    def __init__(self, session, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32, io_binding: bool = True):
        self.session = session
        self.num_layers, self.kv, self.hd = num_layers, num_kv_heads, head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.io_binding = io_binding
        self.past_names, self.present_names = kv_names(num_layers)
        self.batch = 0
        self.length = 0
        self.capacity = 0  # positions per row
        self.max_batch = 0
        self._bufs: list[list[np.ndarray]] = [[], []]  # two sets of flat buffers
        self._cur = 0
        self._plain_past: list[np.ndarray] = []
        self._logits = _Logits(session)
        self.allocations = 0
        self.peak_used_positions = 0

    @property
    def allocated_bytes(self) -> int:
        return 2 * 2 * self.num_layers * self.max_batch * self.kv * self.capacity * self.hd * self.dtype.itemsize

    @property
    def used_bytes(self) -> int:
        return 2 * self.num_layers * self.batch * self.kv * self.length * self.hd * self.dtype.itemsize

    def _ensure(self, batch: int, positions: int) -> None:
        batch, positions = max(batch, self.max_batch), min(self.max_len, max(positions, self.capacity))
        if batch == self.max_batch and positions == self.capacity:
            return
        keep = [np.array(v) for v in self.past()] if self.length else None
        n = batch * self.kv * positions * self.hd
        self._bufs = [[np.empty(n, self.dtype) for _ in self.past_names] for _ in range(2)]
        self.max_batch, self.capacity = batch, positions
        self.allocations += 1
        if keep is not None:
            for i, k in enumerate(keep):
                self._view(self._cur, i, k.shape[0], k.shape[2])[...] = k

    def _view(self, which: int, i: int, batch: int, length: int) -> np.ndarray:
        n = batch * self.kv * length * self.hd
        return self._bufs[which][i][:n].reshape(batch, self.kv, length, self.hd)

    def reserve(self, batch: int, positions: int) -> None:
        """As InplaceKVDecoder.reserve: before a request, the previous request's cache is dropped (not copied)."""
        self.length = 0
        if self.io_binding:
            self._ensure(batch, positions)

    def past(self) -> list[np.ndarray]:
        """The current cache as arrays [B, KV, len, HD] (views; copy to keep)."""
        if not self.io_binding:
            return self._plain_past
        return [self._view(self._cur, i, self.batch, self.length) for i in range(len(self.past_names))]

    def reset(self, batch: int) -> None:
        self.batch, self.length = batch, 0
        if self.io_binding:
            self._ensure(batch, self.capacity)
        else:
            self._plain_past = [np.zeros((batch, self.kv, 0, self.hd), self.dtype) for _ in self.past_names]

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        b, s, total = _check_step(self, inputs_embeds)
        mask = np.ones((b, total), np.int64)
        pos = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (b, s)).copy()
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self.dtype)
        self.peak_used_positions = max(self.peak_used_positions, total)
        if not self.io_binding:
            feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
            feed.update(zip(self.past_names, self._plain_past))
            out = self.session.run(None, feed)
            self._plain_past = out[1:]
            self.length = total
            return np.asarray(out[0], dtype=np.float32)
        if total > self.capacity:
            self._ensure(b, max(total, 2 * self.capacity))
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        logits = self._logits.view(b)
        io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        nxt = 1 - self._cur
        for i, (pn, qn) in enumerate(zip(self.past_names, self.present_names)):
            past = self._view(self._cur, i, b, self.length)
            io.bind_input(pn, "cpu", 0, self.dtype, past.shape, past.ctypes.data)
            present = self._view(nxt, i, b, total)
            io.bind_output(qn, "cpu", 0, self.dtype, present.shape, present.ctypes.data)
        self.session.run_with_iobinding(io)  # writes logits and present.* in place: nothing is copied back
        self._cur, self.length = nxt, total
        return logits.astype(np.float32)

    def reorder(self, beam_idx: np.ndarray) -> None:
        beam_idx = np.asarray(beam_idx, dtype=np.int64)
        new_b = int(beam_idx.shape[0])
        if not self.io_binding:
            self._plain_past = [np.ascontiguousarray(p[beam_idx]) for p in self._plain_past]
            self.batch = new_b
            return
        self._ensure(new_b, self.capacity)
        nxt = 1 - self._cur
        for i in range(len(self.past_names)):
            src = self._view(self._cur, i, self.batch, self.length)
            dst = self._view(nxt, i, new_b, self.length)
            np.take(src, beam_idx, axis=0, out=dst)
        self._cur, self.batch = nxt, new_b


def graph_dtype(session, name: str = "inputs_embeds", default=np.float32):
    """The numpy dtype a graph declares for a floating-point input (the decoder's activations and KV cache)."""
    for i in session.get_inputs():
        if i.name == name:
            return np.float16 if i.type == "tensor(float16)" else np.float32
    return default


def open_decoder(session, graph_entry: dict, model: dict, dtype, provider: str):
    """The KV decoder for a decoder graph's contract on a resolved ORT provider. `dtype` is a fallback: the graph's
    own inputs_embeds dtype decides (an fp32-activation int4 decoder can sit in an fp16 export)."""
    dtype = graph_dtype(session, default=dtype)
    args = (session, model["num_layers"], model["num_kv_heads"], model["head_dim"], model["max_position_embeddings"])
    if decoder_contract(graph_entry) == INPLACE:
        return InplaceKVDecoder(*args, dtype=dtype, device="cpu" if provider == "cpu" else "cuda")
    return ConcatKVDecoder(*args, dtype=dtype, io_binding=provider == "cpu")
