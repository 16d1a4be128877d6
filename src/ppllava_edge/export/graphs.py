"""The exported graphs as small nn.Modules over the reference model (same parameters, same maths).

- VisionGraph:      pixel_values [T,3,H,W] -> values [T,P,D_llm] = GELU(linear_1(F)), keys [T*P,E] (normalised)
- PromptPoolGraph:  clip_ids [1,L], keys, values -> visual_tokens [T//2*(h/3)*(w/3), D_llm], relevance [T,h,w]
- image_pool:       PromptPoolGraph(image=True): the same for N image tiles with the (1,3,3) kernel -> [N*(h/3)*(w/3), D];
                    the anyres assembly (unpadding, image_newline rows) is done by the caller (media/anyres.py)
- SiglipPoolGraph:  the prompt_pool / image_pool of the Qwen2 + SigLIP family: clip_ids [1,L], clip_mask [1,L],
                    keys, values -> visual_tokens, relevance (SigLIP text tower with the padding mask, no logit_bias:
                    a constant shift under the softmax)
- ProjectorHeadGraph: values [N,D_llm] -> linear_2(values) (baselines without prompt-guided pooling)
- DecoderGraph:     inputs_embeds, attention_mask, position_ids, past.{i}.key/value -> logits [B,V], present.*
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QWEN_SIGLIP
from ..model.clip import l2_normalize
from ..model.pooling import pool_windows, relevance
from ..model.ppllava import PPLLaVAForConditionalGeneration
from ..runtime.stages import pool_query

CLIP_SOT, CLIP_EOT = 49406, 49407  # CLIP's <|startoftext|> / <|endoftext|>


class VisionGraph(nn.Module):
    """Holds only the tower and the projector (the LLM may be unloaded, on the meta device)."""

    def __init__(self, model: PPLLaVAForConditionalGeneration):
        super().__init__()
        self.vision_tower = model.vision_tower
        self.projector = model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.vision_tower(pixel_values)  # = model.encode_video
        return self.projector.values(features), self.projector.keys(features)


class PromptPoolGraph(nn.Module):
    """Text encoder (folded position table) + relevance (fp32) + windowed pooling + linear_2.

    image=True: the frames are an image's tiles (one relevance softmax over all of them) and the kernel is the image
    kernel (1,3,3); the output is the pooled tokens of every tile in order, without `image_newline`.
    """

    def __init__(self, model: PPLLaVAForConditionalGeneration, image: bool = False):
        super().__init__()
        self.projector = model.multi_modal_projector
        self.image = image
        table = self.projector.clip_text_model.embeddings.position_table().detach().clone()
        self.position_table = nn.Parameter(table, requires_grad=False)

    def forward(self, clip_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, tokens = self.projector.pool(keys, values, clip_ids, image=self.image, position_table=self.position_table)
        return tokens, g


class SiglipPoolGraph(nn.Module):
    """The SigLIP family's pool: query = l2norm(text_model(clip_ids, clip_mask)) (the SigLIP text tower's pooled
    output: final_layer_norm at the last position, then its `head` Linear), g = softmax over every token of
    cos * exp(logit_scale) (+ logit_bias, the authors' `LLaVASiglip3DMultiModalProjector`: a scalar added to every
    logit, which the softmax cancels exactly, so the graph leaves it out), then the windowed pooling and linear_2.

    The mask is an input because SigLIP's text attention is bidirectional: the padding the authors' tokenization
    adds (padding="max_length") is masked as keys, and the pooled position (the last, a pad when the question is
    shorter than the context) reads every real token - so the mask changes the query, unlike CLIP's causal EOT.

    Args:
        text_model: (input_ids [1,L] int64, attention_mask [1,L] int64[, position_table]) -> pooled [1,E].
        position_table: the folded extended position table [L, D] the text model is called with (held here as
            `position_table`, which the weight map traces to the two checkpoint tables); None: the text model holds
            its positions itself.
        grid: the patch grid (h, w) of one frame; kernel: (kt, kh, kw) (video (2,3,3), image tiles (1,3,3)).
    """

    def __init__(self, text_model: nn.Module, linear_2: nn.Module, logit_scale: torch.Tensor, grid: tuple[int, int],
                 kernel: tuple[int, int, int], temperature: float, position_table: torch.Tensor | None = None):
        super().__init__()
        self.text_model, self.linear_2, self.logit_scale = text_model, linear_2, logit_scale
        self.grid, self.kernel, self.temperature = tuple(grid), tuple(kernel), float(temperature)
        self.position_table = None if position_table is None else nn.Parameter(position_table.detach().clone(), requires_grad=False)

    def forward(self, clip_ids: torch.Tensor, clip_mask: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = () if self.position_table is None else (self.position_table,)
        query = l2_normalize(self.text_model(clip_ids, clip_mask, *table))
        g = relevance(keys, query, self.logit_scale, values.shape[0], self.grid)
        return self.linear_2(pool_windows(values, g, self.kernel, self.temperature)), g


SIGLIP_EOS = 1  # `</s>`, SigLIP's EOS and pad id (the authors' SiglipTokenizer call pads with it)


def pool_graph(model: PPLLaVAForConditionalGeneration, image: bool = False) -> nn.Module:
    """prompt_pool (image=False) / image_pool of the checkpoint's family: PromptPoolGraph (CLIP; inputs clip_ids,
    keys, values) or SiglipPoolGraph over the SigLIP projector's parts (clip_ids, clip_mask, keys, values)."""
    if model.cfg.family != QWEN_SIGLIP:
        return PromptPoolGraph(model, image=image)
    cfg, proj = model.cfg, model.multi_modal_projector
    table = proj.clip_text_model.embeddings.position_table()
    kernel = cfg.image_pooling_kernel if image else cfg.pooling_kernel
    return SiglipPoolGraph(proj.clip_text_model, proj.linear_2, proj.logit_scale, cfg.frame_shape, kernel, cfg.pooling_temp, table)


def example_query(cfg, words: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """The pools' question inputs for `words` (token ids of the relevance tokenizer, without specials), laid out as
    the family's tokenizer does: CLIP `<|startoftext|>` words `<|endoftext|>`, padded with EOT to the context;
    SigLIP words `</s>`, padded with `</s>`, and the attention mask (1 up to and with `</s>`)."""
    ctx, words = cfg.clip_text.context_length, torch.as_tensor(words, dtype=torch.int64)
    if cfg.family != QWEN_SIGLIP:
        ids = torch.full((1, ctx), CLIP_EOT, dtype=torch.int64)
        ids[0, 0] = CLIP_SOT
        ids[0, 1 : 1 + len(words)] = words
        return pool_query(ids)
    ids = torch.full((1, ctx), SIGLIP_EOS, dtype=torch.int64)
    ids[0, : len(words)] = words
    mask = torch.zeros((1, ctx), dtype=torch.int64)
    mask[0, : len(words) + 1] = 1
    return pool_query(ids, mask)


class ProjectorHeadGraph(nn.Module):
    """linear_2 alone: values [N, D_llm] -> tokens [N, D_llm]. Used by the bench's no-pooling / average-pooling
    baselines (LLaVA-NeXT without prompt-guided pooling on the same backbone)."""

    def __init__(self, model: PPLLaVAForConditionalGeneration):
        super().__init__()
        self.linear_2 = model.multi_modal_projector.linear_2

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.linear_2(values)


class DecoderGraph(nn.Module):
    """One KV-cache graph for prefill (empty past) and decode; the transformers cache is flattened to tensors.

    `lm` is the causal LM alone (transformers' LlamaForCausalLM or Qwen2ForCausalLM: `model.language_model`)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.num_layers = lm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        flat = []
        for layer in out.cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits[:, -1, :], *flat)
