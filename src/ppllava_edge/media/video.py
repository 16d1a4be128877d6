"""Frame sampling and video decoding with PyAV (imported inside the functions that need it): segment-centre
indices, sequential or GOP-aware seek decoding, `load_video` -> uint8 `[T, H, W, 3]`.
"""

from __future__ import annotations

import bisect
import logging
import operator
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._deps import require
from ..errors import InputError, VideoError

if TYPE_CHECKING:
    from types import ModuleType

log = logging.getLogger(__name__)

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
