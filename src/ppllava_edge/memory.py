"""Peak memory and wall time of long steps: a background RSS sampler and a per-step recorder (psutil only).

    steps = StepRecorder()
    with steps.step("vision.onnx"):
        ...
    steps.as_dict()   # {"vision.onnx": {"seconds": 12.3, "peak_rss_mb": 812.0}, ...}

Used by the bench (peak RSS per variant), `export` and `quantize` (time and peak RSS per step, recorded in
export.json) and `ask --json` (peak RSS of the answer).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (the kernel's high-water mark), in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class MemorySampler:
    """Peak process RSS (psutil, sampled every `interval` s on a background thread) and, with `device_fn`, peak
    device memory in use. The thread holds the GIL for a few microseconds per sample."""

    def __init__(self, interval: float = 0.01, device_fn: Callable[[], int | None] | None = None):
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.device_fn = device_fn if device_fn is not None and device_fn() is not None else None
        self.device = self.device_fn is not None
        self.peak_rss = 0
        self.peak_device: int | None = None
        self.device_base: int | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def _sample(self) -> None:
        rss = self.rss()
        dev = self.device_fn() if self.device_fn is not None else None
        with self._lock:
            self.peak_rss = max(self.peak_rss, rss)
            if dev is not None:
                self.peak_device = dev if self.peak_device is None else max(self.peak_device, dev)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> MemorySampler:
        self.reset()
        self._thread.start()
        return self

    def reset(self) -> int:
        """Start a new peak; returns the current RSS."""
        rss = self.rss()
        with self._lock:
            self.peak_rss = rss
            self.device_base = self.device_fn() if self.device_fn is not None else None
            self.peak_device = self.device_base
        return rss

    def peaks(self) -> tuple[int, int | None]:
        self._sample()
        with self._lock:
            return self.peak_rss, self.peak_device

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> MemorySampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (None where there is no glibc: macOS, musl)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc keeps freed blocks of 1-32 MB, e.g. one layer's matrices,
    in its arenas); a no-op without glibc. A step that loaded a graph or a layer and dropped it otherwise leaves its
    memory in the process, counted in every later step's RSS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class StepRecorder:
    """Wall time and peak RSS of each named step; one sampler thread for the recorder's lifetime."""

    def __init__(self, interval: float = 0.02):
        self.sampler = MemorySampler(interval).start()
        self.steps: dict[str, dict] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.sampler.reset()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            peak, _ = self.sampler.peaks()
            trim_heap()
            entry = self.steps.setdefault(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - t0, 3)
            entry["peak_rss_mb"] = round(max(entry["peak_rss_mb"], peak / 2**20), 1)

    @property
    def peak_rss_mb(self) -> float:
        return max((s["peak_rss_mb"] for s in self.steps.values()), default=0.0)

    def as_dict(self) -> dict[str, dict]:
        return {k: dict(v) for k, v in self.steps.items()}

    def close(self) -> None:
        self.sampler.stop()
