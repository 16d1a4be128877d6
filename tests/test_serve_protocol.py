"""The server's request validation, streamed text with stop strings and media-path rules, without a server."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("starlette")

from ppllava_edge.serve.inputs import MediaPolicy  # noqa: E402
from ppllava_edge.serve.protocol import ApiError, MediaPart, StreamText, parse_chat_request  # noqa: E402

PIECES = {1: "Hel", 2: "lo, ", 3: "wor", 4: "ld", 5: "! END", 6: " more", 7: "\ufffd"}


def decode(ids):
    text = "".join(PIECES[i] for i in ids)
    return text.replace("\ufffd", "") if ids and ids[-1] != 7 else text


def run(stops, ids):
    st = StreamText(decode, stops)
    deltas, stopped_at = [], None
    for n, tok in enumerate(ids, 1):
        delta, stop = st.feed(tok)
        deltas.append(delta)
        if stop:
            stopped_at = n
            break
    deltas.append(st.finish())
    return "".join(deltas), st.text(), stopped_at, deltas


def test_stream_text_without_stops_emits_the_whole_text():
    joined, final, stopped, deltas = run([], [1, 2, 3, 4, 5, 6])
    assert joined == final == "Hello, world! END more" and stopped is None and deltas[0] == "Hel"


def test_stream_text_cuts_at_the_first_stop_string_and_holds_back_partial_matches():
    joined, final, stopped, deltas = run(["END", "orld!!"], [1, 2, 3, 4, 5, 6])
    assert joined == final == "Hello, world! " and stopped == 5
    assert deltas[2:5] == ["w", "", "orld! "]  # "or", then "orld", might start "orld!!": held back until token 5
    joined, final, stopped, _ = run(["o, w"], [1, 2, 3, 4])
    assert joined == final == "Hell" and stopped == 3


def test_stream_text_holds_back_incomplete_characters():
    st = StreamText(decode, [])
    assert st.feed(1) == ("Hel", False) and st.feed(7) == ("", False)


def body(**kw):
    msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": "q"}]}]
    return {"model": "m", "messages": msg, **kw}


@pytest.mark.parametrize(
    "data,param,status",
    [
        ([], None, 400),
        ({"messages": []}, "model", 400),
        (body(model="x"), "model", 404),
        (body(messages="hi"), "messages", 400),
        (body(messages=[{"role": "tool", "content": "x"}]), "messages[0].role", 400),
        (body(messages=[{"role": "assistant", "content": "x"}, {"role": "user", "content": "q"}]), "messages[0].role", 400),
        (body(max_tokens=True), "max_tokens", 400),
        (body(max_completion_tokens=-1), "max_completion_tokens", 400),
        (body(top_p=0), "top_p", 400),
        (body(seed=-3), "seed", 400),
        (body(stop=["a", "b", "c", "d", "e"]), "stop", 400),
        (body(stop=[""]), "stop", 400),
        (body(stream="yes"), "stream", 400),
        (body(tools=[{"type": "function"}]), "tools", 400),
        (body(logprobs=True), "logprobs", 400),
        (body(frames=0), "frames", 400),
    ],
)
def test_invalid_requests_name_the_field(data, param, status):
    with pytest.raises(ApiError) as err:
        parse_chat_request(data, "m")
    assert (err.value.status, err.value.param) == (status, param)
    assert set(err.value.body()["error"]) == {"message", "type", "param", "code"}


def test_two_videos_or_a_video_in_an_assistant_turn_are_refused():
    two = body()
    two["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": "a.png"}})
    with pytest.raises(ApiError) as err:
        parse_chat_request(two, "m")
    assert err.value.param == "messages[0].content[2].image_url.url" and err.value.code == "too_many_media"
    assistant = body()
    assistant["messages"] += [{"role": "assistant", "content": [{"type": "video_url", "video_url": {"url": "b.mp4"}}]}, {"role": "user", "content": "q"}]
    with pytest.raises(ApiError) as err:
        parse_chat_request(assistant, "m")
    assert err.value.param == "messages[1].content[0].type"


def test_conversation_turns_and_sampling_fields():
    data = body(temperature=0.7, top_p=0.9, seed=5, stop="END", max_tokens=9, frames=16, stream=True)
    data["messages"] = [
        {"role": "system", "content": "sys"},
        data["messages"][0],
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "user", "content": [{"type": "text", "text": "u2b"}]},
    ]
    req = parse_chat_request(data, "m")
    assert req.history == [("q", "a1")] and req.question == "u2\nu2b" and req.system == "sys"
    assert (req.do_sample, req.temperature, req.top_p, req.seed, req.stop, req.max_tokens, req.frames, req.stream) == (True, 0.7, 0.9, 5, ["END"], 9, 16, True)
    greedy = parse_chat_request(body(temperature=0), "m")
    assert not greedy.do_sample and greedy.max_tokens is None and greedy.media[0].param == "messages[0].content[0].video_url.url"


def test_media_policy_paths(tmp_path):
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "sub" / "a.mp4").write_bytes(b"x")
    (tmp_path / "secret.mp4").write_bytes(b"x")
    os.symlink(tmp_path / "secret.mp4", media / "link.mp4")
    os.symlink(media / "sub" / "a.mp4", media / "ok_link.mp4")
    policy = MediaPolicy([media], 1 << 20, tmp_path)

    def resolve(url):
        return policy.resolve(MediaPart(url, "video_url", "p"))

    assert resolve("sub/a.mp4").path == media / "sub" / "a.mp4"
    assert resolve(f"file://{media}/sub/a.mp4").path == media / "sub" / "a.mp4"
    assert resolve(f"file://localhost{media}/sub/%61.mp4").path == media / "sub" / "a.mp4"
    assert resolve("ok_link.mp4").path == media / "sub" / "a.mp4"  # a symlink staying inside is fine
    for url, status in [("link.mp4", 403), ("../secret.mp4", 403), (str(tmp_path / "secret.mp4"), 403), ("sub/missing.mp4", 400),
                        ("sub", 400), ("file://otherhost/x.mp4", 400), ("http://example.com/a.mp4", 400), ("ftp://h/a.mp4", 400)]:
        with pytest.raises(ApiError) as err:
            resolve(url)
        assert err.value.status == status, url
    assert MediaPolicy([], 1 << 20, tmp_path).media_dirs == []
    with pytest.raises(ApiError) as err:
        MediaPolicy([], 1 << 20, tmp_path).resolve(MediaPart("sub/a.mp4", "video_url", "p"))
    assert err.value.status == 403 and err.value.code == "path_access_disabled"


def test_media_policy_uploads(tmp_path):
    import base64

    policy = MediaPolicy([], 1000, tmp_path)
    ok = policy.resolve(MediaPart("data:video/webm;base64," + base64.b64encode(b"v" * 1000).decode(), "video_url", "p"))
    assert ok.path.suffix == ".webm" and ok.path.read_bytes() == b"v" * 1000 and ok.temporary
    ok.cleanup()
    assert not ok.path.exists()
    npy = policy.resolve(MediaPart("data:application/x-npy;base64,AAAA", "video_url", "p"))
    assert npy.path.suffix == ".npy"
    for url, status, code in [
        ("data:video/mp4;base64," + base64.b64encode(b"v" * 1001).decode(), 413, "upload_too_large"),
        ("data:video/mp4,plain", 400, "invalid_data_url"),
        ("data:video/mp4;base64,***", 400, "invalid_base64"),
        ("data:text/html;base64,AAAA", 400, "unsupported_media_type"),
        ("data:video/mp4;base64,", 400, "invalid_data_url"),
    ]:
        with pytest.raises(ApiError) as err:
            policy.resolve(MediaPart(url, "video_url", "p"))
        assert (err.value.status, err.value.code) == (status, code), url


def test_stream_text_decodes_incrementally():
    """Each token decodes a window of a few ids, not the whole answer (before: 4000 tokens decoded ~8M ids)."""
    calls = []

    def counting(ids):
        calls.append(len(ids))
        return "".join(PIECES[1 + i % 6] for i in ids)

    st = StreamText(counting, ["never"])
    deltas = [st.feed(i) for i in range(4000)]
    assert sum(calls) <= 4 * 4000 and max(calls) <= 2
    calls.clear()
    assert "".join(d for d, _ in deltas) + st.finish() == st.text() == counting(range(4000))


def test_stream_text_long_stop_strings_cost_what_the_text_costs():
    """A 200k-character stop string whose prefix the text keeps matching: held back, then emitted, and the
    matcher's table grows only as far as the text went (before: O(len(stop)^2) a token)."""
    from ppllava_edge.serve.protocol import _StopMatcher

    stop = "ab" * 100_000
    pieces = {1: "ab", 2: "c"}
    st = StreamText(lambda ids: "".join(pieces[i] for i in ids), [stop, "zz" * 100_000])
    out = [st.feed(1) for _ in range(500)]
    assert all(d == "" for d, _ in out)  # 1000 characters that may still grow into the stop string
    assert st.feed(2) == ("ab" * 500 + "c", False)
    assert max(len(m.fail) for m in st._matchers) <= 1000 and isinstance(st._matchers[0], _StopMatcher)
    assert st.finish() == "" and st.text() == "ab" * 500 + "c"


def test_stream_text_stops_at_the_stop_string_that_ends_first():
    joined, final, stopped, _ = run(["lo, world! E", "wor"], [1, 2, 3, 4, 5])
    assert joined == final == "Hello, " and stopped == 3


@pytest.mark.parametrize("data,param", [
    (body(n=1.0), "n"),
    (body(n=True), "n"),
    (body(stop=["x" * 262_145]), "stop"),
    (body(stop=["ok", "bad \ud800"]), "stop[1]"),
    (body(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a\udc00.mp4"}}]}]), "messages[0].content[0].video_url.url"),
    (body(messages=[{"role": "system", "content": "\ud83d"}, {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "a.mp4"}}]}]), "messages[0].content"),
])
def test_nits_and_lone_surrogates_are_refused(data, param):
    with pytest.raises(ApiError) as err:
        parse_chat_request(data, "m")
    assert (err.value.status, err.value.param) == (400, param)


def test_uploads_decode_piecewise_with_whitespace_and_any_case(tmp_path, monkeypatch):
    import base64

    from ppllava_edge.serve import inputs

    monkeypatch.setattr(inputs, "_B64_PIECE", 8)  # many pieces, whitespace splitting base64 quanta
    data = os.urandom(1001)
    encoded = base64.b64encode(data).decode()
    spaced = "\n".join(encoded[i:i + 7] for i in range(0, len(encoded), 7))
    policy = MediaPolicy([], 2000, tmp_path)
    for url in ("data:video/mp4;base64," + encoded, "DATA:Video/MP4;Base64," + spaced):
        got = policy.resolve(MediaPart(url, "video_url", "p"))
        assert got.path.read_bytes() == data
        got.cleanup()
    with pytest.raises(ApiError) as err:
        policy.resolve(MediaPart("data:video/mp4;base64," + encoded[:-8] + "!!!!" + encoded[-4:], "video_url", "p"))
    assert err.value.code == "invalid_base64"
    assert list(tmp_path.iterdir()) == []  # the partial file of the bad upload is gone
