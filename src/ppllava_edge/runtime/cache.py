"""Per-video feature cache: the vision graph's `values`/`keys` keyed by (content, frames, export).

In memory: an LRU bounded in bytes. Optionally on disk: one .npz per key in a folder (written atomically).
A second question on the same video then runs only prompt_pool + decoder. Safe to share between threads (one
lock around the LRU and the counters); an entry may carry the warnings its decode produced (a truncated video),
so a cache hit reports them too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..digest import file_digest  # noqa: F401  (the feature cache key of a media file)

log = logging.getLogger(__name__)


def content_key(*parts: bytes | str | int) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


class FeatureCache:
    def __init__(self, max_bytes: int = 2 << 30, folder: str | Path | None = None):
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder else None
        self._items: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._warnings: dict[str, tuple[str, ...]] = {}
        self._lock = threading.RLock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        item = self.get_entry(key)
        return None if item is None else item[:2]

    def get_entry(self, key: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
        """(values, keys, warnings) for `key`, or None (counts a hit or a miss)."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return (*self._items[key], self._warnings.get(key, ()))
        path = self.folder / f"{key}.npz" if self.folder is not None else None
        if path is not None and path.is_file():
            with np.load(path) as z:
                item = (z["values"], z["keys"])
                warnings = tuple(str(w) for w in z["warnings"]) if "warnings" in z.files else ()
            with self._lock:
                self._put_memory(key, item, warnings)
                self.hits += 1
            return (*item, warnings)
        with self._lock:
            self.misses += 1
        return None

    def put(self, key: str, values: np.ndarray, keys: np.ndarray, warnings: tuple[str, ...] | list[str] = ()) -> None:
        warnings = tuple(warnings)
        with self._lock:
            self._put_memory(key, (values, keys), warnings)
        if self.folder is not None:
            # unique per process and thread: Triton's instances (separate processes) may share one cache folder
            tmp = self.folder / f".{key}.{os.getpid()}-{threading.get_ident()}.tmp.npz"
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                np.savez(tmp, values=values, keys=keys, warnings=np.asarray(warnings, dtype=np.str_))
                tmp.replace(self.folder / f"{key}.npz")
            except OSError as exc:  # a full or read-only cache folder: the answer goes on without the disk copy
                tmp.unlink(missing_ok=True)
                log.warning("%s: feature cache entry not written (%s)", self.folder, exc.strerror or exc)

    def _put_memory(self, key: str, item: tuple[np.ndarray, np.ndarray], warnings: tuple[str, ...]) -> None:
        size = item[0].nbytes + item[1].nbytes
        if size > self.max_bytes:
            return
        if key in self._items:
            old = self._items.pop(key)
            self.bytes -= old[0].nbytes + old[1].nbytes
        self._items[key] = item
        if warnings:
            self._warnings[key] = warnings
        else:
            self._warnings.pop(key, None)
        self.bytes += size
        while self.bytes > self.max_bytes:
            old_key, (v, k) = self._items.popitem(last=False)
            self._warnings.pop(old_key, None)
            self.bytes -= v.nbytes + k.nbytes

    def __len__(self) -> int:
        return len(self._items)
