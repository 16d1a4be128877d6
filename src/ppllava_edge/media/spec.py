"""One preprocessing spec per checkpoint family: how frames and image tiles become pixel values (no torch).

The two released families were trained through different transformers processors, so their pixels differ:

- "clip" (vicuna-clip): the authors' `LlavaNextVidProcessor` squashes each frame to S×S (bicubic, aspect not kept)
  and normalises with CLIP's mean/std; images take `LlavaNextImageProcessor`'s anyres tiles (image.py).
- "siglip" (qwen-siglip): the authors' `LlavaOnevisionVidProcessor` (`ppllava/datasets/datasets/llavavid_processor.py`,
  a `LlavaOnevisionImageProcessor` whose best resolution is pinned to the tile) fits each frame into S×S with its
  aspect kept, pads it with black and squashes the result to S×S; images take `LlavaOnevisionImageProcessor`'s anyres
  tiles, whose short crops are squashed to S×S too; both normalise with SigLIP's mean/std 0.5.

`SPECS` maps `PPLLaVAConfig.family` to its spec (config.py's `preprocess` property reads it), and export.json records
the spec (`image.preprocess`) so the runtime reads the same one; exports made before it get `CLIP`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

FrameMode = Literal["squash", "fit_pad"]
TileMode = Literal["llava_next", "onevision"]


@dataclass(frozen=True)
class PreprocessSpec:
    """How one family's processor turns frames and images into pixel values.

    Attributes:
        name: "clip" or "siglip" (what export.json records).
        mean, std: per-channel normalisation after `x / 255`.
        frames: "squash" (resize straight to S×S) or "fit_pad" (aspect kept into S×S, black padding, then S×S).
        tiles: the anyres flavour for images: "llava_next" (short crops resized on their short side and centre-cropped)
            or "onevision" (short crops squashed to S×S).
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    frames: FrameMode
    tiles: TileMode

    def as_dict(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std), "frames": self.frames, "tiles": self.tiles, "resample": "bicubic"}


CLIP = PreprocessSpec("clip", CLIP_MEAN, CLIP_STD, "squash", "llava_next")
SIGLIP = PreprocessSpec("siglip", SIGLIP_MEAN, SIGLIP_STD, "fit_pad", "onevision")
SPECS = {"vicuna-clip": CLIP, "qwen-siglip": SIGLIP}
"""`PPLLaVAConfig.family` -> its spec (the family names are config.py's VICUNA_CLIP / QWEN_SIGLIP)."""


def spec_named(name: str | None, where: str = "export.json image.preprocess") -> PreprocessSpec:
    """The spec an export recorded by name; None (an export made before specs) is the CLIP one.

    Raises:
        ConfigError: an unknown name (a newer export read by an older runtime).
    """
    if name is None:
        return CLIP
    for spec in SPECS.values():
        if spec.name == name:
            return spec
    known = ", ".join(sorted(s.name for s in SPECS.values()))
    raise ConfigError(f"{where}: unknown preprocessing {name!r} (known: {known}).\nHint: re-export with this version of ppllava-edge.")
