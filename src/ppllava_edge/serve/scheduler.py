"""The server's state and scheduling: options, one shared, thread-safe Pipeline (loaded in the background),
admission and the worker threads that answer admitted requests.

Requests are answered by `workers` threads over one Pipeline (a decoder each, the feature cache shared); at most
`workers + max_queue` requests are admitted at once, the next get 503 with Retry-After. A job carries its events
(tokens, the answer or an error) from its worker thread to the event loop, and a cancel flag the other way.
"""

from __future__ import annotations

import asyncio
import logging
import math
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import ContextLengthError, InputError, PPLLaVAEdgeError
from .inputs import MediaFile, MediaPolicy
from .metrics import Metrics
from .page import relevance_extra
from .protocol import DEFAULT_MAX_IMAGES, ApiError, ChatRequest, StreamText

log = logging.getLogger(__name__)

JSON_OVERHEAD_BYTES = 1 << 20  # request body allowance on top of the base64-encoded upload limit


@dataclass
class ServeOptions:
    export: Path
    host: str = "127.0.0.1"
    port: int = 8000
    media_dirs: tuple[Path, ...] = ()
    api_key: str | None = None
    max_upload_mb: float = 64.0  # one upload; the uploads of one request share the body limit (max_body_bytes)
    max_images: int = DEFAULT_MAX_IMAGES  # image_url parts per request (several images: one question about all)
    frames: int = 8
    max_queue: int = 8
    workers: int = 1
    decoders: int | None = None  # KV-cache decoders in the pipeline's pool (None: one per worker)
    cache_dir: Path | None = None
    provider: str = "auto"
    threads: int | None = None
    model_name: str | None = None
    max_tokens: int = 256  # max_tokens of a request that gives none
    read_timeout: float = 30.0  # seconds for a request's headers, and between two pieces of its body
    body_timeout: float = 300.0  # seconds for a whole request body

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_body_bytes(self) -> int:
        return math.ceil(self.max_upload_bytes * 4 / 3) + JSON_OVERHEAD_BYTES


class Job:
    """One admitted request, shared by the event loop and its worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.admitted = time.perf_counter()

    def emit(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening
            self.cancel.set()


class Server:
    """The app's state: options, the pipeline (loaded in the background), admission counters, metrics."""

    def __init__(self, opts: ServeOptions, pipeline=None):
        self.opts = opts
        self.model_id = opts.model_name or Path(opts.export).name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.pipe = pipeline
        self.load_error: BaseException | None = None
        self.on_load_error = None  # set by the runner: stops the server when the model cannot be loaded
        self._tmp = tempfile.TemporaryDirectory(prefix="ppllava-serve-")
        self.policy = MediaPolicy(list(opts.media_dirs), opts.max_upload_bytes, Path(self._tmp.name))
        self._uploads = self.policy.upload_names()
        self.executor = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="ppllava-worker")
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self._jobs: set[Job] = set()
        self._mean_e2e: float | None = None
        if pipeline is not None:
            self.metrics.ready.set(1)

    # ---- lifecycle -------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the pipeline (runs on a background thread at start-up)."""
        from ..runtime.pipeline import Pipeline, PipelineOptions

        try:
            t0 = time.perf_counter()
            options = PipelineOptions(provider=self.opts.provider, threads=self.opts.threads, cache_dir=self.opts.cache_dir,
                                      max_decoders=self.opts.decoders or self.opts.workers)
            self.pipe = Pipeline.from_export(self.opts.export, options)
            self.metrics.ready.set(1)
            log.info("model %s loaded in %.1f s (provider %s)", self.model_id, time.perf_counter() - t0, self.pipe.provider)
        except BaseException as exc:  # reported by /ready and by the serve command
            self.load_error = exc
            log.error("cannot load %s: %s", self.opts.export, exc)
            if self.on_load_error is not None:
                self.on_load_error(exc)

    def close(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.pipe is not None:
            self.pipe.close()
        self._tmp.cleanup()

    # ---- admission -------------------------------------------------------------------------------------------
    def _retry_after(self) -> int:
        per = self._mean_e2e or 1.0
        return int(min(60, max(1, math.ceil(per * (self.waiting + 1) / self.opts.workers))))

    def admit(self, job: Job) -> None:
        with self._lock:
            if self.waiting + self.running >= self.opts.workers + self.opts.max_queue:
                raise ApiError(
                    503, f"The server is busy: {self.running} requests running and {self.waiting} queued "
                         f"(--max-queue {self.opts.max_queue}); retry later", None, "server_busy",
                    headers={"Retry-After": str(self._retry_after())},
                )
            self.waiting += 1
            self._jobs.add(job)
            self.metrics.queue_depth.set(self.waiting)

    def release(self, job: Job, started: bool) -> None:
        with self._lock:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1
            self._jobs.discard(job)
            self.metrics.queue_depth.set(self.waiting)
            self.metrics.running.set(self.running)

    # ---- the work (worker thread) ----------------------------------------------------------------------------
    def _generation(self, req: ChatRequest):
        max_tokens = req.max_tokens if req.max_tokens is not None else self.opts.max_tokens
        return self.pipe.generation_config(  # the export's EOS id
            max_new_tokens=max_tokens, do_sample=req.do_sample, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            seed=req.seed, ignore_eos=req.ignore_eos,
        )

    def run_job(self, job: Job, req: ChatRequest, media: list[MediaFile], frames: int) -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            self.metrics.queue_depth.set(self.waiting)
            self.metrics.running.set(self.running)
        started = time.perf_counter()
        first: list[float] = []
        try:
            if job.cancel.is_set():  # the client left while queued
                job.emit(("cancelled",))
                self.metrics.chat_requests.labels(outcome="cancelled").inc()
                return
            text = StreamText(self.pipe.llama.decode, req.stop)

            def on_token(token: int) -> bool:
                if not first:
                    first.append(time.perf_counter())
                if job.cancel.is_set():
                    return True
                delta, stop = text.feed(token)
                job.emit(("token", int(token), delta))
                return stop

            gen = self._generation(req)
            paths = [m.path for m in media]
            result = self.pipe.ask(paths[0] if len(paths) == 1 else paths, req.question, num_frames=frames, generation=gen, on_token=on_token,
                                   history=req.history, system=req.system, keep_arrays=req.return_relevance)
            extra = relevance_extra(result, paths, self.pipe.manifest.preprocess) if req.return_relevance else {}
        except BaseException as exc:
            job.emit(("error", self._map_error(exc, req, media)))
            self.metrics.chat_requests.labels(outcome="error").inc()
            return
        finally:
            for m in media:
                m.cleanup()
            self.release(job, started=True)
        end = time.perf_counter()
        if job.cancel.is_set():
            self.metrics.chat_requests.labels(outcome="cancelled").inc()
        else:
            self.metrics.chat_requests.labels(outcome="ok").inc()
        ttft = (first[0] if first else end) - job.admitted
        self.metrics.observe_answer(result.timings.as_dict(), started - job.admitted, ttft, end - job.admitted, result.context_len, len(result.ids))
        with self._lock:
            e2e = end - job.admitted
            self._mean_e2e = e2e if self._mean_e2e is None else 0.8 * self._mean_e2e + 0.2 * e2e
        finish = "stop" if (text.stopped or (result.ids and result.ids[-1] == gen.eos_token_id and gen.stops_at_eos)) else "length"
        warnings = [self._hide_paths(w, media) for w in result.warnings]
        job.emit(("done", result, text.text(), text.finish(), finish, warnings, extra))

    def _hide_paths(self, text: str, media: list[MediaFile]) -> str:
        """`text` naming this request's media by their labels, and no upload temp file of any request."""
        for m in media:
            text = text.replace(str(m.path), m.label)
        only = media[0] if len(media) == 1 and media[0].temporary else None
        return self._uploads.sub(only.label if only is not None else "an uploaded file", text)

    def _map_error(self, exc: BaseException, req: ChatRequest, media: list[MediaFile]) -> ApiError:
        msg = self._hide_paths(str(exc), media)
        if isinstance(exc, ContextLengthError):
            return ApiError(400, msg, "messages" if exc.prompt_too_long else "max_tokens", "context_length_exceeded")
        if isinstance(exc, InputError):  # VideoError included: the media could not be used
            named = [p.param for p, m in zip(req.media, media) if m.label in msg]  # the part the message names
            return ApiError(400, msg, (named or [req.media[0].param])[0], "invalid_media")
        if isinstance(exc, PPLLaVAEdgeError):
            log.error("request failed: %s", exc)
            return ApiError(500, f"inference failed: {msg}", None, "inference_error")
        log.exception("unexpected error while answering", exc_info=exc)
        return ApiError(500, f"internal error ({type(exc).__name__})", None, "internal_error")
