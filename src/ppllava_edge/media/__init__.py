"""Reading videos and images, frame sampling and CLIP pixel preprocessing (no torch).

Used by both the PyTorch reference and the torch-free runtime, so it imports only the standard
library, numpy and Pillow at module top; PyAV (`av`) is imported inside the functions that need it.

Sampling and preprocessing follow the authors' inference code (see ppllava-model.md §2):
segment-centre frame indices, then the family's video processor (`spec.py`): Vicuna/CLIP squashes each frame to
S×S (bicubic, no crop) with CLIP mean/std; Qwen/SigLIP fits it into S×S with its aspect kept, pads with black and
normalises with 0.5/0.5; float32 `[T, 3, S, S]` either way.

Images take LLaVA-NeXT's anyres path instead (`read_image`, `preprocess_image`, `load_image_tiles`): the
tiles of transformers 4.45.2's `LlavaNextImageProcessor`, the authors' pinned version (geometry in anyres.py), `[tiles, 3, S, S]`.

- `video`: frame sampling and PyAV decoding (`load_video`).
- `spec`: one preprocessing spec per checkpoint family (CLIP: squash, CLIP mean/std; SigLIP: aspect kept + pad, 0.5).
- `preprocess`: frame preprocessing by spec and the dispatch from a file to pixel values (`load_pixel_values`).
- `image` + `anyres`: the image path (anyres tiles) and its geometry (best resolution, unpadding, token layout).
- `synthetic`: test photos, frames that carry their index, test videos.
"""

from __future__ import annotations

from .image import IMAGE_DECODE_PIXELS, MAX_IMAGES, ImageTiles, check_image_paths, check_num_images, images_as_frames, load_image_tiles, preprocess_image, read_image, read_image_size, read_images
from .preprocess import (
    IMAGE_EXTENSIONS,
    MediaInfo,
    MediaKind,
    check_input_file,
    input_kind,
    load_image,
    load_npy_pixel_values,
    load_pixel_values,
    preprocess_frames,
    read_npy_shape,
)
from .spec import CLIP, CLIP_MEAN, CLIP_STD, SIGLIP, SIGLIP_MEAN, SIGLIP_STD, SPECS, PreprocessSpec, spec_named
from .synthetic import make_test_frame, make_test_photo, read_frame_marker, write_test_audio, write_test_video
from .video import (
    SEEK_COST_FRAMES,
    SEEK_MIN_GAIN,
    SEQUENTIAL_MAX_FRAMES,
    VIDEO_DECODE_PIXELS,
    DecodeStrategy,
    VideoFrames,
    load_video,
    segment_centre_indices,
)

__all__ = [
    "CLIP",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_DECODE_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGES",
    "SEEK_COST_FRAMES",
    "SEEK_MIN_GAIN",
    "SEQUENTIAL_MAX_FRAMES",
    "SIGLIP",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "SPECS",
    "VIDEO_DECODE_PIXELS",
    "DecodeStrategy",
    "ImageTiles",
    "MediaInfo",
    "MediaKind",
    "PreprocessSpec",
    "VideoFrames",
    "check_image_paths",
    "check_num_images",
    "images_as_frames",
    "input_kind",
    "load_image",
    "load_image_tiles",
    "load_npy_pixel_values",
    "load_pixel_values",
    "load_video",
    "make_test_frame",
    "make_test_photo",
    "preprocess_frames",
    "preprocess_image",
    "read_frame_marker",
    "read_image",
    "read_image_size",
    "read_images",
    "read_npy_shape",
    "segment_centre_indices",
    "spec_named",
    "write_test_audio",
    "write_test_video",
]
