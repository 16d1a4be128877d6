"""The Qwen2 + SigLIP family's pixels, against transformers' own `LlavaOnevisionImageProcessor` (installed 5.24, PIL
backend; torchvision is not installed, so `LlavaOnevisionImageProcessor` resolves to it):

- video frames: the authors' `LlavaOnevisionVidProcessor` pins the best resolution to one tile, i.e. transformers'
  processor with `image_grid_pinpoints=[[S, S]]` whose base image (patch 0) the authors drop; we compare patch 1;
- images: the processor's anyres tiles (base image, then crops row by row) with LlavaOnevisionConfig's 1..6 x 1..6
  pinpoints at the tile size;
- mean/std 0.5 (the llava-onevision checkpoints' preprocessor_config.json), bicubic, size S×S.

5.24 differs from the authors' pinned 4.45.2 in one rule only: `_pad_for_patching`. 4.45.2 pads
`((paste_y, paste_y), (paste_x, paste_x))` with `paste = (target - new) // 2` (its LlavaNext copy, which
tests/test_image_tf4452.py checks against fixtures made under real 4.45.2), so an odd remainder leaves the canvas one
pixel short and `_preprocess` squashes it back to S×S; 5.24 pads that pixel (`_get_padding_size`). `TF4452` is 5.24's
class with 4.45.2's padding rule put back (everything else is transformers' code): we equal it bit for bit, and
stock 5.24 differs from both exactly on the odd-remainder sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ppllava_edge.config import onevision_pinpoints
from ppllava_edge.media import CLIP, SIGLIP, load_image_tiles, load_pixel_values, preprocess_frames, preprocess_image, spec_named
from ppllava_edge.media.anyres import fitted_size, select_best_resolution
from ppllava_edge.errors import ConfigError

pil_backend = pytest.importorskip("transformers.models.llava_onevision.image_processing_pil_llava_onevision")

S = 84
# (H, W): wide, tall, tiny, square, an even remainder, a wide odd one and a 1-pixel line
SIZES = ((50, 91), (91, 50), (10, 7), (84, 84), (37, 100), (120, 200), (1, 300))


class TF4452(pil_backend.LlavaOnevisionImageProcessorPil):
    """transformers 5.24's LlavaOnevisionImageProcessor with 4.45.2's `_pad_for_patching` (symmetric `// 2` padding)."""

    def _get_padding_size(self, original_resolution, target_resolution):
        (h, w), (th, tw) = original_resolution, target_resolution
        return ((th - h) // 2, (th - h) // 2), ((tw - w) // 2, (tw - w) // 2)


def processor(cls, pinpoints):
    return cls(size={"height": S, "width": S}, image_grid_pinpoints=[list(p) for p in pinpoints], image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3)


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: bicubic resampling and padding both show in every channel."""
    rs = np.random.RandomState(seed + h * 1000 + w)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(h + w - 2, 1)], axis=-1)
    return np.clip(base + rs.randint(-40, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def odd_remainder(h: int, w: int, target) -> bool:
    new_h, new_w = fitted_size((h, w), target)
    return (target[0] - new_h) % 2 == 1 or (target[1] - new_w) % 2 == 1


@pytest.mark.parametrize("size", SIZES)
def test_frames_equal_the_authors_video_processor(size):
    """One frame per size; the 4.45.2 rule bit-exact, stock 5.24 off by up to ~1.8 (normalised units) on odd remainders."""
    a = picture(*size)
    ours = preprocess_frames(a[None], S, SIGLIP)[0]
    want = np.asarray(processor(TF4452, [(S, S)])(Image.fromarray(a), return_tensors="np")["pixel_values"])[0, 1]
    stock = np.asarray(processor(pil_backend.LlavaOnevisionImageProcessorPil, [(S, S)])(Image.fromarray(a), return_tensors="np")["pixel_values"])[0, 1]
    assert ours.dtype == np.float32 and ours.shape == (3, S, S)
    assert float(np.abs(ours - want).max()) == 0.0
    diff = float(np.abs(ours - stock).max())
    assert (diff > 0.1) == odd_remainder(*size, (S, S)), diff


def test_frames_are_padded_black_and_keep_the_aspect():
    """A wide frame: rows above and below the picture are SigLIP's black (-1), and the CLIP spec squashes instead."""
    a = np.full((42, 84, 3), 200, np.uint8)
    sig = preprocess_frames(a[None], S, SIGLIP)[0]
    assert np.all(sig[:, :20] == -1.0) and np.all(sig[:, -20:] == -1.0)
    np.testing.assert_allclose(sig[:, 30:54], 200 / 127.5 - 1, atol=1e-6)
    clip = preprocess_frames(a[None], S, CLIP)[0]
    assert np.all(np.abs(clip - clip[:, :1, :1]) < 1e-6)  # no padding: the whole frame is the picture


@pytest.mark.parametrize("size", ((50, 91), (300, 120), (100, 100), (500, 137), (9, 400)))
def test_image_tiles_equal_the_onevision_processor(size):
    """Anyres tiles with LlavaOnevisionConfig's pinpoints (1..6 x 1..6 tiles): base + crops, bit-exact under 4.45.2's
    rule (the short crops of an odd remainder are squashed to S×S, where LLaVA-NeXT resizes and centre-crops them)."""
    pins = onevision_pinpoints(S)
    a = picture(*size, seed=1)
    ours = preprocess_image(Image.fromarray(a), S, pins, spec=SIGLIP)
    want = np.asarray(processor(TF4452, pins)(Image.fromarray(a), return_tensors="np")["pixel_values"])[0]
    assert ours.best_resolution == tuple(select_best_resolution(size, pins))
    assert ours.pixel_values.shape == want.shape
    assert float(np.abs(ours.pixel_values - want).max()) == 0.0
    if odd_remainder(*size, ours.best_resolution):
        stock = np.asarray(processor(pil_backend.LlavaOnevisionImageProcessorPil, pins)(Image.fromarray(a), return_tensors="np")["pixel_values"])[0]
        assert float(np.abs(ours.pixel_values - stock).max()) > 0.1


def test_files_take_the_spec(tmp_path):
    """`load_pixel_values` (video / image-as-frame) and `load_image_tiles` preprocess with the spec they are given."""
    a = picture(60, 90)
    path = tmp_path / "p.png"
    Image.fromarray(a).save(path)
    pv, kind, _ = load_pixel_values(path, 8, S, spec=SIGLIP)
    np.testing.assert_array_equal(pv, preprocess_frames(a[None], S, SIGLIP))
    tiles = load_image_tiles(path, S, onevision_pinpoints(S), spec=SIGLIP)
    np.testing.assert_array_equal(tiles.pixel_values, preprocess_image(Image.fromarray(a), S, onevision_pinpoints(S), spec=SIGLIP).pixel_values)


def test_spec_named():
    assert spec_named(None) is CLIP and spec_named("siglip") is SIGLIP
    with pytest.raises(ConfigError, match="unknown preprocessing 'lanczos'"):
        spec_named("lanczos")


@pytest.fixture(scope="module")
def qwen_tiny(tmp_path_factory):
    pytest.importorskip("torch")
    from ppllava_edge.model.make import make_checkpoint

    return make_checkpoint("qwen-tiny", tmp_path_factory.mktemp("qwen") / "Q")


def test_generate_on_qwen_feeds_siglip_pixels(qwen_tiny, tmp_path):
    """The PyTorch reference on a Qwen checkpoint: a 128x96 video's frames and a 200x150 photo's tiles are the SigLIP
    spec's (padded, 0.5/0.5), not the CLIP squash; the config names the spec."""
    from ppllava_edge.config import load_config
    from ppllava_edge.media import load_video, make_test_photo, write_test_video
    from ppllava_edge.model.generate import ReferenceModel

    cfg = load_config(qwen_tiny)
    assert cfg.preprocess is SIGLIP
    ref = ReferenceModel(qwen_tiny)
    video = write_test_video(tmp_path / "clip.mp4", num_frames=12)
    got = ref.answer(video, "What is shown?", num_frames=4, max_new_tokens=1).arrays["pixel_values"]
    want = preprocess_frames(load_video(video, 4).frames, cfg.vision.image_size, SIGLIP)
    np.testing.assert_array_equal(got, want)
    assert np.all(got[:, :, :5] == -1.0)  # 4:3 frames fitted into the square tile: black rows above
    photo = tmp_path / "photo.png"
    Image.fromarray(make_test_photo(200, 150)).save(photo)
    got = ref.answer(photo, "What is shown?", max_new_tokens=1).arrays["pixel_values"]
    np.testing.assert_array_equal(got, load_image_tiles(photo, cfg.vision.image_size, cfg.image_grid_pinpoints, spec=SIGLIP).pixel_values)


def test_export_records_the_spec_and_old_exports_read_as_clip(qwen_tiny, tmp_path):
    """export.json `image.preprocess` names the family's spec; the manifest reads it back (CLIP when absent)."""
    from ppllava_edge.config import load_config
    from ppllava_edge.export.exporter import ExportOptions, image_manifest
    from ppllava_edge.manifest import ExportManifest

    rules = image_manifest(load_config(qwen_tiny), ExportOptions())
    assert rules["preprocess"]["name"] == "siglip" and rules["mean"] == [0.5, 0.5, 0.5]
    assert ExportManifest(tmp_path, {"image": rules}).preprocess is SIGLIP
    assert ExportManifest(tmp_path, {"image": {"tile_size": 84}}).preprocess is CLIP  # before specs were recorded
    assert ExportManifest(tmp_path, {}).preprocess is CLIP  # before image tiles
    with pytest.raises(ConfigError, match="export.json image.preprocess: unknown preprocessing 'x'"):
        ExportManifest(tmp_path, {"image": {"preprocess": {"name": "x"}}}).preprocess


def test_runtime_stages_take_the_spec(tmp_path):
    """`read_frames` / `read_image_tiles` (ask, serve, Triton, bench, calibration) preprocess with the spec passed."""
    from ppllava_edge.media import load_video, write_test_video
    from ppllava_edge.runtime.stages import read_frames, read_image_tiles

    video = write_test_video(tmp_path / "clip.mp4", num_frames=8)
    frames = load_video(video, 2).frames
    np.testing.assert_array_equal(read_frames(video, 2, S, SIGLIP).pixel_values, preprocess_frames(frames, S, SIGLIP))
    np.testing.assert_array_equal(read_frames(video, 2, S).pixel_values, preprocess_frames(frames, S, CLIP))
    photo = tmp_path / "p.png"
    Image.fromarray(picture(70, 130)).save(photo)
    pins = onevision_pinpoints(S)
    np.testing.assert_array_equal(read_image_tiles(photo, S, pins, SIGLIP).pixel_values, load_image_tiles(photo, S, pins, spec=SIGLIP).pixel_values)


def test_relevance_thumbnails_undo_the_exports_spec():
    """The chat page's and `ask --relevance-png`'s frames: SigLIP pixels un-normalised with SigLIP's mean/std give the
    padded frame the model saw, level for level; CLIP's mean/std would not."""
    from ppllava_edge.media.preprocess import fit_pad_frame
    from ppllava_edge.relevance import frame_pixels

    a = picture(50, 91)
    px = preprocess_frames(a[None], S, SIGLIP)
    np.testing.assert_array_equal(frame_pixels(px, SIGLIP)[0], fit_pad_frame(Image.fromarray(a), S))
    assert np.abs(frame_pixels(px, CLIP)[0].astype(int) - fit_pad_frame(Image.fromarray(a), S)).max() > 50
