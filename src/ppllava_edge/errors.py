"""Exception hierarchy. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

import errno
import os


class PPLLaVAEdgeError(Exception):
    """Base class of every error this package raises on purpose."""


class MissingDependencyError(PPLLaVAEdgeError, ImportError):
    """An optional dependency (an extra) is not installed."""


class ConfigError(PPLLaVAEdgeError, ValueError):
    """A config.json / manifest / option value is invalid."""


class CheckpointError(PPLLaVAEdgeError):
    """A checkpoint folder is missing files or tensors, or has unexpected ones."""


class InputError(PPLLaVAEdgeError, ValueError):
    """A user input (frames, question, array) is invalid."""


class VideoError(InputError):
    """A video or image file cannot be read or has no usable frames."""


class ContextLengthError(InputError):
    """The prompt (text + visual tokens) plus the new tokens asked for do not fit the LLM context."""

    def __init__(self, message: str, prompt_too_long: bool = False):
        super().__init__(message)
        self.prompt_too_long = prompt_too_long  # the prompt alone leaves no room for one new token


class TokenizerError(PPLLaVAEdgeError):
    """Tokenizer files are missing or malformed."""


class ExportError(PPLLaVAEdgeError):
    """ONNX export failed."""


class AccuracyError(PPLLaVAEdgeError):
    """A parity / accuracy check failed."""


class CalibrationError(PPLLaVAEdgeError):
    """Calibration inputs are invalid."""


class EngineBuildError(PPLLaVAEdgeError):
    """A TensorRT engine could not be built or loaded."""


class DiskFullError(PPLLaVAEdgeError):
    """Writing an output failed for lack of space (ENOSPC, a quota, a file-size limit)."""


class InferenceError(PPLLaVAEdgeError):
    """Running a graph failed, or its inputs do not match its contract."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full_cause(exc: BaseException | None) -> OSError | None:
    """The OSError for a full disk (or quota / file-size limit) in `exc` or the chain of exceptions that caused it
    (an export stage wraps it in an ExportError), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def disk_full_error(cause: OSError, target=None, removed: bool = False) -> DiskFullError:
    """A DiskFullError naming what was being written (`target`, else the OSError's file) and the file system to free."""
    where = str(target) if target is not None else (cause.filename or None)
    what = f"{where}: " if where else ""
    folder = os.path.dirname(os.path.abspath(where)) if where else "."
    return DiskFullError(f"{what}{os.strerror(cause.errno).lower()} while writing" + ("; the partial output was removed" if removed else "")
                         + f".\nHint: free space on that file system (df -h {folder}) or write somewhere else.")
