"""config.json keys both PPLLaVA releases write alike: the prompt-guided pooling that the authors' `from_config` sets
on either config class (LlavaNextVidConfig for Vicuna, LlavaOnevisionVidConfig for Qwen2), in their order."""

from __future__ import annotations

PPLLAVA_POOLING_KEYS = {
    "pooling": "ppllava",
    "pooling_kernel": [2, 3, 3],
    "pooling_stride": [2, 3, 3],
    "image_pooling_kernel": [1, 3, 3],
    "image_pooling_stride": [1, 3, 3],
    "pllava_pooling_shape": None,
    "pooling_temp": 0.01,
    "extend_clip": True,
    "clip_post_pretrain": None,
}
