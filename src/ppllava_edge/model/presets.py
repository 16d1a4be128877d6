"""Random-weight checkpoints in exactly the released layout (`ppllava-edge make-checkpoint`).

The config.json keys, tensor names, shards + index and tokenizer files are those of
`farewellthree/ppllava_weight/ppllava_vicuna7b_image_video_dpo`. `7b` has the released dims and config.json
(`clip_weight` = the OpenAI hub id, whose config the package keeps); `mid` is the same with the LLM cut to 4
layers. `tiny` and `small` have small dims; the CLIP text model's hyper-parameters are not in config.json, so
they point `clip_weight` at a local `clip/` folder holding its config.json (what a user does to run a real
checkpoint offline).

Tensors are generated one at a time in state-dict order from one seeded generator and streamed to the shards
(`write_shards`), so memory holds one tensor (at 7B: one chunk of at most 16 MB) however large the model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch

from ..atomic import AtomicDir
from ..config import config_from_dict
from ..errors import ConfigError
from ..media.anyres import default_pinpoints
from .checkpoint import ProgressFn, build_skeleton, write_shards
from .ppllava import PPLLaVAForConditionalGeneration
from .qwen_presets import QWEN_PRESETS, qwen_preset_config, write_qwen_tokenizer_files, write_siglip_tokenizer
from .release_keys import PPLLAVA_POOLING_KEYS
from .shards import TensorSpec

RELEASED_TOP_LEVEL = {
    "architectures": ["LlavaInterleaveForConditionalGeneration"],
    "model_type": "llava_next",
    **PPLLAVA_POOLING_KEYS,
    "btadapter": True,
    "btadapter_depth": 4,
    "max_T": 64,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "image_token_index": 32000,
    "pad_token_id": 0,
    "ignore_index": -100,
    "projector_hidden_act": "gelu",
    "use_image_newline_parameter": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0",
}

PRESETS: dict[str, dict] = {
    # a few MB, for tests: 84 px -> 6x6 grid (divisible by 3), 6 vision layers (4 adapter pairs fit)
    "tiny": {
        "vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4, "image_size": 84, "patch_size": 14},
        "clip_text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 32},
        "llm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096},
        "init_std": {"vision": 0.05, "llm": 0.08},
    },
    # CPU benchmarks: real 336 px / 24x24 grid / 32 frames -> 1024 tokens; ~190 M parameters; vision (32 frames)
    # and LLM prefill (~1100 tokens) cost about the same, like the 7B model (§11.1).
    "small": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 24, "num_attention_heads": 4, "image_size": 336, "patch_size": 14},
        "clip_text": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 4, "projection_dim": 256},
        "llm": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 4096},
        "init_std": {"vision": 0.03, "llm": 0.04},
    },
    # vision measurements at the released tower's size: the CLIP-L tower (336 px, 24 x 1024, 16 heads, MLP 4096,
    # BT-Adapter depth 4) and CLIP text (12 x 768) of the release, with the small preset's LLM so the whole
    # pipeline (export, calibrate, quantize, bench) runs in a few GB: ~580 M parameters
    "vision-l": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14},
        "clip_text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "projection_dim": 768},
        "llm": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 4096},
        "init_std": "fan_in",
    },
    # the released widths everywhere (CLIP-L tower 336 px, 24 x 1024, BT-Adapter depth 4; CLIP text 12 x 768, 248
    # positions; Vicuna width 4096, 32 heads, MLP 11008, vocab 32064), the LLM cut to 4 layers: ~1.6 B parameters
    "mid": {"released": True, "llm_layers": 4, "init_std": "fan_in"},
    # the released PPLLaVA-7B (Vicuna-7B): 7.26 B parameters, 14.5 GB in bf16
    "7b": {"released": True, "llm_layers": None, "init_std": "fan_in"},
    **QWEN_PRESETS,  # the Qwen2 + SigLIP family (qwen_presets.py)
}

CLIP_HUB_ID = "openai/clip-vit-large-patch14-336"
# vision_config and text_config as the release records them: only the keys that differ from transformers'
# CLIPVisionConfig / LlamaConfig defaults (LlamaConfig's defaults are Vicuna-7B's 4096 / 11008 / 32 layers / 32 heads).
RELEASED_VISION_CONFIG = {
    "hidden_size": 1024,
    "image_size": 336,
    "intermediate_size": 4096,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "vocab_size": 32000,
}
RELEASED_TEXT_CONFIG = {
    "_name_or_path": "lmsys/vicuna-7b-v1.5",
    "architectures": ["LlamaForCausalLM"],
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "torch_dtype": "bfloat16",
    "vocab_size": 32064,
}
FAN_IN_CHUNK = 1 << 22  # elements per generated chunk (16 MB in fp32) for the released-width presets


def released_config(llm_layers: int | None = None) -> dict:
    """The released config.json (7B), optionally with fewer LLM layers."""
    config = dict(RELEASED_TOP_LEVEL, clip_weight=CLIP_HUB_ID, frame_shape=[24, 24])
    config["vision_config"] = dict(RELEASED_VISION_CONFIG)
    config["text_config"] = dict(RELEASED_TEXT_CONFIG)
    if llm_layers is not None:
        config["text_config"]["num_hidden_layers"] = llm_layers
    return config


def preset_config(name: str) -> tuple[dict, dict | None]:
    """(config.json dict, clip/config.json dict or None when `clip_weight` is the OpenAI hub id) for a preset."""
    if name not in PRESETS or name in QWEN_PRESETS:
        raise ConfigError(f"unknown Vicuna preset {name!r}; choose one of: {', '.join(set(PRESETS) - set(QWEN_PRESETS))}")
    p = PRESETS[name]
    if p.get("released"):
        return released_config(p["llm_layers"]), None
    v, c, t = p["vision"], p["clip_text"], p["llm"]
    config = dict(RELEASED_TOP_LEVEL)
    config["clip_weight"] = "clip"
    config["frame_shape"] = [v["image_size"] // v["patch_size"]] * 2
    # the released pinpoints are in 336-px tiles (1x2, 2x1, 2x2, 3x1, 1x3); keep the same tile grids at this tile size
    config["image_grid_pinpoints"] = [list(p) for p in default_pinpoints(v["image_size"])]
    config["vision_config"] = {
        "model_type": "clip_vision_model",
        **v,
        "projection_dim": c["projection_dim"],
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-05,
        "vocab_size": 32000,
    }
    config["text_config"] = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **t,
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "vocab_size": 32064,
    }
    clip = {
        "model_type": "clip",
        "projection_dim": c["projection_dim"],
        "logit_scale_init_value": 2.6592,
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"],
            "num_hidden_layers": c["num_hidden_layers"],
            "num_attention_heads": c["num_attention_heads"],
            "max_position_embeddings": 77,
            "vocab_size": 49408,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05,
            "eos_token_id": 2,
            "bos_token_id": 0,
            "pad_token_id": 1,
            "projection_dim": c["projection_dim"],
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v["hidden_size"],
            "intermediate_size": v["intermediate_size"],
            "num_hidden_layers": v["num_hidden_layers"],
            "num_attention_heads": v["num_attention_heads"],
            "image_size": v["image_size"],
            "patch_size": v["patch_size"],
            "projection_dim": c["projection_dim"],
        },
    }
    return config, clip


def _init_rule(name: str, shape: tuple[int, ...], init_std: dict | str) -> tuple[float, float]:
    """(scale, shift) of the N(shift, scale) values of one tensor.

    LayerNorm/RMSNorm gains ~1, their biases and all other biases small. Matrices: N(0, std) with the preset's
    fixed std (`tiny`, `small`), or, for "fan_in" presets, std 1/sqrt(fan_in) (fan_in = product of all dims but
    the first: a Linear's input width, the patch embedding's 3*14*14), which keeps every layer's output at about
    unit scale so fp16 activations stay finite through the 24 + 32 layers; embedding tables (token, position,
    time), `class_embedding`, `btadapter_cls_token` and `image_newline` get 0.02.
    """
    if "norm" in name or "_ln." in name:
        return (0.05, 1.0) if name.endswith("weight") else (0.02, 0.0)
    if name.endswith(".bias"):
        return 0.02, 0.0
    if init_std != "fan_in":
        return (init_std["llm"] if name.startswith("language_model.") else init_std["vision"]), 0.0
    if len(shape) >= 2 and ("patch_embedding" in name or ("embed" not in name and "cls_token" not in name)):
        return 1.0 / math.sqrt(math.prod(shape[1:])), 0.0
    return 0.02, 0.0


def _normal_chunks(shape: tuple[int, ...], gen: torch.Generator, scale: float, shift: float, chunk: int | None) -> Iterator[torch.Tensor]:
    """N(shift, scale) fp32 values of `shape`: one tensor (chunk=None), or row blocks of at most `chunk` elements."""
    rows, row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    step = max(1, rows if chunk is None or not shape else chunk // max(row, 1))
    for start in range(0, max(rows, 1), step):
        t = torch.randn((min(step, rows - start), *shape[1:]) if shape else shape, generator=gen)
        t = t.mul_(scale)
        yield t.add_(shift) if shift else t


def random_tensors(model: PPLLaVAForConditionalGeneration, init_std: dict | str, seed: int, dtype: torch.dtype) -> tuple[list[TensorSpec], Iterator[tuple[str, Iterator[torch.Tensor]]]]:
    """Deterministic random weights for `model` (usually on the meta device), produced lazily tensor by tensor.

    Returns the specs (state-dict order, stored `dtype`) and a stream of (name, chunks). One generator seeded
    with `seed` is consumed in state-dict order; each tensor's chunks must be consumed before the next tensor
    is asked for. The extended CLIP position tables start equal (`convert_text_position`): the values drawn for
    `position_embedding_res` are replaced by a copy of `position_embedding`. Fixed-std presets draw each tensor
    with one call (their values are those of earlier releases of this tool); "fan_in" presets draw row chunks.
    """
    state = model.state_dict()
    specs = [TensorSpec(name, tuple(p.shape), dtype) for name, p in state.items()]
    chunk = FAN_IN_CHUNK if init_std == "fan_in" else None
    table = "multi_modal_projector.clip_text_model.embeddings.position_embedding"

    def chunks(name: str, shape: tuple[int, ...], gen: torch.Generator, kept: dict) -> Iterator[torch.Tensor]:
        if name.endswith("logit_scale"):
            yield torch.full(shape, math.log(100.0)).to(dtype)
            return
        drawn = _normal_chunks(shape, gen, *_init_rule(name, shape, init_std), chunk)
        if name == table + "_res":
            for _ in drawn:  # drawn so the generator advances as it always did, then replaced by the first table
                pass
            yield from kept.pop(table)
            return
        for c in drawn:
            c = c.to(dtype)
            if name == table:
                kept.setdefault(table, []).append(c)
            yield c

    def stream() -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
        gen = torch.Generator().manual_seed(seed)
        kept: dict[str, list[torch.Tensor]] = {}
        for spec in specs:
            yield spec.name, chunks(spec.name, spec.shape, gen, kept)

    return specs, stream()


def write_tokenizer_files(folder: Path) -> None:
    """tokenizer.model (a synthetic 32000-piece LLaMA-style BPE model) + the three JSON files of the release."""
    from ..tokenization import synthetic_llama_spm, write_spm_model

    write_spm_model(folder / "tokenizer.model", synthetic_llama_spm(vocab_size=32000, seed=0))
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": 32000, "<pad>": 32001}, indent=2) + "\n")
    special = {
        "bos_token": {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "eos_token": {"content": "</s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": {"content": "<pad>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "unk_token": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": True,
        "added_tokens_decoder": {"0": added("<unk>"), "1": added("<s>"), "2": added("</s>"), "32000": added("<image>"), "32001": added("<pad>")},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<pad>",
        "padding_side": "left",
        "processor_class": "LlavaNextProcessor",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_config_files(tmp: Path, preset: str, tokenizer: Path | None) -> dict:
    """config.json's dict and the `clip_weight` folder's config.json of a preset (before the shards: the model is built
    from them); a `--tokenizer` path is checked here, before any weight is generated."""
    if preset in QWEN_PRESETS:
        config, siglip = qwen_preset_config(preset)
        if tokenizer is not None and not tokenizer.is_file():
            raise ConfigError(f"--tokenizer {tokenizer}: no such file (expected Qwen2's tokenizer.json).")
        folder = tmp / config["clip_weight"]
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(siglip, indent=2) + "\n")
        return config
    if tokenizer is not None:
        raise ConfigError("--tokenizer takes Qwen2's tokenizer.json for the qwen presets; the Vicuna presets write a LLaMA tokenizer.model.")
    config, clip = preset_config(preset)
    if clip is not None:
        (tmp / "clip").mkdir()
        (tmp / "clip" / "config.json").write_text(json.dumps(clip, indent=2) + "\n")
    return config


def _write_tokenizers(tmp: Path, preset: str, config: dict, tokenizer: Path | None) -> None:
    """The LLM's tokenizer files and, for the qwen presets, SigLIP's `spiece.model` in the `clip_weight` folder."""
    if preset in QWEN_PRESETS:
        write_siglip_tokenizer(tmp / config["clip_weight"])
        write_qwen_tokenizer_files(tmp, tokenizer)
    else:
        write_tokenizer_files(tmp)


def make_random_checkpoint(preset: str, out: str | Path, seed: int = 0, force: bool = False, dtype: str = "bf16",
                           progress: ProgressFn | None = None, tokenizer: str | Path | None = None) -> Path:
    """Write a random-weight checkpoint folder for `preset` (atomically), streaming tensor by tensor
    (`make.make_checkpoint` is the entry point). `progress(bytes_done, bytes_total)` is called after each tensor.
    `tokenizer`: Qwen2's tokenizer.json to copy (qwen presets; default: a synthetic byte-level BPE)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    store = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    out = Path(out)
    with AtomicDir(out, force=force) as tmp:
        tokenizer = None if tokenizer is None else Path(tokenizer)
        config = _write_config_files(tmp, preset, tokenizer)
        config["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        cfg = config_from_dict(config, tmp)
        model = build_skeleton(cfg)
        specs, tensors = random_tensors(model, PRESETS[preset]["init_std"], seed, store)
        write_shards(tmp, specs, tensors, num_shards=3, progress=progress)
        t = cfg.text
        gen = {"_from_model_config": True, "bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": cfg.pad_token_id,
               "transformers_version": config["transformers_version"]}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        _write_tokenizers(tmp, preset, config, tokenizer)
        (tmp / "ppllava_edge.json").write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    return out
