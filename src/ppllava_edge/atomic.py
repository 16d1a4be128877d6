"""Atomic output folders: build beside the target, rename into place only on success.

The temp folder is `.OUT.tmp-HOST-PID-XXXXXXXX` (and `.OUT.old-…` while a --force replaces OUT). A run killed
with SIGKILL (or a power cut) cannot remove its own; the next run writing the same OUT removes those of this host
whose process is gone (a warning names each), and leaves those of live processes and of other hosts (a shared
folder) alone. Folders without a pid (older versions) are only named in a warning, with the command to remove them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
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
        remove_stale(self.target)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-{_tag()}-", dir=self.target.parent))
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
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-{_tag()}-", dir=self.target.parent))
            os.replace(self.target, old / "x")
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)


log = logging.getLogger(__name__)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def _tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the temp folders of `target` left by dead processes of this host (see the module docstring);
    returns them."""
    target = Path(target)
    ours = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-{re.escape(_host())}-(\d+)-[A-Za-z0-9_]{{8}}$")
    legacy = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-[A-Za-z0-9_]{{8}}$")
    removed, unknown = [], []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = ours.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, the temp folder of process %s, which is gone (killed before it could clean up)", p, m.group(1))
            removed.append(p)
        elif legacy.match(p.name) and p.is_dir():
            unknown.append(p)
    if unknown:
        log.warning("%d temp folder(s) of an older ppllava-edge run beside %s (no pid to tell whether it still runs): %s. "
                    "If no ppllava-edge command is writing %s, remove them: rm -rf %s", len(unknown), target, ", ".join(map(str, unknown)),
                    target.name, " ".join(map(str, unknown)))
    return removed


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
