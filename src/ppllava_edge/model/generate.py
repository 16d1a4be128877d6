"""Reference generation with the PyTorch model: input file -> pixels -> ids -> visual tokens -> greedy answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import QWEN_SIGLIP, PPLLaVAConfig, clip_weight_folder
from ..media import check_image_paths, check_num_images, images_as_frames, input_kind, load_image_tiles, load_pixel_values, read_images
from ..tokenization import ClipTokenizer, LlamaPromptTokenizer, SiglipTextTokenizer, load_llama_tokenizer_from_checkpoint
from .checkpoint import load_model
from .ppllava import PPLLaVAForConditionalGeneration


@dataclass
class Answer:
    text: str
    output_ids: list[int]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the dump arrays (see ppllava_edge.dump.DUMP_NAMES)
    kind: str = "video"


class RelevanceTokenizer:
    """The question's ids (and SigLIP's padding mask) for the relevance text tower of the checkpoint's family: CLIP's
    BPE (package asset; no mask, the causal tower ignores padding) or SigLIP's sentencepiece model from the
    `clip_weight` folder."""

    def __init__(self, cfg: PPLLaVAConfig, checkpoint: Path):
        self.length = cfg.clip_text.context_length
        self.siglip = SiglipTextTokenizer.from_file(clip_weight_folder(cfg.clip_weight, checkpoint)) if cfg.family == QWEN_SIGLIP else None
        self.clip = None if self.siglip is not None else ClipTokenizer()

    def encode(self, question: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids [L], attention mask [L] or None for CLIP)."""
        if self.siglip is not None:
            return self.siglip.encode(question, length=self.length)
        return self.clip.encode(question, length=self.length), None


class ReferenceModel:
    """The PyTorch model plus the tokenizers of its checkpoint folder."""

    def __init__(self, checkpoint: str | Path, dtype: str = "fp32"):
        self.checkpoint = Path(checkpoint)
        self.model: PPLLaVAForConditionalGeneration = load_model(self.checkpoint, dtype=dtype)
        self.cfg = self.model.cfg
        self.llama = LlamaPromptTokenizer(load_llama_tokenizer_from_checkpoint(self.checkpoint), image_token_id=self.cfg.image_token_index,
                                          template=self.cfg.conversation)
        self.relevance = RelevanceTokenizer(self.cfg, self.checkpoint)

    def prompt_ids(self, question: str, images: int = 1) -> np.ndarray:
        """The LLM prompt's ids with `images` image slots."""
        return np.asarray(self.llama.prompt_ids(question, images=images), dtype=np.int64)

    @torch.no_grad()
    def answer_pixels(
        self, pixel_values: np.ndarray, question: str, image: bool, max_new_tokens: int = 64, num_beams: int = 1, image_size: tuple[int, int] | None = None,
        multi_image: bool = False,
    ) -> Answer:
        """Answer from preprocessed pixels: a video's frames, an image's anyres tiles with its (H, W) `image_size`
        (a lone tile without `image_size` takes the single-tile branch), or (`multi_image`) one frame per image of a
        multi-image question, each at its own `<image>` slot."""
        slots = pixel_values.shape[0] if multi_image else 1
        clip_ids, clip_mask = self.relevance.encode(question)
        input_ids = self.prompt_ids(question, images=slots)
        mask = None if clip_mask is None else torch.from_numpy(clip_mask)[None]
        out = self.model.visual_tokens(torch.from_numpy(pixel_values), torch.from_numpy(clip_ids)[None], image=image, image_size=image_size,
                                       multi_image=multi_image, clip_mask=mask)
        embeds = self.model.embed_prompt(torch.from_numpy(input_ids), out.visual_tokens, slots=slots)
        ids = self.model.generate(embeds, max_new_tokens=max_new_tokens, num_beams=num_beams)
        arrays = {
            "pixel_values": pixel_values.astype(np.float32),
            "clip_ids": clip_ids.astype(np.int64),
            "input_ids": input_ids,
            "features": out.features.float().numpy(),
            "relevance": out.relevance.float().numpy(),
            "visual_tokens": out.visual_tokens.float().numpy(),
            "output_ids": np.asarray(ids, dtype=np.int64),
        }
        if clip_mask is not None:
            arrays["clip_mask"] = clip_mask
        kind = "images" if multi_image else "image" if image else "video"
        return Answer(text=self.llama.decode(ids), output_ids=ids, arrays=arrays, kind=kind)

    def answer(self, path: str | Path | Sequence[str | Path], question: str, num_frames: int = 8, max_new_tokens: int = 64, num_beams: int = 1) -> Answer:
        """Answer about a video, an image, a .npy, or (a list of several paths) several images in one question."""
        if not isinstance(path, (str, Path)):
            paths = check_image_paths(path)
            if len(paths) > 1:
                check_num_images(len(paths), self.cfg.max_frames)  # before any image is decoded
                pixel_values = images_as_frames(read_images(paths), self.cfg.vision.image_size, self.cfg.preprocess)
                return self.answer_pixels(pixel_values, question, image=False, max_new_tokens=max_new_tokens, num_beams=num_beams, multi_image=True)
            path = paths[0]
        if input_kind(path) == "image":
            tiles = load_image_tiles(path, self.cfg.vision.image_size, self.cfg.image_grid_pinpoints, spec=self.cfg.preprocess)
            return self.answer_pixels(tiles.pixel_values, question, image=True, max_new_tokens=max_new_tokens, num_beams=num_beams, image_size=tiles.image_size)
        pixel_values, _, _ = load_pixel_values(path, num_frames, self.cfg.vision.image_size, spec=self.cfg.preprocess)  # a video, or a .npy (one row: one tile)
        return self.answer_pixels(pixel_values, question, image=pixel_values.shape[0] == 1, max_new_tokens=max_new_tokens, num_beams=num_beams)
