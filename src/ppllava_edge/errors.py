"""Exception hierarchy. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


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


class InferenceError(PPLLaVAEdgeError):
    """Running a graph failed, or its inputs do not match its contract."""
