"""`make_checkpoint`: a preset's random-weight checkpoint (presets.py), or one whose LLM is a trained model
(llm_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import ProgressFn
from .llm_checkpoint import make_llm_checkpoint
from .presets import make_random_checkpoint


def make_checkpoint(preset: str, out: str | Path, seed: int = 0, force: bool = False, dtype: str | None = None,
                    progress: ProgressFn | None = None, llm: str | Path | None = None, tokenizer: str | Path | None = None) -> Path:
    """Write a random-weight checkpoint folder for `preset` (atomically), streaming tensor by tensor.

    `llm`: a GGUF file or Hugging Face LLaMA folder whose trained LLM (weights, dims, tokenizer, chat template)
    replaces the preset's (see llm_checkpoint.py); `dtype` then defaults to fp32 (the trained values as read), else
    to bf16 (the release). `tokenizer`: Qwen2's tokenizer.json for a qwen preset (default: a synthetic one).
    `progress(bytes_done, bytes_total)` is called after each tensor. Returns the folder.
    """
    if llm is not None:
        return make_llm_checkpoint(preset, llm, out, seed=seed, force=force, dtype=dtype or "fp32", progress=progress)
    return make_random_checkpoint(preset, out, seed=seed, force=force, dtype=dtype or "bf16", progress=progress, tokenizer=tokenizer)
