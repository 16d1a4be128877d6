"""LLaVA-NeXT "anyres" geometry for single images (no torch): best resolution, crop grid, unpadding, token layout.

The authors' image path (`encode_image` in `ppllava/models/llava_interleave_meta.py`, ppllava-model.md §6.2) runs
every tile of transformers' `LlavaNextImageProcessor` output (the base image, then the S×S crops row by row) through
the tower with T = 1, one relevance softmax over all tiles, the (1,3,3) kernel (g×g tokens per tile, g = grid / 3),
and then assembles:

    base tile: g·g tokens, no newline
    crops:     one (rows·g)×(cols·g) map, unpadded to the image's aspect (`unpad_image`), `image_newline` after
               every row of that map

The assembly is a gather: `ImageLayout.index()` lists, for every output token, the pooled token it copies (tile
t, row y, column x → t·g·g + y·g + x) or the newline (index = tiles·g·g). The PyTorch model and the torch-free
runtime both apply that one index, so they cannot disagree on token order. The rules follow transformers 4.45.2, the
authors' pinned version the released model was trained with (`select_best_resolution`, `_get_patch_output_size`,
`get_anyres_image_grid_shape`, `unpad_image`; 4.45's `unpad_image` truncates with `int()` where 5.x rounds to 7
digits first, which keeps one more or one fewer row for a few sizes, e.g. 196x147 at 84-px tiles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, InputError

Size = tuple[int, int]  # (height, width)

LLAVA_NEXT_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
"""`image_grid_pinpoints` of the released config (and LlavaNextConfig's default), for 336-px tiles."""


def default_pinpoints(tile: int) -> tuple[Size, ...]:
    """LLaVA-NeXT's tile grids (1x2, 2x1, 2x2, 3x1, 1x3) at a tile size: the released pinpoints for 336-px tiles, used
    when a config.json has no `image_grid_pinpoints` (and by the small-tile presets)."""
    return tuple((h // 336 * tile, w // 336 * tile) for h, w in LLAVA_NEXT_PINPOINTS)


def check_pinpoints(pinpoints: Sequence[Sequence[int]], tile: int, where: str = "image_grid_pinpoints") -> tuple[Size, ...]:
    """[[h, w], ...] as a tuple of (h, w); every side a positive multiple of the tile size.

    Raises:
        ConfigError: not a non-empty list of [h, w] pairs of positive multiples of `tile`.
    """
    try:
        out = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a list of [height, width] pairs, got {pinpoints!r}") from None
    bad = [list(p) for p in out if p[0] < tile or p[1] < tile or p[0] % tile or p[1] % tile]
    if not out or bad:
        raise ConfigError(
            f"{where} {[list(p) for p in out]}: every pinpoint must be [height, width] in whole tiles of {tile} px"
            + (f" (bad: {bad})" if bad else " (the list is empty)")
        )
    return out


def select_best_resolution(image_size: Size, pinpoints: Sequence[Size]) -> Size:
    """The pinpoint (H, W) that keeps most of the image's pixels once fitted inside it, then wastes the least."""
    height, width = image_size
    best, best_effective, best_wasted = None, 0, math.inf
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise InputError(f"no image_grid_pinpoint fits an image of {width}x{height} pixels")
    return best


def fitted_size(image_size: Size, target: Size) -> Size:
    """(H, W) of the image resized to fit inside `target` with its aspect ratio kept (then padded to `target`)."""
    height, width = image_size
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpad_window(image_size: Size, current: Size) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the part of a padded (H, W) feature map that holds the image (4.45.2's `unpad_image`, plain
    `int()` truncation)."""
    oh, ow = image_size
    ch, cw = current
    if ow / oh > cw / ch:
        new_h = int(oh * (cw / ow))
        pad = (ch - new_h) // 2
        return pad, ch - pad, 0, cw
    new_w = int(ow * (ch / oh))
    pad = (cw - new_w) // 2
    return 0, ch, pad, cw - pad


@dataclass(frozen=True)
class ImageLayout:
    """Where each visual token of one image comes from.

    Attributes:
        image_size: (H, W) of the image as shown (EXIF orientation applied), before any resizing.
        tile: tile side S in pixels (the tower's image_size).
        pooled: g, pooled tokens per tile side (grid / kernel).
        grid: (rows, cols) of S×S crops; (0, 0) for a lone tile (no crops: g·g tokens + one newline).
        best_resolution: the pinpoint (H, W) the image was fitted into; None for a lone tile.
        window: (y0, y1, x0, x1) kept from the (rows·g)×(cols·g) crop map after unpadding.
        newline: whether `image_newline` ends every row.
    """

    image_size: Size
    tile: int
    pooled: int
    grid: Size
    best_resolution: Size | None
    window: tuple[int, int, int, int]
    newline: bool = True

    @property
    def tiles(self) -> int:
        return 1 + self.grid[0] * self.grid[1]

    @property
    def map_rows(self) -> int:
        return self.window[1] - self.window[0]

    @property
    def map_cols(self) -> int:
        return self.window[3] - self.window[2]

    @property
    def num_tokens(self) -> int:
        g2 = self.pooled * self.pooled
        if self.grid == (0, 0):
            return g2 + int(self.newline)
        return g2 + self.map_rows * (self.map_cols + int(self.newline))

    @property
    def newline_index(self) -> int:
        """The index that stands for `image_newline` in `index()` (one past the last pooled token)."""
        return self.tiles * self.pooled * self.pooled

    def index(self) -> np.ndarray:
        """int64 [num_tokens]: the pooled token (tile-major, then row, col) copied to each output position, or
        `newline_index` for the newline."""
        g, nl = self.pooled, self.newline_index
        base = np.arange(g * g, dtype=np.int64)
        if self.grid == (0, 0):
            return np.concatenate([base, [nl] if self.newline else []]).astype(np.int64)
        cols = self.grid[1]
        y0, y1, x0, x1 = self.window
        ys, xs = np.arange(y0, y1), np.arange(x0, x1)
        tile = 1 + (ys[:, None] // g) * cols + xs[None, :] // g
        rows = tile * g * g + (ys[:, None] % g) * g + xs[None, :] % g  # [map_rows, map_cols]
        if self.newline:
            rows = np.concatenate([rows, np.full((len(ys), 1), nl)], axis=1)
        return np.concatenate([base, rows.reshape(-1)]).astype(np.int64)

    def as_dict(self) -> dict:
        return {
            "image_size": list(self.image_size), "tiles": self.tiles, "grid": list(self.grid),
            "best_resolution": list(self.best_resolution) if self.best_resolution else None,
            "window": list(self.window), "tokens": self.num_tokens,
        }


def image_layout(image_size: Size, pinpoints: Sequence[Size], tile: int, pooled: int, newline: bool = True) -> ImageLayout:
    """Layout of an image of `image_size` (H, W): best pinpoint, crop grid, unpadded window."""
    h, w = int(image_size[0]), int(image_size[1])
    if h < 1 or w < 1:
        raise InputError(f"image size {w}x{h}: both sides must be at least 1 pixel")
    best = select_best_resolution((h, w), pinpoints)
    grid = (best[0] // tile, best[1] // tile)
    window = unpad_window((h, w), (grid[0] * pooled, grid[1] * pooled))
    return ImageLayout((h, w), tile, pooled, grid, best, window, newline)


def single_tile_layout(tile: int, pooled: int, newline: bool = True, image_size: Size | None = None) -> ImageLayout:
    """One tile and no crops (authors' `else` branch): g·g tokens, then one newline."""
    return ImageLayout(image_size or (tile, tile), tile, pooled, (0, 0), None, (0, 0, 0, 0), newline)


def max_image_tokens(pinpoints: Sequence[Size], tile: int, pooled: int, newline: bool = True) -> int:
    """Most visual tokens one image can give (an image with a pinpoint's own aspect is not unpadded)."""
    return max(pooled * pooled + (h // tile) * pooled * ((w // tile) * pooled + int(newline)) for h, w in pinpoints)


def max_tiles(pinpoints: Sequence[Size], tile: int) -> int:
    return 1 + max((h // tile) * (w // tile) for h, w in pinpoints)


def assemble_tokens(pooled_tokens: np.ndarray, newline: np.ndarray | None, layout: ImageLayout) -> np.ndarray:
    """[tiles·g·g, D] pooled tokens (+ the newline row [D]) -> the image's visual tokens [num_tokens, D]."""
    expect = layout.newline_index
    if pooled_tokens.ndim != 2 or pooled_tokens.shape[0] != expect:
        raise InputError(f"pooled image tokens have shape {list(pooled_tokens.shape)}; the layout needs [{expect}, D] ({layout.tiles} tiles)")
    if layout.newline:
        if newline is None:
            raise InputError("this image layout ends rows with image_newline, but no newline vector was given")
        table = np.concatenate([pooled_tokens, np.asarray(newline, dtype=pooled_tokens.dtype).reshape(1, -1)], axis=0)
    else:
        table = pooled_tokens
    return table[layout.index()]
