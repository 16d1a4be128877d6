#!/usr/bin/env python
"""Issue 22's server acceptance run: starts a real `ppllava-edge serve EXPORT --workers 1 --max-queue 2` on a free
loopback port and prints what hostile requests cost it (peak RSS growth from /proc/PID/status VmHWM, reset through
/proc/PID/clear_refs, which needs root or the same user) and what each gets back; the server is always stopped.

    python tools/serve_limits.py EXPORT [--big-video CLIP] [--upload-mb 64]

EXPORT: any export (the tiny test one is enough: the limits are the server's, not the model's). --big-video: e.g. an
8192x8192 MJPEG clip, uploaded as is. Prints the load average beside the numbers; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ppllava_edge.media import write_test_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--big-video", type=Path, default=None)
    ap.add_argument("--upload-mb", type=float, default=64.0, help="--max-upload-mb of the server; uploads are just under it")
    args = ap.parse_args()
    media = Path(tempfile.mkdtemp(prefix="serve-limits-"))
    clip = write_test_video(media / "clip.mp4", num_frames=48).read_bytes()
    exe = shutil.which("ppllava-edge", path=os.path.dirname(sys.executable)) or shutil.which("ppllava-edge") or sys.exit("ppllava-edge is not installed")
    proc = subprocess.Popen([exe, "serve", str(args.export), "--port", "0", "--workers", "1", "--max-queue", "2", "--media-dir", str(media),
                             "--max-upload-mb", str(args.upload_mb)], stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        run(proc, lines, args, media, clip)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(media, ignore_errors=True)


def run(proc: subprocess.Popen, lines: list[str], args, media: Path, clip: bytes) -> None:
    deadline = time.monotonic() + 120
    while not re.search(r"listening on http://([^:]+):(\d+)", "".join(lines)):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("the server did not start:\n" + "".join(lines))
        time.sleep(0.1)
    host, port = re.search(r"listening on http://([^:]+):(\d+)", "".join(lines)).groups()

    def post(body, timeout: float = 300.0) -> tuple[int | None, bytes, float]:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body if isinstance(body, bytes) else json.dumps(body).encode(),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read(), time.perf_counter() - t0
        except OSError as exc:
            return None, repr(exc).encode(), time.perf_counter() - t0
        finally:
            conn.close()

    while True:
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("the server never became ready:\n" + "".join(lines))
        time.sleep(0.2)
    model = args.export.name

    def chat(url: str, question: str = "What is happening?", **kw) -> dict:
        content = [{"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": question}]
        return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **kw}

    def mb(key: str) -> int:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        return int(status[key].split()[0]) // 1024

    def reset_peak() -> int:
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
        return mb("VmRSS")

    def load() -> str:
        return f"load average {os.getloadavg()[0]:.1f}"

    def shown(raw: bytes) -> str:
        try:
            data = json.loads(raw)
        except ValueError:
            return repr(raw[:120])
        if "error" in data:
            return f"{data['error']['code']}: {data['error']['message'][:150]!r}"
        return f"answer {data['choices'][0]['message']['content'][:30]!r}, warnings {data.get('warnings')}"

    print(f"warm-up: {post(chat('clip.mp4'))[0]}")
    limit = int(args.upload_mb * 2**20)
    payload = clip + os.urandom(limit - len(clip) - 4096)  # FFmpeg ignores bytes after a complete mp4
    bodies = [json.dumps(chat("data:video/mp4;base64," + base64.b64encode(payload).decode(), f"Question {i}?")).encode() for i in range(8)]
    base = reset_peak()
    with ThreadPoolExecutor(8) as ex:
        res = list(ex.map(post, bodies))
    print(f"8 concurrent uploads of {len(payload) / 2**20:.2f} MiB ({len(bodies[0]) / 2**20:.1f} MiB bodies): statuses "
          f"{[r[0] for r in res]}, seconds {[round(r[2], 1) for r in res]}; peak RSS {mb('VmHWM')} MB, +{mb('VmHWM') - base} MB ({load()})")
    del bodies
    if args.big_video is not None:
        data = args.big_video.read_bytes()
        base = reset_peak()
        status, raw, took = post(chat("data:video/x-msvideo;base64," + base64.b64encode(data).decode()))
        print(f"{args.big_video.name} ({len(data) / 2**20:.1f} MiB upload): {status} in {took:.2f} s, peak RSS +{mb('VmHWM') - base} MB; {shown(raw)} ({load()})")
    for n in (200_000, 1_000_000):
        status, raw, took = post(chat("clip.mp4", stop=[c * n for c in "abcd"], max_tokens=32))
        print(f"4 stop strings of {n:,} characters: {status} in {took:.2f} s ({load()})")
    with open(media / "forged.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 84, 84)})
        f.write(b"\0" * 64)
    context = json.loads(post(chat("clip.mp4", max_tokens=1))[1])["usage"]["prompt_tokens"]
    frames = 16
    size = json.loads(Path(args.export, "export.json").read_text())["model"]["image_size"]
    np.save(media / "many.npy", np.zeros((frames, 3, size, size), np.float32))
    positions = json.loads(Path(args.export, "export.json").read_text())["model"]["max_position_embeddings"]
    cases = {
        f"5  a {frames}-frame .npy, max_tokens fitting 8 frames": chat("many.npy", max_tokens=positions - context),
        "6  temperature 1e-40": chat("clip.mp4", temperature=1e-40),
        "7  JSON nested 100k deep": b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "7  a path longer than the filesystem allows": chat(f"file://{media}/{'a' * 5000}.mp4"),
        "7  a lone surrogate": json.dumps(chat("clip.mp4", "QQ")).replace("QQ", "x \\ud800").encode(),
        "7  a .npy header of 10^12 frames": chat("forged.npy"),
        "9  context + max_tokens = limit + 1 (exactly the limit's positions)": chat("clip.mp4", max_tokens=positions - context + 1, stream=True),
        "9  context + max_tokens = limit + 2": chat("clip.mp4", max_tokens=positions - context + 2),
    }
    for name, body in cases.items():
        if isinstance(body, dict) and body.get("stream"):  # the first chunk shows it was admitted; then leave
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            print(f"{name}: {resp.status} {resp.readline()[:60]!r}")
            conn.sock.close()
            conn.close()
            continue
        status, raw, _ = post(body)
        print(f"{name}: {status} {shown(raw)}")
    time.sleep(1)
    status, raw, _ = post(chat("clip.mp4"))
    print(f"afterwards: {status} {shown(raw)}; server log: {sum('Traceback' in line for line in lines)} tracebacks")


if __name__ == "__main__":
    main()
