from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_LLAMA_TOKENIZER = SHARED / "data" / "llama-tokenizer"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random-weight checkpoint in the released layout (made once per session)."""
    pytest.importorskip("torch")
    from ppllava_edge.model.make import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from ppllava_edge.model.checkpoint import load_model

    return load_model(tiny_ckpt)


@pytest.fixture(scope="session")
def sample_video(tmp_path_factory) -> Path:
    from ppllava_edge.media import write_test_video

    path = tmp_path_factory.mktemp("media") / "clip.mp4"
    write_test_video(path, num_frames=48)
    return path


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> list[Path]:
    """Three different synthetic clips."""
    from ppllava_edge.media import write_test_video

    folder = tmp_path_factory.mktemp("videos")
    out = []
    for i, (n, size) in enumerate([(48, (128, 96)), (30, (96, 96)), (75, (160, 90))]):
        p = folder / f"clip{i}.mp4"
        write_test_video(p, num_frames=n, size=size)
        out.append(p)
    return out


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


@pytest.fixture(scope="session")
def tiny_export(tiny_ckpt, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX once per session (fp32, frames 2:8:16, validated, with the TensorRT decoder)."""
    from ppllava_edge.export.exporter import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_checkpoint(tiny_ckpt, out, ExportOptions(frames=(2, 8, 16), tensorrt=True))
    return out


def write_truncated_video(path):
    """A moov-first mp4 cut to 60 %: the header announces 48 frames, fewer decode."""
    import av

    from ppllava_edge.media import make_test_frame

    full = path.with_name("full-" + path.name)
    with av.open(str(full), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 128, 96, "yuv420p"
        for i in range(48):
            f = av.VideoFrame.from_ndarray(make_test_frame(i), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


@pytest.fixture(scope="module")
def pipe(tiny_export):
    """The torch-free runtime on the tiny export (one per test module)."""
    from ppllava_edge.runtime.pipeline import Pipeline

    return Pipeline.from_export(tiny_export, provider="cpu")


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    """The PyTorch reference (model + tokenizers) of the tiny checkpoint (one per test module)."""
    pytest.importorskip("torch")
    from ppllava_edge.model.generate import ReferenceModel

    return ReferenceModel(tiny_ckpt)
