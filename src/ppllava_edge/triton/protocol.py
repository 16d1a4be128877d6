"""The `ppllava` Triton model's contract: its tensors, how a request's inputs become runtime options, its stats.

The repository writer puts `INPUTS` / `OUTPUTS` into `config.pbtxt`, the Python model reads requests with
`parse_request`, and the client builds its tensors from the same specs, so the three cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..runtime.generation import GenerationConfig

MODEL_NAME = "ppllava"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # the model-config enum, e.g. "TYPE_STRING"
    dims: tuple[int, ...]
    optional: bool = False


INPUTS = (
    TensorSpec("video", "TYPE_STRING", (1,), optional=True),  # the video file's bytes (any container FFmpeg reads), or:
    TensorSpec("images", "TYPE_STRING", (-1,), optional=True),  # image files' bytes: one question about all of them
    TensorSpec("question", "TYPE_STRING", (1,)),  # UTF-8
    TensorSpec("max_tokens", "TYPE_INT32", (1,), optional=True),  # default: the repository's --max-tokens
    TensorSpec("frames", "TYPE_INT32", (1,), optional=True),  # default: the repository's --frames
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),  # > 0: sample at that temperature; absent or 0: greedy
    TensorSpec("seed", "TYPE_INT64", (1,), optional=True),  # seed of the sampler
)
OUTPUTS = (
    TensorSpec("text", "TYPE_STRING", (1,)),  # a text delta; every response has one, the deltas joined are the answer
    TensorSpec("stats", "TYPE_STRING", (1,)),  # JSON, in the final response only (see `answer_stats`)
)
# model-config type -> (tritonclient datatype, numpy dtype)
WIRE_TYPES = {
    "TYPE_STRING": ("BYTES", np.object_),
    "TYPE_INT32": ("INT32", np.int32),
    "TYPE_INT64": ("INT64", np.int64),
    "TYPE_FP32": ("FP32", np.float32),
}


@dataclass(frozen=True)
class RequestOptions:
    video: bytes  # b"" when the request sent `images`
    question: str
    max_tokens: int
    frames: int
    temperature: float | None = None
    seed: int | None = None
    images: tuple[bytes, ...] = ()  # several images: one question about all of them (the authors' multi-image path)

    def generation(self) -> GenerationConfig:
        """Greedy unless a temperature > 0 was sent (then sampling, as `ask --sample --temperature T --seed S`)."""
        sample = self.temperature is not None and self.temperature > 0
        return GenerationConfig(max_new_tokens=self.max_tokens, do_sample=sample, temperature=self.temperature if sample else 1.0, seed=self.seed)


def _scalar(get: Callable[[str], np.ndarray | None], name: str):
    arr = get(name)
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.size != 1:
        raise InputError(f"the '{name}' input must hold exactly one element, got shape {list(arr.shape)}")
    return arr.reshape(-1)[0]


def parse_request(get: Callable[[str], np.ndarray | None], default_frames: int, default_max_tokens: int) -> RequestOptions:
    """Check a request's inputs (`get(name)` returns the tensor as numpy, or None when it was not sent).

    Raises:
        InputError: naming the input and the rule it breaks.
    """
    video, images = _scalar(get, "video"), _images(get)
    if images and video is not None:
        raise InputError("send either the 'video' input or the 'images' input, not both (a video goes alone)")
    if images:
        video = b""
    elif video is None or len(video) == 0:
        raise InputError("the 'video' input is empty: send the video file's bytes (or image files' bytes as 'images')")
    raw_question = _scalar(get, "question")
    if raw_question is None:
        raise InputError("the 'question' input is missing")
    try:
        question = bytes(raw_question).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"the 'question' input is not UTF-8 text ({exc})") from None
    if not question.strip():
        raise InputError("the 'question' input is empty")
    max_tokens, frames = _scalar(get, "max_tokens"), _scalar(get, "frames")
    max_tokens = default_max_tokens if max_tokens is None else int(max_tokens)
    frames = default_frames if frames is None else int(frames)
    if max_tokens < 1:
        raise InputError(f"the 'max_tokens' input must be >= 1, got {max_tokens}")
    temperature = _scalar(get, "temperature")
    if temperature is not None:
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise InputError(f"the 'temperature' input must be a finite number >= 0 (0: greedy), got {temperature}")
    seed = _scalar(get, "seed")
    if seed is not None:
        seed = int(seed)
        if seed < 0:
            raise InputError(f"the 'seed' input must be >= 0, got {seed}")
    return RequestOptions(bytes(video), question, max_tokens, frames, temperature, seed, images)


def _images(get: Callable[[str], np.ndarray | None]) -> tuple[bytes, ...]:
    """The 'images' input: each element one image file's bytes (their number is checked by the runtime's rules)."""
    arr = get("images")
    if arr is None:
        return ()
    images = tuple(bytes(x) for x in np.asarray(arr).reshape(-1))
    empty = [i for i, x in enumerate(images) if not x]
    if not images or empty:
        raise InputError(f"the 'images' input holds no image or an empty one (element {empty[0] if empty else 0}): send each image file's bytes")
    return images


def answer_stats(result, provider: str, instance: str, load_ms: float, peak_rss_mb: float) -> dict:
    """The final response's `stats` (an `AskResult` of the runtime): what `ask --json` prints, plus the timing line;
    `load_ms` is the time the instance took to open the export, `peak_rss_mb` the instance's peak RSS."""
    return {
        "text": result.text,
        "ids": [int(i) for i in result.ids],
        "visual_tokens": int(result.visual_tokens),
        "context_len": int(result.context_len),
        "provider": provider,
        "instance": instance,
        "timings_ms": result.timings.as_dict(),
        "timing_line": result.timings.line(),
        "load_ms": load_ms,
        "peak_rss_mb": peak_rss_mb,
        "warnings": list(result.warnings),
    }
