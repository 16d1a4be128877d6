"""Largest |activation| per layer of a checkpoint in fp16, with one transformer layer in memory at a time.

Random-weight checkpoints must keep fp16 activations finite (fp16 overflows at 65504) through all 24 vision
layers, the BT-Adapter, the CLIP text encoder and every LLM layer, or an fp16 export of them checks nothing. The
check runs the reference model's own forward code: a meta-device skeleton holds the small modules (embeddings,
norms, projector heads) in memory, and each transformer layer, token table and lm_head is read from the shards
just before it runs and released right after (forward hooks), so a 7B checkpoint needs about one layer of memory.

Inputs: `num_frames` random frames (N(0, 1) pixels, the scale of CLIP-normalised ones) and a question of random
CLIP (or SigLIP) ids, pooled to visual tokens that go into a prompt of `num_tokens` random LLM ids around the image
token. Both families: the BT-Adapter tower runs every layer and adapter pair (`hidden_states`), SigLIP's tower every
layer (its feature is the last one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import QWEN_SIGLIP, PPLLaVAConfig
from .checkpoint import DTYPES, CheckpointReader, build_skeleton, load_weights, release_weights

# module-name prefixes of the transformer layers that are streamed, and the big single modules streamed with them
# (the token tables and lm_head: 0.6 GB in fp16 at 7B); everything else (norms, projector heads) stays in memory
STREAMED_MODULES = (
    "multi_modal_projector.clip_text_model.embeddings.token_embedding",
    "language_model.model.embed_tokens",
    "language_model.lm_head",
)
STREAMED_LAYERS = (
    "vision_tower.vision_model.encoder.layers.",
    "vision_tower.vision_model.btadapter_T_layers.",
    "vision_tower.vision_model.btadapter_S_layers.",
    "multi_modal_projector.clip_text_model.encoder.layers.",
    "language_model.model.layers.",
)
# resident modules whose outputs are recorded too
RECORDED = (
    "vision_tower.vision_model.pre_layrnorm",
    "multi_modal_projector.linear_1",
    "multi_modal_projector.clip_visual_projection",
    "multi_modal_projector.clip_visual_head",
    "multi_modal_projector.clip_text_model.final_layer_norm",
    "multi_modal_projector.linear_2",
    "language_model.model.norm",
    "language_model.lm_head",
)


@dataclass(frozen=True)
class LayerActivation:
    """Largest |output| of one module in the checked forward pass."""

    module: str
    max_abs: float
    finite: bool

    @property
    def stage(self) -> str:
        for stage, key in (("clip_text", "clip_text_model"), ("adapter", "btadapter"), ("llm", "language_model"), ("vision", "vision_tower")):
            if key in self.module:
                return stage
        return "projector"


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else next(o for o in output if isinstance(o, torch.Tensor))


def _features(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """F with every tower layer run: SigLIP's feature is its last layer; the BT-Adapter tower's `hidden_states` runs
    the last main layer and adapter pair too, whose output F (`hidden_states[-2]` without CLS) does not need."""
    if model.cfg.family == QWEN_SIGLIP:
        return model.vision_tower(pixels)
    return model.vision_tower.vision_model.hidden_states(pixels)[-2][:, 1:]


def _random_question(cfg: PPLLaVAConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """20 random word ids as the relevance text tower reads them: CLIP (start, words, end-of-text padding) or SigLIP
    (words, `</s>`, `</s>` padding, with the padding mask)."""
    length = cfg.clip_text.context_length
    words = torch.randint(400, min(40000, cfg.clip_text.vocab_size), (20,), generator=gen)
    if cfg.family == QWEN_SIGLIP:
        clip_ids = torch.ones((1, length), dtype=torch.int64)  # `</s>` (id 1) ends the text and pads it
        clip_ids[0, :20] = words
        mask = torch.zeros((1, length), dtype=torch.int64)
        mask[0, :21] = 1
        return {"clip_ids": clip_ids, "clip_mask": mask}
    clip_ids = torch.full((1, length), 49407)  # end-of-text after 20 random word ids
    clip_ids[0, 0] = 49406
    clip_ids[0, 1:21] = words
    return {"clip_ids": clip_ids}


def check_activations(
    folder: str | Path,
    dtype: str = "fp16",
    num_frames: int = 2,
    num_tokens: int = 32,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[LayerActivation]:
    """Run one forward pass (vision tower with all its layers, relevance pooling, CLIP text, LLM prefill) in `dtype`,
    streaming each transformer layer from the shards; return the largest |output| of every layer, in run order.

    `progress(layers_done, layers_total)` is called after each streamed layer.
    """
    folder = Path(folder)
    torch_dtype = DTYPES[dtype]
    model = build_skeleton(folder, attn_implementation="sdpa")
    cfg = model.cfg
    modules = dict(model.named_modules())
    layers = [name for name in modules if name.startswith(STREAMED_LAYERS) and name.rsplit(".", 1)[-1].isdigit()]
    streamed = layers + [name for name in STREAMED_MODULES if name in modules]
    results: list[LayerActivation] = []
    handles = []

    with CheckpointReader(folder) as reader, torch.no_grad():

        def record(name: str) -> Callable:
            def hook(module: nn.Module, args, output) -> None:
                if name in layers or name in RECORDED:
                    out = _first_tensor(output)
                    results.append(LayerActivation(name, float(out.abs().max()), bool(torch.isfinite(out).all())))
                if name in streamed:
                    release_weights(module)
                if progress and name in layers:
                    progress(sum(r.module in layers for r in results), len(layers))

            return hook

        def load(name: str) -> Callable:
            return lambda module, args: load_weights(model, folder, name, torch_dtype, reader=reader) and None

        load_weights(model, folder, "", torch_dtype, exclude=tuple(f"{n}." for n in streamed), reader=reader)
        for name in streamed:
            handles.append(modules[name].register_forward_pre_hook(load(name)))
        for name in dict.fromkeys(streamed + [n for n in RECORDED if n in modules]):
            handles.append(modules[name].register_forward_hook(record(name)))
        try:
            gen = torch.Generator().manual_seed(seed)
            size = cfg.vision.image_size
            pixels = torch.randn(num_frames, 3, size, size, generator=gen).to(torch_dtype)
            features = _features(model, pixels)
            proj = model.multi_modal_projector
            question = _random_question(cfg, gen)
            clip_ids = question.pop("clip_ids")
            _, tokens = proj.pool(proj.keys(features), proj.values(features), clip_ids, **question)
            ids = torch.randint(3, 32000, (num_tokens,), generator=gen)
            if cfg.family != QWEN_SIGLIP:  # Qwen2's prompt has no BOS
                ids[0] = cfg.text.bos_token_id
            ids[num_tokens // 2] = cfg.image_token_index
            embeds = model.embed_prompt(ids, tokens)
            model.language_model(inputs_embeds=embeds, use_cache=False)
        finally:
            for h in handles:
                h.remove()
    return results
