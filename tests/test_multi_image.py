"""Several images in one question, as the authors' multi-image path does it (`media_type` "multi-image"):

- the prompt: one `<image>` slot per image, each followed by "\\n" (their `user_query` makes every `<image>` of a
  multi-image question `<image>\\n`), tokenized as the authors' fast tokenizer tokenizes the rendered text;
- the images: each squashed to S x S like a video frame, through the tower as one video of T = N frames
  (`encode_video(..., multi_image=True)`), one relevance softmax over all of them, kernel (1,3,3), g*g tokens per
  image, no newline;
- the splice: their `_merge_input_ids_with_image_features` (written out below as a loop) puts image k's tokens at
  the k-th slot;
- `ask` on the export == `generate` (greedy ids exact, visual tokens <= 1e-4) for 2 and 3 images of different sizes.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ppllava_edge.cli.main import cli
from ppllava_edge.errors import InputError, VideoError
from ppllava_edge.media import MAX_IMAGES, images_as_frames, make_test_photo, preprocess_frames, read_image, read_images
from ppllava_edge.runtime.generation import GenerationConfig
from ppllava_edge.runtime.pipeline import Pipeline

from .conftest import REAL_LLAMA_TOKENIZER

SIZES = [(200, 120), (90, 150), (100, 100)]  # W x H: landscape, portrait, square (different anyres layouts too)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("photos")
    out = []
    for i, (w, h) in enumerate(SIZES):
        out.append(d / f"photo{i}.png")
        Image.fromarray(make_test_photo(w, h, seed=10 + i)).save(out[-1])
    return out


# ---- the prompt ----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_LLAMA_TOKENIZER.is_dir(), reason="needs ../shared/data/llama-tokenizer")
@pytest.mark.parametrize("n", [1, 2, 3])
def test_prompt_has_one_slot_per_image_as_the_authors_tokenizer_reads_it(n):
    from ppllava_edge.tokenization import LlamaPromptTokenizer, load_llama_tokenizer_from_checkpoint

    tok = load_llama_tokenizer_from_checkpoint(REAL_LLAMA_TOKENIZER)
    q = "Which picture is brighter?"
    ids = LlamaPromptTokenizer(tok).prompt_ids(q, images=n)
    assert ids == tok.encode("USER: " + "<image>\n" * n + q + " ASSISTANT: ").ids  # the full tokenizer on the text
    assert ids.count(32000) == n and ids[ids.index(32000) + 1] == 13  # "\n" (<0x0A>) after each slot


def authors_prompt(roles: tuple[str, str], seps: tuple[str, str], question: str) -> str:
    """The authors' `Conversation.user_query(question, is_mm=True)` + `get_prompt()` (conv.py, system ""): every
    `<image>` of a question becomes `<image>\\n`, then role + message + separator + the assistant's role."""
    mm = "<image>\n"
    if mm not in question:
        question = question.replace("<image>", mm) if "<image>" in question else mm + question
    return roles[0] + question + seps[0] + roles[1]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_prompt_text_is_the_authors_multi_image_prompt_for_both_templates(n):
    from ppllava_edge.conversation import PLAIN_V1, ConversationTemplate, render_text

    q = "Which picture is brighter?"
    msgs = [{"role": "user", "content": q}]
    assert render_text(PLAIN_V1, msgs, image=n) == authors_prompt(("USER: ", "ASSISTANT: "), (" ", "</s>"), "<image>" * n + q)
    plain_qwen = ConversationTemplate(name="plain_qwen", system="<|im_start|>system\n{content}<|im_end|>\n",
                                      user="<|im_start|>user\n{content}<|im_end|>\n", assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
                                      generation="<|im_start|>assistant\n")  # conv.py's conv_plain_qwen as data
    assert render_text(plain_qwen, msgs, image=n) == authors_prompt(("<|im_start|>user\n", "<|im_start|>assistant\n"),
                                                                    ("<|im_end|>\n", "<|im_end|>\n"), "<image>" * n + q)


# ---- the PyTorch model is the authors' multi-image path ----------------------------------------------------------
def authors_merge(embed, input_ids, image_features):
    """The authors' `_merge_input_ids_with_image_features` for one row, as a loop: every image token is replaced by
    as many rows as each image has (`num_image_patches`), filled with the images' rows in order."""
    import torch

    rows, k = [], 0
    for i in input_ids.tolist():
        if i == 32000:
            rows.extend(image_features[k])
            k += 1
        else:
            rows.append(embed(torch.tensor(i)))
    return torch.stack(rows)[None]


def test_model_runs_the_images_as_one_video_with_the_image_kernel(tiny_model, photos):
    import torch

    torch.manual_seed(0)
    px = torch.from_numpy(images_as_frames(read_images(photos), 84))
    clip_ids = torch.randint(1, 400, (1, tiny_model.cfg.clip_text.context_length))
    out = tiny_model.visual_tokens(px, clip_ids, multi_image=True)
    with torch.no_grad():
        video = tiny_model.encode_video(px)  # T = 3 through the BT-Adapter: the images attend to each other
        one_by_one = tiny_model.encode_tiles(px)
    assert torch.equal(out.features, video) and not torch.allclose(video, one_by_one, atol=1e-3)
    g = tiny_model.cfg.image_pooled_grid
    assert out.visual_tokens.shape == (3 * g * g, tiny_model.cfg.text.hidden_size) and out.layout is None  # no newline
    assert out.relevance.shape == (3, 6, 6) and abs(float(out.relevance.sum()) - 1) < 1e-5  # one softmax over all


def test_pixels_are_each_image_squashed_like_a_video_frame(photos):
    px = images_as_frames(read_images(photos), 84)
    want = [preprocess_frames(np.asarray(read_image(p)[0])[None], 84)[0] for p in photos]
    np.testing.assert_array_equal(px, np.stack(want))


def test_splice_puts_each_image_at_its_own_slot_like_the_authors_merge(tiny_model):
    import torch

    torch.manual_seed(1)
    d = tiny_model.cfg.text.hidden_size
    ids = torch.tensor([1, 661, 32000, 13, 32000, 13, 32000, 13, 500, 600])
    feats = torch.randn(3, 4, d)
    got = tiny_model.embed_prompt(ids, feats.reshape(-1, d), slots=3)
    want = authors_merge(tiny_model.language_model.get_input_embeddings(), ids, feats)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(InputError, match="must hold 2 image token"):
        tiny_model.embed_prompt(ids, feats.reshape(-1, d), slots=2)


def test_image_count_bounds(tiny_model):
    import torch

    one = torch.zeros(1, 3, 84, 84)
    with pytest.raises(InputError, match="takes 2 to 32 images"):
        tiny_model.visual_tokens(one, torch.ones(1, 8, dtype=torch.long), multi_image=True)
    assert MAX_IMAGES == 32


def test_generate_cli_takes_several_images_and_refuses_a_video_among_them(tiny_ckpt, photos, sample_video, tmp_path):
    res = CliRunner().invoke(cli, ["generate", str(tiny_ckpt), str(photos[0]), str(photos[1]), "What differs?", "--max-new-tokens", "3",
                                   "--dump", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    ids = np.load(tmp_path / "d" / "input_ids.npy")
    assert list(ids).count(32000) == 2 and np.load(tmp_path / "d" / "visual_tokens.npy").shape[0] == 2 * 4
    res = CliRunner().invoke(cli, ["generate", str(tiny_ckpt), str(photos[0]), str(sample_video), "What differs?"])
    assert res.exit_code == 1 and "several inputs must all be images" in res.output and str(sample_video) in res.output


# ---- the torch-free runtime == the PyTorch reference -------------------------------------------------------------
def _same_answer(pipe, reference, paths, question="Which picture is brighter?"):
    want = reference.answer(paths, question, max_new_tokens=10)
    got = pipe.ask(paths, question, generation=GenerationConfig(max_new_tokens=10), keep_arrays=True)
    assert got.ids == want.output_ids
    for name in ("pixel_values", "clip_ids", "input_ids"):
        np.testing.assert_array_equal(got.arrays[name], want.arrays[name], err_msg=name)
    assert got.arrays["visual_tokens"].shape == want.arrays["visual_tokens"].shape
    assert np.abs(got.arrays["visual_tokens"] - want.arrays["visual_tokens"]).max() <= 1e-4
    assert np.abs(got.arrays["relevance"] - want.arrays["relevance"]).max() <= 1e-4
    return got


@pytest.mark.parametrize("n", [2, 3])
def test_ask_equals_generate_on_several_images_tiny(pipe, reference, photos, n):
    got = _same_answer(pipe, reference, photos[:n])
    g = pipe.image_spec["pooled_grid"]
    assert got.visual_tokens == n * g * g and list(got.arrays["input_ids"]).count(32000) == n
    assert got.context_len == len(got.arrays["input_ids"]) - n + n * g * g


@pytest.fixture(scope="module")
def small_widths(tmp_path_factory, photos):
    """The small preset's widths (336 px tiles, 24x24 patches, g = 8, LLM 768) at the truncated-validation depth, its
    export, the runtime and the PyTorch reference on it."""
    pytest.importorskip("torch")
    from ppllava_edge.export.exporter import ExportOptions, export_checkpoint
    from ppllava_edge.export.truncate import write_truncated_checkpoint
    from ppllava_edge.model.generate import ReferenceModel
    from ppllava_edge.model.make import make_checkpoint

    root = tmp_path_factory.mktemp("small")
    cut = write_truncated_checkpoint(make_checkpoint("small", root / "small"), root / "cut")
    export_checkpoint(cut, root / "export", ExportOptions(frames=(2, 4, 8)))
    return Pipeline.from_export(root / "export", provider="cpu"), ReferenceModel(cut)


@pytest.mark.parametrize("n", [2, 3])
def test_ask_equals_generate_on_several_images_small_widths(small_widths, photos, n):
    pipe, reference = small_widths
    got = _same_answer(pipe, reference, photos[:n])
    assert got.visual_tokens == n * 64 and got.arrays["pixel_values"].shape == (n, 3, 336, 336)


def test_several_images_are_cached_as_an_ordered_set(tiny_export, photos):
    p = Pipeline.from_export(tiny_export, provider="cpu")
    gen = GenerationConfig(max_new_tokens=2)
    first = p.ask(photos[:2], "What differs?", generation=gen)
    again = p.ask(photos[:2], "Which is darker?", generation=gen)
    swapped = p.ask(photos[1::-1], "What differs?", generation=gen)
    assert (first.timings.cache_hit, again.timings.cache_hit, swapped.timings.cache_hit) == (False, True, False)
    assert p.vision_runs == 2  # the order is part of the key: the tower sees the images as an ordered clip


def test_runtime_refuses_bad_image_sets_clearly(pipe, photos, sample_video, tmp_path):
    with pytest.raises(InputError, match="several inputs must all be images"):
        pipe.ask([photos[0], sample_video], "q")
    with pytest.raises(InputError, match=r"17 image\(s\) in one question: a multi-image question takes 2 to 16 images"):
        pipe.ask([photos[0]] * 17, "q")  # the export's frame range (2:8:16) bounds the clip
    with pytest.raises(VideoError, match="missing.png"):
        pipe.ask([photos[0], tmp_path / "missing.png"], "q")


def test_ask_cli_on_several_images_equals_generate_cli(tiny_ckpt, tiny_export, photos, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["ask", str(tiny_export), *map(str, photos), "What differs?", "--max-new-tokens", "6", "--json",
                              "--relevance-png", str(tmp_path / "rel.png")])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    gen = runner.invoke(cli, ["generate", str(tiny_ckpt), *map(str, photos), "What differs?", "--max-new-tokens", "6", "--dump", str(tmp_path / "d")])
    assert gen.exit_code == 0, gen.output
    assert got["ids"] == np.load(tmp_path / "d" / "output_ids.npy").tolist() and got["visual_tokens"] == 3 * 4
    assert Image.open(tmp_path / "rel.png").width > 0
    bad = runner.invoke(cli, ["ask", str(tiny_export), str(photos[0]), "clip.mp4", "q"])
    assert bad.exit_code == 1 and "several inputs must all be images" in bad.output


# ---- the server: several image_url parts in one user message --------------------------------------------------------
def _b64(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _content(*parts: dict, question: str = "Which picture is brighter?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_protocol_takes_several_images_and_bounds_them(photos):
    from ppllava_edge.serve.protocol import ApiError, parse_chat_request

    body = {"model": "m", "messages": _content(*(_image(str(p)) for p in photos))}
    req = parse_chat_request(body, "m", max_images=3)
    assert [m.url for m in req.media] == [str(p) for p in photos] and req.question == "Which picture is brighter?"
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, "m", max_images=2)
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages[0].content[2].image_url.url", "too_many_media")
    assert "at most 2 image_url parts per request" in str(e.value)
    mixed = {"model": "m", "messages": _content(_image(str(photos[0])), {"type": "video_url", "video_url": {"url": "clip.mp4"}})}
    with pytest.raises(ApiError) as e:
        parse_chat_request(mixed, "m")
    assert (e.value.param, e.value.code) == ("messages[0].content[1].video_url.url", "too_many_media") and "a video goes alone" in str(e.value)


def test_a_refused_part_leaves_no_upload_of_the_request_behind(photos, tmp_path):
    from ppllava_edge.serve.inputs import MediaPolicy
    from ppllava_edge.serve.protocol import ApiError, MediaPart

    uploads = tmp_path / "uploads"
    uploads.mkdir()
    policy = MediaPolicy([], 1 << 20, uploads)
    parts = [MediaPart(_b64(photos[0]), "image_url", "p0"), MediaPart("data:image/png;base64,@@@@", "image_url", "p1")]
    with pytest.raises(ApiError, match="'p1': the data: URL payload is not valid base64"):
        policy.resolve_all(parts)
    assert list(uploads.iterdir()) == []
    files = policy.resolve_all(parts[:1] * 2)
    assert len(list(uploads.iterdir())) == 2
    for f in files:
        f.cleanup()


@pytest.fixture(scope="module")
def served(tiny_export, photos):
    pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from .serving import running_server

    with running_server(tiny_export, "--media-dir", str(photos[0].parent), "--max-images", "3") as s:
        yield s


def test_server_answer_on_several_images_equals_ask(served, pipe, photos, tiny_export):
    import openai

    client = openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
    for n in (2, 3):
        want = pipe.ask(photos[:n], "Which picture is brighter?", generation=GenerationConfig(max_new_tokens=8))
        parts = [_image(_b64(photos[0])), *(_image(f"file://{p}") for p in photos[1:n])]  # an upload and media-dir paths
        r = client.chat.completions.create(model=tiny_export.name, messages=_content(*parts), max_tokens=8, temperature=0,
                                           extra_body={"return_token_ids": True, "return_relevance": True})
        assert r.choices[0].model_extra["token_ids"] == want.ids and r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.context_len
        rel = r.model_extra["relevance"]
        assert rel["kind"] == "images" and rel["shape"][0] == n and len(rel["thumbnails"]) == n
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_export.name, messages=_content(*(_image(_b64(p)) for p in [*photos, photos[0]])), max_tokens=2)
    err = e.value.body
    assert (err["param"], err["code"]) == ("messages[0].content[3].image_url.url", "too_many_media")
    bad = _content(_image(_b64(photos[0])), _image("data:image/png;base64," + base64.b64encode(b"not a picture").decode()))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_export.name, messages=bad, max_tokens=2)
    assert (e.value.body["param"], e.value.body["code"]) == ("messages[0].content[1].image_url.url", "invalid_media")
    assert "upload-" not in e.value.body["message"]  # the temporary file is named by its part, never by its path


# ---- the bench -------------------------------------------------------------------------------------------------------
def test_bench_times_a_question_about_several_images(tiny_export, photos):
    args = ["bench", str(tiny_export), *(a for p in photos for a in ("--image", str(p))), "--iterations", "1", "--warmup", "0",
            "--max-new-tokens", "2", "--no-hardware", "--quiet"]
    res = CliRunner().invoke(cli, [*args, "--backend", "ort,torch", "-o", "json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["config"]["video"] is None and (data["config"]["image"]["images"], data["config"]["image"]["tokens"]) == (3, 12)
    for v in data["variants"]:  # the runtime and the PyTorch reference, each with its row
        assert v["error"] is None and v["visual_tokens"] == 12 and v["frames"] == 3, v["name"]
    ort = next(v for v in data["variants"] if v["backend"] == "ort")
    assert ort["cache"]["second_hits"] == 1  # the second question on the same images skips the vision graph
    md = CliRunner().invoke(cli, [*args, "--questions", "1"])
    assert md.exit_code == 0 and "3 images in one question" in md.stdout and "12 visual tokens" in md.stdout
    too_many = CliRunner().invoke(cli, ["bench", str(tiny_export), *(a for _ in range(17) for a in ("--image", str(photos[0]))), "--no-hardware"])
    assert too_many.exit_code == 1 and "17 image(s) in one question" in too_many.output
