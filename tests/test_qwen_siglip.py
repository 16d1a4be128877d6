"""The Qwen2 + SigLIP family: config, the SigLIP modules against transformers' own, the projector against a direct
re-implementation of the authors' LLaVASiglip3DMultiModalProjector.forward, SigLIP tokenization against
transformers' SiglipTokenizer, the plain_qwen prompt against Qwen2's tokenizer, and `generate` against a direct loop."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from ppllava_edge.config import QWEN_SIGLIP, VICUNA_CLIP, config_from_dict  # noqa: E402
from ppllava_edge.errors import ConfigError  # noqa: E402

QWEN2_TOKENIZER = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "qwen2-tokenizer"


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory) -> Path:
    from ppllava_edge.model.make import make_checkpoint

    return make_checkpoint("qwen-tiny", tmp_path_factory.mktemp("qwen") / "Q")


@pytest.fixture(scope="module")
def qwen_model(qwen_ckpt):
    from ppllava_edge.model.checkpoint import load_model

    return load_model(qwen_ckpt)


# ---- config ---------------------------------------------------------------------------------------------------------
def test_released_qwen_config_reads_the_release_dims():
    from ppllava_edge.model.qwen_presets import qwen_preset_config

    cfg = config_from_dict(qwen_preset_config("qwen-7b")[0])
    assert cfg.family == QWEN_SIGLIP and not cfg.has_cls
    v, t, ct = cfg.vision, cfg.text, cfg.clip_text
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.grid, v.hidden_act) == (1152, 4304, 26, 16, 27, "gelu_pytorch_tanh")
    assert (t.model_type, t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == ("qwen2", 152064, 3584, 28, 28, 4)
    assert (t.intermediate_size, t.rope_theta, t.tie_word_embeddings, t.qkv_bias, t.eos_token_id) == (18944, 1e6, False, True, 151645)
    assert (ct.num_hidden_layers, ct.hidden_size, ct.vocab_size, ct.max_position_embeddings, ct.context_length) == (27, 1152, 32000, 64, 196)
    assert (cfg.image_token_index, cfg.pad_token_id, cfg.vision_feature_layer) == (151646, 151643, -1)
    assert cfg.visual_tokens(32) == 16 * 81 == 1296
    assert cfg.conversation.name == "plain_qwen"
    assert cfg.conversation.prompt_text("Q?") == "<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n"


def test_vicuna_config_is_unchanged_and_unsupported_combinations_say_why():
    from ppllava_edge.model.presets import preset_config

    raw = preset_config("7b")[0]
    cfg = config_from_dict(raw)
    assert cfg.family == VICUNA_CLIP and cfg.has_cls and cfg.text.model_type == "llama" and not cfg.text.qkv_bias
    with pytest.raises(ConfigError, match="only the BT-Adapter vision tower"):
        config_from_dict({**raw, "btadapter": False})
    with pytest.raises(ConfigError, match="model_type 'llava_qwen'"):
        config_from_dict({**raw, "model_type": "llava_qwen"})
    from ppllava_edge.model.qwen_presets import qwen_preset_config

    qraw = qwen_preset_config("qwen-7b")[0]
    with pytest.raises(ConfigError, match="valuew_plus"):
        config_from_dict({**qraw, "valuew_plus": True})
    with pytest.raises(ConfigError, match="vision_feature_layer=-2"):
        config_from_dict({**qraw, "vision_feature_layer": -2})


# ---- modules against transformers --------------------------------------------------------------------------------
def test_siglip_vision_tower_matches_transformers(qwen_model):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = qwen_model.cfg.vision
    hf = SiglipVisionModel(SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                                              num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
                                              vision_use_head=False)).eval()
    tower = qwen_model.vision_tower
    hf_state = hf.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in hf_state) else ""  # 4.45.2 nests, 5.24 does not
    ours = {prefix + k: v for k, v in tower.vision_model.state_dict().items()}
    assert set(ours) == set(hf_state)  # the tower's names are transformers' (post_layernorm included, no head)
    hf.load_state_dict(ours)
    px = torch.randn(3, 3, v.image_size, v.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(pixel_values=px, output_hidden_states=True).hidden_states[-1]
        got = tower(px)
    assert got.shape == (3, v.num_patches, v.hidden_size)
    assert (got - want).abs().max().item() < 1e-5


def test_qwen2_llm_equals_transformers_built_from_the_text_config(qwen_ckpt, qwen_model):
    """The LLM built through config.py equals Qwen2ForCausalLM built by transformers from config.json's text_config
    alone (names, GQA, q/k/v biases, rope theta): same tensors load strictly and give the same logits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_config = json.loads((qwen_ckpt / "config.json").read_text())["text_config"]
    hf = Qwen2ForCausalLM(Qwen2Config(**text_config)).eval()
    hf.load_state_dict(qwen_model.language_model.state_dict())
    assert hf.config.num_key_value_heads == 2 and hf.model.layers[0].self_attn.q_proj.bias is not None
    assert hf.model.layers[0].self_attn.o_proj.bias is None
    ids = torch.randint(0, 151643, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - qwen_model.language_model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5


def _hf_text(cfg, length):
    from transformers import SiglipTextConfig, SiglipTextModel

    ct = cfg.clip_text
    return SiglipTextModel(SiglipTextConfig(hidden_size=ct.hidden_size, intermediate_size=ct.intermediate_size, num_hidden_layers=ct.num_hidden_layers,
                                            num_attention_heads=ct.num_attention_heads, max_position_embeddings=length, vocab_size=ct.vocab_size)).eval()


def test_siglip_text_tower_matches_transformers_with_folded_extended_table_and_mask(qwen_model):
    """The 196-row tables (rows < 20 of `position_embedding`, the rest of `position_embedding_res`) against
    transformers' SiglipTextModel holding the folded table; pooled output at the last (padding) position."""
    from ppllava_edge.config import CLIP_KEEP_LEN

    text = qwen_model.multi_modal_projector.clip_text_model
    state = {k: v.clone() for k, v in text.state_dict().items()}
    state["embeddings.position_embedding_res"] += 0.5  # the two tables differ: a wrong fold would show
    hf = _hf_text(qwen_model.cfg, 196)
    folded = torch.cat((state["embeddings.position_embedding"][:CLIP_KEEP_LEN], state["embeddings.position_embedding_res"][CLIP_KEEP_LEN:]))
    hf_state = {k: v for k, v in state.items() if "position_embedding" not in k}
    hf_state["embeddings.position_embedding.weight"] = folded
    hf.load_state_dict(hf_state)
    text_copy = type(text)(qwen_model.cfg)
    text_copy.load_state_dict(state)
    ids = torch.randint(3, 500, (2, 196), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 196, dtype=torch.long)
    mask[0, :30], mask[1, :150] = 1, 1
    ids[mask == 0] = 1
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).pooler_output
        got = text_copy(ids, mask)
        unmasked = text_copy(ids, None)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - unmasked).abs().max().item() > 1e-3  # the mask matters: padding is not attended


def _authors_projector(proj, features, clip_ids, clip_mask, num_frames, video, frame_shape, kernel, temp):
    """LLaVASiglip3DMultiModalProjector.forward (valuew_plus False) re-written from the authors' code with einops:
    the MAP head's V path via nn.MultiheadAttention's packed in_proj, linear_2 before pooling, unfold pooling."""
    from einops import rearrange

    head = proj.clip_visual_head
    x = proj.clip_visual_ln(features)
    d = x.shape[-1]
    w, b = head.attention.in_proj_weight, head.attention.in_proj_bias
    value = torch.nn.functional.linear(x.transpose(0, 1), w[2 * d:], b[2 * d:]).transpose(0, 1)  # batch_first in, as theirs
    image_embeds = value + head.mlp(head.layernorm(value))
    image_embeds = rearrange(image_embeds, "(B T) L D -> B (T L) D", T=num_frames)
    text_embeds = proj.clip_text_model(clip_ids, clip_mask)
    image_embeds = image_embeds / image_embeds.norm(p=2, dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
    logits = torch.einsum("ad,bvd->abv", [text_embeds, image_embeds]).diagonal(dim1=0, dim2=1).transpose(0, 1)
    tv = torch.softmax(logits * proj.logit_scale.exp() + proj.logit_bias, dim=-1)
    tv = rearrange(tv, "B (T W H) -> B T W H", T=num_frames, W=frame_shape[0])
    h = proj.linear_2(torch.nn.functional.gelu(proj.linear_1(features)))
    h = rearrange(h, "(B T) (W H) D -> B D T W H", T=num_frames, W=frame_shape[0])
    kd, kh, kw = kernel
    n, c = h.shape[:2]
    hu = h.unfold(2, kd, kd).unfold(3, kh, kh).unfold(4, kw, kw)
    wu = tv.unfold(1, kd, kd).unfold(2, kh, kh).unfold(3, kw, kw)
    hu = hu.contiguous().view(n, c, *hu.shape[2:5], -1)
    wu = torch.softmax(wu.contiguous().view(n, *wu.shape[1:4], -1) / temp, dim=-1)
    h = (hu * wu.unsqueeze(1)).sum(dim=-1)
    return rearrange(rearrange(h, "B D T W H -> B T (W H) D"), "B T WH D -> B (T WH) D")[0], tv[0]


@pytest.mark.parametrize("video", [True, False])
def test_siglip_projector_matches_the_authors_forward(qwen_model, video):
    cfg = qwen_model.cfg
    proj = qwen_model.multi_modal_projector
    T = 4 if video else 3
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(T, cfg.vision.num_patches, cfg.vision.hidden_size, generator=gen)
    ids = torch.randint(3, 500, (1, 196), generator=gen)
    mask = torch.zeros(1, 196, dtype=torch.long)
    mask[0, :12] = 1
    with torch.no_grad():
        proj.logit_scale.fill_(4.7)  # SigLIP so400m's scale is ~ln 117: a sharp softmax
        proj.logit_bias.fill_(-12.9)
        kernel = cfg.pooling_kernel if video else cfg.image_pooling_kernel
        want, want_g = _authors_projector(proj, features, ids, mask, T, video, cfg.frame_shape, kernel, cfg.pooling_temp)
        keys, values = proj.keys(features), proj.values(features)
        g, got = proj.pool(keys, values, ids, image=not video, clip_mask=mask)
    assert got.shape == want.shape == ((T // kernel[0]) * (cfg.frame_shape[0] // 3) ** 2, cfg.text.hidden_size)
    assert (g - want_g).abs().max().item() < 1e-6
    assert (got - want).abs().max().item() < 1e-5


# ---- tokenization ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_spm(tmp_path_factory) -> Path:
    spm = pytest.importorskip("sentencepiece")
    from ppllava_edge.tokenization.synthetic import _WORDS

    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    lines += ["café naïve résumé über straße", "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=500, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    path = tmp_path_factory.mktemp("spm") / "spiece.model"
    path.write_bytes(buf.getvalue())
    return path


QUESTIONS = [
    "What is the man doing?",
    "Describe the VIDEO, in detail!! (colors; objects: all)",
    "  leading   and trailing   spaces  ",
    "café naïve résumé — “quoted” ½ ﬁ",
    "ｆｕｌｌｗｉｄｔｈ Ｔｅｘｔ 日本語 zebra",
    "",
    "a▁b tab\there\nnewline",
]


@pytest.mark.parametrize("length", [196, 64])
def test_siglip_ids_and_mask_equal_transformers_siglip_tokenizer(trained_spm, length):
    from transformers import SiglipTokenizer

    from ppllava_edge.tokenization import SiglipTextTokenizer
    from ppllava_edge.tokenization.synthetic import _WORDS

    ref = SiglipTokenizer(str(trained_spm))
    ours = SiglipTextTokenizer.from_file(trained_spm.parent)
    long_text = " ".join(_WORDS[:400])  # cut to length-1 pieces + </s>, mask all ones
    for q in QUESTIONS + [long_text]:
        want = ref(q, padding="max_length", truncation=True, max_length=length)
        ids, mask = ours.encode(q, length)
        assert ids.tolist() == want["input_ids"], q
        assert mask.tolist() == want["attention_mask"], q
    ids, mask = ours.encode(long_text, length)
    assert mask.all() and ids[-1] == 1


TYPED_SPECIALS = [
    "what </s> is", "</s> start", "end </s>", "a</s>b", "x <unk> y", "<unk>", "</s>", "two </s></s> in a row",
    " </s>  spaced  <unk>  ", "punct!</s>!punct", "hello▁</s>", "a\n</s>\tb", "ΟΔΟΣ </s> ΟΔΟΣ", "<pad> is text",
    "what </S> is", "WHAT <UNK> IS", "</s>" * 70,
]


def lower_like_4452(text: str) -> str:
    """transformers 4.45.2's `PreTrainedTokenizer.tokenize` with `do_lower_case` (SiglipTokenizer sets it): every
    character but the exact special tokens lowercased before the split on special tokens; 5.24 dropped this step."""
    import re

    pattern = r"(</s>|<unk>)|(.+?)"
    return re.sub(pattern, lambda m: m.groups()[0] or m.groups()[1].lower(), text, flags=re.S)


@pytest.mark.filterwarnings("ignore:This sequence already has </s>")  # the reference's note on a typed final </s>
@pytest.mark.parametrize("length", [196, 12])
def test_typed_special_tokens_are_special_ids_as_in_siglip_tokenizer(trained_spm, length):
    """`</s>` / `<unk>` typed in a question: their ids, the whitespace beside them dropped, the next word without `▁`,
    no second `</s>` after a final one; `</S>` / `<UNK>` too under 4.45.2's lowercasing (5.24 keeps those as text)."""
    from transformers import SiglipTokenizer

    from ppllava_edge.tokenization import SiglipTextTokenizer

    ref = SiglipTokenizer(str(trained_spm))
    ours = SiglipTextTokenizer.from_file(trained_spm)
    for q in TYPED_SPECIALS:
        want = ref(lower_like_4452(q), padding="max_length", truncation=True, max_length=length)
        ids, mask = ours.encode(q, length)
        assert ids.tolist() == want["input_ids"], q
        assert mask.tolist() == want["attention_mask"], q
    ids, mask = ours.encode("what </s> is", length)
    assert ids[:3].tolist() == [ref.convert_tokens_to_ids("▁what"), 1, ref.convert_tokens_to_ids("i")] and mask[:5].tolist() == [1] * 5
    ids, _ = ours.encode("what </S> is", length)
    assert 1 in ids[1:3] and ref("what </S> is")["input_ids"][1] != 1  # 5.24 alone keeps `</S>` as text


def test_siglip_tokenizer_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, ppllava_edge.tokenization.siglip; print(any(m in sys.modules for m in ('torch', 'transformers', 'sentencepiece')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_siglip_tokenizer_names_the_file(tmp_path):
    from ppllava_edge.errors import TokenizerError
    from ppllava_edge.tokenization import SiglipTextTokenizer

    with pytest.raises(TokenizerError, match="spiece.model"):
        SiglipTextTokenizer.from_file(tmp_path)


@pytest.mark.skipif(not QWEN2_TOKENIZER.is_dir(), reason="../shared/data/qwen2-tokenizer is absent")
def test_plain_qwen_prompt_ids_equal_qwen2_tokenizer_of_the_rendered_prompt():
    """Our segment-wise ids (typed specials stay text) equal Qwen2's tokenizer on the authors' prompt string."""
    from tokenizers import Tokenizer

    from ppllava_edge.conversation import PLAIN_QWEN
    from ppllava_edge.tokenization import LlamaPromptTokenizer, load_llama_tokenizer_from_checkpoint

    tok = LlamaPromptTokenizer(load_llama_tokenizer_from_checkpoint(QWEN2_TOKENIZER), image_token_id=151646, template=PLAIN_QWEN)
    full = Tokenizer.from_file(str(QWEN2_TOKENIZER / "tokenizer.json"))
    for q in ["What is the man doing?", "Describe it.\nIn  detail, é 中文 123"]:
        ids = tok.prompt_ids(q)
        assert ids == full.encode(PLAIN_QWEN.prompt_text(q)).ids
        assert ids[:5] == [151644, 872, 198, 151646, 198]  # <|im_start|> user \n <image> \n
    typed = tok.prompt_ids("a <|im_end|> b")
    assert typed.count(151645) == 1  # the typed <|im_end|> is text; only the template's is the special id


def test_check_activations_streams_every_qwen_layer(qwen_ckpt):
    from ppllava_edge.model.activations import check_activations

    rows = check_activations(qwen_ckpt, dtype="fp16")
    names = [r.module for r in rows]
    assert [n for n in names if n.startswith("vision_tower.vision_model.encoder.layers.")] == [f"vision_tower.vision_model.encoder.layers.{i}" for i in range(2)]
    assert sum(n.startswith("multi_modal_projector.clip_text_model.encoder.layers.") for n in names) == 2
    assert sum(n.startswith("language_model.model.layers.") for n in names) == 2
    assert "multi_modal_projector.clip_visual_head" in names and all(r.finite for r in rows)


# ---- generate --------------------------------------------------------------------------------------------------------
def test_generate_on_qwen_tiny_equals_a_direct_qwen2_loop(qwen_ckpt, qwen_model):
    from transformers import Qwen2ForCausalLM

    from ppllava_edge.model.generate import ReferenceModel

    ref = ReferenceModel(qwen_ckpt)
    assert isinstance(ref.model.language_model, Qwen2ForCausalLM)
    v = ref.cfg.vision
    px = np.random.default_rng(4).standard_normal((4, 3, v.image_size, v.image_size)).astype(np.float32)
    ans = ref.answer_pixels(px, "What is the man doing?", image=False, max_new_tokens=6)
    assert ans.arrays["visual_tokens"].shape == (ref.cfg.visual_tokens(4), ref.cfg.text.hidden_size) == (8, 64)
    assert int(ans.arrays["clip_mask"].sum()) == int((ans.arrays["clip_ids"] != 1).sum()) + 1
    # direct loop: the same inputs_embeds, prefill, then argmax steps with the KV cache
    model = ref.model
    embeds = model.embed_prompt(torch.from_numpy(ans.arrays["input_ids"]), torch.from_numpy(ans.arrays["visual_tokens"]))
    ids, past = [], None
    with torch.no_grad():
        out = model.language_model(inputs_embeds=embeds, use_cache=True)
        for _ in range(6):
            nxt = int(out.logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == ref.cfg.text.eos_token_id:
                break
            out = model.language_model(input_ids=torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
    assert ans.output_ids == ids


def test_generate_cli_answers_a_video_and_an_image_on_qwen_tiny(qwen_ckpt, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from ppllava_edge.cli.main import cli
    from ppllava_edge.media.synthetic import make_test_photo, write_test_video

    video = write_test_video(tmp_path / "clip.mp4", num_frames=24)
    photo = tmp_path / "photo.png"
    Image.fromarray(make_test_photo(200, 150)).save(photo)
    runner = CliRunner()
    for path, extra in ((video, ["--frames", "4"]), (photo, [])):
        dump = tmp_path / f"dump_{path.stem}"
        res = runner.invoke(cli, ["generate", str(qwen_ckpt), str(path), "What is shown?", "--max-new-tokens", "4", "--dump", str(dump), *extra])
        assert res.exit_code == 0, res.output
        assert len(np.load(dump / "output_ids.npy")) >= 1
    assert np.load(tmp_path / "dump_clip" / "visual_tokens.npy").shape[0] == 8  # 4 frames on a 6x6 grid: 2 * 2 * 2
    layout = json.loads((qwen_ckpt / "config.json").read_text())
    assert layout["model_type"] == "llava_onevision" and layout["clip_weight"] == "siglip"
