"""SigLIP building blocks of the Qwen2 + SigLIP release, with the checkpoint's key names.

- `SiglipVisionTower`: `vision_tower.vision_model.*` (transformers 4.45.2's `SiglipVisionTransformer`): patch
  embedding (a biased conv), learned positions, no CLS, pre-LN encoder with tanh-GELU MLPs, `post_layernorm`. The
  feature is `hidden_states[-1]` with strategy "full": the last encoder layer's output, every token, before
  `post_layernorm` (which the release stores but the feature never passes through).
- `SiglipTextTransformer`: `multi_modal_projector.clip_text_model.*`, SigLIP's text tower with the authors' extended
  position tables (`convert_text_position`: 64 -> 196 rows, two tables folded as for CLIP), bidirectional attention
  under the tokenizer's padding mask, and the pooled output `head(final_layer_norm(x)[:, -1])` (the last position,
  a padding token when the question is short, as in 4.45.2 and 5.24).
- `SiglipPatchValueHead`: the authors' `SiglipPoolingHead_PatchCLS` (`clip_visual_head.*`): of the MAP head only the
  V slice of `attention.in_proj` runs, per token, then `layernorm` + `mlp` with a residual. `probe` and
  `attention.out_proj` are stored (module tree = checkpoint names) but do not reach the output (`valuew_plus` false).
- `SiglipPPLLaVAProjector`: `multi_modal_projector.*` of the release (the authors' `LLaVASiglip3DMultiModalProjector`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PPLLaVAConfig, VisionConfig
from .clip import CLIPEncoder, CLIPEncoderLayer, CLIPMLP, CLIPTextEmbeddings, l2_normalize
from .pooling import pool_windows, relevance
from .projector import ProjectorMLP


def _encoder(hidden: int, intermediate: int, heads: int, layers: int, act: str, eps: float) -> CLIPEncoder:
    """SigLIP's encoder layers have CLIP's structure and key names (pre-LN, q/k/v/out biases, fc1/fc2)."""
    return CLIPEncoder([CLIPEncoderLayer(hidden, intermediate, heads, act, eps) for _ in range(layers)])


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # [T, P, D]
        return x + self.position_embedding.weight


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = _encoder(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_hidden_layers, cfg.hidden_act, cfg.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F = hidden_states[-1] (strategy "full"): [T, P, D], every patch, no post_layernorm."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


class SiglipVisionTower(nn.Module):
    """Holds `vision_model` so keys read `vision_tower.vision_model.*` as in the checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


class SiglipTextTransformer(nn.Module):
    def __init__(self, cfg: PPLLaVAConfig):
        super().__init__()
        ct = cfg.clip_text
        self.embeddings = CLIPTextEmbeddings(ct, cfg.extend_clip)
        self.encoder = _encoder(ct.hidden_size, ct.intermediate_size, ct.num_attention_heads, ct.num_hidden_layers, ct.hidden_act, ct.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(ct.hidden_size, eps=ct.layer_norm_eps)
        self.head = nn.Linear(ct.hidden_size, ct.projection_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, position_table: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled output [B, E]: `head` of the last position's state.

        Args:
            input_ids: [B, L] SigLIP ids (padded to L with the pad id).
            attention_mask: [B, L] 1 for the question's tokens and EOS, 0 for padding (what the authors' tokenizer
                returns and their projector passes on); None attends to every position.
            position_table: the two extended tables folded into one [L, D] constant (an exporter's choice).
        """
        x = self.embeddings(input_ids, position_table)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, mask=mask)
        return self.head(self.final_layer_norm(x)[:, -1])


class _ValueAttention(nn.Module):
    """The MAP head's `nn.MultiheadAttention` parameters (`in_proj_weight`, `in_proj_bias`, `out_proj`)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.in_proj_weight = nn.Parameter(torch.zeros(3 * hidden, hidden))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden))
        self.out_proj = nn.Linear(hidden, hidden)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The V projection of every token: the last third of `in_proj` (the authors' `_in_proj_qkv` value)."""
        d = x.shape[-1]
        return F.linear(x, self.in_proj_weight[2 * d :], self.in_proj_bias[2 * d :])


class SiglipPatchValueHead(nn.Module):
    """`SiglipPoolingHead_PatchCLS` built from the tower's vision config: v = V(x); v + mlp(layernorm(v)) per token."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, 1, d))
        self.attention = _ValueAttention(d)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.attention.values(x)
        return v + self.mlp(self.layernorm(v))


class SiglipPPLLaVAProjector(ProjectorMLP):
    """`multi_modal_projector` of the Qwen release: MLP (linear_1, GELU, linear_2) + SigLIP text tower / patch value
    head for the relevance, whose logits are cos * exp(logit_scale) + logit_bias."""

    def __init__(self, cfg: PPLLaVAConfig):
        super().__init__(cfg)
        self.clip_text_model = SiglipTextTransformer(cfg)
        self.clip_visual_head = SiglipPatchValueHead(cfg.vision)
        self.clip_visual_ln = nn.LayerNorm(cfg.clip_text.clip_vision_hidden_size, eps=cfg.vision.layer_norm_eps)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.logit_bias = nn.Parameter(torch.zeros(1))

    def keys(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised patch value-head outputs of every token: [T*P, Dv]."""
        e = self.clip_visual_head(self.clip_visual_ln(features))
        return l2_normalize(e.reshape(-1, e.shape[-1]))

    def text_query(self, clip_ids: torch.Tensor, clip_mask: torch.Tensor | None = None, position_table: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised SigLIP text embedding of the question: [1, E]."""
        return l2_normalize(self.clip_text_model(clip_ids, clip_mask, position_table))

    def pool(
        self, keys: torch.Tensor, values: torch.Tensor, clip_ids: torch.Tensor, image: bool = False,
        position_table: torch.Tensor | None = None, clip_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Relevance g [T,h,w] and pooled visual tokens linear_2(pool(values)) [N, D_llm]."""
        query = self.text_query(clip_ids, clip_mask, position_table)
        g = relevance(keys, query, self.logit_scale, values.shape[0], self.cfg.frame_shape, self.logit_bias)
        kernel = self.cfg.image_pooling_kernel if image else self.cfg.pooling_kernel
        return g, self.linear_2(pool_windows(values, g, kernel, self.cfg.pooling_temp))
