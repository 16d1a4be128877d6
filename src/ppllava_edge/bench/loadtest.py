"""Load test of a running `ppllava-edge serve` (or any OpenAI-compatible server taking video_url parts).

    opts = LoadTestOptions(url="http://127.0.0.1:8000", video=Path("clip.mp4"), concurrency=[1, 4], requests=20, stream=True)
    result = run_loadtest(opts, progress=lambda done, total, msg: ...)   # a JSON-ready dict

For each concurrency level N, N client threads (each with its own keep-alive connection) send `requests`
chat completions between them, as fast as answers come back: the video inline as a base64 data: URL (so the
server needs no media folder; the same video — or `--image` — every time, so after the warm-up its features come
from the server's cache), questions cycled from the bench's list, greedy decoding of exactly `max_new_tokens` tokens (`ignore_eos`).
Measured on the client: requests/s and completion tokens/s over the wall time of the level, end-to-end latency and
— with `stream` — time to first token (first content chunk) p50/p90/p99, and errors by kind. Warm-up requests
are sent first and not counted. Standard library only (http.client + threads): no extra dependency.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import InputError
from .plan import QUESTIONS
from .runner import _environment, _video
from .stats import summarize

ProgressFn = Callable[[int, int, str], None]
STATS = ("p50", "p90", "p99")


@dataclass
class LoadTestOptions:
    url: str
    video: Path | None = None
    image: tuple[Path, ...] = ()  # ask about this image (an image_url part) instead of a video; several: one part each
    synthetic: bool = False
    workdir: Path | None = None  # where the synthetic video goes (default: a temporary folder)
    concurrency: list[int] = field(default_factory=lambda: [1])
    requests: int = 20
    warmup: int = 1
    stream: bool = False
    max_new_tokens: int = 32
    frames: int | None = None  # None: the server's --frames
    questions: int = len(QUESTIONS)
    api_key: str | None = None
    model: str | None = None  # None: the first id of GET /v1/models
    timeout: float = 600.0
    command: str | None = None


@dataclass
class _Sample:
    ok: bool
    e2e_ms: float
    ttft_ms: float | None = None
    completion_tokens: int = 0
    cache_hit: bool | None = None
    error: str | None = None


class _Client:
    """One keep-alive connection to the server (one per client thread)."""

    def __init__(self, url: str, api_key: str | None, timeout: float):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"--server {url!r}: expected http://HOST:PORT")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.conn: http.client.HTTPConnection | None = None

    def _connect(self) -> http.client.HTTPConnection:
        if self.conn is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self.conn = cls(self.host, self.port, timeout=self.timeout)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def get_json(self, path: str) -> dict:
        conn = self._connect()
        try:
            conn.request("GET", self.base + path, headers=self.headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise InputError(f"cannot reach {self.scheme}://{self.host}:{self.port}{self.base}{path}: {exc}") from exc
        if resp.status != 200:
            raise InputError(f"GET {path}: HTTP {resp.status}: {body[:300].decode(errors='replace')}")
        return json.loads(body)

    def chat(self, payload: bytes, stream: bool) -> _Sample:
        t0 = time.perf_counter()
        try:
            conn = self._connect()
            conn.request("POST", self.base + "/v1/chat/completions", body=payload, headers=self.headers)
            resp = conn.getresponse()
            if resp.status != 200:
                body = resp.read()
                try:
                    err = json.loads(body)["error"]
                    kind = f"HTTP {resp.status} {err.get('code') or err.get('type')}"
                except (ValueError, KeyError, TypeError):
                    kind = f"HTTP {resp.status}"
                return _Sample(False, (time.perf_counter() - t0) * 1e3, error=kind)
            if not stream:
                data = json.loads(resp.read())
                return _Sample(True, (time.perf_counter() - t0) * 1e3, completion_tokens=int(data["usage"]["completion_tokens"]),
                               cache_hit=(data.get("timings") or {}).get("cache_hit"))
            ttft = None
            tokens = 0
            cache_hit = None
            while True:
                line = resp.readline()
                if not line:
                    return _Sample(False, (time.perf_counter() - t0) * 1e3, ttft, error="stream ended before [DONE]")
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    resp.read()  # the end of the chunked body: the connection is then free for the next request
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    resp.read()
                    return _Sample(False, (time.perf_counter() - t0) * 1e3, ttft, error=f"stream error {chunk['error'].get('code')}")
                for choice in chunk.get("choices") or []:
                    if ttft is None and (choice.get("delta") or {}).get("content"):
                        ttft = (time.perf_counter() - t0) * 1e3
                    if "timings" in chunk:
                        cache_hit = chunk["timings"].get("cache_hit")
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
            return _Sample(True, (time.perf_counter() - t0) * 1e3, ttft, tokens, cache_hit)
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            self.close()
            return _Sample(False, (time.perf_counter() - t0) * 1e3, error=type(exc).__name__)


MIME = {".mp4": "video/mp4", ".mkv": "video/x-matroska", ".webm": "video/webm", ".avi": "video/x-msvideo", ".mov": "video/quicktime",
        ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff",
        ".tiff": "image/tiff"}


def _payloads(opts: LoadTestOptions, model: str, media: Path | list[Path]) -> list[bytes]:
    kind = "image_url" if opts.image else "video_url"
    parts = []
    for path in media if isinstance(media, list) else [media]:  # several --image: one image_url part each, in order
        mime = MIME.get(path.suffix.lower(), "image/png" if opts.image else "video/mp4")
        parts.append({"type": kind, kind: {"url": f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()}})
    out = []
    for q in QUESTIONS[: max(1, opts.questions)]:
        body = {
            "model": model, "max_tokens": opts.max_new_tokens, "temperature": 0, "ignore_eos": True, "stream": opts.stream,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": q}]}],
        }
        if opts.stream:
            body["stream_options"] = {"include_usage": True}
        if opts.frames is not None:
            body["frames"] = opts.frames
        out.append(json.dumps(body).encode())
    return out


def _level(opts: LoadTestOptions, payloads: list[bytes], concurrency: int, on_done: Callable[[], None]) -> dict:
    samples: list[_Sample] = []
    lock = threading.Lock()
    next_index = [0]

    def worker() -> None:
        client = _Client(opts.url, opts.api_key, opts.timeout)
        try:
            while True:
                with lock:
                    i = next_index[0]
                    if i >= opts.requests:
                        return
                    next_index[0] += 1
                s = client.chat(payloads[i % len(payloads)], opts.stream)
                with lock:
                    samples.append(s)
                on_done()
        finally:
            client.close()

    threads = [threading.Thread(target=worker, name=f"loadtest-{k}", daemon=True) for k in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in ok)
    return {
        "concurrency": concurrency, "requests": len(samples), "ok": len(ok), "errors": len(samples) - len(ok),
        "error_kinds": dict(Counter(s.error for s in samples if not s.ok)), "wall_s": wall,
        "requests_per_s": len(ok) / wall if wall > 0 else None, "tokens_per_s": tokens / wall if wall > 0 else None,
        "completion_tokens": tokens, "cache_hits": sum(1 for s in ok if s.cache_hit),
        "e2e_ms": summarize([s.e2e_ms for s in ok]),
        "ttft_ms": summarize([s.ttft_ms for s in ok if s.ttft_ms is not None]),
    }


def run_loadtest(opts: LoadTestOptions, progress: ProgressFn | None = None) -> dict:
    if opts.requests < 1:
        raise InputError(f"--requests must be >= 1, got {opts.requests}")
    if not opts.concurrency or any(c < 1 for c in opts.concurrency):
        raise InputError(f"--concurrency must list integers >= 1, got {opts.concurrency}")
    if opts.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {opts.warmup}")
    probe = _Client(opts.url, opts.api_key, opts.timeout)
    try:
        models = probe.get_json("/v1/models")
        model = opts.model or models["data"][0]["id"]
    finally:
        probe.close()
    for image in opts.image:
        if not Path(image).is_file():
            raise InputError(f"--image {image}: no such file")
    tmp: list = []
    try:
        video, video_info = _video(opts, [opts.frames or 8], tmp)  # the bench's rule: --image, --video or a synthetic clip
        payloads = _payloads(opts, model, video)
    finally:
        for td in tmp:
            td.cleanup()
    total = opts.warmup + opts.requests * len(opts.concurrency)
    done = [0]
    lock = threading.Lock()

    def tick(msg: str) -> None:
        with lock:
            done[0] += 1
            n = done[0]
        if progress is not None:
            progress(n, total, msg)

    warm = _Client(opts.url, opts.api_key, opts.timeout)
    try:
        for i in range(opts.warmup):
            s = warm.chat(payloads[i % len(payloads)], opts.stream)
            if not s.ok:
                raise InputError(f"warm-up request failed: {s.error}")
            tick(f"warm-up {i + 1}/{opts.warmup}")
    finally:
        warm.close()
    env = _environment("server", None)
    env["load_average_end"] = None
    runs = []
    for c in opts.concurrency:
        runs.append(_level(opts, payloads, c, lambda c=c: tick(f"concurrency {c}")))
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "schema": "ppllava-edge-loadtest/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "environment": env,
        "config": {
            "url": opts.url, "model": model, "video": video_info, "requests": opts.requests, "warmup": opts.warmup, "stream": opts.stream,
            "max_new_tokens": opts.max_new_tokens, "frames": opts.frames, "questions": len(payloads), "ignore_eos": True,
        },
        "runs": runs,
        "failed": sum(r["errors"] for r in runs),
    }


# ---- output -----------------------------------------------------------------------------------------------------
def _stat(stats: dict, key: str) -> str:
    v = stats.get(key)
    return "-" if v is None else f"{v:.0f}"


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "| concurrency | requests | ok | errors | req/s | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | e2e p50 ms | e2e p90 ms | e2e p99 ms | tok/s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["runs"]:
        rate = "-" if r["requests_per_s"] is None else f"{r['requests_per_s']:.2f}"
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.1f}"
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['ok']} | {r['errors']} | {rate} | "
            + " | ".join(_stat(r["ttft_ms"], k) for k in STATS) + " | " + " | ".join(_stat(r["e2e_ms"], k) for k in STATS) + f" | {tps} |"
        )
    env = result["environment"]
    load = env.get("load_average") or []
    lines.append("")
    lines.append(
        f"- {result['created']} | server {cfg['url']} model {cfg['model']} | {cfg['max_new_tokens']} tokens per request (EOS ignored), "
        f"frames {cfg['frames'] or 'server default'}, {'streamed' if cfg['stream'] else 'not streamed (TTFT needs --stream)'} | "
        f"{cfg['warmup']} warm-up request(s) not counted | load average {' '.join(f'{x:.2f}' for x in load[:3])} at start"
    )
    for r in result["runs"]:
        if r["error_kinds"]:
            lines.append(f"- concurrency {r['concurrency']}: errors " + ", ".join(f"{k} x{v}" for k, v in r["error_kinds"].items()))
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("concurrency", "requests", "ok", "errors", "wall_s", "requests_per_s", "tokens_per_s", "completion_tokens", "cache_hits")
CSV_STATS = ("min", "mean", "p50", "p90", "p95", "p99", "max")


def csv_header() -> list[str]:
    return [*CSV_FIELDS, *(f"{m}_{k}_ms" for m in ("ttft", "e2e") for k in CSV_STATS), "stream", "max_new_tokens", "model", "created", "error_kinds"]


def csv_rows(result: dict) -> list[dict]:
    cfg = result["config"]
    rows = []
    for r in result["runs"]:
        row = {k: r.get(k) for k in CSV_FIELDS}
        for m in ("ttft", "e2e"):
            for k in CSV_STATS:
                row[f"{m}_{k}_ms"] = r[f"{m}_ms"].get(k)
        row.update(stream=cfg["stream"], max_new_tokens=cfg["max_new_tokens"], model=cfg["model"], created=result["created"],
                   error_kinds=json.dumps(r["error_kinds"]) if r["error_kinds"] else "")
        rows.append(row)
    return rows
