"""File digests: the whole file (sha256_file, the export's and engines' records) and a constant-time sample of a
media file (file_digest, the feature cache key and the integrity spot check)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, window: int = 1 << 20) -> str:
    """Content fingerprint of a media file in O(1): size + the first and last MiB (+ the whole file when small).

    Hashing a multi-GB video on every question would cost seconds; the head holds the container header and the
    tail the index (mp4 moov / mkv cues), so an edited file changes the key.
    """
    h = hashlib.sha256()
    size = os.path.getsize(path)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= 3 * window:
            h.update(f.read())
        else:
            h.update(f.read(window))
            f.seek(size // 2)
            h.update(f.read(window))
            f.seek(size - window)
            h.update(f.read(window))
    return h.hexdigest()
