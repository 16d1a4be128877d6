"""The image path: anyres tiles, LLaVA-NeXT's or LLaVA-OneVision's by the family's spec (geometry in `anyres.py`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import InputError, VideoError
from .anyres import Size, select_best_resolution
from .preprocess import fit_on_black, input_kind, normalize_u8, preprocess_frames
from .spec import CLIP, PreprocessSpec
from .video import _file_size

IMAGE_DECODE_PIXELS = 16_000_000
"""Decoded-pixel budget of one image (48 MB as RGB). A larger JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg
(DCT scaling, no full-size buffer) to fit it; the tile geometry still comes from the full size. Other formats cannot
be decoded at a reduced scale and are read in full up to Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`)."""

_ORIENTATION = ExifTags.Base.Orientation
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class ImageTiles:
    """An image preprocessed as transformers 4.45.2's `LlavaNextImageProcessor` (CLIP spec) or
    `LlavaOnevisionImageProcessor` (SigLIP spec) does (anyres).

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


def preprocess_image(img: Image.Image, tile: int, pinpoints, image_size: Size | None = None, spec: PreprocessSpec = CLIP) -> ImageTiles:
    """Anyres preprocessing of an RGB image exactly as transformers **4.45.2**'s `LlavaNextImageProcessor` (CLIP spec)
    or `LlavaOnevisionImageProcessor` (SigLIP spec) (the authors' pinned version, which the released models were
    trained with; PIL backend).

    1. best resolution: the pinpoint that keeps most of the image (`select_best_resolution` on `image_size`);
    2. the image resized into it with its aspect kept (PIL bicubic) and padded with black by `(target - new) // 2` on
       both sides (`fit_on_black`): an odd remainder leaves the canvas one pixel short of the pinpoint;
    3. the canvas cut into S×S crops row by row (`divide_to_patches`); a crop of the short last row or column
       (S-1 px) is brought back to S×S as the family's `_preprocess` does (`_crop_to_tile`; transformers 5.x pads the
       remainder instead and differs there);
    4. the base tile: the whole image resized to S×S (bicubic, aspect not kept);
    5. every tile: `u8 * (1/255)` in float64 cast to float32, then the spec's mean/std in float32 (4.45's `rescale`,
       `normalize`): bit-exact with the processor (tests/test_image_tf4452.py, tests/test_siglip_preprocess.py).

    Args:
        img: RGB image (possibly decoded at a reduced scale, see `read_image`).
        tile: S, the tower's image size.
        pinpoints: `image_grid_pinpoints`, (H, W) pairs in whole tiles.
        image_size: (H, W) the geometry is computed from (default: the image's own size).
        spec: the family's preprocessing (`spec.py`).
    """
    if img.mode != "RGB":
        raise InputError(f"preprocess_image needs an RGB image, got mode {img.mode}")
    decoded = (img.height, img.width)
    size = tuple(image_size) if image_size is not None else decoded
    best = select_best_resolution(size, pinpoints)
    canvas = fit_on_black(img, best, size)
    rows, cols = best[0] // tile, best[1] // tile
    out = np.empty((1 + rows * cols, tile, tile, 3), dtype=np.uint8)
    out[0] = np.asarray(img.resize((tile, tile), resample=Image.Resampling.BICUBIC))
    padded = np.asarray(canvas)
    to_tile = _squash_to_tile if spec.tiles == "onevision" else _crop_to_tile
    for r in range(rows):
        for c in range(cols):
            out[1 + r * cols + c] = to_tile(padded[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile], tile)
    return ImageTiles(normalize_u8(out, spec), size, best, (rows, cols), decoded)  # type: ignore[arg-type]


def _crop_to_tile(crop: np.ndarray, tile: int) -> np.ndarray:
    """A crop of the canvas as 4.45's LLaVA-NeXT `_preprocess` leaves it: S×S as is; a short one (S-1 px on one side)
    resized so its short side is S (`get_resize_output_image_size`, bicubic) and centre-cropped (`center_crop`)."""
    h, w = crop.shape[:2]
    if (h, w) == (tile, tile):
        return crop
    long = int(tile * max(h, w) / min(h, w))
    out_h, out_w = (long, tile) if w <= h else (tile, long)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((out_w, out_h), resample=Image.Resampling.BICUBIC))
    top, left = (out_h - tile) // 2, (out_w - tile) // 2
    return resized[top : top + tile, left : left + tile]


def _squash_to_tile(crop: np.ndarray, tile: int) -> np.ndarray:
    """A crop of the canvas as 4.45's LLaVA-OneVision `_preprocess` leaves it: resized to (S, S) (bicubic, aspect not
    kept; an S×S crop is unchanged)."""
    if crop.shape[:2] == (tile, tile):
        return crop
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((tile, tile), resample=Image.Resampling.BICUBIC))


def load_image_tiles(path: str | os.PathLike[str], tile: int, pinpoints, max_pixels: int = IMAGE_DECODE_PIXELS, spec: PreprocessSpec = CLIP) -> ImageTiles:
    """`read_image` + `preprocess_image`: the model-ready tiles of an image file, preprocessed by the family's `spec`.

    Raises:
        VideoError: the file cannot be read (the message names it).
    """
    img, shown = read_image(path, max_pixels)
    return preprocess_image(img, tile, pinpoints, image_size=shown, spec=spec)


def read_images(paths: Sequence[str | os.PathLike[str]], max_pixels: int = IMAGE_DECODE_PIXELS) -> list[np.ndarray]:
    """Several images of one question, each decoded upright in RGB (`read_image`): uint8 [H, W, 3] each.

    Raises:
        VideoError: an image cannot be read (the message names the file).
    """
    return [np.asarray(read_image(p, max_pixels)[0]) for p in paths]


def images_as_frames(images: Sequence[np.ndarray], image_size: int, spec: PreprocessSpec = CLIP) -> np.ndarray:
    """The authors' multi-image preprocessing: each image (any size) goes through the family's video processor as a
    video frame (`preprocess_frames` with `spec`: their rawframe reader feeds `LlavaNextVidProcessor` for CLIP,
    `LlavaOnevisionVidProcessor` for SigLIP), in the order given: float32 [N, 3, S, S]. No anyres tiles."""
    return np.concatenate([preprocess_frames(img[None], image_size, spec) for img in images])


MAX_IMAGES = 32
"""Most images in one question: the authors' multi-image reader (`read_frames_rawframes`, num_frames -1) takes at most
32 and samples that many from a longer list, which would leave `<image>` slots without an image."""


def check_num_images(num_images: int, max_frames: int) -> None:
    """Several images in one question: 2 <= N <= min(MAX_IMAGES, max_T) (they go through the tower as a video's frames,
    so the BT-Adapter time table bounds them too; one image takes the anyres image path)."""
    most = min(MAX_IMAGES, max_frames)
    if not 2 <= num_images <= most:
        raise InputError(
            f"{num_images} image(s) in one question: a multi-image question takes 2 to {most} images "
            "(the authors' multi-image reader takes at most 32, and they go through the vision tower as frames).\n"
            "Hint: one image takes the anyres image path; ask about fewer images at a time."
        )


def check_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The inputs of one question: one file of any kind, or several images. The authors' multi-image path reads images
    only (one media type per question: `media_type` "multi-image" goes through their rawframe image reader), so a
    video or a .npy among several inputs is refused."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no input: give a video, an image or a .npy, or several images.")
    others = [str(p) for p in paths if input_kind(p) != "image"]
    if len(paths) > 1 and others:
        raise InputError(
            f"several inputs must all be images; {', '.join(others)} is not (a video or a .npy goes alone).\n"
            "Hint: the authors' model takes one video, or one or more images, per question."
        )
    return paths
