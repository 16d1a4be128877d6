"""Closed-loop load test of a running Triton `ppllava` model over gRPC streaming (`ppllava-edge triton-bench`).

    result = run_load(LoadOptions(url="127.0.0.1:8001", video=Path("clip.mp4"), concurrency=[1, 2, 4], requests=8))
    print(load_markdown(result))

For each concurrency level N, N client threads send `requests` questions between them (cycled from the bench's
question list, the same video bytes every time), each as soon as its previous answer ended. Measured on the client:
requests/s and generated tokens/s over the level's wall time, end-to-end latency and time to the first text delta
(p50 / p90); from each answer's stats: the runtime's own time in the server (`runtime`: the rest of e2e is
queueing, Triton and the network) and how many answers hit the instance's feature cache. Warm-up requests (untimed) go
first. perf_analyzer does this for Triton in general, but the `perf-analyzer` wheel needs glibc 2.38; this is the
same closed loop, standard library threads over `ask_triton`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..bench.plan import QUESTIONS
from ..bench.stats import summarize
from ..errors import InferenceError, InputError
from .client import ask_triton


@dataclass
class LoadOptions:
    url: str
    video: Path
    concurrency: list[int] = field(default_factory=lambda: [1])
    requests: int = 8  # timed requests per level
    warmup: int = 1  # untimed requests before the first level
    frames: int | None = None  # None: the repository's default
    max_tokens: int | None = None  # None: the repository's default
    timeout: float = 600.0

    def check(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1:
            raise InputError(f"--concurrency {self.concurrency}: every level must be >= 1")
        if self.requests < 1 or self.warmup < 0:
            raise InputError("--requests must be >= 1 and --warmup >= 0")


def run_load(opts: LoadOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Run every concurrency level; returns a JSON-ready dict (see `load_markdown`)."""
    opts.check()
    data = Path(opts.video).read_bytes()

    def ask(i: int):
        return ask_triton(opts.url, data, QUESTIONS[i % len(QUESTIONS)], frames=opts.frames, max_tokens=opts.max_tokens, timeout=opts.timeout)

    for i in range(opts.warmup):
        ask(i)
    levels = []
    for level in opts.concurrency:
        counter = itertools.count()
        samples: list[dict] = []
        lock = threading.Lock()

        def worker() -> None:
            while (i := next(counter)) < opts.requests:
                t0 = time.perf_counter()
                try:
                    a = ask(i)
                    s = {"ok": True, "e2e_ms": (time.perf_counter() - t0) * 1e3, "first_text_ms": a.first_text_ms, "tokens": len(a.ids),
                         "server": a.stats["timings_ms"], "cache_hit": bool(a.stats["timings_ms"].get("cache_hit")), "instance": a.stats["instance"]}
                except InferenceError as exc:
                    s = {"ok": False, "error": str(exc).splitlines()[0]}
                with lock:
                    samples.append(s)

        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(level)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        ok = [s for s in samples if s["ok"]]
        levels.append({
            "concurrency": level,
            "requests": len(samples),
            "errors": len(samples) - len(ok),
            "error_messages": sorted({s["error"] for s in samples if not s["ok"]}),
            "wall_s": wall,
            "requests_per_s": len(ok) / wall,
            "tokens_per_s": sum(s["tokens"] for s in ok) / wall,
            "e2e_ms": summarize([s["e2e_ms"] for s in ok]),
            "first_text_ms": summarize([s["first_text_ms"] for s in ok if s["first_text_ms"] is not None]),
            # the runtime's own time inside the server (the rest of e2e is queueing, Triton and the network)
            "server_ms": {k: summarize([s["server"][k] for s in ok]) for k in ("e2e", "vision", "pool", "prefill", "decode")},
            "cache_hits": sum(s["cache_hit"] for s in ok),
            "instances": sorted({s["instance"] for s in ok}),
            "load_average": [load_before, os.getloadavg()[0]],
        })
        if progress is not None:
            lv = levels[-1]
            progress(f"concurrency {level}: {lv['requests_per_s']:.3f} req/s, e2e p50 {lv['e2e_ms']['p50'] or 0:.0f} ms, {lv['errors']} errors")
    return {
        "url": opts.url,
        "video": str(opts.video),
        "frames": opts.frames,
        "max_tokens": opts.max_tokens,
        "requests_per_level": opts.requests,
        "warmup": opts.warmup,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "levels": levels,
    }


def load_markdown(result: dict) -> str:
    head = ("| concurrency | requests | errors | req/s | tok/s | e2e p50 ms | e2e p90 ms | first text p50 ms | first text p90 ms "
            "| runtime p50 ms | cache hits | instances used | load avg |")
    rows = [head, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]

    def ms(v) -> str:
        return "-" if v is None else f"{v:.0f}"

    for lv in result["levels"]:
        rows.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | {lv['requests_per_s']:.3f} | {lv['tokens_per_s']:.1f} | "
            f"{ms(lv['e2e_ms']['p50'])} | {ms(lv['e2e_ms']['p90'])} | {ms(lv['first_text_ms']['p50'])} | {ms(lv['first_text_ms']['p90'])} | "
            f"{ms(lv['server_ms']['e2e']['p50'])} | {lv['cache_hits']} | {len(lv['instances'])} | {lv['load_average'][0]:.1f} → {lv['load_average'][1]:.1f} |"
        )
    return "\n".join(rows)
