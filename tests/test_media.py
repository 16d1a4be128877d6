"""Tests for ppllava_edge.media: sampling, PyAV decoding (both strategies), preprocessing, errors."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from ppllava_edge import media
from ppllava_edge.errors import InputError, VideoError
from ppllava_edge.media import (
    CLIP_MEAN,
    CLIP_STD,
    input_kind,
    load_image,
    load_npy_pixel_values,
    load_pixel_values,
    load_video,
    make_test_frame,
    preprocess_frames,
    read_frame_marker,
    segment_centre_indices,
    write_test_audio,
    write_test_video,
)

av = pytest.importorskip("av")

from .conftest import write_truncated_video  # noqa: E402

# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def clip(media_dir):
    """48 frames, 128x96, 24 fps, keyframe every 12 frames (so seeking really seeks)."""
    return write_test_video(media_dir / "clip.mp4", num_frames=48, gop_size=12)


@pytest.fixture(scope="module")
def clip_mkv(media_dir):
    """Matroska records no frame count: exercises counting by demuxing."""
    return write_test_video(media_dir / "clip.mkv", num_frames=40, gop_size=10)


@pytest.fixture(scope="module")
def long_clip(media_dir):
    """More than SEQUENTIAL_MAX_FRAMES frames with short GOPs: 'auto' should pick seeking."""
    n = media.SEQUENTIAL_MAX_FRAMES + 64
    return write_test_video(media_dir / "long.mp4", num_frames=n, size=(48, 32), fps=30, gop_size=16)


def markers(frames: np.ndarray) -> list[int]:
    return [read_frame_marker(f) for f in frames]


# --------------------------------------------------------------------------------------------
# frame sampling


def authors_indices(num_total: int, num_frames: int) -> list[int]:
    # Direct transcription of the authors' get_index (no bound, first_idx = 0), which uses np.round
    # (round half to even, like Python's round).
    max_frame = num_total - 1
    start_idx, end_idx = 0, max_frame
    seg_size = float(end_idx - start_idx) / num_frames
    return [int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_frames)]


@pytest.mark.parametrize("num_frames", [1, 2, 4, 8, 16, 32, 64, 96])
def test_segment_centre_indices_matches_authors_formula(num_frames):
    for num_total in [*range(1, 130), 150, 255, 256, 300, 301, 1000, 1799, 1800, 54321]:
        got = segment_centre_indices(num_total, num_frames)
        assert got == authors_indices(num_total, num_frames), (num_total, num_frames)
        assert len(got) == num_frames
        assert all(0 <= i <= num_total - 1 for i in got)
        assert got == sorted(got)
        if num_total >= 2 * num_frames:  # enough frames: no repeats
            assert len(set(got)) == num_frames


def test_segment_centre_indices_examples():
    assert segment_centre_indices(48, 8) == [2, 8, 14, 20, 26, 31, 37, 43]
    # fewer frames than requested: frames repeat so T stays N (documented behaviour)
    assert segment_centre_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert segment_centre_indices(1, 4) == [0, 0, 0, 0]
    # banker's rounding: seg = 0.5; round(0.5) == 0 and round(2.5) == 2, where half-up would give
    # [0, 1, 1, 2, 2, 3, 3, 4]
    assert segment_centre_indices(5, 8) == [0, 0, 1, 2, 2, 2, 3, 4]
    # N == total does not give the identity (authors' max_frame / N): frame 24 twice, frame 47 never
    idx = segment_centre_indices(48, 48)
    assert idx.count(24) == 2 and 47 not in idx


def test_segment_centre_indices_errors():
    with pytest.raises(VideoError):
        segment_centre_indices(0, 8)
    with pytest.raises(InputError):
        segment_centre_indices(10, 0)


# --------------------------------------------------------------------------------------------
# decoding


def test_load_video_returns_sampled_frames(clip):
    vf = load_video(clip, 8)
    assert vf.frames.shape == (8, 96, 128, 3)
    assert vf.frames.dtype == np.uint8
    assert vf.num_total == 48
    assert vf.fps == pytest.approx(24.0)
    assert vf.indices == segment_centre_indices(48, 8)
    assert markers(vf.frames) == vf.indices
    assert vf.path == str(clip)
    # content close to the frames that were encoded (codec error only)
    ref = np.stack([make_test_frame(i, (128, 96), 48) for i in vf.indices]).astype(np.int16)
    assert np.abs(vf.frames.astype(np.int16) - ref).mean() < 6


@pytest.mark.parametrize("num_frames", [5, 8, 16, 32])
@pytest.mark.parametrize("which", ["clip", "clip_mkv"])
def test_sequential_and_seek_agree(which, num_frames, request):
    path = request.getfixturevalue(which)
    seq = load_video(path, num_frames, strategy="sequential")
    seek = load_video(path, num_frames, strategy="seek")
    assert seq.strategy == "sequential"
    assert seek.strategy == "seek"  # no silent fallback
    assert seek.indices == seq.indices
    assert seek.num_total == seq.num_total
    assert markers(seek.frames) == seek.indices
    assert seek.frames.shape == seq.frames.shape
    diff = np.abs(seek.frames.astype(np.int16) - seq.frames.astype(np.int16))
    assert diff.max() <= 2


def test_mkv_frame_count_by_demuxing(clip_mkv):
    with av.open(str(clip_mkv)) as c:
        assert c.streams.video[0].frames == 0  # really the no-header-count path
    vf = load_video(clip_mkv, 8)
    assert vf.num_total == 40
    assert markers(vf.frames) == vf.indices == segment_centre_indices(40, 8)


def test_auto_strategy_rule(clip, long_clip):
    assert load_video(clip, 8).strategy == "sequential"  # short clip: never seeks
    vf = load_video(long_clip, 4)
    assert vf.strategy == "seek"  # 4 samples, keyframe every 16 frames
    assert markers(vf.frames) == vf.indices
    seq = load_video(long_clip, 4, strategy="sequential")
    assert seq.indices == vf.indices
    assert np.abs(seq.frames.astype(np.int16) - vf.frames.astype(np.int16)).max() <= 2
    # many samples over short GOPs: every GOP is decoded anyway, so sequential wins
    assert load_video(long_clip, 64).strategy == "sequential"


def test_seek_cost_model():
    # keyframes every 10 frames; targets 5 and 7 share a GOP (one seek), 25 needs another
    assert media.video._seek_cost([5, 7, 25], [0, 10, 20]) == (6 + 2 + 6, 2)


def test_short_clip_repeats_frames(media_dir):
    path = write_test_video(media_dir / "short.mp4", num_frames=3)
    vf = load_video(path, 8)
    assert vf.frames.shape[0] == 8
    assert vf.indices == [0, 0, 0, 1, 1, 1, 2, 2]
    assert markers(vf.frames) == vf.indices
    one = load_video(write_test_video(media_dir / "one.mp4", num_frames=1), 4)
    assert one.indices == [0, 0, 0, 0] and markers(one.frames) == [0, 0, 0, 0]


def test_mpeg4_avi(media_dir):
    path = write_test_video(media_dir / "clip.avi", num_frames=30, codec="mpeg4")
    for strategy in ("sequential", "seek"):
        vf = load_video(path, 6, strategy=strategy)
        assert markers(vf.frames) == vf.indices == segment_centre_indices(30, 6)


def test_header_overcounts_frames_resamples(media_dir):
    # moov-first mp4 cut short: the header announces 48 frames, far fewer decode
    cut = write_truncated_video(media_dir / "cut.mp4")
    for strategy in ("auto", "sequential", "seek"):
        vf = load_video(cut, 8, strategy=strategy)
        assert 0 < vf.num_total < 48
        assert vf.indices == segment_centre_indices(vf.num_total, 8)
        assert markers(vf.frames) == vf.indices
        assert len(vf.warnings) == 1 and str(cut) in vf.warnings[0]
        assert f"only {vf.num_total} of 48 announced frames decoded" in vf.warnings[0]


def test_partly_corrupt_video_answers_from_the_frames_that_decode(clip, media_dir):
    """Garbage in the middle of the stream: decoding stops with an error part way; the frames before it are used
    and the warning says how many decoded (before: a VideoError, no answer)."""
    data = bytearray(clip.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    bad = media_dir / "corrupt_middle.mp4"
    bad.write_bytes(bytes(data))
    for strategy in ("auto", "sequential", "seek"):
        vf = load_video(bad, 8, strategy=strategy)
        assert 1 <= vf.num_total < 48 and vf.frames.shape[0] == 8
        assert markers(vf.frames) == vf.indices == segment_centre_indices(vf.num_total, 8)
        assert len(vf.warnings) == 1 and str(bad) in vf.warnings[0] and "decoding stopped with an error" in vf.warnings[0]
    assert load_video(clip, 8).warnings == []


def test_npy_with_nan_or_inf_is_refused_naming_the_file(media_dir):
    px = np.zeros((4, 3, 32, 32), np.float32)
    px[1, 0, 0, 0] = np.inf
    path = media_dir / "inf.npy"
    np.save(path, px)
    with pytest.raises(InputError, match="non-finite") as err:
        load_npy_pixel_values(path, 32)
    assert str(path) in str(err.value) and "frame(s) 1" in str(err.value)


def test_npy_header_is_checked_before_anything_is_allocated(media_dir):
    from ppllava_edge.media import read_npy_shape

    path = media_dir / "forged.npy"
    with open(path, "wb") as f:  # 10^12 frames announced, 64 bytes of data (before: MemoryError)
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 32, 32)})
        f.write(b"\0" * 64)
    for load in (read_npy_shape, load_npy_pixel_values):
        with pytest.raises(InputError, match="header announces") as err:
            load(path, 32)
        assert str(path) in str(err.value)
    np.save(path, np.zeros((5, 3, 32, 32), np.float32))
    assert read_npy_shape(path, 32) == (5, 3, 32, 32)


def test_video_over_the_pixel_cap_is_refused_naming_its_size(clip):
    from ppllava_edge.media import VIDEO_DECODE_PIXELS

    assert VIDEO_DECODE_PIXELS >= 3840 * 2160
    with pytest.raises(VideoError, match="decode limit") as err:
        load_video(clip, 8, max_pixels=100 * 100)
    assert str(clip) in str(err.value) and "128x96" in str(err.value)
    assert load_video(clip, 8, max_pixels=128 * 96).frames.shape[0] == 8


# --------------------------------------------------------------------------------------------
# preprocessing


def test_preprocess_shape_dtype():
    frames = np.stack([make_test_frame(i, (128, 96), 4) for i in range(4)])
    out = preprocess_frames(frames, 32)
    assert out.shape == (4, 3, 32, 32)
    assert out.dtype == np.float32
    assert out.flags.c_contiguous


def test_preprocess_matches_hand_computation():
    frame = make_test_frame(7, (128, 96), 48)
    img = Image.fromarray(frame).resize((336, 336), resample=Image.BICUBIC)
    x = np.asarray(img).astype(np.float32) / np.float32(255)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    expected = x.transpose(2, 0, 1)
    out = preprocess_frames(frame[None], 336)
    np.testing.assert_array_equal(out[0], expected)


def test_preprocess_constant_colour_exact():
    rgb = (200, 100, 30)
    frames = np.empty((2, 50, 70, 3), dtype=np.uint8)
    frames[:] = rgb
    out = preprocess_frames(frames, 24)
    for c in range(3):
        want = (np.float32(rgb[c]) / np.float32(255) - np.float32(CLIP_MEAN[c])) / np.float32(CLIP_STD[c])
        assert np.all(out[:, c] == want), c
    # black and white frames hit the ends of the range
    bw = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    bw[1] = 255
    out = preprocess_frames(bw, 8)
    np.testing.assert_allclose(out[0, :, 0, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), rtol=1e-6)
    np.testing.assert_allclose(out[1, :, 0, 0], (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), rtol=1e-6)


def test_preprocess_squashes_no_crop():
    # left half black, right half white, wide frame: the edge must stay in the middle (no crop)
    frame = np.zeros((1, 40, 160, 3), dtype=np.uint8)
    frame[:, :, 80:] = 255
    out = preprocess_frames(frame, 16)
    assert np.all(out[0, 0, :, :7] < 0) and np.all(out[0, 0, :, 9:] > 0)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8, 4), np.uint8)],
)
def test_preprocess_rejects_bad_frames(bad):
    with pytest.raises(InputError):
        preprocess_frames(bad, 8)


# --------------------------------------------------------------------------------------------
# errors (every message names the file)


def _raises_naming(exc_type, path, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(path, *args)
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_file(media_dir):
    msg = _raises_naming(VideoError, media_dir / "nope.mp4", load_video, 8)
    assert "not found" in msg


def test_text_file_renamed_mp4(media_dir):
    path = media_dir / "notes.mp4"
    path.write_text("this is not a video\n" * 20)
    msg = _raises_naming(VideoError, path, load_video, 8)
    assert "corrupt or not a media file" in msg


def test_empty_file(media_dir):
    path = media_dir / "empty.mp4"
    path.write_bytes(b"")
    msg = _raises_naming(VideoError, path, load_video, 8)
    assert "empty" in msg


@pytest.mark.parametrize("name", ["tone.m4a", "tone.wav"])
def test_audio_only_file(media_dir, name):
    path = write_test_audio(media_dir / name)
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1 and not c.streams.video
    msg = _raises_naming(VideoError, path, load_video, 8)
    assert "No video stream" in msg and "audio" in msg


def test_undecodable_payload(clip, media_dir):
    # valid container, video payload zeroed: the decoder rejects every packet
    data = bytearray(clip.read_bytes())
    i = data.find(b"mdat")
    size = int.from_bytes(data[i - 4 : i], "big")
    data[i + 4 : i - 4 + size] = bytes(size - 8)
    path = media_dir / "zeroed.mp4"
    path.write_bytes(bytes(data))
    _raises_naming(VideoError, path, load_video, 8)


def test_unknown_codec(clip, media_dir):
    path = media_dir / "unknown_codec.mp4"
    path.write_bytes(clip.read_bytes().replace(b"avc1", b"qqq1"))
    msg = _raises_naming(VideoError, path, load_video, 8)
    assert "codec" in msg


def test_directory_is_not_a_video(media_dir):
    _raises_naming(VideoError, media_dir, load_video, 8)


def test_errors_are_never_raw_av_exceptions(media_dir):
    path = media_dir / "garbage.mkv"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(VideoError):
        load_video(path, 4)


def test_bad_arguments(clip):
    with pytest.raises(InputError):
        load_video(clip, 0)
    with pytest.raises(InputError):
        load_video(clip, 8, strategy="fast")


def test_bad_npy(media_dir):
    path = media_dir / "bad_ndim.npy"
    np.save(path, np.zeros((3, 32, 32), np.float32))
    msg = _raises_naming(InputError, path, load_pixel_values, 8, 32)
    assert "[3, 32, 32]" in msg
    path = media_dir / "bad_dtype.npy"
    np.save(path, np.zeros((2, 3, 32, 32), np.float64))
    assert "float64" in _raises_naming(InputError, path, load_pixel_values, 8, 32)
    path = media_dir / "bad_channels.npy"
    np.save(path, np.zeros((2, 32, 32, 3), np.float32))
    assert "[2, 32, 32, 3]" in _raises_naming(InputError, path, load_pixel_values, 8, 32)
    path = media_dir / "bad_size.npy"
    np.save(path, np.zeros((2, 3, 16, 16), np.float32))
    _raises_naming(InputError, path, load_pixel_values, 8, 32)
    path = media_dir / "not_npy.npy"
    path.write_text("hello")
    _raises_naming(InputError, path, load_pixel_values, 8, 32)
    _raises_naming(InputError, media_dir / "missing.npy", load_pixel_values, 8, 32)


def test_bad_images(media_dir):
    _raises_naming(VideoError, media_dir / "missing.png", load_image)
    path = media_dir / "fake.jpg"
    path.write_text("not an image")
    assert "not an image" in _raises_naming(VideoError, path, load_image)
    path = media_dir / "empty.png"
    path.write_bytes(b"")
    assert "empty" in _raises_naming(VideoError, path, load_pixel_values, 8, 32)


# --------------------------------------------------------------------------------------------
# images, .npy and dispatch


def test_input_kind():
    assert input_kind("a.npy") == "npy"
    assert input_kind("dir/A.PNG") == "image"
    assert input_kind("a.jpeg") == "image"
    assert input_kind("a.webp") == "image"
    assert input_kind("a.mp4") == "video"
    assert input_kind("a.gif") == "video"
    assert input_kind("noext") == "video"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_image_gives_one_frame(media_dir, suffix):
    frame = make_test_frame(3, (100, 60), 8)
    path = media_dir / f"frame{suffix}"
    Image.fromarray(frame).save(path)
    img = load_image(path)
    assert img.shape == (60, 100, 3) and img.dtype == np.uint8
    pv, kind, info = load_pixel_values(path, 8, 32)
    assert kind == "image" == info.kind
    assert pv.shape == (1, 3, 32, 32) and pv.dtype == np.float32
    assert info.num_total == 1 and info.indices == (0,) and info.source_size == (60, 100)
    np.testing.assert_array_equal(pv, preprocess_frames(img[None], 32))
    if suffix == ".png":  # lossless
        np.testing.assert_array_equal(img, frame)


def test_rgba_and_grey_images_become_rgb(media_dir):
    Image.new("RGBA", (10, 6), (10, 20, 30, 40)).save(media_dir / "rgba.png")
    Image.new("L", (10, 6), 77).save(media_dir / "grey.png")
    assert load_image(media_dir / "rgba.png")[0, 0].tolist() == [10, 20, 30]
    assert load_image(media_dir / "grey.png")[0, 0].tolist() == [77, 77, 77]


def test_load_pixel_values_video_and_npy_roundtrip(clip, media_dir):
    pv, kind, info = load_pixel_values(clip, 8, 32)
    assert kind == "video" and pv.shape == (8, 3, 32, 32) and pv.dtype == np.float32
    assert info.indices == tuple(segment_centre_indices(48, 8))
    assert info.num_total == 48 and info.source_size == (96, 128) and info.fps == pytest.approx(24.0)
    assert info.to_dict()["indices"] == list(info.indices)
    np.testing.assert_array_equal(pv, preprocess_frames(load_video(clip, 8).frames, 32))
    path = media_dir / "pixels.npy"
    np.save(path, pv)
    pv2, kind2, info2 = load_pixel_values(path, 8, 32)
    assert kind2 == "npy" and info2.num_total is None
    np.testing.assert_array_equal(pv2, pv)


# --------------------------------------------------------------------------------------------
# synthetic media helpers, import hygiene


def test_write_test_video_validates_and_is_deterministic(media_dir):
    with pytest.raises(InputError):
        write_test_video(media_dir / "odd.mp4", size=(127, 96))
    np.testing.assert_array_equal(make_test_frame(5), make_test_frame(5))
    assert all(read_frame_marker(make_test_frame(i, (128, 96), 5000)) == i for i in (0, 1, 15, 16, 255, 4095))
