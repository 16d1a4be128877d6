"""Synthetic test media: photos, frames carrying their index, test videos and an audio-only file."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..errors import InputError
from .video import _av

_MARKER = 16  # side of each corner block that carries the frame index in `write_test_video`
_MARKER_BASE = 16
_MARKER_DIGITS = 3  # indices up to 16**3 - 1 = 4095 are encoded exactly


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
        frames = (av.VideoFrame.from_ndarray(make_test_frame(i, size, num_frames), format="rgb24") for i in range(num_frames))
        _encode(container, stream, frames, time_base)
    return out


def _encode(container, stream, frames, time_base=None) -> None:
    """Encode `frames` into `stream` (frame i at pts i, or at the frame's own pts when time_base is None), mux every
    packet, then flush the encoder."""
    for i, frame in enumerate(frames):
        if time_base is not None:
            frame.pts = i
            frame.time_base = time_base
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


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
        _encode(container, stream, _tone_frames(av, tone, sample_rate))
    return out


def _tone_frames(av, tone: np.ndarray, sample_rate: int, chunk: int = 1024):
    for start in range(0, len(tone), chunk):
        frame = av.AudioFrame.from_ndarray(tone[None, start:start + chunk], format="s16", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = start
        yield frame
