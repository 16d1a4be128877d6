"""The PPLLaVA model (Vicuna / CLIP release): BT-Adapter tower, prompt-guided pooling projector, LLaMA LLM."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PPLLaVAConfig
from ..errors import InputError
from ..media.anyres import ImageLayout
from ..media.image import check_num_images
from .clip import CLIPTextTransformer, CLIPVisionTower, l2_normalize
from .pooling import pool_windows, relevance

log = logging.getLogger(__name__)


def check_num_frames(num_frames: int, max_frames: int) -> None:
    """Videos need 2 <= T <= max_T; an odd T is allowed (last frame dropped by the pooling) with a warning."""
    if num_frames < 2 or num_frames > max_frames:
        raise InputError(
            f"num_frames={num_frames} is out of range: a video needs 2 <= T <= {max_frames} frames "
            f"(the BT-Adapter time table has {max_frames} rows; T=1 gives no pooled token).\n"
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


class PPLLaVAProjector(nn.Module):
    """`multi_modal_projector`: MLP (linear_1, GELU, linear_2) + CLIP text encoder / visual head for the relevance."""

    def __init__(self, cfg: PPLLaVAConfig):
        super().__init__()
        self.cfg = cfg
        dv, dl, ct = cfg.vision.hidden_size, cfg.text.hidden_size, cfg.clip_text
        self.linear_1 = nn.Linear(dv, dl)
        self.linear_2 = nn.Linear(dl, dl)
        self.clip_text_model = CLIPTextTransformer(ct, cfg.extend_clip)
        self.clip_text_projection = nn.Linear(ct.hidden_size, ct.projection_dim, bias=False)
        self.clip_visual_ln = nn.LayerNorm(ct.clip_vision_hidden_size, eps=ct.layer_norm_eps)
        self.clip_visual_projection = nn.Linear(ct.clip_vision_hidden_size, ct.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def act(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.projector_hidden_act != "gelu":
            raise NotImplementedError(self.cfg.projector_hidden_act)
        return F.gelu(x)  # exact erf GELU

    def values(self, features: torch.Tensor) -> torch.Tensor:
        """GELU(linear_1(F)): [T, P, D_llm] (linear_2 runs after pooling, §6.1 rewrite)."""
        return self.act(self.linear_1(features))

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


def llama_config(cfg: PPLLaVAConfig):
    """transformers' LlamaConfig of the checkpoint's LLM (the exporter also uses it for the rotary tables)."""
    from transformers import LlamaConfig

    t = cfg.text
    return LlamaConfig(
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
        attention_bias=t.attention_bias,
        mlp_bias=t.mlp_bias,
        bos_token_id=t.bos_token_id,
        eos_token_id=t.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        **{k: v for k, v in t.extra.items() if k in {"head_dim", "rope_scaling", "rope_parameters", "pretraining_tp"}},
    )


class PPLLaVAForConditionalGeneration(nn.Module):
    """Module tree mirrors the checkpoint: `vision_tower.vision_model.*`, `multi_modal_projector.*`,
    `language_model.{model,lm_head}.*`, `image_newline`."""

    def __init__(self, cfg: PPLLaVAConfig, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import LlamaForCausalLM

        self.cfg = cfg
        t = cfg.text
        self.vision_tower = CLIPVisionTower(cfg.vision)
        self.multi_modal_projector = PPLLaVAProjector(cfg)
        llama_cfg = llama_config(cfg)
        llama_cfg._attn_implementation = attn_implementation
        self.language_model = LlamaForCausalLM(llama_cfg)
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
        multi_image: bool = False,
    ) -> VisualOutput:
        """Video: 2 <= T <= max_T frames, kernel (2,3,3). Image: anyres tiles (base first) of an image of
        `image_size` (H, W), each tile through the tower with T = 1, one relevance softmax over all tiles, kernel
        (1,3,3), then the anyres assembly with `image_newline`. `multi_image`: N images, each squashed to S x S like a
        video frame, through the tower as one video of T = N frames, one relevance softmax over all of them, kernel
        (1,3,3), no newline: g*g tokens per image, in order (the authors' `encode_video(..., multi_image=True)`)."""
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
        g, tokens = proj.pool(keys, values, clip_ids, image=image or multi_image)
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
