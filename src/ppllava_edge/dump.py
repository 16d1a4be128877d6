"""`--dump DIR`: the intermediate arrays of one answer, as .npy files with stable names shared by every stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import save_npy

# pixel_values [T,3,H,W] f32, clip_ids [L_clip] i64, input_ids [L] i64 (prompt with one image token),
# features [T,P,Dv] f32, relevance [T,h,w] f32, visual_tokens [N,D] f32, output_ids [n] i64
DUMP_NAMES = ("pixel_values", "clip_ids", "input_ids", "features", "relevance", "visual_tokens", "output_ids")


def write_dump(folder: str | Path, arrays: dict[str, np.ndarray]) -> list[Path]:
    """Write each array as <name>.npy (temp file + rename, so no half-written file is left)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, arr in arrays.items():
        tmp = folder / f".{name}.npy.tmp"
        try:
            save_npy(tmp, arr)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(folder / f"{name}.npy")
        written.append(folder / f"{name}.npy")
    return written
