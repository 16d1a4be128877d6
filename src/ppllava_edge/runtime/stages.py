"""The route video → answer as free functions, one place each (torch-free; gpt-fast's generate.py shape):

    frames = read_frames(path, num_frames, image_size, spec)   # decode_video + preprocess (the family's spec) -> pixel_values
                                                               # (read_image_tiles: an image; read_images: several)
    values, keys = encode(sessions["vision"], frames.pixel_values)     # vision
    tokens, relevance = pool(sessions["prompt_pool"], clip_ids, keys, values, clip_mask)   # pool -> visual_tokens, relevance
    embeds = splice(embed_table, input_ids, tokens, image_token_id, dtype)      # the prompt with the visual tokens
    out = generate(decoder, embed, embeds, config)              # prefill + decode steps -> output_ids

`Pipeline.ask` / `features` / `image_features`, the bench's baseline and PyTorch runners (their reading side),
`collect_calibration` and its readers, the accuracy gate, the quality measures and the export's validation call
these; a graph feed of the vision graph, the pools or projector_head is built here only, and a decoder graph's feed
outside a KV decoder object too (`decoder_feed`). A session is anything with ONNX Runtime's
`run(output_names, feed) -> [arrays]` (ORT sessions, TensorRT stage runners, Triton's BLS requests).

One vocabulary (`VOCABULARY`): each stage's name is its timing name in `Timings`, the bench's `STAGES` and the
server's metrics, and the arrays it produces are the `--dump` file names (dump.DUMP_NAMES).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InferenceError, InputError
from ..media.spec import CLIP, PreprocessSpec
from .decoder import adapt_feed, kv_names
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


def read_frames(path: str | Path, num_frames: int, image_size: int, spec: PreprocessSpec = CLIP) -> Frames:
    """Decode `num_frames` frames of a video and preprocess them as the checkpoint's family does (`spec`, recorded in
    export.json: `ExportManifest.preprocess`; CLIP's squash by default)."""
    from ..media import load_video, preprocess_frames

    t0 = time.perf_counter()
    video = load_video(path, num_frames)
    t1 = time.perf_counter()
    px = preprocess_frames(video.frames, image_size, spec)
    return Frames(px, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, list(video.warnings))


def read_image_tiles(path: str | Path, tile_size: int, grid_pinpoints, spec: PreprocessSpec = CLIP) -> Frames:
    """Read an image (EXIF-oriented) and cut it into its anyres tiles (base tile first), preprocessed by `spec`."""
    from ..media import preprocess_image, read_image

    t0 = time.perf_counter()
    img, shown = read_image(path)
    t1 = time.perf_counter()
    px = preprocess_image(img, tile_size, grid_pinpoints, image_size=shown, spec=spec).pixel_values
    return Frames(px, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3, shown=shown)


def read_images(paths, image_size: int, spec: PreprocessSpec = CLIP) -> Frames:
    """Several images of one question (the authors' multi-image path): each decoded upright and preprocessed as a
    video frame by the family's `spec` (as `read_frames` does), [N, 3, S, S] in the order given."""
    from ..media import images_as_frames
    from ..media import read_images as decode_images

    t0 = time.perf_counter()
    images = decode_images(paths)
    t1 = time.perf_counter()
    px = images_as_frames(images, image_size, spec)
    return Frames(px, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3)


def vision_feed(pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    """The vision graph's feed (also what its calibration reader yields)."""
    return {"pixel_values": pixel_values}


def encode(session, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vision graph on one clip: pixel_values [T, 3, S, S] -> (values, keys)."""
    values, keys = session.run(None, vision_feed(pixel_values))
    return values, keys


def encode_tiles(session, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The vision graph on each anyres tile alone (T = 1), concatenated: [tiles, ...] (values, keys)."""
    outs = [encode(session, pixel_values[i : i + 1]) for i in range(pixel_values.shape[0])]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])


CLIP_MASK = "clip_mask"
"""The pools' padding-mask input: graphs of the Qwen2 + SigLIP family take it (SigLIP's text attention is
bidirectional), CLIP's causal ones do not; a session's declared inputs say which."""


def takes_clip_mask(session) -> bool:
    """Whether a pool graph (an ORT session, or a runner without `get_inputs`: assumed not) has a clip_mask input."""
    get_inputs = getattr(session, "get_inputs", None)
    return get_inputs is not None and any(i.name == CLIP_MASK for i in get_inputs())


def pool_query(clip_ids, clip_mask=None) -> dict:
    """The pools' question inputs by name (numpy or torch arrays): clip_ids, and clip_mask for a SigLIP pool (CLIP's
    takes none) - what calibration stores beside keys and values and what the exporter traces the pools with."""
    return {"clip_ids": clip_ids} if clip_mask is None else {"clip_ids": clip_ids, CLIP_MASK: clip_mask}


def pool(session, clip_ids: np.ndarray, keys: np.ndarray, values: np.ndarray, clip_mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """prompt_pool / image_pool: the question's relevance-tokenizer ids ([L] or [1, L]; and its padding mask for a
    SigLIP pool) against the clip's keys and values -> (visual_tokens, relevance). The mask is fed when given (a
    graph without the input is then refused by ONNX Runtime, naming it); a SigLIP pool run without one is refused here."""
    if clip_mask is None and takes_clip_mask(session):
        raise InferenceError("pool: this export's pool graph takes the question's clip_mask (SigLIP's padding mask) and none was given")
    mask = None if clip_mask is None else np.atleast_2d(np.asarray(clip_mask, dtype=np.int64))
    tokens, relevance = session.run(None, {**pool_query(np.atleast_2d(clip_ids), mask), "keys": keys, "values": values})
    return tokens, relevance


def empty_past(num_layers: int, kv_heads: int, head_dim: int, dtype, batch: int = 1) -> list[np.ndarray]:
    """A decoder's cache before its first run: one [batch, kv_heads, 0, head_dim] array per `past.*` input."""
    return [np.zeros((batch, kv_heads, 0, head_dim), dtype) for _ in kv_names(num_layers)[0]]


def decoder_feed(inputs_embeds: np.ndarray, past: list[np.ndarray], input_names=None) -> dict[str, np.ndarray]:
    """One run of a decoder graph without a KV decoder object (validation, the accuracy gate, calibration feeds):
    `inputs_embeds` [B, S, D] after `past`, one [B, kv, P, hd] array per runtime/decoder.py `kv_names` input in that
    order (P cached positions; `empty_past` for a prefill). The feed is the concat contract (mask and positions
    P..P+S); with the graph's `input_names` it follows that graph's contract (in place: seqlens_k, `adapt_feed`)."""
    b, s, _ = inputs_embeds.shape
    start = past[0].shape[2] if past else 0
    feed = {"inputs_embeds": inputs_embeds, "attention_mask": np.ones((b, start + s), np.int64),
            "position_ids": np.repeat(np.arange(start, start + s, dtype=np.int64)[None], b, axis=0),
            **dict(zip(kv_names(len(past) // 2)[0], past))}
    return feed if input_names is None else adapt_feed(feed, input_names)


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
