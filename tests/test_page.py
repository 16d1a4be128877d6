"""The chat page of `ppllava-edge serve` (GET /) and what it uses: the media listing (GET /v1/media) and the opt-in
`return_relevance` field; then the page itself in a real headless Chromium (Debian's chromium + chromedriver,
driven by Selenium), on real servers on free loopback ports.

The browser test does not skip: without chromium it fails and says how to install it (tools/install-browser.sh,
which .ci/run runs)."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from ppllava_edge.runtime.generation import GenerationConfig  # noqa: E402
from ppllava_edge.runtime.pipeline import Pipeline  # noqa: E402

from .serving import running_server  # noqa: E402

KEY = "page-key-42"
ROOT = Path(__file__).resolve().parents[1]
STATIC = ROOT / "src" / "ppllava_edge" / "serve" / "static"
Q1, Q2 = "What is moving in the video?", "What colour is it?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from ppllava_edge.media import write_test_video

    root = tmp_path_factory.mktemp("page")
    d = root / "media"
    (d / "sub").mkdir(parents=True)
    outside = root / "outside"
    outside.mkdir()
    files = {
        "clip": write_test_video(d / "clip.mp4", num_frames=48),
        "nested": write_test_video(d / "sub" / "nested.mp4", num_frames=20, size=(96, 96)),
        "upload": write_test_video(root / "upload.mp4", num_frames=36, size=(112, 80)),  # not in the media dir
        "secret": write_test_video(outside / "secret.mp4", num_frames=12),
    }
    Image.fromarray((np.random.default_rng(3).random((80, 120, 3)) * 255).astype(np.uint8)).save(d / "photo.png")
    files["photo"] = d / "photo.png"
    (d / "readme.txt").write_text("not media")
    (d / ".hidden.mp4").write_bytes(files["clip"].read_bytes())
    os.symlink(files["secret"], d / "escape.mp4")  # inside the media dir, pointing outside: not listed
    files["bad"] = root / "bad.mp4"
    files["bad"].write_text("this is a text file, not a video")
    return d, files


@pytest.fixture(scope="module")
def open_server(tiny_export, media):
    with running_server(tiny_export, "--media-dir", str(media[0]), "--frames", "8") as s:
        yield s


@pytest.fixture(scope="module")
def keyed_server(tiny_export, media):
    with running_server(tiny_export, "--media-dir", str(media[0]), "--api-key", KEY, "--frames", "8", "--max-upload-mb", "1") as s:
        yield s


@pytest.fixture(scope="module")
def pipe(tiny_export):
    return Pipeline.from_export(tiny_export, provider="cpu")


def data_url(path: Path, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def chat(server, url: str, question: str, kind: str = "video_url", key: str | None = KEY, **fields) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": question}]}],
            "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    _, _, raw = server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    body["model"] = json.loads(raw)["data"][0]["id"]
    status, headers, raw = server.request("POST", "/v1/chat/completions", body, headers={"Authorization": f"Bearer {key}"} if key else {})
    if headers.get("content-type", "").startswith("text/event-stream"):
        return status, {"events": [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: {")]}
    return status, json.loads(raw)


# ---- the page's files and routes ---------------------------------------------------------------------------------
def test_page_files_are_package_data():
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ppllava_edge"]
    files = sorted(p.relative_to(STATIC.parents[1]).as_posix() for p in STATIC.rglob("*") if p.is_file())
    assert {"serve/static/index.html", "serve/static/app.js", "serve/static/style.css"} <= set(files)
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []
    page = (STATIC / "index.html").read_text() + (STATIC / "app.js").read_text() + (STATIC / "style.css").read_text()
    assert "http://" not in page and "https://" not in page and "//cdn" not in page  # nothing loaded from elsewhere


def test_index_and_static_need_no_key_and_send_a_strict_csp(keyed_server):
    status, headers, body = keyed_server.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in headers["content-security-policy"] and "connect-src 'self'" in headers["content-security-policy"]
    assert b'src="static/app.js"' in body
    for name, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        status, headers, body = keyed_server.request("GET", f"/static/{name}")
        assert status == 200 and ctype in headers["content-type"] and body == (STATIC / name).read_bytes()
    status, _, body = keyed_server.request("GET", "/static/../app.py")
    assert status == 404


def test_media_listing_is_authenticated_and_stays_inside_the_media_dirs(keyed_server, open_server):
    status, headers, body = keyed_server.request("GET", "/v1/media")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
    status, _, body = keyed_server.request("GET", "/v1/media", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200
    listing = json.loads(body)
    assert [(e["name"], e["kind"]) for e in listing["data"]] == [("clip.mp4", "video"), ("photo.png", "image"), ("sub/nested.mp4", "video")]
    assert listing["limits"] == {"frames": {"default": 8, "min": 2, "max": 16}, "max_tokens": 256, "max_upload_bytes": 1 << 20}
    assert listing["truncated"] is False
    # every listed name is accepted as is by the chat endpoint
    status, answer = chat(keyed_server, "sub/nested.mp4", Q1)
    assert status == 200, answer
    status, _, body = open_server.request("GET", "/v1/media")  # no --api-key: no key needed
    assert status == 200 and len(json.loads(body)["data"]) == 3


# ---- return_relevance ---------------------------------------------------------------------------------------------
def test_relevance_field_equals_the_pipelines_relevance(keyed_server, pipe, media):
    _, files = media
    want = pipe.ask(files["clip"], Q1, num_frames=8, generation=GenerationConfig(max_new_tokens=MAX_TOKENS), keep_arrays=True)
    status, r = chat(keyed_server, "clip.mp4", Q1, return_relevance=True)
    assert status == 200, r
    rel = r["relevance"]
    assert rel["kind"] == "video" and rel["shape"] == list(want.arrays["relevance"].shape) and rel["shape"][0] == 8
    np.testing.assert_allclose(np.array(rel["values"]), want.arrays["relevance"], rtol=1e-5, atol=1e-12)
    assert rel["max"] == pytest.approx(float(want.arrays["relevance"].max()), rel=1e-5)
    assert len(rel["thumbnails"]) == 8 and all(t.startswith("data:image/jpeg;base64,") for t in rel["thumbnails"])
    assert r["choices"][0]["message"]["content"] == want.text

    status, s = chat(keyed_server, "clip.mp4", Q1, return_relevance=True, stream=True)  # a cache hit now
    final = [e for e in s["events"] if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert status == 200 and len(final) == 1 and final[0]["timings"]["cache_hit"]
    np.testing.assert_allclose(np.array(final[0]["relevance"]["values"]), want.arrays["relevance"], rtol=1e-5, atol=1e-12)

    status, plain = chat(keyed_server, "clip.mp4", Q1)
    assert status == 200 and "relevance" not in plain


def test_relevance_of_an_image_is_over_its_tiles(keyed_server, pipe, media):
    _, files = media
    want = pipe.ask(files["photo"], Q1, generation=GenerationConfig(max_new_tokens=MAX_TOKENS), keep_arrays=True)
    status, r = chat(keyed_server, "photo.png", Q1, kind="image_url", return_relevance=True)
    assert status == 200, r
    tiles = want.arrays["pixel_values"].shape[0]
    assert r["relevance"]["kind"] == "image" and r["relevance"]["shape"][0] == tiles > 1 and len(r["relevance"]["thumbnails"]) == tiles
    np.testing.assert_allclose(np.array(r["relevance"]["values"]), want.arrays["relevance"], rtol=1e-5, atol=1e-12)


def test_relevance_field_must_be_a_boolean(keyed_server):
    status, r = chat(keyed_server, "clip.mp4", Q1, return_relevance="yes")
    assert status == 400 and r["error"]["param"] == "return_relevance" and "true or false" in r["error"]["message"]


# ---- the page in a real browser -----------------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture
def browser():
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed for the chat-page test: run `bash tools/install-browser.sh` as root "
                    "(apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,820", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # Debian's driver: no Selenium Manager download
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout=60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def _last_answer(driver):
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: (d.find_elements(By.CSS_SELECTOR, "li.answer") or [None])[-1] is not None
          and d.find_elements(By.CSS_SELECTOR, "li.answer")[-1].get_attribute("data-state") in ("done", "error"))
    return driver.find_elements(By.CSS_SELECTOR, "li.answer")[-1]


def _ask(driver, question):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(driver.find_elements(By.CSS_SELECTOR, "li.answer"))
    driver.find_element(By.ID, "question").send_keys(question, Keys.ENTER)  # Enter sends
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.answer")) == before + 1)
    return _last_answer(driver)


def _text(driver, li) -> str:
    """The answer bubble's exact text (textContent: no whitespace folding)."""
    from selenium.webdriver.common.by import By

    return driver.execute_script("return arguments[0].textContent", li.find_element(By.CSS_SELECTOR, ".bubble"))


def _type(driver, element_id, value):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    el = driver.find_element(By.ID, element_id)
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(str(value))


def _script_errors(driver, allowed_network=()):
    """Console entries that are not the expected failed requests (the page logs nothing itself)."""
    bad = []
    for entry in driver.get_log("browser"):
        if entry["source"] == "network" and any(a in entry["message"] for a in allowed_network):
            continue
        if entry["level"] in ("SEVERE", "WARNING"):
            bad.append(entry)
    return bad


def test_chat_page_in_headless_chromium(open_server, browser, media, tiny_export, pipe, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from ppllava_edge.cli.main import cli

    _, files = media
    d = browser
    d.get(open_server.url + "/")
    _wait(d, lambda d: d.find_element(By.ID, "status").text.startswith("ready"), 30)
    assert d.find_element(By.ID, "key-form").get_attribute("hidden") is not None  # loopback, no key: nothing to type
    assert d.find_element(By.ID, "media-select").get_attribute("data-count") == "3"
    _type(d, "max-tokens", MAX_TOKENS)
    d.find_element(By.ID, "upload").send_keys(str(files["upload"]))
    _wait(d, lambda d: "upload.mp4 (upload)" in d.find_element(By.ID, "media-current").text)

    # question 1: streamed token by token, equal to `ppllava-edge ask`; one relevance cell per sampled frame
    a1 = _ask(d, Q1)
    res = CliRunner().invoke(cli, ["ask", str(tiny_export), str(files["upload"]), Q1, "--frames", "8", "--max-new-tokens", str(MAX_TOKENS), "--json"])
    assert res.exit_code == 0, res.output
    want1 = json.loads(res.stdout.strip().splitlines()[-1])
    assert a1.get_attribute("data-state") == "done", a1.text
    assert _text(d, a1) == want1["text"]
    assert int(a1.get_attribute("data-chunks")) > 1  # arrived in pieces, not as one block
    strip = a1.find_element(By.CSS_SELECTOR, ".relevance")
    assert strip.get_attribute("data-cells") == "8" and len(strip.find_elements(By.CSS_SELECTOR, "figure canvas")) == 8
    assert len(strip.find_elements(By.CSS_SELECTOR, "figure img")) == 8
    meta = a1.find_element(By.CSS_SELECTOR, ".meta")
    assert meta.get_attribute("data-cache-hit") == "false" and "vision" in meta.text and "prefill" in meta.text

    # question 2: a follow-up (the first turn as history), features from the cache
    a2 = _ask(d, Q2)
    want2 = pipe.ask(files["upload"], Q2, num_frames=8, generation=GenerationConfig(max_new_tokens=MAX_TOKENS), history=[(Q1, want1["text"])])
    assert a2.get_attribute("data-state") == "done", a2.text
    assert _text(d, a2) == want2.text
    assert a2.find_element(By.CSS_SELECTOR, ".meta").get_attribute("data-cache-hit") == "true"
    assert "feature cache hit" in a2.find_element(By.CSS_SELECTOR, ".meta").text
    assert a2.find_element(By.CSS_SELECTOR, ".relevance").get_attribute("data-cells") == "8"
    d.save_screenshot(str(tmp_path / "chat.png"))

    # a bad upload: the page shows the server's own message
    d.find_element(By.ID, "upload").send_keys(str(files["bad"]))
    _wait(d, lambda d: "bad.mp4 (upload)" in d.find_element(By.ID, "media-current").text)
    err = _ask(d, Q1)
    status, body = chat(open_server, data_url(files["bad"]), Q1, key=None)
    assert status == 400
    assert err.get_attribute("data-state") == "error" and _text(d, err) == body["error"]["message"]
    assert "the uploaded video" in err.text
    d.save_screenshot(str(tmp_path / "bad-upload.png"))

    # an image from the media list, chosen with the keyboard: one cell per anyres tile
    sel = d.find_element(By.ID, "media-select")
    sel.send_keys(Keys.DOWN, Keys.DOWN)  # "— choose —" -> clip.mp4 -> photo.png
    _wait(d, lambda d: "photo.png" in d.find_element(By.ID, "media-current").text)
    a3 = _ask(d, Q1)
    tiles = pipe.ask(files["photo"], Q1, generation=GenerationConfig(max_new_tokens=2), keep_arrays=True).arrays["relevance"].shape[0]
    assert a3.get_attribute("data-state") == "done", a3.text
    assert a3.find_element(By.CSS_SELECTOR, ".relevance").get_attribute("data-cells") == str(tiles)
    assert "tile 1" in a3.text
    d.save_screenshot(str(tmp_path / "image.png"))

    assert _script_errors(d, allowed_network=("/v1/chat/completions - Failed to load resource: the server responded with a status of 400",)) == []


def test_api_key_typed_once_in_the_page(keyed_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(keyed_server.url + "/")
    _wait(d, lambda d: d.find_element(By.ID, "key-form").get_attribute("hidden") is None, 30)
    assert "Incorrect or missing API key" in d.find_element(By.ID, "status").text  # the server's 401 message
    assert d.switch_to.active_element == d.find_element(By.ID, "api-key")
    d.find_element(By.ID, "api-key").send_keys("wrong", Keys.ENTER)
    _wait(d, lambda d: d.find_element(By.ID, "status").text.startswith("Incorrect"))
    _type(d, "api-key", KEY)
    d.find_element(By.ID, "api-key").send_keys(Keys.ENTER)
    _wait(d, lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    assert d.execute_script("return sessionStorage.getItem('ppllava-api-key')") == KEY
    assert d.execute_script("return localStorage.length") == 0 and "page-key" not in d.execute_script("return document.cookie")
    d.refresh()  # the same tab: not asked again
    _wait(d, lambda d: d.find_element(By.ID, "status").text.startswith("ready"), 30)
    d.find_element(By.ID, "media-select").send_keys(Keys.DOWN)  # clip.mp4
    _type(d, "max-tokens", 4)
    answer = _ask(d, Q1)
    assert answer.get_attribute("data-state") == "done", answer.text
    d.save_screenshot(str(tmp_path / "keyed.png"))
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(1536 * 1024))  # over --max-upload-mb 1: refused before it is read or sent
    d.find_element(By.ID, "upload").send_keys(str(big))
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "li.answer")[-1].get_attribute("data-state") == "error")
    assert _text(d, d.find_elements(By.CSS_SELECTOR, "li.answer")[-1]) == "big.mp4: the upload is 1.5 MiB, over this server's limit of 1 MiB (--max-upload-mb)"
    assert "No media chosen" in d.find_element(By.ID, "media-current").text
    assert _script_errors(d, allowed_network=("/v1/media - Failed to load resource: the server responded with a status of 401",)) == []
