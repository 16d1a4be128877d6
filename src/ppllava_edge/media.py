"""Reading videos and images, frame sampling and CLIP pixel preprocessing (no torch).

Used by both the PyTorch reference and the torch-free runtime, so it imports only the standard
library, numpy and Pillow at module top; PyAV (`av`) is imported inside the functions that need it.

Sampling and preprocessing follow the authors' inference code (see ppllava-model.md §2):
segment-centre frame indices, each frame squashed to S×S with bicubic resampling (no aspect ratio,
no crop), then `x/255` and CLIP mean/std normalisation, giving float32 `[T, 3, S, S]`.

Images take LLaVA-NeXT's anyres path instead (`read_image`, `preprocess_image`, `load_image_tiles`): the
tiles of transformers 4.45.2's `LlavaNextImageProcessor`, the authors' pinned version (geometry in anyres.py), `[tiles, 3, S, S]`.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ._deps import require
from .anyres import Size, fitted_size, select_best_resolution
from .errors import InputError, VideoError

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
"""Suffixes `input_kind` treats as still images. `.gif` is not one: PyAV reads it as a video."""

MediaKind = Literal["video", "image", "npy"]
DecodeStrategy = Literal["auto", "sequential", "seek"]

# Decode-strategy rule for strategy="auto" (see `_choose_strategy`). Cost is counted in
# decoded-frame units. Measured here (2 CPUs, av 18.1.0, libx264 640x360 30 fps, thread_type AUTO):
#   - decoding one frame: 0.33-0.55 ms; converting a kept frame to RGB: 0.5-0.8 ms;
#   - demuxing one packet without decoding: 0.004-0.007 ms (~0.01 frame), e.g. 12 ms for 1800 frames;
#   - one seek (seek, decoder flush, restart at the keyframe): 3-7 ms including the first frame,
#     ~7-12 frames, of which ~2 are frames the pipeline decodes anyway -> SEEK_COST_FRAMES = 8.
# Seek is chosen only when its estimate is below SEEK_MIN_GAIN x sequential, because it needs a
# second open and falls back to a full sequential pass if timestamps do not line up.
# Clips of at most SEQUENTIAL_MAX_FRAMES frames (whose count the header gives) go straight to
# sequential decoding without reading the packet index: with the usual GOPs (libx264 default 250)
# such clips have 1-2 keyframes and seeking cannot win. On the toolchain notes' 300-frame clip
# (GOP 250, 32 samples) the notes measured 96 ms sequential vs 231 ms naive per-target seeking;
# the GOP-aware seek here needs only 2 seeks (125 ms vs 156 ms sequential in the same run, i.e.
# noise-level), and "auto" keeps sequential there.
SEEK_COST_FRAMES = 8
SEEK_MIN_GAIN = 0.9
SEQUENTIAL_MAX_FRAMES = 256

VIDEO_DECODE_PIXELS = 4096 * 2304
"""Largest video frame, width x height, that `load_video` decodes by default (9.4 MP: every 4K format, 3840x2160
and 4096x2160, fits). A larger video is refused with a VideoError from its header, before any frame is decoded, and a
stream whose decoded frames turn out larger is refused at the first such frame: decoding cost grows with the source
resolution while the model sees every frame at 336x336 (an 8192x8192 MJPEG clip took +2.8 GB and 80 s for 8 frames)."""

_MARKER = 16  # side of each corner block that carries the frame index in `write_test_video`
_MARKER_BASE = 16
_MARKER_DIGITS = 3  # indices up to 16**3 - 1 = 4095 are encoded exactly


# --------------------------------------------------------------------------------------------
# Frame sampling


def _positive_int(name: str, value: Any) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be a positive integer, got {value!r}") from None
    if v < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return v


def segment_centre_indices(num_total: int, num_frames: int) -> list[int]:
    """Frame indices at segment centres, the authors' eval/demo rule (ppllava-model.md §2.1).

    With `max_frame = num_total - 1` and `seg = max_frame / num_frames`, index k is
    `int(seg / 2 + round(seg * k))` for k = 0..num_frames-1. `round` is Python's (banker's
    rounding), exactly as in the authors' code, so results match theirs bit for bit.

    Short clips: when `num_total < num_frames` the formula repeats frames (e.g. 3 frames, N = 8 →
    [0, 0, 0, 1, 1, 1, 2, 2]), so T always equals `num_frames`. We ship this behaviour on purpose:
    the model needs a fixed, even T. A one-frame clip gives `num_frames` copies of frame 0.
    Because the step is `(num_total - 1) / N`, not `num_total / N`, clips with only slightly more
    frames than N also repeat one frame and skip others (48 frames, N = 48 → frame 24 twice,
    frame 47 never). That too is the authors' behaviour and is kept.

    Args:
        num_total: number of frames in the clip (>= 1).
        num_frames: number of frames to sample, N (>= 1).

    Returns:
        `num_frames` non-decreasing indices, each in [0, num_total - 1].

    Raises:
        VideoError: `num_total < 1` (the clip has no frames).
        InputError: `num_frames < 1`.
    """
    num_frames = _positive_int("num_frames", num_frames)
    if num_total < 1:
        raise VideoError(f"Cannot sample {num_frames} frames from a clip with {num_total} frames")
    max_frame = num_total - 1
    seg = max_frame / num_frames
    return [int(seg / 2 + round(seg * k)) for k in range(num_frames)]


# --------------------------------------------------------------------------------------------
# Video decoding


@dataclass
class VideoFrames:
    """Frames sampled from a video.

    Attributes:
        frames: uint8 `[T, H, W, 3]` RGB, one row per entry of `indices`.
        indices: the sampled frame indices (may repeat for clips shorter than T).
        num_total: number of frames in the clip that `indices` were computed from.
        fps: average frame rate from the container, or None when unknown.
        path: the file read.
        strategy: how the frames were decoded, "sequential" or "seek".
        warnings: what a user should know about the answer, e.g. a truncated or partly corrupt file that still
            gave frames (each names the file and how many frames decoded).
    """

    frames: np.ndarray
    indices: list[int]
    num_total: int
    fps: float | None
    path: str
    strategy: str = field(default="sequential", compare=False)
    warnings: list[str] = field(default_factory=list, compare=False)


@dataclass(frozen=True)
class _PacketIndex:
    """The video packets of a file: how many, their presentation timestamps (sorted), keyframes."""

    count: int
    pts: list[int]  # sorted; pts[k] is the presentation timestamp of frame k
    keyframes: list[int]  # sorted frame positions k that start a decodable GOP


class _NeedSequential(Exception):
    """Internal: the seek path cannot guarantee the same frames as sequential decoding."""


def _av() -> ModuleType:
    return require("av", "video", "Reading video files")


def _open_container(av: Any, path: str) -> Any:
    """av.open with every failure mapped to a VideoError naming the file."""
    try:
        return av.open(path, mode="r", metadata_errors="ignore")
    except av.error.FileNotFoundError as exc:
        raise VideoError(f"Video file not found: {path}") from exc
    except av.error.IsADirectoryError as exc:
        raise VideoError(f"Video path is a directory, not a file: {path}") from exc
    except av.error.PermissionError as exc:
        raise VideoError(f"Video file is not readable (permission denied): {path}") from exc
    except av.error.InvalidDataError as exc:
        size = _file_size(path)
        what = "is empty (0 bytes)" if size == 0 else "is corrupt or not a media file"
        raise VideoError(f"Cannot open video {path}: the file {what}\nNote: {exc}") from exc
    except av.error.EOFError as exc:
        raise VideoError(f"Cannot open video {path}: the file ends before any media data (truncated?)") from exc
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(f"Cannot open video {path}: {exc}") from exc


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _video_stream(container: Any, path: str) -> Any:
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(
            f"No video stream in {path} (streams found: {', '.join(kinds)})"
            + ("\nHint: this looks like an audio-only file" if kinds == ["audio"] else "")
        )
    stream = container.streams.video[0]
    cc = stream.codec_context
    if cc is None or getattr(cc, "codec", None) is None:
        raise VideoError(f"Unsupported video codec in {path}: no decoder in this FFmpeg build")
    stream.thread_type = "AUTO"
    return stream


def _decode_error(path: str, codec: str, position: int, exc: BaseException) -> VideoError:
    return VideoError(
        f"Decoding video {path} failed after {position} frames (codec {codec}): {exc}"
        if position
        else f"Cannot decode video {path} (codec {codec}): {exc}"
    )


def _codec_name(stream: Any) -> str:
    try:
        return str(stream.codec_context.name)
    except Exception:  # noqa: BLE001 - only used in error messages
        return "unknown"


def _fps(stream: Any) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _av_errors() -> tuple[type[BaseException], ...]:
    """Exception types PyAV raises while reading (for `except`)."""
    av = _av()
    return (av.FFmpegError, OSError, ValueError, EOFError)


def _demux_index(container: Any, stream: Any, path: str) -> _PacketIndex:
    """Read every packet of `stream` without decoding: count, sorted pts and keyframe positions.

    Flush (empty) packets and packets the demuxer marks for discard (edit-list pre-roll) are
    skipped. When some packet has no pts, `pts` and `keyframes` are left empty (no seeking).
    """
    entries: list[tuple[int | None, bool]] = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:
                continue
            entries.append((packet.pts, bool(packet.is_keyframe)))
    except _av_errors() as exc:
        raise VideoError(f"Cannot read the packets of video {path}: {exc}") from exc
    if any(p is None for p, _ in entries):
        return _PacketIndex(count=len(entries), pts=[], keyframes=[])
    entries.sort(key=lambda e: e[0])  # type: ignore[arg-type, return-value]
    pts = [p for p, _ in entries]
    keyframes = [k for k, (_, key) in enumerate(entries) if key]
    return _PacketIndex(count=len(entries), pts=pts, keyframes=keyframes)  # type: ignore[arg-type]


def _check_pixels(width: int, height: int, path: str, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoError(
            f"{path}: the video's frames are {width}x{height} ({width * height / 1e6:.1f} MP), over the decode limit of "
            f"{max_pixels / 1e6:.1f} MP a frame (3840x2160 fits).\nHint: downscale it first, e.g. "
            "ffmpeg -i IN -vf scale=1920:-2 OUT.mp4"
        )


def _to_rgb(frame: Any, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", width=size[0], height=size[1])


def _decode_sequential(
    container: Any, stream: Any, wanted: list[int], path: str, max_pixels: int = VIDEO_DECODE_PIXELS
) -> tuple[dict[int, np.ndarray], int, BaseException | None]:
    """Decode from the start, keep the frames at `wanted` (sorted, unique), stop after the last.

    Returns the kept frames, the number of frames decoded (== last + 1 unless the stream ended early) and the
    decoding error that ended the stream early, if any. An error before the first frame raises VideoError; an
    error after some frames (a truncated or partly corrupt file) ends the stream there instead.
    """
    wanted_set = set(wanted)
    last = wanted[-1]
    got: dict[int, np.ndarray] = {}
    size: tuple[int, int] | None = None
    i = -1
    try:
        for frame in container.decode(stream):
            i += 1
            _check_pixels(frame.width, frame.height, path, max_pixels)
            if i in wanted_set:
                if size is None:
                    size = (frame.width, frame.height)
                got[i] = _to_rgb(frame, size)
            if i >= last:
                break
    except _av_errors() as exc:
        if i < 0:
            raise _decode_error(path, _codec_name(stream), 0, exc) from exc
        return got, i + 1, exc
    return got, i + 1, None


def _decode_seek(
    container: Any, stream: Any, wanted: list[int], index: _PacketIndex, path: str, max_pixels: int = VIDEO_DECODE_PIXELS
) -> dict[int, np.ndarray]:
    """Decode only the GOPs that hold `wanted` frames: seek to a target's keyframe unless the
    decoder is already inside that GOP, then decode forward to the target's pts.

    Raises _NeedSequential when a decoded pts does not match the packet index.
    """
    got: dict[int, np.ndarray] = {}
    size: tuple[int, int] | None = None
    frames_iter = None
    pos = -1  # index of the last frame handed out by the decoder, in the current run
    try:
        for t in wanted:
            target = index.pts[t]
            k = bisect.bisect_right(index.keyframes, t) - 1
            if k < 0:
                raise _NeedSequential(f"no keyframe at or before frame {t}")
            kf = index.keyframes[k]
            if frames_iter is None or kf > pos:
                container.seek(index.pts[kf], stream=stream, backward=True, any_frame=False)
                frames_iter = container.decode(stream)
                pos = -1
            for frame in frames_iter:
                _check_pixels(frame.width, frame.height, path, max_pixels)
                if frame.pts is None:
                    raise _NeedSequential("decoded frame without pts")
                if frame.pts < target:
                    pos = max(pos, bisect.bisect_left(index.pts, frame.pts))
                    continue
                if frame.pts != target:
                    raise _NeedSequential(f"expected pts {target} for frame {t}, decoder gave {frame.pts}")
                if size is None:
                    size = (frame.width, frame.height)
                got[t] = _to_rgb(frame, size)
                pos = t
                break
            else:
                raise _NeedSequential(f"stream ended before frame {t}")
    except _av_errors() as exc:
        raise _NeedSequential(f"decoding error: {exc}") from exc
    return got


def _seek_cost(wanted: list[int], keyframes: list[int]) -> tuple[int, int]:
    """(frames decoded, seeks) for `_decode_seek` on `wanted`, given keyframe positions."""
    decoded = seeks = 0
    pos = -1
    for t in wanted:
        kf = keyframes[max(bisect.bisect_right(keyframes, t) - 1, 0)]
        if pos < 0 or kf > pos:
            seeks += 1
            decoded += t - kf + 1
        else:
            decoded += t - pos
        pos = t
    return decoded, seeks


def _choose_strategy(wanted: list[int], index: _PacketIndex) -> str:
    """Seek when the GOP-aware seek plan decodes clearly fewer frames than sequential decoding.

    Cost, in decoded-frame units: sequential = last wanted index + 1; seek = frames decoded from
    each needed keyframe to its target(s) + SEEK_COST_FRAMES per seek.
    """
    if not index.pts or not index.keyframes or index.keyframes[0] != 0:
        return "sequential"
    decoded, seeks = _seek_cost(wanted, index.keyframes)
    seq = wanted[-1] + 1
    return "seek" if decoded + SEEK_COST_FRAMES * seeks < SEEK_MIN_GAIN * seq else "sequential"


def load_video(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    strategy: DecodeStrategy = "auto",
    max_pixels: int = VIDEO_DECODE_PIXELS,
) -> VideoFrames:
    """Decode `num_frames` frames at segment centres (`segment_centre_indices`) with PyAV.

    The frame count is `stream.frames` from the container, or the number of video packets when
    the container does not record it. If the stream ends before the last sampled frame (the header
    over-counted, or the file is truncated), indices are recomputed from the frames actually decoded and
    `warnings` says so; a decoding error after some frames (a partly corrupt file) is treated the same way.

    Decoding: "sequential" decodes from the first frame up to the last sampled one. "seek" demuxes
    the packet index, then decodes only the GOPs that hold sampled frames (seeking to a GOP's
    keyframe unless already inside it). "auto" decodes sequentially when the header gives at most
    SEQUENTIAL_MAX_FRAMES frames; otherwise it reads the packet index (~1 % of the cost of
    decoding) and picks the cheaper plan by the decoded-frame cost model in `_choose_strategy`
    (seek when frames-decoded + SEEK_COST_FRAMES per seek < SEEK_MIN_GAIN x frames up to the last
    sample). All strategies return the same frames; seek falls back to sequential when timestamps
    are missing or do not match.

    Args:
        path: video file (anything FFmpeg demuxes: mp4, mkv, webm, avi, mov, gif, ...).
        num_frames: frames to sample, T.
        strategy: "auto", "sequential" or "seek" (the last two force a path; for tests and benchmarks).
        max_pixels: largest frame (width x height) decoded; see VIDEO_DECODE_PIXELS.

    Returns:
        VideoFrames with uint8 RGB frames `[T, H, W, 3]` (all frames at the first decoded frame's size).

    Raises:
        VideoError: missing, unreadable, empty or corrupt file; no video stream; no decodable frames;
            unsupported codec; frames over `max_pixels`. The message names the file.
        InputError: bad `num_frames` or `strategy`.
    """
    if strategy not in ("auto", "sequential", "seek"):
        raise InputError(f"strategy must be 'auto', 'sequential' or 'seek', got {strategy!r}")
    num_frames = _positive_int("num_frames", num_frames)
    av = _av()
    spath = os.fspath(path)
    if not os.path.exists(spath):
        raise VideoError(f"Video file not found: {spath}")
    if os.path.isfile(spath) and _file_size(spath) == 0:
        raise VideoError(f"Cannot open video {spath}: the file is empty (0 bytes)")

    with _open_container(av, spath) as container:
        stream = _video_stream(container, spath)
        _check_pixels(stream.codec_context.width or 0, stream.codec_context.height or 0, spath, max_pixels)  # from the header
        fps = _fps(stream)
        header_total = int(stream.frames or 0)
        index: _PacketIndex | None = None
        if header_total > 0:
            num_total = header_total
        else:  # the container does not record a frame count (mkv, webm, some avi): demux to count
            index = _demux_index(container, stream, spath)
            num_total = index.count
    if num_total < 1:
        raise VideoError(f"No decodable frames in video {spath} (the video stream has no packets)")

    indices = segment_centre_indices(num_total, num_frames)
    wanted = sorted(set(indices))

    chosen = strategy
    if strategy == "seek" or (strategy == "auto" and (index is not None or num_total > SEQUENTIAL_MAX_FRAMES)):
        if index is None:
            with _open_container(av, spath) as container:
                index = _demux_index(container, _video_stream(container, spath), spath)
        if len(index.pts) != num_total:
            chosen = "sequential"  # header count and packet count disagree: trust the decoder
            if strategy == "seek":
                log.warning("%s: %d frames in header but %d packets; decoding sequentially",
                            spath, num_total, len(index.pts))
        elif strategy == "auto":
            chosen = _choose_strategy(wanted, index)
        elif not index.keyframes or index.keyframes[0] != 0:
            chosen = "sequential"
    else:
        chosen = "sequential"

    got: dict[int, np.ndarray] | None = None
    if chosen == "seek":
        assert index is not None
        with _open_container(av, spath) as container:
            try:
                got = _decode_seek(container, _video_stream(container, spath), wanted, index, spath, max_pixels)
            except _NeedSequential as why:
                log.warning("%s: seek decoding not exact (%s); decoding sequentially", spath, why)
                got, chosen = None, "sequential"

    warnings: list[str] = []
    if got is None:
        with _open_container(av, spath) as container:
            stream = _video_stream(container, spath)
            codec = _codec_name(stream)
            got, decoded, error = _decode_sequential(container, stream, wanted, spath, max_pixels)
        if decoded < 1:
            raise VideoError(
                f"No decodable frames in video {spath} (codec {codec}, {num_total} frames announced)"
            )
        if len(got) < len(wanted):
            # The stream ended early (truncated file, or a decoding error part way): answer from the frames that
            # really decode (second pass), and say so.
            why = f"decoding stopped with an error ({error})" if error is not None else "the stream ended early"
            warnings.append(
                f"{spath}: truncated or partly corrupt video: only {decoded} of {num_total} announced frames "
                f"decoded ({why}); the {num_frames} frames were sampled from those {decoded}"
            )
            log.info("%s", warnings[-1])  # callers surface `warnings` themselves (CLI stderr, JSON)
            num_total = decoded
            indices = segment_centre_indices(num_total, num_frames)
            wanted = sorted(set(indices))
            with _open_container(av, spath) as container:
                got, _, _ = _decode_sequential(container, _video_stream(container, spath), wanted, spath, max_pixels)
            if len(got) < len(wanted):
                raise VideoError(f"Video {spath} decodes inconsistently ({decoded} frames, then fewer)")

    frames = np.stack([got[i] for i in indices])
    return VideoFrames(frames=frames, indices=indices, num_total=num_total, fps=fps, path=spath, strategy=chosen, warnings=warnings)


# --------------------------------------------------------------------------------------------
# Images, preprocessing, dispatch


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as uint8 RGB `[H, W, 3]` (Pillow, `convert("RGB")`, as the authors do).

    EXIF orientation is not applied and alpha is dropped, matching `Image.open(p).convert("RGB")`.

    Raises:
        VideoError: missing, unreadable or non-image file (the message names the file).
    """
    spath = os.fspath(path)
    if not os.path.exists(spath):
        raise VideoError(f"Image file not found: {spath}")
    try:
        with Image.open(spath) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except UnidentifiedImageError as exc:
        size = _file_size(spath)
        what = "is empty (0 bytes)" if size == 0 else "is corrupt or not an image"
        raise VideoError(f"Cannot open image {spath}: the file {what}") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise VideoError(f"Cannot read image {spath}: {exc}") from exc


def preprocess_frames(frames: np.ndarray, image_size: int) -> np.ndarray:
    """CLIP preprocessing of the authors' video processor: uint8 `[T, H, W, 3]` → float32 `[T, 3, S, S]`.

    Each frame is resized straight to (S, S) with Pillow BICUBIC (aspect ratio not kept, no crop),
    then `x / 255` and `(x - CLIP_MEAN) / CLIP_STD` in float32, and HWC → CHW.

    Raises:
        InputError: `frames` is not uint8 `[T, H, W, 3]` with T >= 1, or `image_size < 1`.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        desc = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise InputError(f"frames must be uint8 [T, H, W, 3], got {desc}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise InputError(f"frames must be non-empty uint8 [T, H, W, 3], got {list(frames.shape)}")
    s = _positive_int("image_size", image_size)
    out = np.empty((frames.shape[0], s, s, 3), dtype=np.float32)
    for t in range(frames.shape[0]):
        img = Image.fromarray(np.ascontiguousarray(frames[t]))
        if img.size != (s, s):
            img = img.resize((s, s), resample=Image.Resampling.BICUBIC)
        out[t] = np.asarray(img, dtype=np.float32)
    return _clip_normalize(out)


def _clip_normalize(out: np.ndarray) -> np.ndarray:
    """float32 `[N, S, S, 3]` in 0..255 (modified in place) -> `(x / 255 - CLIP_MEAN) / CLIP_STD` as `[N, 3, S, S]`."""
    out /= np.float32(255.0)
    out -= np.asarray(CLIP_MEAN, dtype=np.float32)
    out /= np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# The image path: LLaVA-NeXT anyres tiles (see anyres.py)

IMAGE_DECODE_PIXELS = 16_000_000
"""Decoded-pixel budget of one image (48 MB as RGB). A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
(DCT scaling, no full-size buffer) to fit it; the tile geometry still comes from the full size. Other formats cannot
be decoded at a reduced scale and are read in full up to Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)."""

_ORIENTATION = ExifTags.Base.Orientation
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class ImageTiles:
    """An image preprocessed as transformers 4.45.2's `LlavaNextImageProcessor` does (anyres).

    Attributes:
        pixel_values: float32 `[tiles, 3, S, S]`: the base tile (whole image squashed to S×S), then the S×S crops of
            the image fitted (aspect kept, bicubic) and zero-padded into `best_resolution`, row by row (transformers
            4.45.2's rules, see `preprocess_image`).
        image_size: (H, W) of the image as shown (EXIF orientation applied): LLaVA-NeXT's `image_sizes`.
        best_resolution: the `image_grid_pinpoints` entry (H, W) the image was fitted into.
        grid: (rows, cols) of crops.
        decoded_size: (H, W) actually decoded (smaller than `image_size` for a JPEG over IMAGE_DECODE_PIXELS).
    """

    pixel_values: np.ndarray
    image_size: Size
    best_resolution: Size
    grid: Size
    decoded_size: Size


@contextlib.contextmanager
def _image_errors(spath: str) -> Iterator[None]:
    """Map Pillow's failures inside the block to one VideoError naming the file."""
    if not os.path.exists(spath):
        raise VideoError(f"Image file not found: {spath}")
    if os.path.isdir(spath):
        raise VideoError(f"Image path is a directory, not a file: {spath}")
    try:
        yield
    except UnidentifiedImageError as exc:
        what = "is empty (0 bytes)" if _file_size(spath) == 0 else "is corrupt or not an image"
        raise VideoError(f"Cannot open image {spath}: the file {what}") from exc
    except Image.DecompressionBombError as exc:
        raise VideoError(f"Cannot read image {spath}: {exc}\nHint: downscale the image first.") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated / corrupt data, unsupported mode
        raise VideoError(f"Cannot read image {spath}: the file is corrupt or truncated ({exc})") from exc


def _shown_size(img: Image.Image) -> Size:
    """(H, W) of an opened (not necessarily decoded) image once its EXIF orientation is applied."""
    w, h = img.size
    return (w, h) if img.getexif().get(_ORIENTATION, 1) in _SWAPS_SIDES else (h, w)


def read_image_size(path: str | os.PathLike[str]) -> Size:
    """(H, W) of an image file as shown (EXIF orientation applied), read from its header only.

    Raises:
        VideoError: missing, unreadable or non-image file (the message names the file).
    """
    spath = os.fspath(path)
    with _image_errors(spath), Image.open(spath) as img:
        return _shown_size(img)


def read_image(path: str | os.PathLike[str], max_pixels: int = IMAGE_DECODE_PIXELS) -> tuple[Image.Image, Size]:
    """Decode an image file as an RGB Pillow image, upright, within a pixel budget.

    - EXIF orientation is applied (as transformers' `load_image` does), so a phone photo stored sideways is seen as
      shown; grayscale, palette, CMYK and 16-bit images become RGB; alpha is dropped (`convert("RGB")`, as the
      authors' loaders do).
    - A JPEG of more than `max_pixels` pixels is decoded at the smallest of 1/2, 1/4, 1/8 scale that fits (libjpeg DCT
      scaling), so an 8000×6000 photo never occupies more than the budget.

    Returns:
        (image, (H, W) of the full-size upright image).

    Raises:
        VideoError: missing, empty, corrupt, truncated or too large file (the message names the file).
    """
    spath = os.fspath(path)
    with _image_errors(spath), Image.open(spath) as img:
        shown = _shown_size(img)
        w, h = img.size
        if w * h > max_pixels:  # JPEG / MPO (phone photos) scale in the decoder; draft() is a no-op for other formats
            scale = next((s for s in (2, 4, 8) if -(-w // s) * -(-h // s) <= max_pixels), 8)
            img.draft("RGB", (-(-w // scale), -(-h // scale)))
        img.load()  # leaving the `with` closes the file only; the decoded pixels stay
        ImageOps.exif_transpose(img, in_place=True)  # no copy unless the photo really is rotated
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    return rgb, shown


def preprocess_image(img: Image.Image, tile: int, pinpoints, image_size: Size | None = None) -> ImageTiles:
    """LLaVA-NeXT anyres preprocessing of an RGB image exactly as transformers **4.45.2**'s `LlavaNextImageProcessor`
    (the authors' pinned version, which the released model was trained with; PIL backend).

    1. best resolution: the pinpoint that keeps most of the image (`select_best_resolution` on `image_size`);
    2. the image resized into it with its aspect kept (PIL bicubic) and padded with black by `(target - new) // 2` on
       both sides (`_pad_for_patching`): an odd remainder leaves the canvas one pixel short of the pinpoint;
    3. the canvas cut into S×S crops row by row (`divide_to_patches`); a crop of the short last row or column
       (S-1 px) is resized so its short side is S (bicubic, long side `int(S * long / short)`) and centre-cropped to
       S×S, as `_preprocess` does (transformers 5.x pads the remainder instead and differs there);
    4. the base tile: the whole image resized to S×S (bicubic, aspect not kept);
    5. every tile: `u8 * (1/255)` in float64 cast to float32, then CLIP mean/std in float32 (4.45's `rescale`,
       `normalize`): bit-exact with the processor (tests/test_image_tf4452.py).

    Args:
        img: RGB image (possibly decoded at a reduced scale, see `read_image`).
        tile: S, the tower's image size.
        pinpoints: `image_grid_pinpoints`, (H, W) pairs in whole tiles.
        image_size: (H, W) the geometry is computed from (default: the image's own size).
    """
    if img.mode != "RGB":
        raise InputError(f"preprocess_image needs an RGB image, got mode {img.mode}")
    decoded = (img.height, img.width)
    size = tuple(image_size) if image_size is not None else decoded
    best = select_best_resolution(size, pinpoints)
    new_h, new_w = fitted_size(size, best)
    pad_y, pad_x = (best[0] - new_h) // 2, (best[1] - new_w) // 2
    canvas = Image.new("RGB", (new_w + 2 * pad_x, new_h + 2 * pad_y))  # one pixel short of `best` on an odd remainder
    canvas.paste(img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC), (pad_x, pad_y))
    rows, cols = best[0] // tile, best[1] // tile
    out = np.empty((1 + rows * cols, tile, tile, 3), dtype=np.uint8)
    out[0] = np.asarray(img.resize((tile, tile), resample=Image.Resampling.BICUBIC))
    padded = np.asarray(canvas)
    for r in range(rows):
        for c in range(cols):
            out[1 + r * cols + c] = _crop_to_tile(padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile], tile)
    return ImageTiles(_clip_normalize_u8(out), size, best, (rows, cols), decoded)  # type: ignore[arg-type]


def _crop_to_tile(crop: np.ndarray, tile: int) -> np.ndarray:
    """A crop of the canvas as 4.45's `_preprocess` leaves it: S×S as is; a short one (S-1 px on one side) resized so
    its short side is S (`get_resize_output_image_size`, bicubic) and centre-cropped (`center_crop`)."""
    h, w = crop.shape[:2]
    if (h, w) == (tile, tile):
        return crop
    long = int(tile * max(h, w) / min(h, w))
    out_h, out_w = (long, tile) if w <= h else (tile, long)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((out_w, out_h), resample=Image.Resampling.BICUBIC))
    top, left = (out_h - tile) // 2, (out_w - tile) // 2
    return resized[top : top + tile, left : left + tile]


def _clip_normalize_u8(tiles: np.ndarray) -> np.ndarray:
    """uint8 `[N, S, S, 3]` -> float32 `[N, 3, S, S]` as transformers 4.45's `rescale` (the product in float64, cast to
    float32) then `normalize` (float32 mean/std)."""
    out = (tiles * (1 / 255)).astype(np.float32)
    out -= np.asarray(CLIP_MEAN, dtype=np.float32)
    out /= np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def load_image_tiles(path: str | os.PathLike[str], tile: int, pinpoints, max_pixels: int = IMAGE_DECODE_PIXELS) -> ImageTiles:
    """`read_image` + `preprocess_image`: the model-ready tiles of an image file.

    Raises:
        VideoError: the file cannot be read (the message names it).
    """
    img, shown = read_image(path, max_pixels)
    return preprocess_image(img, tile, pinpoints, image_size=shown)


def input_kind(path: str | os.PathLike[str]) -> MediaKind:
    """"npy" for `.npy`, "image" for IMAGE_EXTENSIONS, otherwise "video" (by extension, case-insensitive)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return "video"


@dataclass(frozen=True)
class MediaInfo:
    """Where `pixel_values` came from.

    Attributes:
        path: the input file.
        kind: "video", "image" or "npy".
        num_total: frames in the video (1 for an image, None for .npy).
        indices: sampled frame indices (video), (0,) (image) or () (.npy).
        fps: video frame rate, when known.
        source_size: (H, W) of the decoded frames before resizing; None for .npy.
        strategy: video decode strategy used, or None.
    """

    path: str
    kind: MediaKind
    num_total: int | None
    indices: tuple[int, ...]
    fps: float | None
    source_size: tuple[int, int] | None
    strategy: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "num_total": self.num_total,
            "indices": list(self.indices),
            "fps": self.fps,
            "source_size": list(self.source_size) if self.source_size else None,
            "strategy": self.strategy,
        }


def read_npy_shape(path: str | os.PathLike[str], image_size: int | None = None) -> tuple[int, ...]:
    """The shape of the pixel values in a `.npy` file, from its header alone (nothing is allocated), checked as
    `load_npy_pixel_values` checks the array: float32 `[T, 3, S, S]`, and a file long enough to hold it.

    Raises:
        InputError: missing/unreadable file, a header that is not a .npy one, the wrong ndim, channels, dtype or
            spatial size, or a header announcing more data than the file holds.
    """
    spath = os.fspath(path)
    if not os.path.exists(spath):
        raise InputError(f"Pixel-values file not found: {spath}")
    fmt = np.lib.format
    try:
        with open(spath, "rb") as f:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise InputError(f"Cannot read pixel values from {spath}: not a valid .npy array ({exc})") from exc
    expect = f"float32 [T, 3, {image_size or 'H'}, {image_size or 'W'}]"
    got = f"{dtype} {list(shape)}"
    if len(shape) != 4 or shape[1] != 3 or shape[0] < 1:
        raise InputError(f"Pixel values in {spath} must be {expect}, got shape {got}")
    if dtype != np.float32:
        raise InputError(f"Pixel values in {spath} must be {expect}, got dtype {got}")
    if image_size is not None and tuple(shape[2:]) != (image_size, image_size):
        raise InputError(f"Pixel values in {spath} must be {expect}, got spatial size {got}")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size - offset < need:
        raise InputError(
            f"Cannot read pixel values from {spath}: its header announces {got} ({need:,} bytes) but the file holds "
            f"{max(size - offset, 0):,} bytes of data (truncated, or a forged header)"
        )
    return tuple(int(d) for d in shape)


def load_npy_pixel_values(path: str | os.PathLike[str], image_size: int | None = None) -> np.ndarray:
    """Load already-preprocessed pixel values float32 `[T, 3, H, W]` from a `.npy` file, unchanged. The header is
    checked first (`read_npy_shape`), so a forged or truncated file is refused before anything is allocated.

    Raises:
        InputError: missing/unreadable file, wrong ndim, channels, dtype, or (when `image_size` is
            given) spatial size, or non-finite values (NaN/Inf); the message names the file and what is wrong.
    """
    spath = os.fspath(path)
    read_npy_shape(spath, image_size)
    try:
        arr = np.load(spath, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"Cannot read pixel values from {spath}: not a valid .npy array ({exc})") from exc
    if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 4:  # changed since the header check
        raise InputError(f"Cannot read pixel values from {spath}: the file changed while it was read")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        frames = np.flatnonzero(~finite.reshape(arr.shape[0], -1).all(axis=1))
        raise InputError(
            f"Pixel values in {spath} contain {bad} non-finite values (NaN or Inf) in frame(s) "
            f"{', '.join(str(int(f)) for f in frames[:8])}{' ...' if frames.size > 8 else ''}; refusing to answer from them"
        )
    return arr


def load_pixel_values(
    path: str | os.PathLike[str],
    num_frames: int,
    image_size: int,
    *,
    strategy: DecodeStrategy = "auto",
) -> tuple[np.ndarray, MediaKind, MediaInfo]:
    """Model-ready pixel values float32 `[T, 3, S, S]` from a video, an image or a `.npy` file.

    - video: `num_frames` frames at segment centres, preprocessed (T = num_frames).
    - image: one frame squashed like a video frame (T = 1; the authors' video processor on one image). The
      model's image path is `load_image_tiles` (anyres tiles).
    - .npy: already preprocessed `[T, 3, S, S]` float32, returned as stored (T is not checked
      against `num_frames`; S must equal `image_size`).

    Raises:
        VideoError: the video or image cannot be read.
        InputError: bad arguments, or a `.npy` with the wrong ndim/channels/dtype/size.
    """
    spath = os.fspath(path)
    kind = input_kind(spath)
    if kind == "npy":
        pv = load_npy_pixel_values(spath, image_size)
        return pv, kind, MediaInfo(spath, kind, None, (), None, None)
    if kind == "image":
        img = load_image(spath)
        pv = preprocess_frames(img[None], image_size)
        return pv, kind, MediaInfo(spath, kind, 1, (0,), None, (img.shape[0], img.shape[1]))
    vf = load_video(spath, num_frames, strategy=strategy)
    pv = preprocess_frames(vf.frames, image_size)
    info = MediaInfo(
        spath, kind, vf.num_total, tuple(vf.indices), vf.fps, (vf.frames.shape[1], vf.frames.shape[2]), vf.strategy
    )
    return pv, kind, info


# --------------------------------------------------------------------------------------------
# Synthetic test media


def make_test_photo(w: int, h: int, seed: int = 0, noise: float = 12.0) -> np.ndarray:
    """A deterministic uint8 RGB `[h, w, 3]` picture with smooth ramps, darker checkerboard cells and Gaussian noise of
    `noise` levels (so resampling matters): the image tests' and tools/make_image_fixtures.py's pictures."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = np.stack([xs * 255 // max(w - 1, 1), ys * 255 // max(h - 1, 1), (xs + ys) * 127 // max(w + h - 2, 1)], axis=-1).astype(np.float64)
    img[(xs // max(w // 7, 1) + ys // max(h // 5, 1)) % 2 == 0] *= 0.6
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _marker_digits(index: int) -> list[int]:
    return [(index // _MARKER_BASE**k) % _MARKER_BASE for k in range(_MARKER_DIGITS)]


def read_frame_marker(frame: np.ndarray) -> int:
    """Frame index that `write_test_video` encoded in the top-left corner of an RGB frame.

    The corner holds `_MARKER_DIGITS` grey 16×16 blocks side by side (least significant first).
    Block k's red channel is `8 + 16 * digit_k` (green and blue are equal to it, so the value is
    carried by luma, which codecs keep accurately). Each block is read as the median red value of
    its inner 8×8 pixels, so a codec error below 8 levels still decodes exactly.
    """
    index = 0
    for k in range(_MARKER_DIGITS):
        x0 = k * _MARKER
        block = frame[4:_MARKER - 4, x0 + 4:x0 + _MARKER - 4, 0].astype(np.float64)
        digit = int(np.clip(np.floor(np.median(block) / 16), 0, _MARKER_BASE - 1))
        index += digit * _MARKER_BASE**k
    return index


def make_test_frame(index: int, size: tuple[int, int] = (128, 96), num_frames: int = 48) -> np.ndarray:
    """The deterministic RGB frame `index` of `write_test_video`: uint8 `[H, W, 3]`."""
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    frame = np.empty((h, w, 3), dtype=np.uint8)
    frame[..., 0] = (xs * 255 // max(w - 1, 1)).astype(np.uint8)  # horizontal red ramp
    frame[..., 1] = (ys * 255 // max(h - 1, 1)).astype(np.uint8)  # vertical green ramp
    frame[..., 2] = 96
    phase = index / max(num_frames, 1)
    # a yellow square moving left → right along the bottom
    side = max(h // 5, 4)
    x0 = int(phase * max(w - side, 1))
    y0 = h - side - max(h // 10, 1)
    frame[y0:y0 + side, x0:x0 + side] = (240, 220, 30)
    # a cyan disc moving top → bottom on the right, below the marker row
    radius = max(h // 8, 3)
    cx = w - radius - 2
    cy = int(2 * _MARKER + radius + phase * max(h - 2 * _MARKER - 2 * radius, 1))
    frame[(xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2] = (20, 200, 230)
    for k, digit in enumerate(_marker_digits(index)):
        frame[:_MARKER, k * _MARKER:(k + 1) * _MARKER] = 8 + 16 * digit
    return frame


def write_test_video(
    path: str | os.PathLike[str],
    num_frames: int = 48,
    size: tuple[int, int] = (128, 96),
    fps: int = 24,
    codec: str = "libx264",
    *,
    gop_size: int | None = None,
) -> Path:
    """Write a deterministic synthetic clip (yuv420p) for demos and tests.

    Frame i (see `make_test_frame`) has colour ramps, a moving square and disc, and its index
    encoded in grey blocks along the top-left corner (read it back with `read_frame_marker`).

    Args:
        path: output file; the container comes from the suffix (.mp4, .mkv, .avi, ...).
        num_frames: frames to write (>= 1).
        size: (W, H), both even and >= 16.
        fps: frame rate.
        codec: "libx264" (alias "h264") or "mpeg4". (mjpeg needs yuvj420p and is not supported here.)
        gop_size: keyframe interval; None keeps the encoder default (250 for libx264).

    Returns:
        The path written.
    """
    w, h = size
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")
    min_w = _MARKER * _MARKER_DIGITS
    if w < min_w or h < 2 * _MARKER or w % 2 or h % 2:
        raise InputError(f"size (W, H) must be even and at least ({min_w}, {2 * _MARKER}), got {size}")
    av = _av()
    out = Path(path)
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        time_base = Fraction(1, int(fps))
        stream.codec_context.time_base = time_base
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if gop_size is not None:
            stream.codec_context.gop_size = int(gop_size)
        if stream.codec_context.name == "libx264":
            # mbtree=0: with x264's macroblock-tree rate control (asm path) the bundled libx264 is not
            # reproducible within a process (the same frames encode differently after unrelated work such as a
            # torch export); the decoded pixels then differ by up to ~30/255 between runs and every
            # calibration / accuracy number downstream drifts. Without mbtree the output is bit-identical.
            stream.codec_context.options = {"crf": "18", "x264-params": "mbtree=0"}
        else:
            stream.codec_context.bit_rate = max(2_000_000, w * h * fps // 2)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_test_frame(i, size, num_frames), format="rgb24")
            frame.pts = i
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out


def write_test_audio(path: str | os.PathLike[str], seconds: float = 0.5, sample_rate: int = 16000) -> Path:
    """Write an audio-only file (a sine tone): `.wav` → pcm_s16le, anything else (.m4a, .mp4) → aac."""
    av = _av()
    out = Path(path)
    n = max(int(seconds * sample_rate), 1)
    tone = (0.3 * np.sin(2 * np.pi * 440.0 * np.arange(n) / sample_rate) * 32767).astype(np.int16)
    wav = out.suffix.lower() == ".wav"
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("pcm_s16le" if wav else "aac", rate=sample_rate)
        stream.layout = "mono"
        chunk = 1024
        for start in range(0, n, chunk):
            frame = av.AudioFrame.from_ndarray(tone[None, start:start + chunk], format="s16", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return out
