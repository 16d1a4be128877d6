"""The route video → answer as free functions, one place each (torch-free; gpt-fast's generate.py shape):

    frames = read_frames(path, num_frames, image_size)         # decode_video + preprocess -> pixel_values
                                                               # (read_image_tiles: an image; read_images: several)
    values, keys = encode(sessions["vision"], frames.pixel_values)     # vision
    tokens, relevance = pool(sessions["prompt_pool"], clip_ids, keys, values)   # pool -> visual_tokens, relevance
    embeds = splice(embed_table, input_ids, tokens, image_token_id, dtype)      # the prompt with the visual tokens
    out = generate(decoder, embed, embeds, config)              # prefill + decode steps -> output_ids

`Pipeline.ask` / `features` / `image_features`, the bench's baseline and PyTorch runners (their reading side),
`collect_calibration`, the accuracy gate and the quality measures call these; a graph feed of the vision graph,
the pools or projector_head is built here only. A session is anything with ONNX Runtime's
`run(output_names, feed) -> [arrays]` (ORT sessions, TensorRT stage runners, Triton's BLS requests).

One vocabulary (`VOCABULARY`): each stage's name is its timing name in `Timings`, the bench's `STAGES` and the
server's metrics, and the arrays it produces are the `--dump` file names (dump.DUMP_NAMES).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from .generation import generate  # noqa: F401  (the last stage: prefill + decode steps, see generation.py)

# stage -> (timing names, arrays it produces = --dump file names)
VOCABULARY: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "read_frames": (("decode_video", "preprocess"), ("pixel_values",)),
    "encode": (("vision",), ()),  # values / keys (the PyTorch reference dumps the tower's `features`)
    "pool": (("pool",), ("relevance", "visual_tokens")),
    "splice": ((), ()),  # timed inside "pool" (a gather and a concatenation)
    "generate": (("prefill", "decode_step"), ("output_ids",)),
}
TIMED_STAGES = ("decode_video", "preprocess", "vision", "pool", "prefill", "decode_step", "e2e")
"""Per-answer timings in route order (e2e: the whole answer); the bench's STAGES."""


@dataclass
class Frames:
    """What `read_frames` / `read_image_tiles` give: preprocessed pixels [T, 3, S, S] and the two timings (ms)."""

    pixel_values: np.ndarray
    decode_ms: float
    preprocess_ms: float
    warnings: list[str] = field(default_factory=list)
    shown: tuple[int, int] | None = None  # an image's (EXIF-oriented) size


def read_frames(path: str | Path, num_frames: int, image_size: int) -> Frames:
    """Decode `num_frames` frames of a video and preprocess them (CLIP resize / crop / normalise)."""
    from ..media import load_video, preprocess_frames

    t0 = time.perf_counter()
    video = load_video(path, num_frames)
    t1 = time.perf_counter()
    px = preprocess_frames(video.frames, image_size)
    return Frames(px, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, list(video.warnings))


def read_image_tiles(path: str | Path, tile_size: int, grid_pinpoints) -> Frames:
    """Read an image (EXIF-oriented) and cut it into its anyres tiles (base tile first), preprocessed."""
    from ..media import preprocess_image, read_image

    t0 = time.perf_counter()
    img, shown = read_image(path)
    t1 = time.perf_counter()
    px = preprocess_image(img, tile_size, grid_pinpoints, image_size=shown).pixel_values
    return Frames(px, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, shown=shown)


def read_images(paths, image_size: int) -> Frames:
    """Several images of one question (the authors' multi-image path): each decoded upright and squashed to S x S as
    a video frame, [N, 3, S, S] in the order given."""
    from ..media import images_as_frames
    from ..media import read_images as decode_images

    t0 = time.perf_counter()
    images = decode_images(paths)
    t1 = time.perf_counter()
    px = images_as_frames(images, image_size)
    return Frames(px, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)


def encode(session, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vision graph on one clip: pixel_values [T, 3, S, S] -> (values, keys)."""
    values, keys = session.run(None, {"pixel_values": pixel_values})
    return values, keys


def encode_tiles(session, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vision graph on each anyres tile alone (T = 1), concatenated: [tiles, ...] (values, keys)."""
    outs = [encode(session, pixel_values[i : i + 1]) for i in range(pixel_values.shape[0])]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


def pool(session, clip_ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """prompt_pool / image_pool: the question's CLIP ids ([L] or [1, L]) against the clip's keys and values ->
    (visual_tokens, relevance)."""
    tokens, relevance = session.run(None, {"clip_ids": np.atleast_2d(clip_ids), "keys": keys, "values": values})
    return tokens, relevance


def project(session, values: np.ndarray) -> np.ndarray:
    """projector_head (the no-pooling baselines): values [N, Dv] -> visual tokens [N, D]."""
    (tokens,) = session.run(None, {"values": values})
    return tokens


def splice(table: np.ndarray, input_ids: np.ndarray, visual_tokens: np.ndarray, image_token_id: int, dtype, slots: int = 1) -> np.ndarray:
    """[L-slots+N, D]: the prompt's text embeddings (rows of `table`) with its `slots` image tokens replaced by the
    visual tokens, N / slots rows each in order (several images: image k's tokens at the k-th slot, as the authors'
    `_merge_input_ids_with_image_features` does)."""
    where = np.flatnonzero(input_ids == image_token_id)
    if where.size != slots or visual_tokens.shape[0] % slots:
        raise InputError(f"the prompt must hold {slots} image token(s) for {visual_tokens.shape[0]} visual tokens; found {where.size}")
    per_slot = visual_tokens.shape[0] // slots
    parts, start = [], 0
    for k, i in enumerate(where):
        parts += [table[input_ids[start:i]], visual_tokens[k * per_slot : (k + 1) * per_slot].astype(table.dtype)]
        start = i + 1
    parts.append(table[input_ids[start:]])
    return np.concatenate(parts, axis=0).astype(dtype)
