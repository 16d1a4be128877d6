"""What the question looked at: the prompt-guided pooling's relevance map [T, h, w] as colours, a PNG strip (`ask
--relevance-png`) and the JSON the server returns with `"return_relevance": true` (drawn by the chat page).

`relevance` is the pooling's global softmax over all T·h·w patches of the clip (or of an image's tiles): the
values sum to 1. Colours are relative to the largest value of the answer, so frames compare with each other:
level = floor(255 · v / max + 0.5), colour = COLORMAP[level]. The chat page (serve/static/app.js) builds the same
map from `COLORMAP_STOPS`. Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .media.spec import CLIP, PreprocessSpec

# (position in 0..1, RGB): a dark-to-bright "inferno"-like ramp; app.js holds the same stops
COLORMAP_STOPS = ((0.0, (0, 0, 4)), (0.25, (87, 16, 110)), (0.5, (188, 55, 84)), (0.75, (249, 142, 9)), (1.0, (252, 255, 164)))


def _colormap() -> np.ndarray:
    pos = np.array([p for p, _ in COLORMAP_STOPS])
    rgb = np.array([c for _, c in COLORMAP_STOPS], np.float64)
    x = np.arange(256) / 255.0
    return np.floor(np.stack([np.interp(x, pos, rgb[:, k]) for k in range(3)], axis=1) + 0.5).astype(np.uint8)


COLORMAP = _colormap()  # [256, 3] uint8


def levels(relevance: np.ndarray) -> np.ndarray:
    """uint8 levels of a relevance array, relative to its largest value (all zeros when that is not > 0)."""
    r = np.asarray(relevance, np.float64)
    top = float(r.max()) if r.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return np.zeros(r.shape, np.uint8)
    return np.clip(np.floor(255.0 * np.clip(r, 0, None) / top + 0.5), 0, 255).astype(np.uint8)


def heat_rgb(relevance: np.ndarray) -> np.ndarray:
    """[..., h, w] relevance -> [..., h, w, 3] uint8 colours."""
    return COLORMAP[levels(relevance)]


def frame_pixels(pixel_values: np.ndarray, spec: PreprocessSpec = CLIP) -> np.ndarray:
    """[T, 3, S, S] float pixels normalised by `spec` (the export's, `ExportManifest.preprocess`) -> [T, S, S, 3]
    uint8 (the frames the model saw)."""
    px = np.asarray(pixel_values, np.float32).transpose(0, 2, 3, 1)
    rgb = px * np.asarray(spec.std, np.float32) + np.asarray(spec.mean, np.float32)
    return np.clip(np.floor(rgb * 255.0 + 0.5), 0, 255).astype(np.uint8)


def _check(relevance: np.ndarray, pixel_values: np.ndarray | None) -> None:
    if relevance.ndim != 3 or 0 in relevance.shape:
        raise ValueError(f"relevance must be [frames, h, w], got shape {relevance.shape}")
    if pixel_values is not None and pixel_values.shape[0] != relevance.shape[0]:
        raise ValueError(f"{pixel_values.shape[0]} frames of pixels for {relevance.shape[0]} relevance maps")


# ---- the PNG strip -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StripLayout:
    """Where `strip_image` puts things: per frame a column with a label, the frame with the heat map over it,
    then the heat map alone, each relevance patch a `scale` x `scale` block."""

    frames: int
    h: int
    w: int
    scale: int
    margin: int = 8
    gap: int = 6
    label: int = 14
    title: int = 18
    bar: int = 10

    @classmethod
    def of(cls, frames: int, h: int, w: int, cell: int = 96) -> StripLayout:
        return cls(frames, h, w, max(1, round(cell / max(h, w))))

    @property
    def cell_w(self) -> int:
        return self.w * self.scale

    @property
    def cell_h(self) -> int:
        return self.h * self.scale

    def column_x(self, t: int) -> int:
        return self.margin + t * (self.cell_w + self.gap)

    @property
    def overlay_y(self) -> int:
        return self.margin + self.title + self.label

    @property
    def heat_y(self) -> int:
        return self.overlay_y + self.cell_h + self.gap

    @property
    def bar_y(self) -> int:
        return self.heat_y + self.cell_h + self.gap

    @property
    def size(self) -> tuple[int, int]:
        width = max(self.column_x(self.frames) - self.gap + self.margin, 256 + 2 * self.margin + 120)
        return width, self.bar_y + self.bar + self.label + self.margin


def strip_image(relevance: np.ndarray, pixel_values: np.ndarray | None = None, kind: str = "video", title: str = "", spec: PreprocessSpec = CLIP) -> Image.Image:
    """One column per sampled frame (per tile for an image): the frame with its heat map blended over it (when
    `pixel_values` are given), then the heat map alone with exact colours (nearest-neighbour blocks), and a colour
    bar from 0 to the largest value."""
    relevance = np.asarray(relevance, np.float32)
    _check(relevance, pixel_values)
    t_count, h, w = relevance.shape
    lay = StripLayout.of(t_count, h, w)
    img = Image.new("RGB", lay.size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((lay.margin, lay.margin), title[:160], fill=(0, 0, 0), font=font)
    heat = heat_rgb(relevance)
    frames = frame_pixels(pixel_values, spec) if pixel_values is not None else None
    name = {"image": "tile", "images": "image"}.get(kind, "frame")  # an image's tiles, several images, a video's frames
    for t in range(t_count):
        x = lay.column_x(t)
        draw.text((x, lay.margin + lay.title), f"{name} {t + 1}", fill=(60, 60, 60), font=font)
        block = Image.fromarray(heat[t]).resize((lay.cell_w, lay.cell_h), Image.Resampling.NEAREST)
        if frames is not None:
            shown = Image.fromarray(frames[t]).resize((lay.cell_w, lay.cell_h), Image.Resampling.BILINEAR)
            smooth = Image.fromarray(heat[t]).resize((lay.cell_w, lay.cell_h), Image.Resampling.BILINEAR)
            img.paste(Image.blend(shown, smooth, 0.5), (x, lay.overlay_y))
        else:
            img.paste(block, (x, lay.overlay_y))
        img.paste(block, (x, lay.heat_y))
    bar = Image.fromarray(np.repeat(COLORMAP[None], lay.bar, axis=0))
    img.paste(bar, (lay.margin, lay.bar_y))
    draw.text((lay.margin, lay.bar_y + lay.bar + 1), "0", fill=(60, 60, 60), font=font)
    draw.text((lay.margin + 256 + 6, lay.bar_y - 2), f"max {float(relevance.max()):.3g}", fill=(60, 60, 60), font=font)
    return img


def write_relevance_png(
    path: str | Path, relevance: np.ndarray, pixel_values: np.ndarray | None = None, kind: str = "video", title: str = "", spec: PreprocessSpec = CLIP
) -> Path:
    """`strip_image` saved as PNG (temp file in the same folder + rename: no half-written file)."""
    path = Path(path)
    img = strip_image(relevance, pixel_values, kind, title, spec)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", optimize=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---- the server's JSON -------------------------------------------------------------------------------------------
THUMBNAIL_PX = 96


def relevance_json(relevance: np.ndarray, pixel_values: np.ndarray | None, kind: str, spec: PreprocessSpec = CLIP) -> dict:
    """The response's `relevance` object: `shape` [frames, h, w], `values` (nested lists, 6 significant digits),
    `max`, `kind` ("video" or "image": then the frames are the anyres tiles) and `thumbnails`: one small JPEG
    data: URL per frame, the pixels the model saw (empty when there are no pixels)."""
    relevance = np.asarray(relevance, np.float32)
    _check(relevance, pixel_values)
    values = [[[float(f"{v:.6g}") for v in row] for row in frame] for frame in relevance.tolist()]
    thumbs = []
    if pixel_values is not None:
        for frame in frame_pixels(pixel_values, spec):
            buf = io.BytesIO()
            Image.fromarray(frame).resize((THUMBNAIL_PX, THUMBNAIL_PX), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=80)
            thumbs.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return {"kind": kind, "shape": list(relevance.shape), "max": float(f"{float(relevance.max()):.6g}"), "values": values, "thumbnails": thumbs}


def relevance_kind(path: str | Path, relevance: np.ndarray) -> str:
    """"image" when the maps are an image's anyres tiles (an image file, or a one-row .npy), else "video"."""
    from .media import input_kind

    kind = input_kind(path)
    return "image" if kind == "image" or (kind == "npy" and np.asarray(relevance).shape[0] == 1) else "video"
