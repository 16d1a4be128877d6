"""The Qwen2 + SigLIP presets of `make-checkpoint` (`qwen-tiny`, `qwen-small`, `qwen-7b`): config.json as the authors'
`LlavaOnevisionVidConfig` writes it (llava-onevision-qwen2-7b-si-hf's config plus the PPLLaVA keys `from_config`
sets), the SigLIP model folder named by `clip_weight` (its config.json and `spiece.model`), and Qwen2's tokenizer
files. Weights and shards are written by `presets.make_random_checkpoint`, as for the Vicuna presets (the folder's
config.json before the shards, the tokenizers after).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import GOOGLE_SIGLIP_SO400M_384, onevision_pinpoints
from ..errors import ConfigError
from .release_keys import PPLLAVA_POOLING_KEYS

SIGLIP_HUB_ID = "google/siglip-so400m-patch14-384"
QWEN_RELEASED_TOP_LEVEL = {
    "architectures": ["LlavaInterleaveForConditionalGeneration"],
    "model_type": "llava_onevision",
    "qwen": True,
    **PPLLAVA_POOLING_KEYS,
    "btadapter": False,
    "btadapter_depth": 4,
    "max_T": 64,
    "valuew_plus": False,
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "image_token_index": 151646,
    "video_token_index": 151647,
    "pad_token_id": 151643,
    "ignore_index": -100,
    "projector_hidden_act": "gelu",
    "use_image_newline_parameter": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.2",
}
# llava-onevision-qwen2-7b-si-hf's text_config (Qwen2-7B-Instruct: GQA 28/4 heads, rope theta 1e6, padded vocabulary)
QWEN_RELEASED_TEXT_CONFIG = {
    "_name_or_path": "Qwen/Qwen2-7B-Instruct",
    "architectures": ["Qwen2ForCausalLM"],
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_sliding_window": False,
    "vocab_size": 152064,
}
# its vision_config: the SigLIP so400m tower cut to 26 layers, no MAP head
QWEN_RELEASED_VISION_CONFIG = {
    "hidden_size": 1152,
    "image_size": 384,
    "intermediate_size": 4304,
    "model_type": "siglip_vision_model",
    "num_attention_heads": 16,
    "num_hidden_layers": 26,
    "patch_size": 14,
    "vision_use_head": False,
}

QWEN_PRESETS: dict[str, dict] = {
    # a few tens of MB (most of it the 152064-row embedding and head): 84 px -> 6x6 grid, 2 frames -> 4 tokens;
    # SigLIP text width = vision width (the relevance compares the text head's output with the patch value head's)
    "qwen-tiny": {
        "vision": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 84, "patch_size": 14},
        "siglip_text": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4},
        "llm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        "init_std": {"vision": 0.05, "llm": 0.08},
    },
    # CPU benchmarks: the released 384 px / 27x27 grid (32 frames -> 16*81 = 1296 tokens), small widths, GQA 12/2
    "qwen-small": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 26, "num_attention_heads": 4, "image_size": 384, "patch_size": 14},
        "siglip_text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 12, "num_attention_heads": 4},
        "llm": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 2},
        "init_std": {"vision": 0.03, "llm": 0.04},
    },
    # the released ppllava_qwen7b_llavahound300k dims: Qwen2-7B + SigLIP so400m (26-layer tower, 27-layer text tower)
    "qwen-7b": {"released": True, "init_std": "fan_in"},
}


def qwen_preset_config(name: str) -> tuple[dict, dict]:
    """(config.json dict, the SigLIP folder's config.json dict) of a qwen preset. qwen-7b names the hub id as the
    release does; the small presets name a local `siglip/` folder (the SigLIP dims are not in config.json)."""
    if name not in QWEN_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(QWEN_PRESETS)}")
    p = QWEN_PRESETS[name]
    config = dict(QWEN_RELEASED_TOP_LEVEL)
    config["text_config"] = dict(QWEN_RELEASED_TEXT_CONFIG)
    if p.get("released"):
        config.update(clip_weight=SIGLIP_HUB_ID, frame_shape=[27, 27], vision_config=dict(QWEN_RELEASED_VISION_CONFIG))
        config["image_grid_pinpoints"] = [list(x) for x in onevision_pinpoints(384)]
        return config, GOOGLE_SIGLIP_SO400M_384
    v, c, t = p["vision"], p["siglip_text"], p["llm"]
    config.update(clip_weight="siglip", frame_shape=[v["image_size"] // v["patch_size"]] * 2)
    config["image_grid_pinpoints"] = [list(x) for x in onevision_pinpoints(v["image_size"])]
    config["vision_config"] = {"model_type": "siglip_vision_model", **v, "vision_use_head": False}
    config["text_config"].update(t, max_window_layers=t["num_hidden_layers"])
    siglip = {
        "model_type": "siglip",
        "text_config": {"model_type": "siglip_text_model", **c},
        "vision_config": {"model_type": "siglip_vision_model", **v, "num_hidden_layers": v["num_hidden_layers"] + 1},
    }
    return config, siglip


def write_qwen_tokenizer_files(folder: Path, tokenizer_json: Path | None = None) -> None:
    """Qwen2's tokenizer.json (a copy of `tokenizer_json`, else the synthetic byte-level BPE), tokenizer_config.json and
    added_tokens.json as llava-onevision-qwen2 has them (EOS `<|im_end|>`, pad `<|endoftext|>`, no BOS)."""
    from ..tokenization import synthetic_qwen2_tokenizer_json
    from ..tokenization.synthetic import QWEN2_FIRST_SPECIAL, QWEN2_SPECIALS

    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_text(json.dumps(synthetic_qwen2_tokenizer_json(), ensure_ascii=False) + "\n", encoding="utf-8")
    ids = {t: QWEN2_FIRST_SPECIAL + i for i, t in enumerate(QWEN2_SPECIALS)}
    (folder / "added_tokens.json").write_text(json.dumps(ids, indent=2) + "\n")
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, **flags} for t, i in ids.items()},
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "processor_class": "LlavaOnevisionProcessor",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_siglip_tokenizer(folder: Path) -> None:
    """SigLIP's sentencepiece `spiece.model` in the `clip_weight` folder: the synthetic SigLIP-like unigram vocabulary
    (a real checkpoint's folder holds SigLIP's own)."""
    from ..tokenization import SIGLIP_MODEL_NAME, synthetic_siglip_spm, write_spm_model

    write_spm_model(folder / SIGLIP_MODEL_NAME, synthetic_siglip_spm())
