"""The image path (LLaVA-NeXT anyres) against transformers' own processor and helpers, and PyTorch vs the runtime.

- preprocessing: transformers 4.45.2's processor (the authors' pin) in test_image_tf4452.py; here, where 5.x's
  `LlavaNextImageProcessorPil` agrees with it and where it must not (the short crops of an odd remainder);
- assembly == the authors' `encode_image` written with transformers' `get_anyres_image_grid_shape` / `unpad_image`;
- `ask` on the export == `generate` for the same images (visual tokens <= 1e-4, greedy ids exact).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ppllava_edge.media.anyres import LLAVA_NEXT_PINPOINTS, assemble_tokens, fitted_size, image_layout, select_best_resolution
from ppllava_edge.cli.main import cli
from ppllava_edge.errors import ConfigError, VideoError
from ppllava_edge.manifest import ExportManifest, load_manifest
from ppllava_edge.media import CLIP_STD, load_image_tiles, make_test_photo, preprocess_image, read_image, read_image_size
from ppllava_edge.runtime.generation import GenerationConfig
from ppllava_edge.runtime.pipeline import Pipeline

ONE_UINT8_STEP = 1 / 255 / min(CLIP_STD)  # one uint8 level after CLIP normalisation (~0.0146)
TINY_PINPOINTS = ((84, 168), (168, 84), (168, 168), (252, 84), (84, 252))  # the released tile grids at 84 px
SINGLE_TILE_PINPOINTS = ((84, 84), (84, 168), (168, 84))  # the best resolution of a small image is one crop


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 RGB picture with smooth ramps, edges and noise (so resampling matters)."""
    return make_test_photo(w, h, seed)


def _hf_processor(tile: int, pinpoints):
    pytest.importorskip("transformers")
    from transformers import LlavaNextImageProcessorPil

    return LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                      image_grid_pinpoints=[list(p) for p in pinpoints], resample=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Files of every kind the image path must take."""
    d = tmp_path_factory.mktemp("images")
    out = {}
    for name, (w, h) in {"landscape": (200, 120), "portrait": (90, 150), "square": (100, 100), "tiny": (5, 3),
                         "wide": (300, 90), "tall": (90, 300)}.items():
        out[name] = d / f"{name}.png"
        Image.fromarray(photo(w, h, seed=len(out))).save(out[name])
    out["jpeg"] = d / "photo.jpg"
    Image.fromarray(photo(160, 120, seed=9)).save(out["jpeg"], quality=90)
    out["grey"] = d / "grey.png"
    Image.fromarray(photo(130, 70, seed=10)[..., 0]).save(out["grey"])  # mode L
    rgba = np.concatenate([photo(110, 80, seed=11), np.full((80, 110, 1), 128, np.uint8)], axis=-1)
    out["rgba"] = d / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(out["rgba"])
    # a phone photo stored sideways: the upright 120x70 picture rotated, with EXIF orientation 6 (rotate to show)
    out["upright"] = d / "upright.png"
    up = Image.fromarray(photo(120, 70, seed=12))
    up.save(out["upright"])
    exif = Image.Exif()
    exif[0x0112] = 6
    out["exif-rotated"] = d / "rotated.png"
    up.transpose(Image.Transpose.ROTATE_90).save(out["exif-rotated"], exif=exif.tobytes())
    return out


# ---- preprocessing vs transformers 5.x's LlavaNextImageProcessor (4.45.2 itself: test_image_tf4452.py) ------------
@pytest.mark.parametrize("tile, pinpoints", [(336, LLAVA_NEXT_PINPOINTS), (84, TINY_PINPOINTS), (84, SINGLE_TILE_PINPOINTS)],
                         ids=["released-336", "tiny-84", "single-tile"])
@pytest.mark.parametrize("w, h", [(640, 480), (480, 640), (500, 500), (60, 40), (7, 5), (1500, 420), (420, 1500)],
                         ids=["landscape", "portrait", "square", "small", "tiny", "1x3", "3x1"])
def test_preprocessing_differs_from_transformers_5_only_on_the_short_crops(tile, pinpoints, w, h):
    """We follow transformers 4.45.2 (the authors' pin). 5.x agrees (within one uint8 step: its own resampling) on
    every tile except, when the fitted image leaves an odd remainder, the last crop row (or column): 4.45's canvas
    is one pixel short there and that crop is stretched back to S x S; 5.x pads it instead."""
    img = Image.fromarray(photo(w, h, seed=w * h))
    ref = _hf_processor(tile, pinpoints)(img, return_tensors="np")
    ours = preprocess_image(img, tile, pinpoints)
    want = ref["pixel_values"][0]
    assert ours.pixel_values.shape == want.shape == (1 + ours.grid[0] * ours.grid[1], 3, tile, tile)
    assert ours.pixel_values.dtype == np.float32
    assert tuple(ref["image_sizes"][0]) == ours.image_size == (h, w)
    best = ours.best_resolution
    new_h, new_w = fitted_size((h, w), best)
    rows, cols = ours.grid
    short = np.zeros(ours.grid, bool)
    short[-1, :] |= (best[0] - new_h) % 2 == 1
    short[:, -1] |= (best[1] - new_w) % 2 == 1
    diff = np.abs(ours.pixel_values - want).reshape(len(want), -1).max(axis=1)
    assert diff[0] <= ONE_UINT8_STEP and (diff[1:][~short.ravel()] <= ONE_UINT8_STEP).all(), diff
    assert (diff[1:][short.ravel()] > ONE_UINT8_STEP).all(), diff


def test_checkpoint_pinpoints_are_what_the_processor_gets(tiny_ckpt):
    from ppllava_edge.config import load_config

    cfg = load_config(tiny_ckpt)
    assert cfg.image_grid_pinpoints == TINY_PINPOINTS  # the released tile grids, 84-px tiles (config.json)
    assert json.loads((tiny_ckpt / "config.json").read_text())["image_grid_pinpoints"] == [list(p) for p in TINY_PINPOINTS]


@pytest.mark.parametrize("kind", ["jpeg", "grey", "rgba", "exif-rotated"])
def test_decoded_kinds_equal_the_processor_on_the_upright_rgb_image(images, kind):
    """Grayscale / RGBA / EXIF-rotated files: the processor (4.45.2's rules, test_image_tf4452.py) on the upright
    `convert("RGB")` image (what the authors' loaders hand it; transformers' `load_image` applies EXIF the same way)."""
    from PIL import ImageOps

    with Image.open(images[kind]) as f:
        upright = ImageOps.exif_transpose(f).convert("RGB")
    ref = preprocess_image(upright, 84, TINY_PINPOINTS)
    ours = load_image_tiles(images[kind], 84, TINY_PINPOINTS)
    np.testing.assert_array_equal(ours.pixel_values, ref.pixel_values)
    assert ours.image_size == ref.image_size == read_image_size(images[kind]) == (upright.height, upright.width)


def test_exif_rotated_photo_is_seen_upright(images):
    assert read_image_size(images["exif-rotated"]) == (70, 120)  # stored 70 wide x 120 high, shown 120x70
    a = load_image_tiles(images["exif-rotated"], 84, TINY_PINPOINTS)
    b = load_image_tiles(images["upright"], 84, TINY_PINPOINTS)
    assert a.image_size == b.image_size == (70, 120)
    np.testing.assert_array_equal(a.pixel_values, b.pixel_values)


def test_grey_and_rgba_become_rgb_like_the_authors_loader(images):
    grey, _ = read_image(images["grey"])
    rgba, _ = read_image(images["rgba"])
    assert grey.mode == rgba.mode == "RGB"
    g = np.asarray(grey)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])
    np.testing.assert_array_equal(np.asarray(rgba), photo(110, 80, seed=11))  # alpha dropped, colours kept


# ---- assembly == transformers' get_anyres_image_grid_shape + unpad_image ----------------------------------------
def _authors_assembly(pooled, image_size, pinpoints, tile, newline):
    """`encode_image` after the projector (ppllava/models/llava_interleave_meta.py), with transformers' helpers."""
    import torch
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    g = int(pooled.shape[1] ** 0.5)
    if pooled.shape[0] == 1:
        return torch.cat((pooled[0], newline[None]), dim=0)
    base, crops = pooled[0], pooled[1:]
    nh, nw = get_anyres_image_grid_shape(list(image_size), [list(p) for p in pinpoints], tile)
    f = crops.view(nh, nw, g, g, -1).permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    f = unpad_image(f, list(image_size))
    f = torch.cat((f, newline[:, None, None].expand(*f.shape[:-1], 1)), dim=-1)
    return torch.cat((base, f.flatten(1, 2).transpose(0, 1)), dim=0)


def _sizes_for(pinpoint, tile):
    """Image sizes (H, W) around a pinpoint: its own aspect (no unpadding), wider, taller, smaller, larger, odd."""
    ph, pw = pinpoint
    out = set()
    for scale in (0.13, 0.5, 1.0, 1.7, 3.1):
        for aspect in (1.0, 0.83, 1.21, 0.61, 1.63):
            out.add((max(1, round(ph * scale * aspect)), max(1, round(pw * scale / aspect))))
    out |= {(ph - 37, pw), (ph, pw - 53), (ph + 1, pw), (1, 1), (3, 1000), (1000, 3)}
    return sorted(out)


@pytest.mark.parametrize("tile, pooled, pinpoints", [(336, 8, LLAVA_NEXT_PINPOINTS), (84, 2, TINY_PINPOINTS), (84, 2, SINGLE_TILE_PINPOINTS)],
                         ids=["released-336", "tiny-84", "single-tile"])
def test_assembly_equals_transformers_unpad_on_every_pinpoint(tile, pooled, pinpoints):
    """Token order against the authors' assembly with this environment's (5.x) helpers, on sizes where 5.x's rounded
    `unpad_image` keeps the same window as 4.45.2's `int()` (the sizes where they differ: test_image_tf4452.py)."""
    torch = pytest.importorskip("torch")
    covered: dict[tuple, int] = {tuple(p): 0 for p in pinpoints}
    unpadded = 0
    for pinpoint in pinpoints:
        for size in _sizes_for(pinpoint, tile):
            layout = image_layout(size, pinpoints, tile, pooled)
            best = select_best_resolution(size, pinpoints)
            covered[best] += 1
            # every pooled token carries its own (tile, row, col) so any misplacement shows; newline = (-1, -1, -1)
            t, y, x = np.meshgrid(np.arange(layout.tiles), np.arange(pooled), np.arange(pooled), indexing="ij")
            tokens = np.stack([t, y, x], axis=-1).reshape(layout.tiles, pooled * pooled, 3).astype(np.float32)
            newline = np.full(3, -1, np.float32)
            want = _authors_assembly(torch.from_numpy(tokens), size, pinpoints, tile, torch.from_numpy(newline)).numpy()
            got = assemble_tokens(tokens.reshape(-1, 3), newline, layout)
            assert got.shape == want.shape == (layout.num_tokens, 3), (size, best)
            np.testing.assert_array_equal(got, want, err_msg=f"image {size}, pinpoint {best}")
            rows = layout.grid[0] * pooled
            unpadded += layout.map_rows * layout.map_cols < rows * layout.grid[1] * pooled
    assert all(n >= 3 for n in covered.values()), covered  # every pinpoint chosen by several sizes
    assert unpadded > 10  # and many of them really unpadded


def test_model_assembly_uses_the_same_rules(tiny_model):
    torch = pytest.importorskip("torch")
    layout = tiny_model.cfg.image_layout((120, 200))  # the 200x120 picture on the tiny preset
    assert (layout.tiles, layout.grid, layout.best_resolution, layout.num_tokens) == (5, (2, 2), (168, 168), 14)
    tokens = torch.randn(layout.tiles * 4, tiny_model.cfg.text.hidden_size)
    want = _authors_assembly(tokens.reshape(layout.tiles, 4, -1), (120, 200), TINY_PINPOINTS, 84, tiny_model.image_newline.detach())
    got = tiny_model.assemble_image(tokens, layout)
    assert torch.equal(got, want)
    np.testing.assert_array_equal(assemble_tokens(tokens.numpy(), tiny_model.image_newline.detach().numpy(), layout), want.numpy())


def test_tiles_go_through_the_tower_one_by_one_like_the_authors_4d_input(tiny_model):
    """The authors' tower takes [N,3,H,W] as N clips of T = 1: our per-tile encoding equals the independent port run
    on a batch of N one-frame clips (the BT-Adapter's temporal attention never mixes tiles)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    from .reference import PortTower

    s = tiny_model.cfg.vision.image_size
    px = torch.randn(5, 3, s, s, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = PortTower(tiny_model).eval()(px[:, None])[-2][:, 1:]
        got = tiny_model.encode_tiles(px)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, tiny_model.encode_video(px), atol=1e-3)  # as one 5-frame clip it would differ


def test_relevance_is_one_softmax_over_all_tiles(tiny_model):
    torch = pytest.importorskip("torch")
    s = tiny_model.cfg.vision.image_size
    px = torch.randn(5, 3, s, s, generator=torch.Generator().manual_seed(6))
    ids = torch.full((1, 248), 49407)
    ids[0, :4] = torch.tensor([49406, 320, 1125, 539])
    with torch.no_grad():
        out = tiny_model.visual_tokens(px, ids, image=True, image_size=(120, 200))
    g = out.relevance
    assert g.shape == (5, 6, 6) and abs(float(g.sum()) - 1.0) < 1e-5  # jointly over the tiles (tiles act as frames)
    per_tile = [float(g[i].sum()) for i in range(5)]
    assert max(per_tile) < 0.999 and out.visual_tokens.shape[0] == 14


# ---- the torch-free runtime == the PyTorch reference ------------------------------------------------------------
def _same_answer(pipe, reference, path, question="What is in the picture?"):
    want = reference.answer(path, question, max_new_tokens=10)
    got = pipe.ask(path, question, generation=GenerationConfig(max_new_tokens=10), keep_arrays=True)
    assert got.ids == want.output_ids, path.name
    for name in ("pixel_values", "clip_ids", "input_ids"):
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name], err_msg=name)
    assert got.arrays["visual_tokens"].shape == want.arrays["visual_tokens"].shape
    assert np.abs(got.arrays["visual_tokens"] - want.arrays["visual_tokens"]).max() <= 1e-4
    assert np.abs(got.arrays["relevance"] - want.arrays["relevance"]).max() <= 1e-4
    return got, want


@pytest.mark.parametrize("kind", ["landscape", "portrait", "square", "tiny", "wide", "tall", "jpeg", "grey", "rgba", "exif-rotated"])
def test_ask_equals_generate_on_images(pipe, reference, images, kind):
    got, want = _same_answer(pipe, reference, images[kind])
    layout = load_manifest(pipe.manifest.folder).image_layout(read_image_size(images[kind]))
    assert got.visual_tokens == layout.num_tokens == want.arrays["visual_tokens"].shape[0]
    assert got.arrays["pixel_values"].shape == (layout.tiles, 3, 84, 84) and want.arrays["features"].shape == (layout.tiles, 36, 48)
    if kind == "landscape":  # the issue's 200x120 picture: the authors' model makes 5 tiles and 14 tokens
        assert (layout.tiles, got.visual_tokens) == (5, 14)
    if kind in ("wide", "tall"):  # the 1x3 / 3x1 pinpoints
        assert layout.best_resolution == {"wide": (84, 252), "tall": (252, 84)}[kind] and layout.tiles == 4


def test_single_tile_best_resolution(tiny_export, reference, images, monkeypatch):
    """Pinpoints with an S x S entry: a small image's best resolution is one crop (base + 1 tile)."""
    cfg = dataclasses.replace(reference.cfg, image_grid_pinpoints=SINGLE_TILE_PINPOINTS)
    monkeypatch.setattr(reference, "cfg", cfg)
    monkeypatch.setattr(reference.model, "cfg", cfg)
    data = json.loads(json.dumps(load_manifest(tiny_export).data))
    data["image"]["grid_pinpoints"] = [list(p) for p in SINGLE_TILE_PINPOINTS]
    data["image"]["max_tiles"] = 3
    small = Pipeline(ExportManifest(tiny_export, data), provider="cpu")
    got, _ = _same_answer(small, reference, images["square"])
    layout = small.image_layout(images["square"])
    assert layout.best_resolution == (84, 84) and layout.tiles == 2 and got.visual_tokens == 4 + 2 * (2 + 1)


def test_image_features_are_cached_by_content(tiny_export, tmp_path):
    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    path = tmp_path / "pic.png"
    Image.fromarray(photo(150, 100, seed=20)).save(path)
    first = pipe.ask(path, "What is this?", generation=GenerationConfig(max_new_tokens=4))
    second = pipe.ask(path, "Which colours?", generation=GenerationConfig(max_new_tokens=4))
    assert pipe.vision_runs == 1 and not first.timings.cache_hit and second.timings.cache_hit
    assert second.timings.vision == 0.0 and second.visual_tokens == first.visual_tokens
    Image.fromarray(photo(150, 100, seed=21)).save(path)  # same name, new content -> a new key
    third = pipe.ask(path, "What is this?", generation=GenerationConfig(max_new_tokens=4))
    assert pipe.vision_runs == 2 and not third.timings.cache_hit


def test_export_from_before_image_tiles_says_re_export(tiny_export, images):
    data = json.loads(json.dumps(load_manifest(tiny_export).data))
    del data["image"]
    old = Pipeline(ExportManifest(tiny_export, data), provider="cpu")
    with pytest.raises(ConfigError, match="re-export"):
        old.ask(images["square"], "q", generation=GenerationConfig(max_new_tokens=2))


# ---- bad and huge files -----------------------------------------------------------------------------------------
def _bad_images(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir(exist_ok=True)
    fake = folder / "fake.jpg"
    fake.write_text("not an image at all")
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(photo(200, 150, seed=3)).save(buf, format="JPEG", quality=90)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    directory = folder / "folder.png"
    directory.mkdir(exist_ok=True)
    return {"corrupt": (fake, "corrupt or not an image"), "empty": (empty, "empty"), "truncated": (truncated, "truncated"),
            "directory": (directory, "directory"), "missing": (folder / "missing.png", "not found")}


def test_bad_images_are_clear_errors_naming_the_file(pipe, reference, tmp_path):
    for label, (path, what) in _bad_images(tmp_path).items():
        for run in (lambda p: pipe.ask(p, "q", generation=GenerationConfig(max_new_tokens=2)), lambda p: reference.answer(p, "q", max_new_tokens=2)):
            with pytest.raises(VideoError) as err:
                run(path)
            assert str(path) in str(err.value) and what in str(err.value), (label, str(err.value))


def test_cli_bad_image_exits_1_without_traceback(tiny_export, tiny_ckpt, tmp_path):
    runner = CliRunner()
    bad = _bad_images(tmp_path)
    cases = [["ask", str(tiny_export), str(path), "q"] for path, _ in bad.values()]
    cases += [["generate", str(tiny_ckpt), str(bad[k][0]), "q"] for k in ("corrupt", "truncated")]  # each loads the model
    for args in cases:
        path = Path(args[2])
        res = runner.invoke(cli, args)
        assert res.exit_code == 1 and "error: " in res.output and path.name in res.output and "Traceback" not in res.output, res.output


def test_huge_jpeg_is_decoded_within_the_pixel_budget(tmp_path):
    """8000x6000 JPEG: decoded at half scale (12 MP, never the 144 MB full buffer); geometry from the full size."""
    path = tmp_path / "huge.jpg"
    big = Image.new("RGB", (8000, 6000), (40, 90, 160))
    big.paste(Image.fromarray(photo(800, 600, seed=4)).resize((8000, 6000), Image.Resampling.NEAREST))
    big.save(path, quality=85)
    del big
    code = textwrap.dedent(f"""
        import resource, json
        from ppllava_edge.media import load_image_tiles
        from ppllava_edge.media.anyres import LLAVA_NEXT_PINPOINTS
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = load_image_tiles({str(path)!r}, 336, LLAVA_NEXT_PINPOINTS)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"kb": after - before, "size": t.image_size, "decoded": t.decoded_size, "shape": t.pixel_values.shape}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["size"] == [6000, 8000] and r["decoded"] == [3000, 4000] and r["shape"] == [5, 3, 336, 336]
    assert r["kb"] < 80 * 1024, r  # a full decode alone is 144 MB
    layout = image_layout((6000, 8000), LLAVA_NEXT_PINPOINTS, 336, 8)
    assert layout.best_resolution == (672, 672) and layout.num_tokens == 64 + 12 * (16 + 1)  # unpadded to 12 of 16 rows
    # the reduced-scale decode is an antialiased downscale too: the tiles stay close to a full decode's
    full = load_image_tiles(path, 336, LLAVA_NEXT_PINPOINTS, max_pixels=10**9)
    reduced = load_image_tiles(path, 336, LLAVA_NEXT_PINPOINTS)
    assert full.decoded_size == (6000, 8000)
    assert np.abs(full.pixel_values - reduced.pixel_values).mean() < 4 * ONE_UINT8_STEP


# ---- CLI: generate / ask / chat / bench with a picture ----------------------------------------------------------
def test_cli_generate_and_ask_dump_tiles_and_tokens(tiny_ckpt, tiny_export, images, tmp_path):
    """The issue's acceptance: a 200x120 photo on the tiny preset -> 5 tiles, 14 visual tokens, in both."""
    pytest.importorskip("torch")
    runner = CliRunner()
    photo_png = tmp_path / "photo.png"
    photo_png.write_bytes(images["landscape"].read_bytes())
    g = runner.invoke(cli, ["generate", str(tiny_ckpt), str(photo_png), "What is in the picture?", "--dump", str(tmp_path / "D"), "--max-new-tokens", "8"])
    assert g.exit_code == 0, g.output
    a = runner.invoke(cli, ["ask", str(tiny_export), str(photo_png), "What is in the picture?", "--dump", str(tmp_path / "A"), "--max-new-tokens", "8", "--json"])
    assert a.exit_code == 0, a.output
    assert json.loads(a.stdout)["visual_tokens"] == 14
    d = {p.stem: np.load(p) for p in (tmp_path / "D").glob("*.npy")}
    assert d["pixel_values"].shape == (5, 3, 84, 84) and d["visual_tokens"].shape == (14, 64)
    assert d["features"].shape == (5, 36, 48) and d["relevance"].shape == (5, 6, 6)
    for name in ("pixel_values", "output_ids", "input_ids", "clip_ids"):
        np.testing.assert_array_equal(np.load(tmp_path / "A" / f"{name}.npy"), d[name])
    assert np.abs(np.load(tmp_path / "A" / "visual_tokens.npy") - d["visual_tokens"]).max() <= 1e-4


def test_cli_chat_on_an_image_hits_the_cache(tiny_export, images):
    res = CliRunner().invoke(cli, ["chat", str(tiny_export), str(images["portrait"]), "-q", "What is it?", "-q", "Which colours?", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("Q: ") == 2 and res.output.count("(feature cache hit)") == 1


def test_bench_image_reports_tiles_and_tokens(tiny_export, images):
    res = CliRunner().invoke(cli, ["bench", str(tiny_export), "--image", str(images["landscape"]), "--iterations", "1", "--warmup", "0",
                                   "--max-new-tokens", "2", "--no-hardware", "-o", "json", "--quiet"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["config"]["video"] is None and data["config"]["image"]["tiles"] == 5 and data["config"]["image"]["tokens"] == 14
    assert data["config"]["image"]["best_resolution"] == [168, 168] and data["config"]["image"]["image_size"] == [120, 200]
    (v,) = data["variants"]
    assert v["error"] is None and v["visual_tokens"] == 14 and v["frames"] == 5 and v["cache"]["second_hits"] == 1
    md = CliRunner().invoke(cli, ["bench", str(tiny_export), "--image", str(images["landscape"]), "--iterations", "1", "--warmup", "0",
                                  "--max-new-tokens", "2", "--no-hardware", "--questions", "1", "--quiet"])
    assert md.exit_code == 0 and "5 tiles, 14 visual tokens" in md.stdout


@pytest.mark.parametrize("args, message", [(["--frames", "8"], "--frames is for videos"), (["--baseline", "nopool"], "video baselines"),
                                           (["--synthetic"], "not both")])
def test_bench_image_bad_options(tiny_export, images, args, message):
    res = CliRunner().invoke(cli, ["bench", str(tiny_export), "--image", str(images["square"]), "--no-hardware", *args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output


# ---- README ----------------------------------------------------------------------------------------------------
def test_readme_token_table_matches_the_rules():
    """The README's visual-token table (released dims, 336-px tiles) is what the layout code gives."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| (\d+)×(\d+) \| (\d+)×(\d+) \| (\d+) \| (\d+) \| (\d+)×(\d+) \((\d+)\) \| (\d+) \|$", readme, re.M)
    assert len(rows) == len(LLAVA_NEXT_PINPOINTS)
    for h, w, gh, gw, tiles, map_tokens, ex_w, ex_h, ex_tokens, most in rows:
        layout = image_layout((int(h), int(w)), LLAVA_NEXT_PINPOINTS, 336, 8)
        assert layout.best_resolution == (int(h), int(w)) and layout.grid == (int(gh), int(gw)) and layout.tiles == int(tiles)
        assert layout.num_tokens == int(most) == 64 + int(map_tokens)
        example = image_layout((int(ex_h), int(ex_w)), LLAVA_NEXT_PINPOINTS, 336, 8)
        assert example.best_resolution == (int(h), int(w)) and example.num_tokens == int(ex_tokens)
