"""`ask --relevance-png` draws exactly the relevance that `ask --dump` writes (two separate runs), over the sampled
frames of a video and over the anyres tiles of an image; the colours are checked against a colour map computed here
from the documented rule (level = floor(255 v / max + 0.5), linear between the stops)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ppllava_edge.cli.main import cli
from ppllava_edge.relevance import COLORMAP_STOPS, StripLayout

QUESTION = "Where does the disc go?"


def expected_colours(relevance: np.ndarray) -> np.ndarray:
    """[T,h,w,3] uint8, computed without the module's code."""
    r = relevance.astype(np.float64)
    level = np.floor(255.0 * r / r.max() + 0.5)
    x = level / 255.0
    pos = [p for p, _ in COLORMAP_STOPS]
    out = np.empty(r.shape + (3,))
    for k in range(3):
        out[..., k] = np.interp(x, pos, [c[k] for _, c in COLORMAP_STOPS])
    return np.floor(out + 0.5).astype(np.uint8)


def run_ask(*args) -> dict:
    res = CliRunner().invoke(cli, ["ask", *map(str, args), "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def heat_blocks(png, relevance_shape):
    """The heat-map row of the PNG: per frame, per patch, the block's pixels [T,h,w,s*s,3]."""
    t_count, h, w = relevance_shape
    lay = StripLayout.of(t_count, h, w)
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == lay.size[::-1]
    s = lay.scale
    blocks = np.empty((t_count, h, w, s * s, 3), np.uint8)
    for t in range(t_count):
        x0 = lay.column_x(t)
        for i in range(h):
            for j in range(w):
                y, x = lay.heat_y + i * s, x0 + j * s
                blocks[t, i, j] = img[y : y + s, x : x + s].reshape(-1, 3)
    return blocks


@pytest.mark.parametrize("kind", ["video", "image"])
def test_relevance_png_draws_the_dumped_relevance(tiny_export, sample_video, tmp_path, kind):
    if kind == "image":
        source = tmp_path / "photo.png"
        Image.fromarray((np.random.default_rng(5).random((90, 150, 3)) * 255).astype(np.uint8)).save(source)
    else:
        source = sample_video
    dump = tmp_path / "dump"
    png = tmp_path / "relevance.png"
    a = run_ask(tiny_export, source, QUESTION, "--frames", "6", "--dump", dump)
    b = run_ask(tiny_export, source, QUESTION, "--frames", "6", "--relevance-png", png)
    assert a["ids"] == b["ids"]
    rel = np.load(dump / "relevance.npy")
    frames = np.load(dump / "pixel_values.npy").shape[0]
    assert rel.ndim == 3 and rel.shape[0] == frames == (6 if kind == "video" else frames)
    assert frames > 1
    want = expected_colours(rel)
    assert len(np.unique(want.reshape(-1, 3), axis=0)) >= 3, "a flat map would not test the colours"
    blocks = heat_blocks(png, rel.shape)
    assert (blocks == blocks[..., :1, :]).all(), "each relevance patch is one flat block"
    np.testing.assert_array_equal(blocks[..., 0, :], want)
    # the relevance of another question is a different picture: the PNG follows the question asked
    other = tmp_path / "other.png"
    run_ask(tiny_export, source, "Count the squares in the top left corner.", "--frames", "6", "--relevance-png", other)
    assert not np.array_equal(heat_blocks(other, rel.shape)[..., 0, :], want)


def test_relevance_png_into_a_missing_folder_is_one_clear_error(tiny_export, sample_video, tmp_path):
    target = tmp_path / "nope" / "r.png"
    res = CliRunner().invoke(cli, ["ask", str(tiny_export), str(sample_video), QUESTION, "--relevance-png", str(target)])
    assert res.exit_code == 1 and f"no such folder {target.parent}" in res.output
    assert not target.parent.exists()
