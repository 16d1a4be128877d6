"""The KV-cache decoder over `decoder.onnx` (one graph: prefill = empty past).

On the CPU provider the cache lives in two preallocated flat buffers per tensor (past / present) sized for the
context, bound with IO binding: ONNX Runtime writes `present.*` straight into the other buffer and the two swap
roles each step, so decoding does not allocate per step. Other providers use plain `run()`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InferenceError


class OrtKVDecoder:
    """Implements runtime.generation.KVDecoder over an onnxruntime session of decoder.onnx."""

    def __init__(self, session, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype=np.float32, io_binding: bool = True):
        self.session = session
        self.num_layers, self.kv, self.hd = num_layers, num_kv_heads, head_dim
        self.max_len = max_len
        self.dtype = np.dtype(dtype)
        self.io_binding = io_binding
        self.past_names = [f"past.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
        self.present_names = [n.replace("past", "present") for n in self.past_names]
        self.batch = 0
        self.length = 0
        self._capacity = 0
        self._bufs: list[list[np.ndarray]] = [[], []]  # two sets of flat buffers
        self._cur = 0
        self._plain_past: list[np.ndarray] = []
        self._logits: np.ndarray | None = None
        self.allocations = 0  # buffer (re)allocations, for tests and the bench

    # -- buffers ------------------------------------------------------------------------------
    def _ensure(self, batch: int) -> None:
        if batch <= self._capacity:
            return
        n = batch * self.kv * self.max_len * self.hd
        self._bufs = [[np.empty(n, self.dtype) for _ in self.past_names] for _ in range(2)]
        self._capacity = batch
        self.allocations += 1

    def _view(self, which: int, i: int, batch: int, length: int) -> np.ndarray:
        n = batch * self.kv * length * self.hd
        return self._bufs[which][i][:n].reshape(batch, self.kv, length, self.hd)

    def _logits_buffer(self, batch: int) -> np.ndarray:
        if self._logits is None or self._logits.shape[0] < batch:
            out = self.session.get_outputs()[0]
            dtype = np.float16 if out.type == "tensor(float16)" else np.float32
            self._logits = np.empty((max(batch, self._capacity), int(out.shape[-1])), dtype)
        return self._logits[:batch]

    def past(self) -> list[np.ndarray]:
        """The current cache as arrays [B, KV, len, HD] (views; copy to keep)."""
        if not self.io_binding:
            return self._plain_past
        return [self._view(self._cur, i, self.batch, self.length) for i in range(len(self.past_names))]

    # -- KVDecoder protocol ---------------------------------------------------------------------
    def reset(self, batch: int) -> None:
        self.batch, self.length = batch, 0
        if self.io_binding:
            self._ensure(batch)
        else:
            self._plain_past = [np.zeros((batch, self.kv, 0, self.hd), self.dtype) for _ in self.past_names]

    def forward(self, inputs_embeds: np.ndarray) -> np.ndarray:
        b, s, _ = inputs_embeds.shape
        if b != self.batch:
            raise InferenceError(f"decoder: inputs_embeds batch {b} != cache batch {self.batch}")
        total = self.length + s
        if total > self.max_len:
            raise InferenceError(f"decoder: {total} positions exceed the context of {self.max_len}")
        mask = np.ones((b, total), np.int64)
        pos = np.broadcast_to(np.arange(self.length, total, dtype=np.int64), (b, s)).copy()
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self.dtype)
        if not self.io_binding:
            feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": pos}
            feed.update(zip(self.past_names, self._plain_past))
            out = self.session.run(None, feed)
            self._plain_past = out[1:]
            self.length = total
            return np.asarray(out[0], dtype=np.float32)
        io = self.session.io_binding()
        io.bind_cpu_input("inputs_embeds", embeds)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        logits = self._logits_buffer(b)
        io.bind_output("logits", "cpu", 0, logits.dtype, logits.shape, logits.ctypes.data)
        nxt = 1 - self._cur
        for i, (pn, qn) in enumerate(zip(self.past_names, self.present_names)):
            past = self._view(self._cur, i, b, self.length)
            io.bind_input(pn, "cpu", 0, self.dtype, past.shape, past.ctypes.data)
            present = self._view(nxt, i, b, total)
            io.bind_output(qn, "cpu", 0, self.dtype, present.shape, present.ctypes.data)
        self.session.run_with_iobinding(io)  # writes logits and present.* in place: nothing is copied back
        self._cur, self.length = nxt, total
        return logits.astype(np.float32)  # a copy: the buffer is reused next step

    def reorder(self, beam_idx: np.ndarray) -> None:
        beam_idx = np.asarray(beam_idx, dtype=np.int64)
        new_b = int(beam_idx.shape[0])
        if not self.io_binding:
            self._plain_past = [np.ascontiguousarray(p[beam_idx]) for p in self._plain_past]
            self.batch = new_b
            return
        old = [np.array(v) if new_b > self._capacity else v for v in self.past()]
        if new_b > self._capacity:
            self._ensure(new_b)
            src_set = None
        else:
            src_set = self._cur
        nxt = 1 - self._cur if src_set is not None else self._cur
        for i in range(len(self.past_names)):
            src = old[i] if src_set is None else self._view(src_set, i, self.batch, self.length)
            dst = self._view(nxt, i, new_b, self.length)
            np.take(src, beam_idx, axis=0, out=dst)
        self._cur, self.batch = nxt, new_b
