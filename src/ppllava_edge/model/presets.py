"""Random-weight checkpoints in exactly the released layout (`ppllava-edge make-checkpoint`).

The config.json keys, tensor names, shards + index and tokenizer files are those of
`farewellthree/ppllava_weight/ppllava_vicuna7b_image_video_dpo`; only the dims are small. The CLIP text
model's hyper-parameters are not in config.json, so presets point `clip_weight` at a local `clip/` folder
holding its config.json (what a user does to run a real checkpoint offline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..anyres import default_pinpoints
from ..atomic import AtomicDir
from ..config import config_from_dict
from ..errors import ConfigError
from .checkpoint import save_shards
from .ppllava import PPLLaVAForConditionalGeneration

RELEASED_TOP_LEVEL = {
    "architectures": ["LlavaInterleaveForConditionalGeneration"],
    "model_type": "llava_next",
    "pooling": "ppllava",
    "pooling_kernel": [2, 3, 3],
    "pooling_stride": [2, 3, 3],
    "image_pooling_kernel": [1, 3, 3],
    "image_pooling_stride": [1, 3, 3],
    "pllava_pooling_shape": None,
    "pooling_temp": 0.01,
    "extend_clip": True,
    "clip_post_pretrain": None,
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
}


def preset_config(name: str) -> tuple[dict, dict]:
    """(config.json dict, clip/config.json dict) for a preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    p = PRESETS[name]
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


def random_state_dict(model: PPLLaVAForConditionalGeneration, init_std: dict, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights: LayerNorm/RMSNorm gains ~1, biases small, matrices N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        std = init_std["llm"] if name.startswith("language_model.") else init_std["vision"]
        if name.endswith("logit_scale"):
            t = torch.tensor(math.log(100.0))
        elif "norm" in name or "_ln." in name:
            t = (1.0 + 0.05 * torch.randn(p.shape, generator=gen)) if name.endswith("weight") else 0.02 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(p.shape, generator=gen)
        else:
            t = std * torch.randn(p.shape, generator=gen)
        state[name] = t.to(torch.float32)
    # the two extended CLIP position tables start equal (convert_text_position), rows >= 20 may differ later
    emb = "multi_modal_projector.clip_text_model.embeddings."
    state[emb + "position_embedding_res"] = state[emb + "position_embedding"].clone()
    return state


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


def make_checkpoint(preset: str, out: str | Path, seed: int = 0, force: bool = False, dtype: str = "bf16") -> Path:
    """Write a random-weight checkpoint folder for `preset` (atomically). Returns the folder."""
    config, clip = preset_config(preset)
    store = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    config["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    out = Path(out)
    with AtomicDir(out, force=force) as tmp:
        (tmp / "clip").mkdir()
        (tmp / "clip" / "config.json").write_text(json.dumps(clip, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        cfg = config_from_dict(config, tmp)
        with torch.device("meta"):
            model = PPLLaVAForConditionalGeneration(cfg)
        state = random_state_dict(model, PRESETS[preset]["init_std"], seed)
        save_shards({k: v.to(store) for k, v in state.items()}, tmp, num_shards=3)
        gen = {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.40.0"}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        write_tokenizer_files(tmp)
        (tmp / "ppllava_edge.json").write_text(json.dumps({"preset": preset, "seed": seed}) + "\n")
    return out
