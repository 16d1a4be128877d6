"""Torch-free tokenizers: the LLaMA prompt tokenizer and the CLIP text tokenizer.

Everything here uses only the standard library, numpy and the `tokenizers` package (no torch, transformers,
sentencepiece or protobuf), so the runtime can tokenize on a device that has none of them.

- `codec`: a small protobuf reader/writer for sentencepiece `ModelProto` files (`tokenizer.model`).
- `synthetic`: `synthetic_llama_spm`, a deterministic LLaMA-like BPE vocabulary for the random-weight presets.
- `llama`: `build_llama_tokenizer`, a `tokenizers.Tokenizer` built from a sentencepiece model with merges ranked by
  (-score, id), which gives the same ids as transformers 4.45's fast tokenizer and as sentencepiece
  (transformers 5 ranks merges by id and gets runs of spaces wrong); `load_llama_tokenizer_from_checkpoint`.
- `prompt`: `LlamaPromptTokenizer`, the authors' prompt ids (`"USER: <image>\\n" + question + " ASSISTANT: "`), with
  the question tokenized so that a typed `<image>` or `</s>` stays text.
- `clip`: `ClipTokenizer`, CLIP's BPE tokenizer (ids padded/truncated to 248 or 77), shipped as a package asset.
- `siglip`: `SiglipTextTokenizer`, SigLIP's sentencepiece tokenization with the authors' rules (canonicalised text,
  `</s>`, padded to 196 or 64, attention mask), for the Qwen2 + SigLIP family.
- `synthetic` also makes the Qwen2-like byte-level BPE tokenizer.json and the SigLIP-like unigram model of the qwen presets.

The conversation templates stay in `ppllava_edge.conversation` (config and manifest read them without `tokenizers`).
"""

from __future__ import annotations

from ..conversation import IMAGE_TOKEN
from .clip import CLIP_BOS_ID, CLIP_EOS_ID, CLIP_LENGTH, CLIP_LENGTH_SHORT, ClipTokenizer
from .codec import (
    SPM_BYTE,
    SPM_CONTROL,
    SPM_NORMAL,
    SPM_UNKNOWN,
    SPM_UNUSED,
    SPM_USER_DEFINED,
    SpmModel,
    parse_spm_model,
    read_spm_model,
    serialize_spm_model,
    write_spm_model,
)
from .llama import build_llama_tokenizer, check_llama_merge_order, load_llama_tokenizer_from_checkpoint
from .prompt import IMAGE_TOKEN_ID, PROMPT_HEAD, PROMPT_TAIL, TEMPLATE, LlamaPromptTokenizer, render_prompt
from .siglip import SIGLIP_LENGTH, SIGLIP_LENGTH_SHORT, SIGLIP_MODEL_NAME, SiglipTextTokenizer
from .synthetic import synthetic_llama_spm, synthetic_qwen2_tokenizer_json, synthetic_siglip_spm

__all__ = [
    "CLIP_BOS_ID",
    "CLIP_EOS_ID",
    "CLIP_LENGTH",
    "CLIP_LENGTH_SHORT",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_ID",
    "PROMPT_HEAD",
    "PROMPT_TAIL",
    "SPM_BYTE",
    "SPM_CONTROL",
    "SPM_NORMAL",
    "SPM_UNKNOWN",
    "SPM_UNUSED",
    "SPM_USER_DEFINED",
    "SIGLIP_LENGTH",
    "SIGLIP_LENGTH_SHORT",
    "SIGLIP_MODEL_NAME",
    "TEMPLATE",
    "ClipTokenizer",
    "LlamaPromptTokenizer",
    "SiglipTextTokenizer",
    "SpmModel",
    "build_llama_tokenizer",
    "check_llama_merge_order",
    "load_llama_tokenizer_from_checkpoint",
    "parse_spm_model",
    "read_spm_model",
    "render_prompt",
    "serialize_spm_model",
    "synthetic_llama_spm",
    "synthetic_qwen2_tokenizer_json",
    "synthetic_siglip_spm",
    "write_spm_model",
]
