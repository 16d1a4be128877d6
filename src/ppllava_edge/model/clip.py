"""CLIP building blocks with the checkpoint's key names, the BT-Adapter vision tower and the extended text encoder.

Attribute names equal the released state-dict keys (`q_proj`, `layer_norm1`, `mlp.fc1`, `btadapter_S_layers`, ...)
so weights load without a key map. Shapes in comments: T frames, P patches per frame, D width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIP_KEEP_LEN, ClipTextConfig, VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' `gelu_pytorch_tanh` (SigLIP's MLP)."""
    return F.gelu(x, approximate="tanh")


_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}


class CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: bool [B, 1, 1, N], True where a key may be attended (SigLIP's padded text), else all keys."""
        b, n, d = hidden_states.shape  # [B, N, D]
        q = self.q_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.head_dim**-0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.act = _ACTS[act]
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer (CLIP)."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal=causal, mask=mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)


class BTAdapterTemporalLayer(nn.Module):
    """`CLIPLayer_AttnTime`: per patch, attention over the T frames, `temporal_fc`, residual; CLS untouched."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(d)  # the authors use nn.LayerNorm defaults (eps 1e-5)
        self.temporal_fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: [1, 1 + P*T, D], patch tokens in (p, t) order
        cls, patches = x[:, :1], x[:, 1:]
        d = x.shape[-1]
        h = patches.reshape(-1, num_frames, d)  # [P, T, D]
        h = self.temporal_fc(self.self_attn(self.layer_norm1(h)))
        return torch.cat((cls, patches + h.reshape(1, -1, d)), dim=1)


class BTAdapterSpatialLayer(nn.Module):
    """`CLIPLayer_Spatial`: per frame, attention over (CLS copy + P patches); CLS outputs averaged over T; MLP."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(d)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: [1, 1 + P*T, D]
        d = x.shape[-1]
        cls, patches = x[:, :1], x[:, 1:]
        per_frame = patches.reshape(1, -1, num_frames, d).transpose(1, 2).reshape(num_frames, -1, d)  # [T, P, D]
        h = torch.cat((cls.expand(num_frames, 1, d), per_frame), dim=1)  # [T, 1+P, D]
        h = self.self_attn(self.layer_norm1(h))
        cls_out = h[:, :1].mean(dim=0, keepdim=True)  # [1, 1, D]
        patches_out = h[:, 1:].reshape(1, num_frames, -1, d).transpose(1, 2).reshape(1, -1, d)  # [1, P*T, D]
        x = x + torch.cat((cls_out, patches_out), dim=1)
        return x + self.mlp(self.layer_norm2(x))


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # [T, P, D]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight  # [T, 1+P, D]


class BTAdapterVisionTransformer(nn.Module):
    """`CLIPVisionTransformer_BTAdapter` for one video of T frames (`pixel_values` [T, 3, H, W], never sniffed)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(
            [
                CLIPEncoderLayer(d, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.post_layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.btadapter_S_layers = nn.ModuleList([BTAdapterSpatialLayer(cfg) for _ in range(cfg.btadapter_depth)])
        self.btadapter_T_layers = nn.ModuleList([BTAdapterTemporalLayer(cfg) for _ in range(cfg.btadapter_depth)])
        self.btadapter_time_embed = nn.Embedding(cfg.max_t, d)
        self.btadapter_cls_token = nn.Parameter(torch.zeros(1, 1, d))

    # -- adapter pieces (authors' `input_ini`, `forward_BTAdapter`, `get_combined_embedding`) --
    def _adapter_init(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # x: [T, 1+P, D] main-stream output of the first adapted layer
        d = x.shape[-1]
        cls_old = x[:, 0].mean(dim=0).view(1, 1, d)
        h = torch.cat((self.btadapter_cls_token.expand(num_frames, 1, d), x[:, 1:]), dim=1)
        h = h + self.embeddings.position_embedding.weight  # [T, 1+P, D]
        cls_new = h[:1, :1]  # first frame's row (batch of one video)
        patches = h[:, 1:].transpose(0, 1)  # [P, T, D]
        time_ids = torch.arange(num_frames, device=x.device)
        patches = patches + self.btadapter_time_embed(time_ids)
        return torch.cat(((cls_old + cls_new) / 2, patches.reshape(1, -1, d)), dim=1)  # [1, 1+P*T, D]

    def _adapter_step(self, x: torch.Tensor, x2: torch.Tensor | None, step: int, num_frames: int) -> torch.Tensor:
        d = x.shape[-1]
        if x2 is None:
            h = self._adapter_init(x, num_frames)
        else:
            cls = x[:, 0].mean(dim=0).view(1, 1, d)
            patches = x[:, 1:].transpose(0, 1).reshape(1, -1, d)  # (p, t) order
            h = x2 + torch.cat((cls, patches), dim=1)
        h = self.btadapter_T_layers[step](h, num_frames)
        return self.btadapter_S_layers[step](h, num_frames)

    @staticmethod
    def _combine(x: torch.Tensor, x2: torch.Tensor, num_frames: int) -> torch.Tensor:
        # per frame: [main CLS, (main patch + adapter patch) / 2]
        d = x.shape[-1]
        x2_patches = x2[:, 1:].reshape(-1, num_frames, d).transpose(0, 1)  # [T, P, D]
        return torch.cat((x[:, :1], (x[:, 1:] + x2_patches) / 2), dim=1)

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """All encoder states as the authors' `forward_patch` returns them (every layer and adapter pair runs)."""
        num_frames = pixel_values.shape[0]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        total, depth = len(self.encoder.layers), self.cfg.btadapter_depth
        states, x2 = [], None
        for idx, layer in enumerate(self.encoder.layers):
            states.append(x if x2 is None else self._combine(x, x2, num_frames))
            x = layer(x)
            if idx >= total - depth:
                x2 = self._adapter_step(x, x2, idx - (total - depth), num_frames)
        states.append(self._combine(x, x2, num_frames))
        return states

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """F = hidden_states[-2] without CLS: [T, P, D]. Dead compute (last main layer, last adapter pair) is skipped."""
        num_frames = pixel_values.shape[0]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        total, depth = len(self.encoder.layers), self.cfg.btadapter_depth
        x2 = None
        for idx in range(total - 1):
            x = self.encoder.layers[idx](x)
            if idx >= total - depth:
                x2 = self._adapter_step(x, x2, idx - (total - depth), num_frames)
        state = x if x2 is None else self._combine(x, x2, num_frames)
        return state[:, 1:]


class CLIPVisionTower(nn.Module):
    """Holds `vision_model` so keys read `vision_tower.vision_model.*` as in the checkpoint."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = BTAdapterVisionTransformer(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values)


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings; with `extend_clip` two 248-row tables (`position_embedding`, `position_embedding_res`)."""

    def __init__(self, cfg: ClipTextConfig, extend: bool):
        super().__init__()
        self.extend = extend
        d = cfg.hidden_size
        self.token_embedding = nn.Embedding(cfg.vocab_size, d)
        if extend:
            self.position_embedding = nn.Parameter(torch.zeros(cfg.context_length, d))
            self.position_embedding_res = nn.Parameter(torch.zeros(cfg.context_length, d))
        else:
            self.position_embedding = nn.Embedding(cfg.context_length, d)

    def position_table(self) -> torch.Tensor:
        """One [L, D] table: rows < 20 from `position_embedding`, rows >= 20 from `position_embedding_res` (§5)."""
        if not self.extend:
            return self.position_embedding.weight
        return torch.cat((self.position_embedding[:CLIP_KEEP_LEN], self.position_embedding_res[CLIP_KEEP_LEN:]), dim=0)

    def forward(self, input_ids: torch.Tensor, position_table: torch.Tensor | None = None) -> torch.Tensor:
        table = self.position_table() if position_table is None else position_table
        return self.token_embedding(input_ids) + table[: input_ids.shape[1]]


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: ClipTextConfig, extend: bool):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPTextEmbeddings(cfg, extend)
        self.encoder = CLIPEncoder(
            [
                CLIPEncoderLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_act, cfg.layer_norm_eps)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def eot_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Pooled position: transformers' legacy argmax(ids) when eos_token_id == 2 (OpenAI config), else the first EOS."""
        if self.cfg.eos_token_id == 2:
            return input_ids.to(torch.int64).argmax(dim=-1)
        return (input_ids == self.cfg.eos_token_id).to(torch.int64).argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, position_table: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled EOT state [B, D]. The padding mask is omitted: causal attention makes it irrelevant at EOT (§4).

        `position_table` lets an exporter pass the two extended tables folded into one constant.
        """
        x = self.embeddings(input_ids, position_table)
        for layer in self.encoder.layers:
            x = layer(x, causal=True)
        x = self.final_layer_norm(x)
        idx = self.eot_index(input_ids)
        return x[torch.arange(x.shape[0], device=x.device), idx]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| over the last dim, written with rsqrt so ORT's symbolic shape inference keeps the shape."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True))


def ln100() -> float:
    return math.log(100.0)
