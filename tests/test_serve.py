"""`ppllava-edge serve`: a real server on a free loopback port, driven with the official `openai` client.

Answers equal `Pipeline.ask` on the same export, video and question (ids and text, streamed or not, alone or with 8
concurrent clients); the feature cache is shared; bad inputs get the right status and an OpenAI-style error body,
and the next good request still succeeds; a client that disconnects stops its generation; the queue limit gives
503 + Retry-After; and each limit of the README's "Reliability" table (issue 22) answers as documented.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from ppllava_edge.runtime.generation import GenerationConfig  # noqa: E402
from ppllava_edge.runtime.pipeline import Pipeline  # noqa: E402

from .conftest import write_truncated_video  # noqa: E402
from .serving import running_server  # noqa: E402

KEY = "test-key-123"
QUESTIONS = ["What is happening in the video?", "What colour is the square?", "Count the   objects, please.", "Where does the disc go?"]


def b64_url(path, mime="video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def video_messages(url: str, question: str, kind: str = "video_url") -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from ppllava_edge.media import write_test_video

    root = tmp_path_factory.mktemp("serve")
    d = root / "media"
    d.mkdir()
    outside = root / "outside"
    outside.mkdir()
    files = {
        "clip": write_test_video(d / "clip.mp4", num_frames=48),
        "clip2": write_test_video(d / "clip2.mp4", num_frames=30, size=(96, 96)),
        "fresh": write_test_video(d / "fresh.mp4", num_frames=40, size=(112, 80)),
        "secret": write_test_video(outside / "secret.mp4", num_frames=12),
        "truncated": write_truncated_video(d / "truncated.mp4"),
    }
    (d / "notes.mp4").write_text("this is a text file, not a video")
    files["notes"] = d / "notes.mp4"
    nan = np.zeros((8, 3, 84, 84), np.float32)
    nan[3, 1, 2, 2] = np.nan
    np.save(d / "nan.npy", nan)
    files["nan"] = d / "nan.npy"
    os.symlink(files["secret"], d / "escape.mp4")  # inside the media dir, pointing outside it
    files["escape"] = d / "escape.mp4"
    return d, files


@pytest.fixture(scope="module")
def server(tiny_export, media):
    with running_server(tiny_export, "--media-dir", str(media[0]), "--api-key", KEY, "--max-upload-mb", "1", "--workers", "2", "--frames", "8") as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return Pipeline.from_export(tiny_export, provider="cpu")


def model_id(tiny_export) -> str:
    return tiny_export.name


def ask(pipe, path, question, **kw):
    return pipe.ask(path, question, num_frames=8, generation=GenerationConfig(max_new_tokens=12, **kw))


def test_models_health_ready(server, client, tiny_export):
    assert [m.id for m in client.models.list().data] == [model_id(tiny_export)]
    for path in ("/health", "/ready"):
        status, _, body = server.request("GET", path)
        assert status == 200, body
    status, _, body = server.request("GET", "/v1/nope", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_answer_equals_ask_streamed_or_not(server, client, pipe, media, tiny_export):
    _, files = media
    for name, url in (("clip", f"file://{files['clip']}"), ("clip2", b64_url(files["clip2"]))):
        for q in QUESTIONS[:2]:
            want = ask(pipe, files[name], q)
            r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages(url, q), max_tokens=12, temperature=0,
                                               extra_body={"return_token_ids": True})
            choice = r.choices[0]
            assert choice.message.content == want.text
            assert choice.model_extra["token_ids"] == want.ids
            assert r.usage.completion_tokens == len(want.ids) and r.usage.prompt_tokens == want.context_len  # visual tokens included
            assert choice.finish_reason == ("stop" if want.ids[-1] == 2 else "length")
            assert set(r.model_extra["timings"]) >= {"vision", "pool", "prefill", "decode", "e2e"} and r.model_extra["warnings"] == []

            stream = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages(url, q), max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
            text, ids, finish, usage = [], [], None, None
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for c in chunk.choices:
                    text.append(c.delta.content or "")
                    ids += (c.model_extra or {}).get("token_ids") or []
                    finish = c.finish_reason or finish
            assert "".join(text) == want.text and ids == want.ids
            assert finish == choice.finish_reason and usage.completion_tokens == len(want.ids)


def test_image_url_answer_equals_ask(client, pipe, media, tiny_export, tmp_path):
    from PIL import Image

    img = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(2).random((70, 110, 3)) * 255).astype(np.uint8)).save(img)
    want = pipe.ask(img, "What is this?", generation=GenerationConfig(max_new_tokens=8))
    r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages(b64_url(img, "image/png"), "What is this?", "image_url"),
                                       max_tokens=8, temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want.ids and r.usage.prompt_tokens == want.context_len


def test_stop_strings_cut_the_answer(client, pipe, media, tiny_export):
    _, files = media
    want = ask(pipe, files["clip"], QUESTIONS[0])
    assert len(want.text) >= 8, want.text
    stop = want.text[len(want.text) // 2: len(want.text) // 2 + 3]
    expected = want.text[: want.text.find(stop)]
    messages = video_messages("clip.mp4", QUESTIONS[0])
    r = client.chat.completions.create(model=model_id(tiny_export), messages=messages, max_tokens=12, temperature=0, stop=[stop, "never-seen"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens <= len(want.ids)
    chunks = client.chat.completions.create(model=model_id(tiny_export), messages=messages, max_tokens=12, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_earlier_turns_use_the_conversation_template(client, pipe, media, tiny_export):
    _, files = media
    history = [("Describe the video.", "A square moves."), ("And the disc?", "It falls.")]
    messages = [{"role": "system", "content": "Be brief."}]
    messages.append({"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{files['clip']}"}}, {"type": "text", "text": history[0][0]}]})
    messages.append({"role": "assistant", "content": history[0][1]})
    messages += [{"role": "user", "content": history[1][0]}, {"role": "assistant", "content": history[1][1]}, {"role": "user", "content": "What colour is it?"}]
    want = pipe.ask(files["clip"], "What colour is it?", num_frames=8, generation=GenerationConfig(max_new_tokens=12), history=history, system="Be brief.")
    single = ask(pipe, files["clip"], "What colour is it?")
    r = client.chat.completions.create(model=model_id(tiny_export), messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True})
    assert r.choices[0].model_extra["token_ids"] == want.ids
    assert r.usage.prompt_tokens == want.context_len > single.context_len


def test_eight_concurrent_clients_get_the_sequential_answers(client, pipe, media, tiny_export):
    _, files = media
    jobs = [(name, q) for name in ("clip", "clip2") for q in QUESTIONS]  # 8 different requests
    want = {job: ask(pipe, files[job[0]], job[1]).ids for job in jobs}

    def one(job):
        name, q = job
        r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages(f"file://{files[name]}", q), max_tokens=12,
                                           temperature=0, extra_body={"return_token_ids": True})
        return r.choices[0].model_extra["token_ids"]

    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(one, jobs * 2))  # 16 requests, 8 at a time
    assert got == [want[j] for j in jobs * 2]


def test_second_question_on_a_video_is_a_cache_hit(server, client, media, tiny_export):
    _, files = media
    before = server.metrics()
    answers = []
    for q in QUESTIONS[:2]:
        r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages(b64_url(files["fresh"]), q), max_tokens=4, temperature=0)
        answers.append(r.model_extra["timings"])
    after = server.metrics()
    assert not answers[0]["cache_hit"] and answers[1]["cache_hit"] and answers[1]["vision"] == 0.0
    assert after["ppllava_feature_cache_misses_total"] - before["ppllava_feature_cache_misses_total"] == 1
    assert after["ppllava_feature_cache_hits_total"] - before["ppllava_feature_cache_hits_total"] == 1
    ok = 'ppllava_chat_requests_total{outcome="ok"}'
    assert after[ok] - before[ok] == 2
    assert after["ppllava_generated_tokens_total"] - before["ppllava_generated_tokens_total"] == 8
    # the stage label values are the exported contract (dashboards): every one counted once per answer
    stages = ("queue", "decode_video", "preprocess", "vision", "pool", "prefill", "decode", "ttft", "e2e")
    counts = {k: v for k, v in after.items() if k.startswith("ppllava_stage_seconds_count")}
    assert sorted(counts) == sorted(f'ppllava_stage_seconds_count{{stage="{s}"}}' for s in stages)
    assert all(counts[k] - before[k] == 2 for k in counts)
    assert "ppllava_queue_depth" in after and 'ppllava_http_requests_total{path="/v1/chat/completions",status="200"}' in after


def _bad_cases(files):
    big = os.urandom(1536 * 1024)  # 1.5 MiB decoded: over --max-upload-mb 1, under the body limit
    huge = os.urandom(3 << 20)  # 3 MiB: the request body itself is over the limit
    return [
        # (label, url, api key, status, openai exception, error code, text the message must hold)
        ("missing file", "file://{media}/nope.mp4", KEY, 400, openai.BadRequestError, "file_not_found", "nope.mp4"),
        ("outside the media dir", f"file://{files['secret']}", KEY, 403, openai.PermissionDeniedError, "path_not_allowed", "outside"),
        ("relative escape", "../outside/secret.mp4", KEY, 403, openai.PermissionDeniedError, "path_not_allowed", "outside"),
        ("symlink escaping", f"file://{files['escape']}", KEY, 403, openai.PermissionDeniedError, "path_not_allowed", "symlinks"),
        ("bad base64", "data:video/mp4;base64,@@@not-base64@@@", KEY, 400, openai.BadRequestError, "invalid_base64", "base64"),
        ("text file as video", "notes.mp4", KEY, 400, openai.BadRequestError, "invalid_media", "notes.mp4"),
        ("NaN .npy (path)", f"file://{files['nan']}", KEY, 400, openai.BadRequestError, "invalid_media", "non-finite"),
        ("NaN .npy (upload)", b64_url(files["nan"], "application/x-npy"), KEY, 400, openai.BadRequestError, "invalid_media", "uploaded video"),
        ("oversize upload", "data:video/mp4;base64," + base64.b64encode(big).decode(), KEY, 413, openai.APIStatusError, "upload_too_large", "--max-upload-mb"),
        ("oversize body", "data:video/mp4;base64," + base64.b64encode(huge).decode(), KEY, 413, openai.APIStatusError, "request_too_large", "limit"),
        ("http URL", "https://example.com/clip.mp4", KEY, 400, openai.BadRequestError, "unsupported_url", "not fetched"),
        ("wrong API key", "clip.mp4", "wrong-key", 401, openai.AuthenticationError, "invalid_api_key", "API key"),
    ]


def test_bad_inputs_get_the_right_status_and_the_server_keeps_serving(server, pipe, media, tiny_export):
    d, files = media
    want = ask(pipe, files["clip"], QUESTIONS[0])
    for label, url, key, status, exc_type, code, needle in _bad_cases(files):
        bad_client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)
        with pytest.raises(exc_type) as err:
            bad_client.chat.completions.create(model=model_id(tiny_export), messages=video_messages(url.replace("{media}", str(d)), "q"), max_tokens=4, temperature=0)
        assert err.value.status_code == status, label
        body = err.value.body
        assert set(body) == {"message", "type", "param", "code"} and body["code"] == code, (label, body)
        assert needle in body["message"], (label, body["message"])
        if status in (400, 403, 413) and code != "request_too_large":
            assert body["param"] == "messages[0].content[0].video_url.url", (label, body)
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = good.chat.completions.create(model=model_id(tiny_export), messages=video_messages("clip.mp4", QUESTIONS[0]), max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want.text, f"after {label}"


def test_bad_request_fields_name_the_field(server, client, tiny_export):
    cases = [
        ({"model": "other", "messages": video_messages("clip.mp4", "q")}, 404, "model"),
        ({"model": model_id(tiny_export), "messages": []}, 400, "messages"),
        ({"model": model_id(tiny_export), "messages": [{"role": "user", "content": "no video"}]}, 400, "messages"),
        ({"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "max_tokens": 0}, 400, "max_tokens"),
        ({"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "temperature": 5}, 400, "temperature"),
        ({"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "frames": 40}, 400, "frames"),
        ({"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "max_tokens": 5000}, 400, "max_tokens"),
        ({"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "n": 2}, 400, "n"),
        ({"model": model_id(tiny_export), "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, 400, "messages[0].content[0].type"),
    ]
    auth = {"Authorization": f"Bearer {KEY}"}
    for body, status, param in cases:
        got, _, raw = server.request("POST", "/v1/chat/completions", body, auth)
        err = json.loads(raw)["error"]
        assert (got, err["param"]) == (status, param), (body, err)
        assert err["type"] in ("invalid_request_error", "not_found_error") and err["message"]
    got, _, raw = server.request("POST", "/v1/chat/completions", b"{not json", auth)
    assert got == 400 and json.loads(raw)["error"]["code"] == "invalid_json"


def test_truncated_video_is_answered_with_a_warning(client, media, tiny_export):
    _, files = media
    r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages("truncated.mp4", "q"), max_tokens=4, temperature=0)
    warnings = r.model_extra["warnings"]
    assert len(warnings) == 1 and "truncated.mp4" in warnings[0] and "of 48 announced frames decoded" in warnings[0]
    again = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages("truncated.mp4", "q2"), max_tokens=4, temperature=0)
    assert again.model_extra["timings"]["cache_hit"] and again.model_extra["warnings"] == warnings  # a cache hit keeps the warning


def _stream_some_then_disconnect(server, body: dict, chunks: int) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = 0
    while seen < chunks:
        if resp.readline().startswith(b"data:"):
            seen += 1
    conn.sock.close()  # the client goes away mid-stream
    conn.close()


def _wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_disconnect_mid_stream_stops_generation(server, client, tiny_export):
    before = server.metrics()
    body = {"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "max_tokens": 3900, "ignore_eos": True,
            "temperature": 0, "stream": True}
    _stream_some_then_disconnect(server, body, chunks=3)
    key = 'ppllava_chat_requests_total{outcome="cancelled"}'
    assert _wait_for(lambda: server.metrics()[key] - before[key] == 1)
    after = server.metrics()
    generated = after["ppllava_generated_tokens_total"] - before["ppllava_generated_tokens_total"]
    assert 0 < generated < 3900  # stopped early, not run to max_tokens
    r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages("clip.mp4", "q"), max_tokens=4, temperature=0)
    assert r.choices[0].message.content


def _occupy_the_worker(s, tiny_export) -> http.client.HTTPConnection:
    """Start a long streamed answer (3900 tokens, EOS ignored) and wait for its first chunk: the one worker is busy
    until the returned connection is closed."""
    long = {"model": model_id(tiny_export), "messages": video_messages("clip.mp4", "q"), "max_tokens": 3900, "ignore_eos": True,
            "temperature": 0, "stream": True}
    conn = http.client.HTTPConnection(s.host, s.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(long).encode(), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data:")
    return conn


def test_queue_limit_gives_503_with_retry_after(tiny_export, media, pipe):
    d, files = media
    with running_server(tiny_export, "--media-dir", str(d), "--workers", "1", "--max-queue", "0") as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        conn = _occupy_the_worker(s, tiny_export)
        with pytest.raises(openai.InternalServerError) as err:
            c.chat.completions.create(model=model_id(tiny_export), messages=video_messages("clip.mp4", "q"), max_tokens=4, temperature=0)
        assert err.value.status_code == 503 and err.value.body["code"] == "server_busy"
        assert int(err.value.response.headers["retry-after"]) >= 1
        # admission comes before the body is read: a busy server never parses it (before: 400 invalid_json, after
        # holding the body in memory)
        status, _, raw = s.request("POST", "/v1/chat/completions", b"{not json" + b" " * 100_000)
        assert status == 503 and json.loads(raw)["error"]["code"] == "server_busy", raw
        conn.sock.close()
        conn.close()
        want = ask(pipe, files["clip"], "q")
        answered = _answers(c, tiny_export, want.text)
        assert _wait_for(answered)


def _answers(client, tiny_export, text: str):
    """A predicate: the server answers a plain question on the clip with `text` (False while it is busy)."""

    def answered() -> bool:
        try:
            r = client.chat.completions.create(model=model_id(tiny_export), messages=video_messages("clip.mp4", "q"), max_tokens=12, temperature=0)
        except openai.InternalServerError:
            return False
        return r.choices[0].message.content == text

    return answered


def test_no_media_dir_means_no_path_access(tiny_export, media):
    _, files = media
    with running_server(tiny_export) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for url in (f"file://{files['clip']}", str(files["clip"]), "clip.mp4"):
            with pytest.raises(openai.PermissionDeniedError) as err:
                c.chat.completions.create(model=model_id(tiny_export), messages=video_messages(url, "q"), max_tokens=4)
            assert err.value.body["code"] == "path_access_disabled"
        r = c.chat.completions.create(model=model_id(tiny_export), messages=video_messages(b64_url(files["clip"]), "q"), max_tokens=4)
        assert r.choices[0].message.content is not None
        status, _, body = s.request("GET", "/health")
        assert status == 200


def test_soak_200_requests_rss_stays_flat(server, media, tiny_export):
    """200 requests (uploads and paths, streamed and not) on the tiny export; the server's RSS after the last is
    at most 5 % above its RSS after the 20th."""
    _, files = media
    upload = b64_url(files["clip2"])
    auth = {"Authorization": f"Bearer {KEY}"}
    rss = {}
    for i in range(1, 201):
        url = upload if i % 2 else "clip.mp4"
        body = {"model": model_id(tiny_export), "messages": video_messages(url, QUESTIONS[i % len(QUESTIONS)]), "max_tokens": 8, "temperature": 0,
                "stream": i % 3 == 0}
        status, _, raw = server.request("POST", "/v1/chat/completions", body, auth)
        assert status == 200, raw[:300]
        if body["stream"]:
            assert raw.rstrip().endswith(b"data: [DONE]")
        if i in (20, 200):
            rss[i] = server.rss()
    assert rss[200] <= rss[20] * 1.05, f"RSS grew from {rss[20] / 2**20:.1f} MiB to {rss[200] / 2**20:.1f} MiB"


def test_loadtest_command_against_the_server(server, tmp_path, media):
    from click.testing import CliRunner

    from ppllava_edge.cli.main import cli

    _, files = media
    res = CliRunner().invoke(cli, ["bench", "--server", server.url, "--api-key", KEY, "--video", str(files["clip"]), "--concurrency", "1,2",
                                   "--requests", "4", "--warmup", "1", "--max-new-tokens", "6", "--stream", "-o", "json",
                                   "--csv", str(tmp_path / "lt.csv"), "-q"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert [r["concurrency"] for r in result["runs"]] == [1, 2]
    for r in result["runs"]:
        assert (r["requests"], r["ok"], r["errors"]) == (4, 4, 0)
        assert r["completion_tokens"] == 4 * 6  # ignore_eos: exactly max_new_tokens each
        assert r["requests_per_s"] > 0 and r["tokens_per_s"] > 0
        assert r["ttft_ms"]["n"] == 4 and 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]
        assert r["cache_hits"] == 4  # the warm-up put the video's features in the cache
    rows = (tmp_path / "lt.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("concurrency,requests,ok,errors")
    md = CliRunner().invoke(cli, ["bench", "--server", server.url, "--video", str(files["clip"]), "--requests", "2", "--warmup", "0", "-q"])
    assert md.exit_code == 1 and "HTTP 401" in md.output  # no key: every request refused, reported, exit 1
    from PIL import Image

    img = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(3).random((60, 90, 3)) * 255).astype(np.uint8)).save(img)
    res = CliRunner().invoke(cli, ["bench", "--server", server.url, "--api-key", KEY, "--image", str(img), "--requests", "2", "--warmup", "0",
                                   "--max-new-tokens", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "| 1 | 2 | 2 | 0 |" in res.stdout  # concurrency 1: 2 requests, 2 ok, 0 errors


# ---- hardening (issue 22): every hostile or careless request gets one clear 4xx in OpenAI's format ----------------
AUTH = {"Authorization": f"Bearer {KEY}"}


def _post(server, body, timeout: float = 60.0) -> tuple[int, dict]:
    status, headers, raw = server.request("POST", "/v1/chat/completions", body, AUTH, timeout=timeout)
    assert headers["content-type"].startswith("application/json"), (status, raw[:200])
    return status, json.loads(raw)


def _error(server, body, status: int, code: str, param: str | None = "messages[0].content[0].video_url.url") -> str:
    got, data = _post(server, body)
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"} and (got, err["code"], err["param"]) == (status, code, param), err
    return err["message"]


def _chat(tiny_export, url: str, question: str = "q", **kw) -> dict:
    return {"model": model_id(tiny_export), "messages": video_messages(url, question), "max_tokens": 4, "temperature": 0, **kw}


def test_context_check_uses_the_npy_frame_count_and_allows_exactly_the_limit(server, pipe, media, tiny_export):
    d, _ = media
    limit = pipe.manifest.model["max_position_embeddings"]
    status, ok = _post(server, _chat(tiny_export, "clip.mp4", max_tokens=1))
    context = ok["usage"]["prompt_tokens"]  # 8 frames' visual tokens + the text
    # context + max_tokens - 1 == limit needs exactly `limit` positions (the last token is never fed): admitted
    _stream_some_then_disconnect(server, _chat(tiny_export, "clip.mp4", max_tokens=limit - context + 1, ignore_eos=True, stream=True), chunks=2)
    msg = _error(server, _chat(tiny_export, "clip.mp4", max_tokens=limit - context + 2), 400, "context_length_exceeded", "max_tokens")
    assert f"at most {limit - context + 1} new tokens fit" in msg
    # a 16-frame .npy brings its own frame count: refused before any compute with its real visual tokens,
    # although max_tokens fits the request's 8 frames (before: generated, then 500)
    np.save(d / "sixteen.npy", np.zeros((16, 3, 84, 84), np.float32))
    for stream in (False, True):
        msg = _error(server, _chat(tiny_export, "sixteen.npy", max_tokens=limit - context, stream=stream), 400, "context_length_exceeded", "max_tokens")
        assert f"({pipe.manifest.visual_tokens(16)} visual)" in msg


def test_tiny_temperature_samples_greedily_instead_of_nan(server, pipe, media, tiny_export):
    _, files = media
    want = ask(pipe, files["clip"], QUESTIONS[1])
    for temperature in (1e-40, 5e-324):
        status, r = _post(server, _chat(tiny_export, "clip.mp4", QUESTIONS[1], max_tokens=12, temperature=temperature, seed=3, return_token_ids=True))
        assert status == 200 and r["choices"][0]["token_ids"] == want.ids, (temperature, r)


def test_ask_sample_with_a_tiny_temperature_is_greedy(tiny_export, media):
    from click.testing import CliRunner

    from ppllava_edge.cli.main import cli

    _, files = media
    base = ["ask", str(tiny_export), str(files["clip"]), QUESTIONS[1], "--max-new-tokens", "6", "--json"]
    greedy = CliRunner().invoke(cli, base)
    tiny = CliRunner().invoke(cli, [*base, "--sample", "--temperature", "1e-40", "--seed", "1"])
    assert greedy.exit_code == 0 and tiny.exit_code == 0, tiny.output
    assert json.loads(tiny.stdout)["ids"] == json.loads(greedy.stdout)["ids"]


def test_hostile_bodies_get_400_in_openai_format(server, media, tiny_export):
    d, _ = media
    nested = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    got, headers, raw = server.request("POST", "/v1/chat/completions", nested, AUTH)
    assert got == 400 and headers["content-type"].startswith("application/json") and json.loads(raw)["error"]["code"] == "invalid_json"
    msg = _error(server, _chat(tiny_export, f"file://{d}/{'a' * 5000}.mp4"), 400, "invalid_path")
    assert "File name too long" in msg
    surrogate = json.dumps(_chat(tiny_export, "clip.mp4", "QUESTION")).replace("QUESTION", "bad \\ud800 text").encode()
    got, _, raw = server.request("POST", "/v1/chat/completions", surrogate, AUTH)
    err = json.loads(raw)["error"]
    assert got == 400 and (err["code"], err["param"]) == ("invalid_text", "messages[0].content[1].text"), err
    with open(d / "forged.npy", "wb") as f:  # a header claiming 10^12 frames over a few bytes of data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 84, 84)})
        f.write(b"\0" * 64)
    msg = _error(server, _chat(tiny_export, "forged.npy"), 400, "invalid_media")
    assert "header announces" in msg and "forged.npy" in msg


def test_cache_hit_warnings_name_this_request_s_input(server, media, tiny_export):
    _, files = media
    upload = b64_url(files["truncated"])
    seen = []
    for url in ("truncated.mp4", upload, upload):  # the first fills the cache (or hits it), the next two hit it
        status, r = _post(server, _chat(tiny_export, url))
        assert status == 200
        seen.append(r["warnings"])
    assert len(seen[0]) == 1 and seen[0][0].startswith("truncated.mp4: truncated or partly corrupt video")
    for w in seen[1:]:
        assert len(w) == 1 and w[0].startswith("the uploaded video (messages[0].content[0].video_url.url): truncated"), w
        assert "/tmp" not in w[0] and "upload-" not in w[0] and "truncated.mp4" not in w[0]


def test_small_nits_get_the_right_answer(server, media, tiny_export):
    _, files = media
    for n in (1.0, True):
        _error(server, _chat(tiny_export, "clip.mp4", n=n), 400, "unsupported_parameter", "n")
    msg = _error(server, _chat(tiny_export, "clip.mp4", "word " * 5000), 400, "context_length_exceeded", "messages")
    assert "exceeds the LLM context" in msg
    status, r = _post(server, _chat(tiny_export, "DATA:video/mp4;BASE64," + b64_url(files["clip2"]).partition(",")[2]))
    assert status == 200 and r["choices"][0]["message"]["content"] is not None


def test_ready_does_not_echo_the_load_error(tiny_export):
    import asyncio

    from ppllava_edge.serve.app import create_app
    from ppllava_edge.serve.scheduler import ServeOptions, Server

    server = Server(ServeOptions(export=tiny_export))
    server.load_error = RuntimeError("secret detail /home/me/export")
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/ready", "headers": [], "query_string": b"", "http_version": "1.1",
             "scheme": "http", "server": ("127.0.0.1", 1), "client": ("127.0.0.1", 2), "root_path": ""}
    try:
        asyncio.run(create_app(server)(scope, receive, send))
    finally:
        server.close()
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert sent[0]["status"] == 503 and json.loads(body)["status"] == "failed" and b"secret" not in body


def test_long_stop_strings_are_scanned_in_linear_time(server, pipe, media, tiny_export):
    _, files = media
    want = ask(pipe, files["clip"], QUESTIONS[0])
    stops = [c * 200_000 for c in "abcd"]  # four 200k-character stops (before: ~55 s a token for 1M)
    status, r = _post(server, _chat(tiny_export, "clip.mp4", QUESTIONS[0], max_tokens=12, stop=stops), timeout=30)
    assert status == 200 and r["choices"][0]["message"]["content"] == want.text
    from ppllava_edge.serve.protocol import MAX_STOP_CHARS

    _error(server, _chat(tiny_export, "clip.mp4", stop=["x" * (MAX_STOP_CHARS + 1)]), 400, "invalid_value", "stop")


def test_videos_over_the_resolution_cap_are_refused_before_decoding(server, media, tiny_export):
    import av

    d, _ = media
    path = d / "huge.avi"
    with av.open(str(path), "w") as c:  # 4100x2400 = 9.8 MP, just over the 9.4 MP cap
        s = c.add_stream("mjpeg", rate=4)
        s.width, s.height, s.pix_fmt = 4100, 2400, "yuvj420p"
        for p in s.encode(av.VideoFrame.from_ndarray(np.zeros((2400, 4100, 3), np.uint8), format="rgb24")):
            c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    msg = _error(server, _chat(tiny_export, "huge.avi"), 400, "invalid_media")
    assert "4100x2400" in msg and "decode limit" in msg and "huge.avi" in msg


def _raw(server, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes on a fresh connection; (everything the server sent until it closed or went quiet, seconds)."""
    import socket

    t0 = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out, time.monotonic() - t0


def _head(length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_read_timeouts_and_one_log_line_per_disconnect(tiny_export, media, pipe):
    d, files = media
    with running_server(tiny_export, "--media-dir", str(d), "--workers", "1", "--max-queue", "0", "--max-upload-mb", "1",
                        "--read-timeout", "1", "--body-timeout", "3") as s:
        conn = _occupy_the_worker(s, tiny_export)
        # a busy server refuses before reading the body: 503 (once the drained rest stops coming) although only
        # 1 KiB of the announced 1 MB came
        out, took = _raw(s, _head(1_000_000) + b"{" + b" " * 1023)
        assert out.startswith(b"HTTP/1.1 503") and b'"code":"server_busy"' in out.replace(b" ", b"") and took < 5, out[:300]
        conn.sock.close()
        conn.close()
        want = ask(pipe, files["clip"], "q")
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answered = _answers(c, tiny_export, want.text)
        assert _wait_for(answered)
        # headers that never end: the connection is closed after --read-timeout
        out, took = _raw(s, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert out == b"" and took < 5
        # a body that stops arriving: 408 in OpenAI's format
        out, took = _raw(s, _head(5000) + b'{"model": ')
        assert out.startswith(b"HTTP/1.1 408") and b"request_timeout" in out and took < 5, out[:300]
        # a client that leaves mid-upload: one log line, no traceback
        import socket

        before = len(s.stderr)
        with socket.create_connection((s.host, s.port), timeout=10) as sock:
            sock.sendall(_head(5000) + b'{"model": ')
            time.sleep(0.3)
        assert _wait_for(lambda: any("disconnected" in line for line in s.stderr[before:]), timeout=10)
        time.sleep(0.5)
        new = s.stderr[before:]
        assert sum("disconnected" in line for line in new) == 1 and not any("Traceback" in line for line in new), new
        assert answered()


def test_a_full_upload_folder_answers_507_and_leaves_nothing(tiny_export, media, tmp_path):
    import resource

    _, files = media
    tmp = tmp_path / "tmp"
    tmp.mkdir()

    def small_files() -> None:  # every file the server writes is cut at 256 KiB: a stand-in for a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    with running_server(tiny_export, "--max-upload-mb", "1", env={"TMPDIR": str(tmp)}, preexec_fn=small_files) as s:
        big = "data:video/mp4;base64," + base64.b64encode(os.urandom(600 << 10)).decode()
        for _ in range(2):
            msg = _error(s, _chat(tiny_export, big), 507, "insufficient_storage")
            assert "cannot store the upload" in msg
            assert [p.name for p in tmp.glob("ppllava-serve-*/*")] == []  # the partial upload was removed
        status, r = _post(s, _chat(tiny_export, b64_url(files["clip2"])))
        assert status == 200 and r["choices"][0]["message"]["content"] is not None
