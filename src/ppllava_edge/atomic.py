"""Atomic output folders: build beside the target, rename into place only on success."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError, disk_full_cause, disk_full_error


class AtomicDir:
    """Context manager yielding a temp dir beside `target`; on success it replaces `target`, on error it is removed.

    A non-empty existing `target` is refused unless `force` (so a finished output is never half-overwritten).
    """

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        self.force = force
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.target.exists() and (not self.target.is_dir() or any(self.target.iterdir())) and not self.force:
            raise InputError(f"{self.target} exists and is not empty.\nHint: pass --force to replace it, or choose another folder.")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            cause = disk_full_cause(exc)
            if cause is not None:  # one clear error naming the output instead of a bare OSError
                raise disk_full_error(cause, self.target, removed=True) from exc
            return
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, old / "x")
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)


class _Writes:
    """Only a `write` method: np.save then writes through Python's file object, whose errors carry the errno
    (ENOSPC, EFBIG); ndarray.tofile, which np.save uses on a real file, raises an OSError without one."""

    def __init__(self, f):
        self.write = f.write


def save_npy(path: str | Path, array) -> None:
    """np.save to `path`; a full disk raises an OSError with its errno (see _Writes)."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(_Writes(f), array)
