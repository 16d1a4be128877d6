"""The PPLLaVA model of both releases (`cfg.family`): Vicuna / CLIP (BT-Adapter tower, CLIP relevance, LLaMA LLM) and
Qwen2 / SigLIP (SigLIP tower, SigLIP relevance, Qwen2 LLM); the prompt-guided pooling and the splice are shared."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..config import QWEN_SIGLIP, PPLLaVAConfig
from ..errors import InputError
from ..media.anyres import ImageLayout
from ..media.image import check_num_images
from .clip import CLIPTextTransformer, CLIPVisionTower, l2_normalize
from .pooling import pool_windows, relevance
from .projector import ProjectorMLP
from .siglip import SiglipPPLLaVAProjector, SiglipVisionTower

log = logging.getLogger(__name__)


def check_num_frames(num_frames: int, max_frames: int) -> None:
    """Videos need 2 <= T <= max_T; an odd T is allowed (last frame dropped by the pooling) with a warning."""
    if num_frames < 2 or num_frames > max_frames:
        raise InputError(
            f"num_frames={num_frames} is out of range: a video needs 2 <= T <= {max_frames} frames "
            f"(the config's max_T, the BT-Adapter time table's rows in the Vicuna release; T=1 gives no pooled token).\n"
            "Hint: pass an even frame count such as 8, 16 or 32; single images take the image path."
        )
    if num_frames % 2:
        log.warning(
            "num_frames=%d is odd: all %d frames go through the tower and the relevance softmax, "
            "but the (2,3,3) pooling drops the last frame, as the authors' code does.",
            num_frames,
            num_frames,
        )


@dataclass
class VisualOutput:
    features: torch.Tensor  # F [T, P, Dv] (an image: [tiles, P, Dv])
    relevance: torch.Tensor  # g [T, h, w] float32
    visual_tokens: torch.Tensor  # V' [N, D_llm]
    layout: ImageLayout | None = None  # images: where each token comes from (anyres assembly)


class PPLLaVAProjector(ProjectorMLP):
    """`multi_modal_projector`: MLP (linear_1, GELU, linear_2) + CLIP text encoder / visual head for the relevance."""

    def __init__(self, cfg: PPLLaVAConfig):
        super().__init__(cfg)
        ct = cfg.clip_text
        self.clip_text_model = CLIPTextTransformer(ct, cfg.extend_clip)
        self.clip_text_projection = nn.Linear(ct.hidden_size, ct.projection_dim, bias=False)
        self.clip_visual_ln = nn.LayerNorm(ct.clip_vision_hidden_size, eps=ct.layer_norm_eps)
        self.clip_visual_projection = nn.Linear(ct.clip_vision_hidden_size, ct.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def keys(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised CLIP visual projections of every patch: [T*P, E]."""
        e = self.clip_visual_projection(self.clip_visual_ln(features))
        return l2_normalize(e.reshape(-1, e.shape[-1]))

    def text_query(self, clip_ids: torch.Tensor, position_table: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised CLIP text embedding of the question: [1, E]."""
        return l2_normalize(self.clip_text_projection(self.clip_text_model(clip_ids, position_table)))

    def pool(
        self, keys: torch.Tensor, values: torch.Tensor, clip_ids: torch.Tensor, image: bool = False, position_table: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relevance g [T,h,w] and pooled visual tokens linear_2(pool(values)) [N, D_llm]."""
        num_frames = values.shape[0]
        g = relevance(keys, self.text_query(clip_ids, position_table), self.logit_scale, num_frames, self.cfg.frame_shape)
        kernel = self.cfg.image_pooling_kernel if image else self.cfg.pooling_kernel
        pooled = pool_windows(values, g, kernel, self.cfg.pooling_temp)
        return g, self.linear_2(pooled)


def _llm_kwargs(cfg: PPLLaVAConfig, extra_keys: set[str]) -> dict:
    """The config keys LlamaConfig and Qwen2Config share, from the checkpoint's text config (plus `extra_keys` of it)."""
    t = cfg.text
    return dict(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        **{k: v for k, v in t.extra.items() if k in extra_keys},
    )


def llama_config(cfg: PPLLaVAConfig):
    """transformers' LlamaConfig of the checkpoint's LLM (the exporter also uses it for the rotary tables)."""
    from transformers import LlamaConfig

    t = cfg.text
    kwargs = _llm_kwargs(cfg, {"head_dim", "rope_scaling", "rope_parameters", "pretraining_tp"})
    return LlamaConfig(attention_bias=t.attention_bias, mlp_bias=t.mlp_bias, **kwargs)


def qwen2_config(cfg: PPLLaVAConfig):
    """transformers' Qwen2Config of a qwen-siglip checkpoint's LLM (q/k/v biases, GQA, rope theta, untied head)."""
    from transformers import Qwen2Config

    return Qwen2Config(use_sliding_window=False, **_llm_kwargs(cfg, {"rope_scaling", "rope_parameters"}))


def llm_config(cfg: PPLLaVAConfig):
    """The LLM's transformers config: Qwen2Config for qwen-siglip, LlamaConfig for vicuna-clip."""
    return qwen2_config(cfg) if cfg.family == QWEN_SIGLIP else llama_config(cfg)


def build_llm(cfg: PPLLaVAConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """transformers' Qwen2ForCausalLM or LlamaForCausalLM for the checkpoint's LLM (`language_model.*`)."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    config = llm_config(cfg)
    config._attn_implementation = attn_implementation
    return (Qwen2ForCausalLM if cfg.family == QWEN_SIGLIP else LlamaForCausalLM)(config)


class PPLLaVAForConditionalGeneration(nn.Module):
    """Module tree mirrors the checkpoint: `vision_tower.vision_model.*`, `multi_modal_projector.*`,
    `language_model.{model,lm_head}.*`, `image_newline`. The family picks the tower, the projector's relevance side
    and the LLM."""

    def __init__(self, cfg: PPLLaVAConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        self.cfg = cfg
        t = cfg.text
        siglip = cfg.family == QWEN_SIGLIP
        self.vision_tower = SiglipVisionTower(cfg.vision) if siglip else CLIPVisionTower(cfg.vision)
        self.multi_modal_projector = SiglipPPLLaVAProjector(cfg) if siglip else PPLLaVAProjector(cfg)
        self.language_model = build_llm(cfg, attn_implementation)
        self.image_newline = nn.Parameter(torch.zeros(t.hidden_size))

    # ---- vision side -------------------------------------------------------------------------
    def encode_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F [T, P, Dv] from pixel_values [T, 3, H, W]."""
        return self.vision_tower(pixel_values)

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F [N, P, Dv] for N image tiles [N, 3, H, W], each through the tower on its own (T = 1), as the authors'
        tower does with a 4-D input: the BT-Adapter's temporal attention never mixes tiles."""
        return torch.cat([self.encode_video(pixel_values[i : i + 1]) for i in range(pixel_values.shape[0])])

    def image_layout(self, num_tiles: int, image_size: tuple[int, int] | None) -> ImageLayout:
        """Layout of an image given as `num_tiles` tiles: anyres (base + crops) needs the image's (H, W); a lone
        tile without `image_size` is the authors' single-tile branch (g*g tokens + one newline)."""
        if image_size is None:
            if num_tiles != 1:
                raise InputError(f"{num_tiles} image tiles need the image's (height, width) to be assembled (anyres)")
            return self.cfg.image_layout(None)
        layout = self.cfg.image_layout(image_size)
        if layout.tiles != num_tiles:
            raise InputError(
                f"an image of {image_size[1]}x{image_size[0]} pixels takes {layout.tiles} tiles "
                f"(best resolution {layout.best_resolution}); pixel_values has {num_tiles}"
            )
        return layout

    def assemble_image(self, tokens: torch.Tensor, layout: ImageLayout) -> torch.Tensor:
        """Pooled tile tokens [tiles*g*g, D] -> the image's tokens: base tile, then the unpadded crop map with
        `image_newline` after every row (`ImageLayout.index`)."""
        if layout.newline:
            tokens = torch.cat((tokens, self.image_newline[None].to(tokens.dtype)), dim=0)
        return tokens[torch.from_numpy(layout.index())]

    def visual_tokens(
        self, pixel_values: torch.Tensor, clip_ids: torch.Tensor, image: bool = False, image_size: tuple[int, int] | None = None,
        multi_image: bool = False, clip_mask: torch.Tensor | None = None,
    ) -> VisualOutput:
        """Video: 2 <= T <= max_T frames, kernel (2,3,3). Image: anyres tiles (base first) of an image of
        `image_size` (H, W), each tile through the tower with T = 1, one relevance softmax over all tiles, kernel
        (1,3,3), then the anyres assembly with `image_newline`. `multi_image`: N images, each squashed to S x S like a
        video frame, through the tower as one video of T = N frames, one relevance softmax over all of them, kernel
        (1,3,3), no newline: g*g tokens per image, in order (the authors' `encode_video(..., multi_image=True)`).
        `clip_mask` [1, L]: the SigLIP tokenizer's padding mask (qwen-siglip; CLIP's causal text tower needs none)."""
        num_frames = pixel_values.shape[0]
        layout = self.image_layout(num_frames, image_size) if image else None
        if multi_image:
            check_num_images(num_frames, self.cfg.max_frames)
        elif not image:
            check_num_frames(num_frames, self.cfg.max_frames)
        size = self.cfg.vision.image_size
        if tuple(pixel_values.shape[1:]) != (self.cfg.vision.num_channels, size, size):
            raise InputError(
                f"pixel_values has shape {list(pixel_values.shape)}; this checkpoint needs [T, 3, {size}, {size}]."
            )
        dtype = self.image_newline.dtype
        features = self.encode_tiles(pixel_values.to(dtype)) if image else self.encode_video(pixel_values.to(dtype))
        proj = self.multi_modal_projector
        keys, values = proj.keys(features), proj.values(features)
        mask = {"clip_mask": clip_mask} if self.cfg.family == QWEN_SIGLIP else {}
        g, tokens = proj.pool(keys, values, clip_ids, image=image or multi_image, **mask)
        if layout is not None:
            tokens = self.assemble_image(tokens, layout)
        return VisualOutput(features=features, relevance=g, visual_tokens=tokens, layout=layout)

    # ---- LLM side ----------------------------------------------------------------------------
    def embed_prompt(self, input_ids: torch.Tensor, visual_tokens: torch.Tensor, slots: int = 1) -> torch.Tensor:
        """Text embeddings with the image tokens replaced by the visual tokens: [1, L - slots + N, D]. The prompt must
        hold `slots` image tokens; each takes the next N / slots rows, in order (the authors'
        `_merge_input_ids_with_image_features`: every image token of a row takes as many rows as each image has)."""
        ids = input_ids.reshape(-1)
        where = [int(i) for i in (ids == self.cfg.image_token_index).nonzero().flatten()]
        if len(where) != slots or visual_tokens.shape[0] % slots:
            raise InputError(f"the prompt must hold {slots} image token(s) ({self.cfg.image_token_index}) for "
                             f"{visual_tokens.shape[0]} visual tokens; found {len(where)}")
        emb = self.language_model.get_input_embeddings()
        per_slot = visual_tokens.shape[0] // slots
        parts, start = [], 0
        for k, i in enumerate(where):
            parts += [emb(ids[start:i]), visual_tokens[k * per_slot : (k + 1) * per_slot].to(emb.weight.dtype)]
            start = i + 1
        parts.append(emb(ids[start:]))
        return torch.cat(parts, dim=0)[None]

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, max_new_tokens: int, num_beams: int = 1) -> list[int]:
        """Greedy (or beam) decoding with transformers' generate; returns the new token ids (prompt excluded)."""
        n = inputs_embeds.shape[1]
        limit = self.cfg.text.max_position_embeddings
        if n + max_new_tokens > limit:
            raise InputError(
                f"prompt of {n} tokens + max_new_tokens={max_new_tokens} exceeds the LLM context of {limit} tokens.\n"
                "Hint: use fewer frames or a shorter question."
            )
        mask = torch.ones(1, n, dtype=torch.long)
        out = self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=num_beams,
            eos_token_id=self.cfg.text.eos_token_id,
            pad_token_id=self.cfg.pad_token_id,
        )
        return [int(x) for x in out[0].tolist()]
