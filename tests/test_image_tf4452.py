"""Images exactly as the authors' pinned processor makes them (transformers 4.45.2, what the released model was
trained with), against tests/fixtures/images_tf4452.npz made by tools/make_image_fixtures.py in a side environment:

- tiles of a landscape, a square and a portrait picture: bit-exact (tolerance 0) at 84 px (the stored tiles) and at
  336 px with the released pinpoints (sha256 of the float32 tiles);
- best resolution and the unpadded crop map of ~10k image sizes: 4.45's `select_best_resolution`,
  `get_anyres_image_grid_shape`, `unpad_image`;
- `generate` on the tiny checkpoint: the tiles, visual tokens and greedy ids of the authors' path (their
  `encode_image` over 4.45's tiles, 4.45.2's LlamaForCausalLM greedy `generate`); `ask` gives the same ids.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from ppllava_edge.media.anyres import LLAVA_NEXT_PINPOINTS, fitted_size, image_layout
from ppllava_edge.media import CLIP_MEAN, CLIP_STD, load_image_tiles, preprocess_image, read_image
from ppllava_edge.runtime.generation import GenerationConfig

FIXTURE = Path(__file__).parent / "fixtures" / "images_tf4452.npz"
TINY_PINPOINTS = ((84, 168), (168, 84), (168, 168), (252, 84), (84, 252))
NAMES = ("landscape", "square", "portrait")


@pytest.fixture(scope="module")
def fx() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def files(fx, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tf4452")
    out = {}
    for name in NAMES:
        out[name] = d / f"{name}.png"
        out[name].write_bytes(fx[f"{name}/png"].tobytes())
    return out


def tiles_445(fx, name: str) -> np.ndarray:
    """The processor's float32 tiles: the stored uint8 levels rescaled and normalised as 4.45 does (float64 product,
    float32 result); the sha256 proves them equal to what the processor returned."""
    u8 = fx[f"{name}/tiles_u8"]
    mean = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, np.float32)[:, None, None]
    pv = ((u8 * (1 / 255)).astype(np.float32) - mean) / std
    assert hashlib.sha256(pv.tobytes()).hexdigest() == str(fx[f"{name}/tiles_sha256"])
    return pv


def test_fixture_is_from_transformers_4452(fx):
    meta = json.loads(str(fx["meta"]))
    assert meta["transformers"] == "4.45.2" and meta["authors_meta"] == "llava_interleave_meta.py"


@pytest.mark.parametrize("name", NAMES)
def test_tiles_equal_transformers_4452(fx, files, name):
    want = tiles_445(fx, name)
    ours = load_image_tiles(files[name], 84, TINY_PINPOINTS)
    assert ours.image_size == tuple(fx[f"{name}/image_size"]) and ours.best_resolution == tuple(fx[f"{name}/best_resolution"])
    assert ours.pixel_values.shape == want.shape and ours.pixel_values.dtype == np.float32
    diff = np.abs(ours.pixel_values - want).reshape(want.shape[0], -1).max(axis=1)
    assert diff.max() == 0.0, f"max |ours - 4.45| per tile: {diff.tolist()}"  # bit-exact
    released = load_image_tiles(files[name], 336, LLAVA_NEXT_PINPOINTS)
    assert list(released.pixel_values.shape) == fx[f"{name}/tiles336_shape"].tolist()
    assert released.best_resolution == tuple(fx[f"{name}/best336"])
    assert hashlib.sha256(released.pixel_values.tobytes()).hexdigest() == str(fx[f"{name}/tiles336_sha256"])


def test_odd_remainder_leaves_4452_one_pixel_short(fx):
    """What makes 4.45 differ: both non-square pictures are fitted into 168x168 with an odd remainder (67 px), the
    canvas is 167 px, and the last crop row (landscape) / column (portrait) is 83 px stretched back to 84."""
    for name, fitted in (("landscape", (101, 168)), ("portrait", (168, 101))):
        size, best = tuple(fx[f"{name}/image_size"]), tuple(fx[f"{name}/best_resolution"])
        assert best == (168, 168) and fitted_size(size, best) == fitted


@pytest.mark.parametrize("tile, pinpoints, key", [(84, TINY_PINPOINTS, "tiny"), (336, LLAVA_NEXT_PINPOINTS, "released")])
def test_best_resolution_and_unpadding_equal_4452(fx, tile, pinpoints, key):
    rows = fx[f"sweep/{key}"]
    assert len(rows) > 4000
    pooled = {84: 2, 336: 8}[tile]
    bad = []
    for h, w, bh, bw, y0, n_rows, x0, n_cols in rows.tolist():
        layout = image_layout((h, w), pinpoints, tile, pooled)
        got = (layout.best_resolution, layout.map_rows, layout.map_cols)
        want = ((bh, bw), n_rows, n_cols)
        if got != want or (n_rows and n_cols and (layout.window[0], layout.window[2]) != (y0, x0)):
            bad.append(((h, w), got, want))
    assert not bad, f"{len(bad)} sizes differ from 4.45.2, e.g. {bad[:5]}"


@pytest.fixture(scope="module")
def same_checkpoint(fx, tiny_ckpt):
    digest = hashlib.sha256()
    for shard in sorted(Path(tiny_ckpt).glob("*.safetensors")):
        digest.update(shard.read_bytes())
    assert digest.hexdigest() == str(fx["checkpoint_sha256"]), "the tiny preset changed: re-run tools/make_image_fixtures.py"


@pytest.mark.parametrize("name", NAMES)
def test_generate_gives_the_authors_path(fx, files, reference, same_checkpoint, name):
    meta = json.loads(str(fx["meta"]))
    got = reference.answer(files[name], str(fx[f"{name}/question"]), max_new_tokens=meta["max_new_tokens"])
    np.testing.assert_array_equal(got.arrays["pixel_values"], tiles_445(fx, name))
    np.testing.assert_array_equal(got.arrays["input_ids"], fx[f"{name}/input_ids"])
    np.testing.assert_array_equal(got.arrays["clip_ids"], fx[f"{name}/clip_ids"])
    want = fx[f"{name}/visual_tokens"]
    assert got.arrays["visual_tokens"].shape == want.shape
    assert np.abs(got.arrays["visual_tokens"] - want).max() <= 1e-5
    assert got.output_ids == fx[f"{name}/output_ids"].tolist()


@pytest.mark.parametrize("name", ["landscape", "portrait"])
def test_ask_gives_the_authors_ids(fx, files, pipe, reference, same_checkpoint, name):
    meta = json.loads(str(fx["meta"]))
    got = pipe.ask(files[name], str(fx[f"{name}/question"]), generation=GenerationConfig(max_new_tokens=meta["max_new_tokens"]), keep_arrays=True)
    np.testing.assert_array_equal(got.arrays["pixel_values"], tiles_445(fx, name))
    assert np.abs(got.arrays["visual_tokens"] - fx[f"{name}/visual_tokens"]).max() <= 1e-4
    assert got.ids == fx[f"{name}/output_ids"].tolist()


def test_preprocess_image_matches_the_file_path(fx, files):
    """`ask` preprocesses with `read_image` + `preprocess_image`; `generate` with `load_image_tiles`: one function."""
    img, shown = read_image(files["landscape"])
    a = preprocess_image(img, 84, TINY_PINPOINTS, image_size=shown).pixel_values
    np.testing.assert_array_equal(a, tiles_445(fx, "landscape"))
