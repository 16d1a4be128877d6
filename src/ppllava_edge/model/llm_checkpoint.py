"""`make-checkpoint --preset tiny|small --llm PATH`: a released-layout checkpoint whose LLM is a trained model.

The `language_model.*` tensors, the LLM's dims (GQA heads, tied embeddings, rope theta, context, eps), its tokenizer
and its conversation template come from PATH (a GGUF file or a Hugging Face LLaMA folder, `llm_source.py`); the vision
tower, the projector (its output width follows the LLM: linear_1 [D_llm, Dv], linear_2 [D_llm, D_llm]) and
`image_newline` are the preset's random weights. They are untrained: the answers are fluent text from a real LLM
about visual tokens that carry no trained meaning.

The image token is appended to the vocabulary: `image_token_index` = the LLM's vocabulary size, one more row in
`embed_tokens` (and in `lm_head` when it is not tied). The new row is the mean of the trained rows (transformers'
`resize_token_embeddings(mean_resizing=True)` starts from that mean and adds noise drawn from the rows' covariance;
we keep the mean alone, so the checkpoint is deterministic). The row is never looked up as an input (the image token
is replaced by the visual tokens), and as an output row it scores like an average token, so greedy decoding does
not pick it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..atomic import AtomicDir
from ..config import config_from_dict
from ..conversation import derive_template, jinja_renderer
from ..errors import ConfigError
from .checkpoint import ProgressFn, build_skeleton, tied_aliases, write_shards
from .llm_source import LlmSource, open_llm
from .presets import PRESETS, _init_rule, _normal_chunks, preset_config
from .shards import TensorSpec

IMAGE_ROW_INIT = "mean of the trained rows"
LANGUAGE_MODEL = "language_model."
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings", "hidden_act", "bos_token_id",
              "eos_token_id", "pad_token_id", "head_dim")


def llm_checkpoint_config(preset: str, src: LlmSource, template: dict) -> tuple[dict, dict | None]:
    """(config.json, clip/config.json) of `preset` with the LLM of `src` (vocabulary + 1 for the image token)."""
    if PRESETS.get(preset, {}).get("released"):
        raise ConfigError(f"--llm works with the tiny and small presets (their vision side is small); got --preset {preset}.")
    config, clip = preset_config(preset)
    t = {k: v for k, v in src.text_config.items() if k in _TEXT_KEYS and v is not None}
    vocab = int(t["vocab_size"])
    text = {"_name_or_path": src.model_name, "architectures": ["LlamaForCausalLM"], "model_type": "llama", **t, "vocab_size": vocab + 1}
    pad = t.get("pad_token_id", t.get("eos_token_id", 0))
    text["pad_token_id"] = pad
    config.update(text_config=text, image_token_index=vocab, pad_token_id=pad, tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
                  conversation_template=template)
    return config, clip


def conversation_template(src: LlmSource) -> dict:
    """The LLM's chat template read as per-role strings (ConversationTemplate) and checked against the Jinja."""
    if not src.chat_template:
        raise ConfigError(f"--llm {src.path}: the model has no chat template (tokenizer.chat_template / chat_template); "
                          "ppllava-edge needs one to lay out the question.\nHint: use the Instruct (chat) version of the model.")
    render = jinja_renderer(src.chat_template, bos_token=src.bos_token or "", eos_token=src.eos_token or "")
    name = "chatml" if "<|im_start|>" in src.chat_template else "derived"
    return derive_template(render, name=name, source=f"chat template of {src.model_name}").to_dict()


def _llm_stream(src: LlmSource, name: str, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    hf = name[len(LANGUAGE_MODEL):]
    w = src.read(hf)
    if hf in ("model.embed_tokens.weight", "lm_head.weight"):
        w = np.concatenate([w, w.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)], axis=0)
    yield torch.from_numpy(np.require(w, requirements="W")).to(dtype)  # a read-only GGUF / mmap view is copied once


def checkpoint_tensors(model, src: LlmSource, init_std, seed: int, dtype: torch.dtype):
    """(specs, stream) in state-dict order: the LLM's tensors from `src`, the rest random (one generator, `seed`)."""
    aliases = tied_aliases(model)
    state = {k: v for k, v in model.state_dict().items() if k not in aliases}
    specs = [TensorSpec(name, tuple(p.shape), dtype) for name, p in state.items()]
    wanted = {LANGUAGE_MODEL + n for n in src.names}
    ours = {n for n in state if n.startswith(LANGUAGE_MODEL)}
    if wanted != ours:
        missing, extra = sorted(ours - wanted), sorted(wanted - ours)
        raise ConfigError(f"--llm {src.path}: its tensors do not match a LLaMA of its config (missing {missing[:5]}, unexpected {extra[:5]}).")

    def stream():
        gen = torch.Generator().manual_seed(seed)
        for spec in specs:
            if spec.name.startswith(LANGUAGE_MODEL):
                yield spec.name, _llm_stream(src, spec.name, dtype)
            elif spec.name.endswith("logit_scale"):
                yield spec.name, iter([torch.tensor(np.log(100.0), dtype=torch.float32).to(dtype)])
            else:
                yield spec.name, (c.to(dtype) for c in _normal_chunks(spec.shape, gen, *_init_rule(spec.name, spec.shape, init_std), None))

    return specs, stream()


def write_llm_tokenizer(src: LlmSource, folder: Path, image_token_id: int, template: dict) -> None:
    """The LLM's tokenizer with `<image>` added (a special token, id = the LLM's vocabulary size): tokenizer.model and
    its JSON files when the source has one (sentencepiece, ids unchanged), else tokenizer.json; tokenizer_config.json
    records the chat template, BOS and EOS."""
    from tokenizers import AddedToken

    from ..tokenization import IMAGE_TOKEN

    spm = src.kind == "hf" and (src.path / "tokenizer.model").is_file()
    tok_cfg = {}
    if src.kind == "hf" and (src.path / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((src.path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok = src.tokenizer()
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != image_token_id:
        raise ConfigError(f"--llm {src.path}: the tokenizer has {size} ids but the model {image_token_id} embedding rows; "
                          "the image token must follow both.")
    added = {"content": IMAGE_TOKEN, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    if spm:
        shutil.copyfile(src.path / "tokenizer.model", folder / "tokenizer.model")
        for name in ("special_tokens_map.json",):
            if (src.path / name).is_file():
                shutil.copyfile(src.path / name, folder / name)
        extra = json.loads((src.path / "added_tokens.json").read_text()) if (src.path / "added_tokens.json").is_file() else {}
        (folder / "added_tokens.json").write_text(json.dumps({**extra, IMAGE_TOKEN: image_token_id}, indent=2) + "\n")
        tok_cfg.setdefault("added_tokens_decoder", {})[str(image_token_id)] = added
    else:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
        if tok.token_to_id(IMAGE_TOKEN) != image_token_id:
            raise ConfigError(f"--llm {src.path}: {IMAGE_TOKEN} got id {tok.token_to_id(IMAGE_TOKEN)}, expected {image_token_id}")
        tok.save(str(folder / "tokenizer.json"))
        tok_cfg = {"added_tokens_decoder": {str(image_token_id): added}}
    tok_cfg.update(chat_template=src.chat_template, bos_token=src.bos_token, eos_token=src.eos_token, model_max_length=src.text_config["max_position_embeddings"])
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def make_llm_checkpoint(preset: str, llm: str | Path, out: str | Path, seed: int = 0, force: bool = False, dtype: str = "fp32",
                        progress: ProgressFn | None = None) -> Path:
    """Write a checkpoint folder: `preset`'s random vision side + the trained LLM at `llm` (atomically, streamed)."""
    store = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    src = open_llm(llm)
    try:
        template = conversation_template(src)
        config, clip = llm_checkpoint_config(preset, src, template)
        config["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
        with AtomicDir(Path(out), force=force) as tmp:
            if clip is not None:
                (tmp / "clip").mkdir()
                (tmp / "clip" / "config.json").write_text(json.dumps(clip, indent=2) + "\n")
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            cfg = config_from_dict(config, tmp)
            write_llm_tokenizer(src, tmp, cfg.image_token_index, template)
            specs, tensors = checkpoint_tensors(build_skeleton(cfg), src, PRESETS[preset]["init_std"], seed, store)
            write_shards(tmp, specs, tensors, num_shards=3, progress=progress)
            t = cfg.text
            gen = {"_from_model_config": True, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": cfg.pad_token_id}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
            info = {
                "preset": preset, "seed": seed,
                "llm": {"source": str(Path(llm).resolve()), "format": src.kind, "name": src.model_name, "sha256": src.sha256(), "trained": True,
                        "image_token_row": IMAGE_ROW_INIT, "random": ["vision_tower", "multi_modal_projector", "image_newline"]},
            }
            (tmp / "ppllava_edge.json").write_text(json.dumps(info, indent=2) + "\n")
    finally:
        src.close()
    return Path(out)
