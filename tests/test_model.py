"""The PyTorch reference model against independent implementations (einops port, transformers CLIP, loops)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("einops")

from ppllava_edge.errors import CheckpointError, ConfigError, InputError  # noqa: E402
from ppllava_edge.model.pooling import pool_windows, relevance  # noqa: E402

from .reference import PortTower, hf_text_model, pool_authors_order, pool_loop  # noqa: E402


def _pixels(model, T, seed=0):
    s = model.cfg.vision.image_size
    return torch.randn(T, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _clip_ids(n_words=5, length=248):
    ids = torch.full((1, length), 49407)
    ids[0, 0] = 49406
    ids[0, 1 : 1 + n_words] = torch.arange(400, 400 + n_words)
    return ids


@torch.no_grad()
@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_vision_tower_matches_independent_port(tiny_model, T):
    px = _pixels(tiny_model, T)
    port = PortTower(tiny_model).eval()
    states = port(px[None])
    ours = tiny_model.encode_video(px)
    assert ours.shape == (T, tiny_model.cfg.vision.num_patches, tiny_model.cfg.vision.hidden_size)
    torch.testing.assert_close(ours, states[-2][:, 1:], atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_dead_layer_skip_gives_identical_features(tiny_model):
    px = _pixels(tiny_model, 6, seed=3)
    full = tiny_model.vision_tower.vision_model.hidden_states(px)
    assert len(full) == tiny_model.cfg.vision.num_hidden_layers + 1
    assert torch.equal(full[-2][:, 1:], tiny_model.encode_video(px))


@torch.no_grad()
def test_text_encoder_matches_transformers_clip(tiny_model):
    hf = hf_text_model(tiny_model)
    ids = _clip_ids(30)
    ours = tiny_model.multi_modal_projector.clip_text_model(ids)
    theirs = hf(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_extended_positions_use_two_tables(tiny_model):
    emb = tiny_model.multi_modal_projector.clip_text_model.embeddings
    table = emb.position_table()
    assert table.shape[0] == 248
    assert torch.equal(table[:20], emb.position_embedding[:20])
    assert torch.equal(table[20:], emb.position_embedding_res[20:])


@torch.no_grad()
def test_relevance_is_one_softmax_over_the_whole_clip(tiny_model):
    proj = tiny_model.multi_modal_projector
    feats = tiny_model.encode_video(_pixels(tiny_model, 4))
    keys = proj.keys(feats)
    q = proj.text_query(_clip_ids())
    g = relevance(keys, q, proj.logit_scale, 4, tiny_model.cfg.frame_shape)
    assert g.shape == (4, 6, 6) and g.dtype == torch.float32
    assert abs(float(g.sum()) - 1.0) < 1e-5
    per_frame = g.reshape(4, -1).sum(-1)
    assert not torch.allclose(per_frame, torch.ones(4))  # not a per-frame softmax
    # cosine * exp(logit_scale), softmax over all tokens, against a float64 direct computation
    cos = keys.double() @ q.double().reshape(-1)
    ref = torch.softmax(cos * math.exp(float(proj.logit_scale)), 0).reshape(4, 6, 6)
    torch.testing.assert_close(g.double(), ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T,kernel", [(2, (2, 3, 3)), (8, (2, 3, 3)), (5, (2, 3, 3)), (1, (1, 3, 3)), (3, (1, 3, 3))])
def test_pooling_equals_direct_window_loop(T, kernel):
    gen = torch.Generator().manual_seed(T)
    values = torch.randn(T, 36, 16, generator=gen)
    g = torch.softmax(torch.randn(T * 36, generator=gen) * 4, 0).reshape(T, 6, 6)
    ours = pool_windows(values, g, kernel, 0.01)
    ref = pool_loop(values, g, kernel, 0.01)
    assert ours.shape == ref.shape == ((T // kernel[0]) * 4, 16)
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("T", [2, 4, 8])
def test_pool_after_gelu_equals_authors_order(tiny_model, T):
    """linear_2(pool(GELU(linear_1 F))) == pool(linear_2(GELU(linear_1 F))) because the window weights sum to 1."""
    proj = tiny_model.multi_modal_projector
    feats = tiny_model.encode_video(_pixels(tiny_model, T, seed=T))
    g, ours = proj.pool(proj.keys(feats), proj.values(feats), _clip_ids())
    theirs = pool_authors_order(feats, g, proj, (2, 3, 3), 0.01)
    assert ours.shape == (T // 2 * 4, tiny_model.cfg.text.hidden_size)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_odd_frame_count_drops_last_frame_after_global_softmax(tiny_model, caplog):
    px = _pixels(tiny_model, 5, seed=7)
    with caplog.at_level(logging.WARNING):
        out5 = tiny_model.visual_tokens(px, _clip_ids())
    assert "odd" in caplog.text
    assert out5.visual_tokens.shape[0] == 2 * 4  # floor(5/2) * (6/3)^2
    assert out5.relevance.shape[0] == 5 and abs(float(out5.relevance.sum()) - 1) < 1e-5
    proj = tiny_model.multi_modal_projector
    # the pooled tokens use g normalised over all 5 frames (not re-normalised over 4)
    ref = proj.linear_2(pool_loop(proj.values(out5.features)[:4], out5.relevance[:4], (2, 3, 3), 0.01).float())
    torch.testing.assert_close(out5.visual_tokens, ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
def test_three_frames_are_not_mistaken_for_channels(tiny_model):
    px = _pixels(tiny_model, 3, seed=9)
    port = PortTower(tiny_model).eval()
    torch.testing.assert_close(tiny_model.encode_video(px), port(px[None])[-2][:, 1:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [1, 0, 65, 100])
def test_frame_count_out_of_range_is_a_clear_error(tiny_model, T):
    s = tiny_model.cfg.vision.image_size
    with pytest.raises(InputError, match="2 <= T <= 64"):
        tiny_model.visual_tokens(torch.zeros(T, 3, s, s), _clip_ids())


def test_wrong_pixel_size_is_a_clear_error(tiny_model):
    with pytest.raises(InputError, match=r"\[T, 3, 84, 84\]"):
        tiny_model.visual_tokens(torch.zeros(4, 3, 336, 336), _clip_ids())


@torch.no_grad()
def test_lone_image_tile_gives_grid_tokens_plus_newline(tiny_model):
    """One tile without an image size (a 1-row .npy): the authors' single-tile branch, g*g tokens + image_newline."""
    out = tiny_model.visual_tokens(_pixels(tiny_model, 1), _clip_ids(), image=True)
    assert out.visual_tokens.shape == (4 + 1, tiny_model.cfg.text.hidden_size)
    assert torch.equal(out.visual_tokens[-1], tiny_model.image_newline)
    assert tiny_model.cfg.image_layout(None).num_tokens == 5 and out.layout.tiles == 1
    with pytest.raises(InputError, match="need the image's"):
        tiny_model.visual_tokens(_pixels(tiny_model, 3), _clip_ids(), image=True)
    with pytest.raises(InputError, match="takes 5 tiles"):  # a 200x120 image needs base + 2x2 crops
        tiny_model.visual_tokens(_pixels(tiny_model, 3), _clip_ids(), image=True, image_size=(120, 200))


# ---- checkpoint loader ------------------------------------------------------------------------

def test_loader_round_trip_identical_tensors(tiny_ckpt, tiny_model):
    from safetensors import safe_open

    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    state = tiny_model.state_dict()
    assert set(state) == set(index["weight_map"])
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(tiny_ckpt / shard), framework="pt") as f:
            for name in f.keys():
                assert torch.equal(f.get_tensor(name).float(), state[name]), name


def test_logit_scale_is_read_from_the_checkpoint(tiny_model):
    # the preset stores ln 100 in bf16, which rounds to 4.59375 as in the released checkpoint
    assert float(tiny_model.multi_modal_projector.logit_scale) == 4.59375


def _copy_ckpt(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_listed(tiny_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    from ppllava_edge.model.checkpoint import load_model

    ck = _copy_ckpt(tiny_ckpt, tmp_path / "ck")
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    victim = "image_newline"
    shard = ck / index["weight_map"][victim]
    tensors = load_file(str(shard))
    del tensors[victim]
    tensors["multi_modal_projector.extra_head.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    del index["weight_map"][victim]
    index["weight_map"]["multi_modal_projector.extra_head.weight"] = shard.name
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        load_model(ck)
    msg = str(err.value)
    assert "Missing 1 tensor" in msg and "image_newline" in msg
    assert "Unexpected 1 tensor" in msg and "multi_modal_projector.extra_head.weight" in msg


def test_missing_shard_file_is_named(tiny_ckpt, tmp_path):
    from ppllava_edge.model.checkpoint import load_model

    ck = _copy_ckpt(tiny_ckpt, tmp_path / "ck")
    (ck / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load_model(ck)


@pytest.mark.parametrize("key,value,hint", [("long_clip", True, "rename 'long_clip' to 'extend_clip'"), ("pooling", "clipST_3d", '"pooling": "ppllava"')])
def test_legacy_config_keys_say_what_to_rename(tiny_ckpt, tmp_path, key, value, hint):
    from ppllava_edge.config import load_config

    ck = _copy_ckpt(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    if key == "long_clip":
        cfg["long_clip"] = cfg.pop("extend_clip")
    else:
        cfg["pooling"] = value
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=hint):
        load_config(ck)


@pytest.mark.parametrize("key,rope", [("rope_scaling", {"type": "dynamic", "factor": 2.0}),
                                      ("rope_parameters", {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})])
def test_dynamic_rope_is_refused_at_export(tiny_ckpt, tmp_path, key, rope):
    """A rope type whose cos/sin change with the sequence length cannot live in the decoder's fixed tables: export
    stops with one error line naming the key; a static type (linear) exports its own scaled tables."""
    from ppllava_edge.cli.main import cli
    from ppllava_edge.config import load_config
    from ppllava_edge.export.exporter import rotary_tables

    ck = _copy_ckpt(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["text_config"][key] = rope
    (ck / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(cli, ["export", str(ck), str(tmp_path / "out")])
    assert res.exit_code == 1, res.output
    assert f"text_config.{key} has rope type '{rope.get('type', rope.get('rope_type'))}'" in res.output
    assert res.output.count("error:") == 1 and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
    cfg["text_config"][key] = {"rope_type": "linear", "factor": 2.0}
    (ck / "config.json").write_text(json.dumps(cfg))
    cos, _ = rotary_tables(load_config(ck))
    plain, _ = rotary_tables(load_config(tiny_ckpt))
    np.testing.assert_allclose(cos[8], plain[4], atol=1e-6)  # linear x2: position 8 takes position 4's angles


def test_clip_weight_hub_id_uses_known_openai_config():
    from ppllava_edge.config import resolve_clip_config

    cfg = resolve_clip_config("openai/clip-vit-large-patch14-336", None)
    assert cfg["text_config"]["hidden_size"] == 768 and cfg["text_config"]["num_hidden_layers"] == 12
    with pytest.raises(ConfigError, match="neither a known CLIP model"):
        resolve_clip_config("someone/unknown-clip", None)


def test_released_config_defaults_fill_missing_dims():
    """A real config.json records only non-default text_config keys: LlamaConfig defaults fill the rest (7B dims)."""
    from ppllava_edge.config import config_from_dict
    from ppllava_edge.model.presets import RELEASED_TOP_LEVEL

    raw = dict(RELEASED_TOP_LEVEL, clip_weight="openai/clip-vit-large-patch14-336", frame_shape=[24, 24])
    raw["vision_config"] = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14, "projection_dim": 768}
    raw["text_config"] = {"_name_or_path": "lmsys/vicuna-7b-v1.5", "max_position_embeddings": 4096, "model_type": "llama", "pad_token_id": 0, "rms_norm_eps": 1e-05, "vocab_size": 32064}
    cfg = config_from_dict(raw)
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.intermediate_size, cfg.text.num_key_value_heads) == (4096, 32, 11008, 32)
    assert cfg.clip_text.context_length == 248 and cfg.clip_text.hidden_size == 768
    assert cfg.visual_tokens(32) == 1024 and cfg.visual_tokens(64) == 2048
    assert cfg.image_grid_pinpoints == ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
    assert cfg.image_layout(None).num_tokens == 65  # a lone 336 tile: 64 + the newline
    assert cfg.image_max_tokens() == 64 + 16 * (16 + 1) and cfg.image_max_tiles() == 5  # the 672x672 pinpoint


# ---- end to end -------------------------------------------------------------------------------

def test_greedy_generation_is_deterministic_and_image_token_literal_stays_text(tiny_ckpt):
    from ppllava_edge.model.generate import ReferenceModel

    ref = ReferenceModel(tiny_ckpt)
    s = ref.cfg.vision.image_size
    px = np.random.default_rng(0).standard_normal((8, 3, s, s)).astype(np.float32)
    a = ref.answer_pixels(px, "What happens in the <image> video?", image=False, max_new_tokens=12)
    b = ref.answer_pixels(px, "What happens in the <image> video?", image=False, max_new_tokens=12)
    assert a.output_ids == b.output_ids and len(a.output_ids) >= 1
    ids = a.arrays["input_ids"]
    assert int((ids == 32000).sum()) == 1  # the typed <image> stays text
    n_vis = a.arrays["visual_tokens"].shape[0]
    assert n_vis == 16
