"""Prometheus metrics of the server (prometheus-client, one registry per app, text format on GET /metrics).

    ppllava_http_requests_total{path, status}      every HTTP request by route and status code
    ppllava_chat_requests_total{outcome}           chat completions: ok, error (4xx/5xx after admission), cancelled
    ppllava_stage_seconds{stage}                   per-stage latency of answered requests (histogram): queue, decode_video,
                                                   preprocess, vision, pool, prefill, decode, ttft, e2e
    ppllava_generated_tokens_total                 completion tokens
    ppllava_prompt_tokens_total                    prompt tokens (text + visual)
    ppllava_feature_cache_hits_total / _misses_total   per answered request: vision features from the cache or not
    ppllava_queue_depth                            requests admitted and waiting for a worker
    ppllava_requests_running                       requests being answered
    ppllava_ready                                  1 once the model is loaded
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from ..runtime.stages import TIMED_STAGES

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# The answer's timed stages (runtime/stages.py TIMED_STAGES, read from Timings.as_dict()) -> their `stage` label. The
# one renamed series, in this one place: "decode_step" is exported as "decode", the answer's decode steps summed
# (Timings.as_dict()'s "decode"), the label value since the server's first release, so dashboards keep working. The
# answer's own e2e is not exported: the server's e2e below also counts the queue.
ANSWER_LABELS = {stage: {"decode_step": "decode"}.get(stage, stage) for stage in TIMED_STAGES if stage != "e2e"}
BEFORE_ANSWER = ("queue",)  # server only: admitted, waiting for a worker
AFTER_ANSWER = ("ttft", "e2e")  # server only: admission to the first token, admission to the last
STAGES = (*BEFORE_ANSWER, *ANSWER_LABELS.values(), *AFTER_ANSWER)
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` series: they double the output and no dashboard reads them
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter("ppllava_http_requests", "HTTP requests by route and status code", ["path", "status"], registry=r)
        self.chat_requests = Counter("ppllava_chat_requests", "Chat completions by outcome", ["outcome"], registry=r)
        self.stage_seconds = Histogram("ppllava_stage_seconds", "Per-stage latency of answered requests", ["stage"], buckets=_BUCKETS, registry=r)
        self.generated_tokens = Counter("ppllava_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("ppllava_prompt_tokens", "Prompt tokens (text + visual) processed", registry=r)
        self.cache_hits = Counter("ppllava_feature_cache_hits", "Answered requests whose video features came from the cache", registry=r)
        self.cache_misses = Counter("ppllava_feature_cache_misses", "Answered requests that ran the vision graph", registry=r)
        self.queue_depth = Gauge("ppllava_queue_depth", "Requests admitted and waiting for a worker", registry=r)
        self.running = Gauge("ppllava_requests_running", "Requests being answered", registry=r)
        self.ready = Gauge("ppllava_ready", "1 once the model is loaded", registry=r)
        for stage in STAGES:  # every series exists from the start (a scraper sees zeros, not gaps)
            self.stage_seconds.labels(stage=stage)
        for outcome in ("ok", "error", "cancelled"):
            self.chat_requests.labels(outcome=outcome)

    def observe_answer(self, timings: dict, queue_s: float, ttft_s: float, e2e_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        """One answered request: `timings` is the pipeline's Timings.as_dict() (ms)."""
        seconds = dict(zip((*BEFORE_ANSWER, *AFTER_ANSWER), (queue_s, ttft_s, e2e_s)))
        for label in ANSWER_LABELS.values():  # Timings.as_dict() uses the label names ("decode": the steps summed)
            seconds[label] = timings[label] / 1e3
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage=stage).observe(value)
        self.generated_tokens.inc(completion_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        (self.cache_hits if timings["cache_hit"] else self.cache_misses).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
