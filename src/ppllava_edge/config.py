"""Model configuration read from a released checkpoint's config.json (no torch).

The released PPLLaVA checkpoints come in two families (`PPLLaVAConfig.family`, derived from `model_type` here and
nowhere else):

- "vicuna-clip" (`model_type` llava_next): a LLaVA-NeXT style config.json with a BT-Adapter CLIP tower, a LLaMA
  (Vicuna) LLM and the OpenAI CLIP text tower for the relevance;
- "qwen-siglip" (`model_type` llava_onevision, the authors' `LlavaOnevisionVidConfig`): a SigLIP vision tower
  (no CLS, `vision_feature_layer` -1 / strategy "full"), a Qwen2 LLM and SigLIP's text tower for the relevance.

Both store top-level PPLLaVA keys (`pooling`, `pooling_kernel`, `extend_clip`, `clip_weight`, `btadapter`, ...), a
`vision_config` and a `text_config` that record only the values that differ from the HF class defaults. Missing
values are filled with the defaults of transformers' `CLIPVisionConfig` / `LlamaConfig` (vicuna-clip) or
`SiglipVisionConfig` / `Qwen2Config` (qwen-siglip), exactly as `from_pretrained` does, so a real checkpoint gets the
real dims.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .conversation import PLAIN_QWEN, ConversationTemplate
from .errors import ConfigError
from .jsonfile import read_json
from .media.anyres import LLAVA_NEXT_PINPOINTS, ImageLayout, check_pinpoints, default_pinpoints, image_layout, max_image_tokens, max_tiles, single_tile_layout
from .media.spec import SPECS, PreprocessSpec

# Known config of the separate CLIP model named by `clip_weight` in the released checkpoints
# (openai/clip-vit-large-patch14-336), kept here so no hub access is needed.
OPENAI_CLIP_L14_336 = {
    "text_config": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "eos_token_id": 2,
        "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
}
# The SigLIP model named by `clip_weight` in the Qwen release (google/siglip-so400m-patch14-384), as its config.json
# records it (keys that differ from SiglipTextConfig / SiglipVisionConfig defaults): text tower 27 x 1152, MLP 4304,
# 16 heads, 64 positions, vocab 32000 (SiglipTextConfig defaults); vision tower 27 x 1152 at 384 px, patch 14.
GOOGLE_SIGLIP_SO400M_384 = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model", "num_attention_heads": 16, "num_hidden_layers": 27},
    "vision_config": {
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    },
}
KNOWN_CLIP_CONFIGS = {"openai/clip-vit-large-patch14-336": OPENAI_CLIP_L14_336, "google/siglip-so400m-patch14-384": GOOGLE_SIGLIP_SO400M_384}

VICUNA_CLIP = "vicuna-clip"
QWEN_SIGLIP = "qwen-siglip"
FAMILIES = {"llava_next": VICUNA_CLIP, "llava_onevision": QWEN_SIGLIP}  # config.json model_type -> family

# Defaults of transformers' config classes for the keys a LLaVA-NeXT config.json may omit.
_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}
_LLAMA_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
}

# transformers' SiglipVisionConfig / SiglipTextConfig defaults (4.45.2 and 5.24 agree)
_SIGLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "num_channels": 3,
}
_SIGLIP_TEXT_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 64,
    "vocab_size": 32000,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "pad_token_id": 1,
    "eos_token_id": 49407,
    "projection_size": None,  # the text `head` width; None: hidden_size
}
# transformers 4.45.2's Qwen2Config defaults (Qwen2Config takes no bos/eos: PretrainedConfig's None)
_QWEN2_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,  # Qwen2 has no such key: its q/k/v always have biases, o_proj never (`qkv_bias`)
    "mlp_bias": False,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "use_sliding_window": False,
}
# LlavaOnevisionConfig defaults the Qwen release relies on when a key is absent
_ONEVISION_DEFAULTS = {"image_token_index": 151646, "pad_token_id": 151643}

CLIP_KEEP_LEN = 20  # positions < 20 use `position_embedding`, >= 20 `position_embedding_res` (§5)
EXTENDED_CLIP_LEN = 248  # 4 * 77 - 3 * 20


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    btadapter_depth: int
    max_t: int
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ClipTextConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int  # of the original table (77); the extended table has `context_length` rows
    vocab_size: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    projection_dim: int
    clip_vision_hidden_size: int  # width of `clip_visual_ln` / input of `clip_visual_projection`
    context_length: int  # 248 with extend_clip, else max_position_embeddings


@dataclass(frozen=True)
class LlamaTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_id: int
    pad_token_id: int | None
    extra: dict = field(default_factory=dict)  # other keys, passed through to LlamaConfig
    model_type: str = "llama"  # "llama" (Vicuna) or "qwen2"

    @property
    def head_dim(self) -> int:
        return self.extra.get("head_dim") or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """q/k/v projections carry biases: always in Qwen2, with `attention_bias` in LLaMA (which also biases o_proj)."""
        return self.model_type == "qwen2" or self.attention_bias


@dataclass(frozen=True)
class PPLLaVAConfig:
    vision: VisionConfig
    clip_text: ClipTextConfig
    text: LlamaTextConfig
    pooling_kernel: tuple[int, int, int]
    pooling_stride: tuple[int, int, int]
    image_pooling_kernel: tuple[int, int, int]
    image_pooling_stride: tuple[int, int, int]
    frame_shape: tuple[int, int]
    pooling_temp: float
    extend_clip: bool
    clip_weight: str
    vision_feature_layer: int
    image_token_index: int
    pad_token_id: int
    projector_hidden_act: str
    use_image_newline_parameter: bool
    torch_dtype: str
    image_grid_pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS  # (H, W) pairs, whole tiles
    # the LLM's conversation template (config.json `conversation_template`; released checkpoints: the authors'
    # plain_v1 for vicuna-clip, plain_qwen for qwen-siglip)
    conversation: ConversationTemplate = field(default_factory=lambda: ConversationTemplate.from_dict(None))
    family: str = VICUNA_CLIP  # VICUNA_CLIP or QWEN_SIGLIP (from model_type, `FAMILIES`)
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def has_cls(self) -> bool:
        """The tower's features carry a CLS token to drop (CLIP, strategy "default"); SigLIP has none ("full")."""
        return self.family == VICUNA_CLIP

    @property
    def max_frames(self) -> int:
        return self.vision.max_t

    @property
    def preprocess(self) -> PreprocessSpec:
        """How this family's processor makes pixel values from frames and images (media/spec.py)."""
        return SPECS[self.family]

    def visual_tokens(self, num_frames: int) -> int:
        """Number of pooled visual tokens for a video of `num_frames` frames (no newline)."""
        kt, kh, kw = self.pooling_kernel
        st, sh, sw = self.pooling_stride
        h, w = self.frame_shape
        t_out = (num_frames - kt) // st + 1 if num_frames >= kt else 0
        return t_out * ((h - kh) // sh + 1) * ((w - kw) // sw + 1)

    @property
    def image_pooled_grid(self) -> int:
        """g: pooled tokens per side of one image tile (the (1,3,3) kernel on the patch grid)."""
        kt, kh, kw = self.image_pooling_kernel
        h, w = self.frame_shape
        if (h - kh) // kh != (w - kw) // kw:
            raise ConfigError(f"image pooling gives a non-square {(h - kh) // kh + 1}x{(w - kw) // kw + 1} grid per tile; anyres assembly needs a square one")
        return (h - kh) // kh + 1

    def image_layout(self, image_size: tuple[int, int] | None) -> ImageLayout:
        """Token layout of an image of (H, W) pixels (anyres tiles); None: one tile without crops."""
        args = (self.vision.image_size, self.image_pooled_grid, self.use_image_newline_parameter)
        if image_size is None:
            return single_tile_layout(*args)
        return image_layout(image_size, self.image_grid_pinpoints, *args)

    def image_max_tokens(self) -> int:
        """Most visual tokens one image can give (any pinpoint, before unpadding)."""
        return max_image_tokens(self.image_grid_pinpoints, self.vision.image_size, self.image_pooled_grid, self.use_image_newline_parameter)

    def image_max_tiles(self) -> int:
        return max_tiles(self.image_grid_pinpoints, self.vision.image_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"config.json: '{name}' must be a list of 3 ints, got {value!r}")
    return tuple(int(v) for v in value)  # type: ignore[return-value]


def _filled(section: dict, defaults: dict) -> dict:
    out = dict(defaults)
    out.update({k: v for k, v in section.items() if v is not None or k not in defaults})
    return out


def _clip_candidates(clip_weight: str, checkpoint_dir: Path | None) -> list[Path]:
    """Where a `clip_weight` folder may be: relative to the checkpoint folder, then as given."""
    return ([Path(checkpoint_dir) / clip_weight] if checkpoint_dir is not None else []) + [Path(clip_weight)]


def clip_weight_folder(clip_weight: str, checkpoint_dir: Path | None) -> Path:
    """The local `clip_weight` folder (SigLIP's holds its tokenizer, `spiece.model`).

    Raises:
        ConfigError: no such folder (a hub id needs a local copy: the package keeps configs, not tokenizers).
    """
    candidates = _clip_candidates(clip_weight, checkpoint_dir)
    for folder in candidates:
        if folder.is_dir():
            return folder
    raise ConfigError(
        f"clip_weight {clip_weight!r}: no such folder (looked in: {', '.join(str(c) for c in candidates)}).\n"
        "Hint: put a local copy of that model's folder (config.json and its tokenizer, e.g. SigLIP's spiece.model) in the "
        "checkpoint folder under that name."
    )


def resolve_clip_config(clip_weight: str, checkpoint_dir: Path | None) -> dict:
    """Hyper-parameters of the separate CLIP model named by `clip_weight`.

    A known hub id uses the copy kept in this package; a folder (relative to the checkpoint folder
    or absolute) is read from its config.json, which is how users point at a local copy offline.
    """
    candidates = _clip_candidates(clip_weight, checkpoint_dir)
    for folder in candidates:
        cfg = folder / "config.json"
        if folder.is_dir() and cfg.is_file():
            return read_json(cfg, "missing")
    if clip_weight in KNOWN_CLIP_CONFIGS:
        return KNOWN_CLIP_CONFIGS[clip_weight]
    raise ConfigError(
        f"clip_weight {clip_weight!r} is neither a known CLIP model "
        f"({', '.join(KNOWN_CLIP_CONFIGS)}) nor a folder with a config.json "
        f"(looked in: {', '.join(str(c) for c in candidates)}).\n"
        "Hint: point clip_weight at a local copy of the CLIP model's folder (config.json is enough)."
    )


def _check_pooling(raw: dict) -> None:
    """The released prompt-guided pooling keys (both families).

    Raises:
        ConfigError: legacy keys (`long_clip`, pooling `clipST_3d`), another pooling, `pllava_pooling_shape`.
    """
    if "long_clip" in raw:
        raise ConfigError(
            "config.json uses the legacy key 'long_clip' (first upload of the PPLLaVA weights).\n"
            "Hint: rename 'long_clip' to 'extend_clip' in config.json, as the current release does."
        )
    pooling = raw.get("pooling", "avp")
    if pooling == "clipST_3d":
        raise ConfigError(
            "config.json has the legacy value \"pooling\": \"clipST_3d\".\n"
            "Hint: rename it to \"pooling\": \"ppllava\", as the current release does."
        )
    if pooling != "ppllava":
        raise ConfigError(
            f"config.json: pooling={pooling!r} is not supported; ppllava-edge runs the prompt-guided "
            "pooling model (\"pooling\": \"ppllava\")."
        )
    if raw.get("pllava_pooling_shape") is not None:
        raise ConfigError("config.json: pllava_pooling_shape is set; only kernel/stride pooling (the released setting) is supported.")


def checkpoint_family(raw: dict) -> str:
    """VICUNA_CLIP or QWEN_SIGLIP from config.json's `model_type` (the one place the family is decided).

    Raises:
        ConfigError: a model_type of neither release, or a combination of keys we cannot run.
    """
    model_type = raw.get("model_type", "llava_next")
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported (expected 'llava_next', the Vicuna/CLIP release, "
            "or 'llava_onevision', the Qwen2/SigLIP release)."
        )
    btadapter = bool(raw.get("btadapter", False))
    if family == VICUNA_CLIP and not btadapter:
        raise ConfigError(
            "config.json: btadapter is false with model_type 'llava_next'; of the Vicuna/CLIP family only the BT-Adapter "
            "vision tower of the released Vicuna checkpoints is supported."
        )
    if family == QWEN_SIGLIP and btadapter:
        raise ConfigError("config.json: btadapter is true with model_type 'llava_onevision'; the Qwen2/SigLIP release has a plain SigLIP tower (btadapter false).")
    if family == QWEN_SIGLIP and raw.get("valuew_plus", False):
        raise ConfigError("config.json: valuew_plus is true; only the released value false (relevance without the MAP head's probe attention) is supported.")
    return family


def _feature_layer(raw: dict, family: str) -> int:
    """The released feature selection: hidden_states[-2] without CLS (CLIP) or hidden_states[-1], all tokens (SigLIP)."""
    layer, strategy = (-2, "default") if family == VICUNA_CLIP else (-1, "full")
    got = int(raw.get("vision_feature_layer", layer))
    if got != layer:
        raise ConfigError(f"config.json: vision_feature_layer={got}; only {layer} (the released value of this family) is supported.")
    if raw.get("vision_feature_select_strategy", strategy) != strategy:
        raise ConfigError(f"config.json: vision_feature_select_strategy must be {strategy!r} (the released value of this family).")
    return layer


def _vision_config(raw: dict, family: str) -> VisionConfig:
    vraw = _filled(raw.get("vision_config", {}), _CLIP_VISION_DEFAULTS if family == VICUNA_CLIP else _SIGLIP_VISION_DEFAULTS)
    depth = int(raw.get("btadapter_depth", vraw.get("depth", 4))) if family == VICUNA_CLIP else 0
    vision = VisionConfig(
        hidden_size=int(vraw["hidden_size"]),
        intermediate_size=int(vraw["intermediate_size"]),
        num_hidden_layers=int(vraw["num_hidden_layers"]),
        num_attention_heads=int(vraw["num_attention_heads"]),
        image_size=int(vraw["image_size"]),
        patch_size=int(vraw["patch_size"]),
        hidden_act=str(vraw["hidden_act"]),
        layer_norm_eps=float(vraw["layer_norm_eps"]),
        btadapter_depth=depth,
        max_t=int(raw.get("max_T", vraw.get("max_T", 64))),
        num_channels=int(vraw.get("num_channels", 3)),
    )
    if family == VICUNA_CLIP and (depth < 1 or depth > vision.num_hidden_layers):
        raise ConfigError(f"config.json: btadapter_depth={depth} must be in 1..{vision.num_hidden_layers}")
    return vision


def _text_config(raw: dict, family: str) -> LlamaTextConfig:
    """The LLM's config: LlamaConfig defaults (vicuna-clip) or Qwen2Config defaults (qwen-siglip)."""
    defaults, model_type = (_LLAMA_DEFAULTS, "llama") if family == VICUNA_CLIP else (_QWEN2_DEFAULTS, "qwen2")
    traw = _filled(raw.get("text_config", {}), defaults)
    check_rope(traw, "config.json: text_config")
    if traw.get("num_key_value_heads") is None:
        traw["num_key_value_heads"] = traw["num_attention_heads"]
    if traw.get("use_sliding_window"):
        raise ConfigError("config.json: text_config.use_sliding_window is true; only full attention (the released Qwen2 setting) is supported.")
    if traw.get("eos_token_id") is None:
        raise ConfigError("config.json: text_config has no eos_token_id; generation needs it to stop.")
    known = set(defaults)
    extra = {k: v for k, v in traw.items() if k not in known and k not in {"architectures", "_name_or_path", "model_type", "torch_dtype"}}
    return LlamaTextConfig(
        vocab_size=int(traw["vocab_size"]),
        hidden_size=int(traw["hidden_size"]),
        intermediate_size=int(traw["intermediate_size"]),
        num_hidden_layers=int(traw["num_hidden_layers"]),
        num_attention_heads=int(traw["num_attention_heads"]),
        num_key_value_heads=int(traw["num_key_value_heads"]),
        hidden_act=str(traw["hidden_act"]),
        max_position_embeddings=int(traw["max_position_embeddings"]),
        rms_norm_eps=float(traw["rms_norm_eps"]),
        rope_theta=float(traw.get("rope_theta", 10000.0)),
        tie_word_embeddings=bool(traw["tie_word_embeddings"]),
        attention_bias=bool(traw["attention_bias"]),
        mlp_bias=bool(traw["mlp_bias"]),
        bos_token_id=None if traw["bos_token_id"] is None else int(traw["bos_token_id"]),
        eos_token_id=int(traw["eos_token_id"]),
        pad_token_id=traw["pad_token_id"],
        extra=extra,
        model_type=model_type,
    )


def _relevance_text_config(raw: dict, family: str, extend_clip: bool, clip_weight: str, checkpoint_dir: Path | None) -> ClipTextConfig:
    """The text tower of the model named by `clip_weight` (CLIP or SigLIP), with the extended context length."""
    craw = resolve_clip_config(clip_weight, checkpoint_dir)
    if family == VICUNA_CLIP:
        ct = _filled(craw.get("text_config", {}), OPENAI_CLIP_L14_336["text_config"])
        cv = _filled(craw.get("vision_config", {}), OPENAI_CLIP_L14_336["vision_config"])
        projection = int(craw.get("projection_dim", ct.get("projection_dim", 768)))
        eos = int(ct.get("eos_token_id", 2))
    else:
        ct = _filled(craw.get("text_config", {}), _SIGLIP_TEXT_DEFAULTS)
        cv = _filled(craw.get("vision_config", {}), _SIGLIP_VISION_DEFAULTS)
        projection = int(ct["projection_size"] or ct["hidden_size"])  # the text `head`: Linear(hidden, projection_size)
        eos = int(ct["eos_token_id"])
    n_pos = int(ct["max_position_embeddings"])
    return ClipTextConfig(
        hidden_size=int(ct["hidden_size"]),
        intermediate_size=int(ct["intermediate_size"]),
        num_hidden_layers=int(ct["num_hidden_layers"]),
        num_attention_heads=int(ct["num_attention_heads"]),
        max_position_embeddings=n_pos,
        vocab_size=int(ct["vocab_size"]),
        hidden_act=str(ct["hidden_act"]),
        layer_norm_eps=float(ct["layer_norm_eps"]),
        eos_token_id=eos,
        projection_dim=projection,
        clip_vision_hidden_size=int(cv["hidden_size"]),
        context_length=4 * n_pos - 3 * CLIP_KEEP_LEN if extend_clip else n_pos,
    )


def onevision_pinpoints(tile: int) -> tuple[tuple[int, int], ...]:
    """LlavaOnevisionConfig's default `image_grid_pinpoints`: every (i, j) grid of 1..6 x 1..6 tiles."""
    return tuple((i * tile, j * tile) for i in range(1, 7) for j in range(1, 7))


def config_from_dict(raw: dict, checkpoint_dir: Path | None = None) -> PPLLaVAConfig:
    """Build a PPLLaVAConfig from a released config.json dict (either family, see the module doc).

    Raises:
        ConfigError: legacy keys (`long_clip`, pooling `clipST_3d`), unsupported pooling or family, bad values.
    """
    _check_pooling(raw)
    family = checkpoint_family(raw)
    top = dict(_ONEVISION_DEFAULTS) if family == QWEN_SIGLIP else {}
    top.update({k: v for k, v in raw.items() if v is not None})
    vision = _vision_config(raw, family)
    layer = _feature_layer(raw, family)
    text = _text_config(raw, family)

    extend_clip = bool(raw.get("extend_clip", False))
    clip_weight = raw.get("clip_weight")
    if not clip_weight:
        raise ConfigError("config.json: 'clip_weight' is missing; it names the CLIP model whose text encoder the projector holds.")
    clip_text = _relevance_text_config(raw, family, extend_clip, str(clip_weight), checkpoint_dir)

    kernel = _triple(raw.get("pooling_kernel"), "pooling_kernel")
    stride = _triple(raw.get("pooling_stride", kernel), "pooling_stride")
    ikernel = _triple(raw.get("image_pooling_kernel") or kernel, "image_pooling_kernel")
    istride = _triple(raw.get("image_pooling_stride") or ikernel, "image_pooling_stride")
    frame_shape = tuple(int(v) for v in raw.get("frame_shape", (vision.grid, vision.grid)))
    if frame_shape != (vision.grid, vision.grid):
        raise ConfigError(
            f"config.json: frame_shape {list(frame_shape)} does not match the vision patch grid "
            f"{vision.grid}x{vision.grid} (image_size {vision.image_size} / patch_size {vision.patch_size})."
        )
    for name, k, s in (("pooling", kernel, stride), ("image_pooling", ikernel, istride)):
        if k != s:
            raise ConfigError(f"config.json: {name}_kernel {list(k)} != {name}_stride {list(s)}; only kernel == stride is supported.")
        if frame_shape[0] % k[1] or frame_shape[1] % k[2]:
            raise ConfigError(f"config.json: patch grid {list(frame_shape)} is not divisible by {name}_kernel {list(k)}.")
    if vision.hidden_size != clip_text.clip_vision_hidden_size:
        raise ConfigError(
            f"CLIP model config: vision hidden_size {clip_text.clip_vision_hidden_size} != the tower's "
            f"{vision.hidden_size}; clip_visual_ln is applied to the tower's features."
        )
    if family == QWEN_SIGLIP and clip_text.projection_dim != vision.hidden_size:
        raise ConfigError(
            f"SigLIP model config: the text head's width {clip_text.projection_dim} != the tower's hidden_size "
            f"{vision.hidden_size}; the relevance compares the text head's output with the patch value head's."
        )
    default_points = default_pinpoints(vision.image_size) if family == VICUNA_CLIP else onevision_pinpoints(vision.image_size)
    template = raw.get("conversation_template") or (PLAIN_QWEN.to_dict() if family == QWEN_SIGLIP else None)

    return PPLLaVAConfig(
        vision=vision,
        clip_text=clip_text,
        text=text,
        pooling_kernel=kernel,
        pooling_stride=stride,
        image_pooling_kernel=ikernel,
        image_pooling_stride=istride,
        frame_shape=frame_shape,  # type: ignore[arg-type]
        pooling_temp=float(raw.get("pooling_temp", 0.01)),
        extend_clip=extend_clip,
        clip_weight=str(clip_weight),
        vision_feature_layer=layer,
        image_token_index=int(top.get("image_token_index", 32000)),
        pad_token_id=int(top.get("pad_token_id", 0) or 0),
        projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
        use_image_newline_parameter=bool(raw.get("use_image_newline_parameter", True)),
        torch_dtype=str(raw.get("torch_dtype", "float32")),
        image_grid_pinpoints=check_pinpoints(raw.get("image_grid_pinpoints") or default_points, vision.image_size, "config.json: image_grid_pinpoints"),
        conversation=ConversationTemplate.from_dict(template),
        family=family,
        raw=raw,
    )


STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
"""RoPE variants whose cos/sin depend on the position alone: the exported decoder holds them as fixed tables.
`dynamic` (NTK) and `longrope` change the tables with the sequence length at run time, which a table cannot do."""


def check_rope(text_config: dict, where: str) -> None:
    """Refuse a `rope_scaling` / `rope_parameters` whose type is not static (see STATIC_ROPE_TYPES).

    Raises:
        ConfigError: a dynamic or unknown rope type (the export would carry wrong cos/sin tables).
    """
    for key in ("rope_scaling", "rope_parameters"):
        rope = text_config.get(key)
        if not rope:
            continue
        kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
        if kind not in STATIC_ROPE_TYPES:
            raise ConfigError(
                f"{where}.{key} has rope type {kind!r}: only {', '.join(STATIC_ROPE_TYPES)} are supported. The exported "
                "decoder holds fixed cos/sin tables, and a dynamic type (dynamic NTK, longrope) recomputes them from the "
                "sequence length at run time.\nHint: use the checkpoint without rope_scaling, or with a static type "
                "(e.g. linear with the same factor), knowing its answers then differ from the dynamic model's."
            )


def load_config(checkpoint_dir: str | Path) -> PPLLaVAConfig:
    """Read `<checkpoint_dir>/config.json`."""
    folder = Path(checkpoint_dir)
    path = folder / "config.json"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: not a checkpoint folder (no such directory).")
    raw = read_json(path, "missing. A PPLLaVA checkpoint folder holds config.json, model.safetensors.index.json and the shards.")
    return config_from_dict(raw, folder)
