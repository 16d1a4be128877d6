"""A checkpoint written by code other than ours (tensor names from the fact sheet's key list §8.2, single
safetensors shards written by hand, other small dims) must load with no missing/unexpected tensors and run."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from safetensors.numpy import save_file  # noqa: E402


def released_tensor_names(v_layers, depth, t_layers, l_layers):
    """Every tensor name of the released Vicuna checkpoint layout, written out from the spec, not from our modules."""
    names = {}
    vm = "vision_tower.vision_model."
    names[vm + "embeddings.class_embedding"] = ("vd",)
    names[vm + "embeddings.patch_embedding.weight"] = ("vd", 3, "ps", "ps")
    names[vm + "embeddings.position_embedding.weight"] = ("vpos", "vd")
    for ln in ("pre_layrnorm", "post_layernorm"):
        names[f"{vm}{ln}.weight"] = ("vd",)
        names[f"{vm}{ln}.bias"] = ("vd",)

    def attn(prefix, d):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            names[f"{prefix}self_attn.{p}.weight"] = (d, d)
            names[f"{prefix}self_attn.{p}.bias"] = (d,)

    def clip_layer(prefix, d, ff):
        attn(prefix, d)
        for ln in ("layer_norm1", "layer_norm2"):
            names[f"{prefix}{ln}.weight"] = (d,)
            names[f"{prefix}{ln}.bias"] = (d,)
        names[f"{prefix}mlp.fc1.weight"] = (ff, d)
        names[f"{prefix}mlp.fc1.bias"] = (ff,)
        names[f"{prefix}mlp.fc2.weight"] = (d, ff)
        names[f"{prefix}mlp.fc2.bias"] = (d,)

    for i in range(v_layers):
        clip_layer(f"{vm}encoder.layers.{i}.", "vd", "vff")
    for i in range(depth):
        clip_layer(f"{vm}btadapter_S_layers.{i}.", "vd", "vff")
        attn(f"{vm}btadapter_T_layers.{i}.", "vd")
        names[f"{vm}btadapter_T_layers.{i}.layer_norm1.weight"] = ("vd",)
        names[f"{vm}btadapter_T_layers.{i}.layer_norm1.bias"] = ("vd",)
        names[f"{vm}btadapter_T_layers.{i}.temporal_fc.weight"] = ("vd", "vd")
        names[f"{vm}btadapter_T_layers.{i}.temporal_fc.bias"] = ("vd",)
    names[vm + "btadapter_time_embed.weight"] = (64, "vd")
    names[vm + "btadapter_cls_token"] = (1, 1, "vd")

    mp = "multi_modal_projector."
    names[mp + "linear_1.weight"] = ("ld", "vd")
    names[mp + "linear_1.bias"] = ("ld",)
    names[mp + "linear_2.weight"] = ("ld", "ld")
    names[mp + "linear_2.bias"] = ("ld",)
    ct = mp + "clip_text_model."
    names[ct + "embeddings.token_embedding.weight"] = (49408, "td")
    names[ct + "embeddings.position_embedding"] = (248, "td")
    names[ct + "embeddings.position_embedding_res"] = (248, "td")
    for i in range(t_layers):
        clip_layer(f"{ct}encoder.layers.{i}.", "td", "tff")
    names[ct + "final_layer_norm.weight"] = ("td",)
    names[ct + "final_layer_norm.bias"] = ("td",)
    names[mp + "clip_text_projection.weight"] = ("pd", "td")
    names[mp + "clip_visual_projection.weight"] = ("pd", "vd")
    names[mp + "clip_visual_ln.weight"] = ("vd",)
    names[mp + "clip_visual_ln.bias"] = ("vd",)
    names[mp + "logit_scale"] = ()

    lm = "language_model."
    names[lm + "model.embed_tokens.weight"] = (32064, "ld")
    for i in range(l_layers):
        p = f"{lm}model.layers.{i}."
        for q in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"{p}self_attn.{q}.weight"] = ("ld", "ld")
        names[f"{p}mlp.gate_proj.weight"] = ("lff", "ld")
        names[f"{p}mlp.up_proj.weight"] = ("lff", "ld")
        names[f"{p}mlp.down_proj.weight"] = ("ld", "lff")
        names[f"{p}input_layernorm.weight"] = ("ld",)
        names[f"{p}post_attention_layernorm.weight"] = ("ld",)
    names[lm + "model.norm.weight"] = ("ld",)
    names[lm + "lm_head.weight"] = (32064, "ld")
    names["image_newline"] = ("ld",)
    return names


def test_foreign_checkpoint_loads_and_runs(tmp_path, tiny_ckpt):
    dims = {"vd": 40, "vff": 80, "ps": 14, "vpos": 1 + 9 * 9, "td": 24, "tff": 48, "pd": 16, "ld": 48, "lff": 96}
    names = released_tensor_names(v_layers=5, depth=4, t_layers=2, l_layers=2)
    rng = np.random.default_rng(5)
    tensors = {}
    for name, shape in names.items():
        shape = tuple(dims[s] if isinstance(s, str) else s for s in shape)
        if name.endswith("logit_scale"):
            arr = np.array(4.6052, dtype=np.float32)
        elif "norm" in name and name.endswith("weight") or "_ln.weight" in name:
            arr = np.ones(shape, np.float32)
        else:
            arr = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        tensors[name] = arr
    ck = tmp_path / "foreign"
    ck.mkdir()
    # two shards split alphabetically, written with safetensors' numpy API (not our writer)
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    weight_map = {}
    for file, ks in shards.items():
        save_file({k: tensors[k] for k in ks}, str(ck / file))
        weight_map.update({k: file for k in ks})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    clip = {"projection_dim": 16, "text_config": {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77, "vocab_size": 49408}, "vision_config": {"hidden_size": 40}}
    (ck / "local_clip").mkdir()
    (ck / "local_clip" / "config.json").write_text(json.dumps(clip))
    config = {
        "architectures": ["LlavaInterleaveForConditionalGeneration"], "model_type": "llava_next", "pooling": "ppllava",
        "pooling_kernel": [2, 3, 3], "pooling_stride": [2, 3, 3], "image_pooling_kernel": [1, 3, 3], "image_pooling_stride": [1, 3, 3],
        "frame_shape": [9, 9], "pooling_temp": 0.01, "extend_clip": True, "clip_weight": "local_clip", "btadapter": True, "btadapter_depth": 4,
        "max_T": 64, "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "image_token_index": 32000, "pad_token_id": 0,
        "projector_hidden_act": "gelu", "use_image_newline_parameter": True,
        "vision_config": {"hidden_size": 40, "image_size": 126, "intermediate_size": 80, "num_hidden_layers": 5, "num_attention_heads": 4, "patch_size": 14},
        "text_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
    }
    (ck / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (ck / f).write_bytes((tiny_ckpt / f).read_bytes())

    from ppllava_edge.model.generate import ReferenceModel

    ref = ReferenceModel(ck)
    state = ref.model.state_dict()
    assert set(state) == set(tensors)
    for k, v in tensors.items():
        assert np.array_equal(state[k].numpy(), v), k
    px = np.random.default_rng(0).standard_normal((4, 3, 126, 126)).astype(np.float32)
    ans = ref.answer_pixels(px, "what is shown?", image=False, max_new_tokens=4)
    assert ans.arrays["visual_tokens"].shape == (2 * 9, 48)  # T/2 * (9/3)^2
    assert ans.arrays["relevance"].shape == (4, 9, 9)
    assert 1 <= len(ans.output_ids) <= 4
