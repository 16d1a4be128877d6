"""Frame preprocessing (per family, `spec.py`) and the dispatch from any input file to model-ready pixel values."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import InputError, VideoError
from .anyres import fitted_size
from .spec import CLIP, CLIP_MEAN, CLIP_STD, PreprocessSpec
from .video import DecodeStrategy, _file_size, _positive_int, load_video

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
"""Suffixes `input_kind` treats as still images. `.gif` is not one: PyAV reads it as a video."""

MediaKind = Literal["video", "image", "npy"]


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


def preprocess_frames(frames: np.ndarray, image_size: int, spec: PreprocessSpec = CLIP) -> np.ndarray:
    """The video processor of the checkpoint's family (`spec`): uint8 `[T, H, W, 3]` → float32 `[T, 3, S, S]`.

    - "squash" (CLIP, the authors' `LlavaNextVidProcessor`): each frame resized straight to (S, S) with Pillow BICUBIC
      (aspect ratio not kept, no crop), then `x / 255` and CLIP mean/std in float32;
    - "fit_pad" (SigLIP, the authors' `LlavaOnevisionVidProcessor` under transformers 4.45.2): each frame fitted into
      (S, S) with its aspect kept and padded with black (`fit_pad_frame`), then 4.45's `rescale` + `normalize`.

    Raises:
        InputError: `frames` is not uint8 `[T, H, W, 3]` with T >= 1, or `image_size < 1`.
    """
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        desc = f"{frames.dtype} {list(frames.shape)}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise InputError(f"frames must be uint8 [T, H, W, 3], got {desc}")
    if frames.shape[0] < 1 or frames.shape[1] < 1 or frames.shape[2] < 1:
        raise InputError(f"frames must be non-empty uint8 [T, H, W, 3], got {list(frames.shape)}")
    s = _positive_int("image_size", image_size)
    if spec.frames == "fit_pad":
        tiles = np.stack([fit_pad_frame(Image.fromarray(np.ascontiguousarray(f)), s) for f in frames])
        return normalize_u8(tiles, spec)
    out = np.empty((frames.shape[0], s, s, 3), dtype=np.float32)
    for t in range(frames.shape[0]):
        img = Image.fromarray(np.ascontiguousarray(frames[t]))
        if img.size != (s, s):
            img = img.resize((s, s), resample=Image.Resampling.BICUBIC)
        out[t] = np.asarray(img, dtype=np.float32)
    return _clip_normalize(out)


def fit_pad_frame(img: Image.Image, s: int) -> np.ndarray:
    """One frame as the authors' `LlavaOnevisionVidProcessor.get_image_patches` leaves it (best resolution pinned to
    the tile), uint8 `[S, S, 3]`: `fit_on_black` into (S, S), and a canvas one pixel short squashed back to S×S
    (bicubic) by `_preprocess`'s resize to the tile size."""
    canvas = fit_on_black(img, (s, s))
    if canvas.size != (s, s):
        canvas = canvas.resize((s, s), resample=Image.Resampling.BICUBIC)
    return np.asarray(canvas)


def fit_on_black(img: Image.Image, target: tuple[int, int], image_size: tuple[int, int] | None = None) -> Image.Image:
    """`img` resized into `target` (H, W) with its aspect kept (PIL bicubic, `ceil` rounding: `_resize_for_patching`)
    and pasted on black with `(target - new) // 2` on **both** sides (transformers 4.45.2's `_pad_for_patching`), so an
    odd remainder leaves the canvas one pixel short of `target` (5.x pads that pixel instead). The fitted size comes
    from `image_size` (H, W) when given (a JPEG decoded at reduced scale keeps its full size's geometry)."""
    new_h, new_w = fitted_size(image_size or (img.height, img.width), target)
    pad_y, pad_x = (target[0] - new_h) // 2, (target[1] - new_w) // 2
    canvas = Image.new("RGB", (new_w + 2 * pad_x, new_h + 2 * pad_y))
    canvas.paste(img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC), (pad_x, pad_y))
    return canvas


def normalize_u8(tiles: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 `[N, S, S, 3]` -> float32 `[N, 3, S, S]` as transformers 4.45's `rescale` (the product in float64, cast to
    float32) then `normalize` (float32 mean/std of `spec`)."""
    out = (tiles * (1 / 255)).astype(np.float32)
    out -= np.asarray(spec.mean, dtype=np.float32)
    out /= np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _clip_normalize(out: np.ndarray) -> np.ndarray:
    """float32 `[N, S, S, 3]` in 0..255 (modified in place) -> `(x / 255 - CLIP_MEAN) / CLIP_STD` as `[N, 3, S, S]`."""
    out /= np.float32(255.0)
    out -= np.asarray(CLIP_MEAN, dtype=np.float32)
    out /= np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def check_input_file(path: Path) -> None:
    """A missing input or a folder: a VideoError naming it."""
    if not path.is_file():
        raise VideoError(f"{path}: " + ("a folder, not a video, image or .npy file." if path.is_dir() else "no such file."))


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
    spec: PreprocessSpec = CLIP,
) -> tuple[np.ndarray, MediaKind, MediaInfo]:
    """Model-ready pixel values float32 `[T, 3, S, S]` from a video, an image or a `.npy` file.

    - video: `num_frames` frames at segment centres, preprocessed by the family's `spec` (T = num_frames).
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
        pv = preprocess_frames(img[None], image_size, spec)
        return pv, kind, MediaInfo(spath, kind, 1, (0,), None, (img.shape[0], img.shape[1]))
    vf = load_video(spath, num_frames, strategy=strategy)
    pv = preprocess_frames(vf.frames, image_size, spec)
    info = MediaInfo(
        spath, kind, vf.num_total, tuple(vf.indices), vf.fps, (vf.frames.shape[1], vf.frames.shape[2]), vf.strategy
    )
    return pv, kind, info
