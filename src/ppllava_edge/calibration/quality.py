"""Answer-quality measures of a quantized export against fp32, meaningful on a trained LLM (the accuracy gate's
`quality` rows; `gate.evaluate_accuracy` adds them).

On every held-out (video, question) pair of CALIB, through the whole pipeline (each export's own vision graph,
prompt_pool and decoder, so `--vision int8` counts too):

- the fp32 export reads the prompt and greedily answers `tokens` tokens; its next-token distribution p is kept at
  every **prefill position** (each text position after the visual tokens: the rest of the question and the template,
  fed one token at a time through the KV cache, which gives the same logits as a prefill of that prefix) and at every
  **decode step** of its answer;
- the quantized export Q is fed the same tokens (teacher forcing: its own visual tokens, then the prompt text and the
  fp32 answer) and its distribution q is compared with p at the same positions: **top-1 agreement**
  (argmax q = argmax p) and **mean KL(p || q)** in nats;
- **perplexity** of the fp32 answers under Q, exp(mean −log q(answer token)), against the fp32 export's own
  perplexity of them, as a relative change (+2 % = Q finds the fp32 answers 2 % less likely per token);
- Q also answers freely (greedy): **exact match** (share of pairs whose `tokens` ids equal fp32's) and the mean
  **common-prefix length** in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime.stages import encode, pool
from .readers import CalibrationSet


class VisionCache:
    """Vision outputs per (pipeline, video) so the end-to-end checks run each vision graph once per video."""

    def __init__(self, calib: CalibrationSet):
        self.calib = calib
        self.records = {r["video"]: r for r in calib.records("vision", "all")}
        self.out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, pipe, video: int) -> tuple[np.ndarray, np.ndarray]:
        key = (id(pipe), video)
        if key not in self.out:
            px = self.calib.load(self.records[video])["pixel_values"]
            values, keys = encode(pipe.sessions["vision"], px)
            self.out[key] = (values, keys)
        return self.out[key]


@dataclass
class PairTrace:
    """One pair's fp32 answer and the per-position log-probabilities of both exports."""

    ref_ids: list[int]
    q_ids: list[int]
    prefill_top1: list[bool]
    prefill_kl: list[float]
    decode_top1: list[bool]
    decode_kl: list[float]
    ref_nll: list[float]
    q_nll: list[float]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p || q) in nats from log-probabilities over the same vocabulary."""
    return float(np.sum(np.exp(logp) * (logp - logq)))


def _positions(decoder, embed, prompt: np.ndarray, first_text: int, feed_ids: list[int]) -> list[np.ndarray]:
    """Log-probabilities [V] predicting each position from `first_text` on: prefill prompt[:first_text], then feed the
    prompt's later positions and then `feed_ids` one at a time."""
    decoder.reset(1)
    if hasattr(decoder, "reserve"):
        decoder.reserve(1, prompt.shape[0] + len(feed_ids))
    out = [log_softmax(decoder.forward(prompt[None, :first_text])[0])]
    for i in range(first_text, prompt.shape[0]):
        out.append(log_softmax(decoder.forward(prompt[None, i : i + 1])[0]))
    for tok in feed_ids:
        out.append(log_softmax(decoder.forward(embed(np.asarray([tok], np.int64)))[0]))
    return out


@dataclass
class Reference:
    """The fp32 side of one pair, computed once and compared with any number of quantized exports."""

    input_ids: np.ndarray
    query: dict[str, np.ndarray]  # the pool's question inputs: clip_ids (and clip_mask, SigLIP)
    video: int
    first_text: int  # the first text position after the visual tokens
    logp: list[np.ndarray]  # float32 log-probabilities predicting each position from first_text on (prompt, then answer)
    answer: list[int]

    @property
    def n_prefill(self) -> int:
        return len(self.logp) - len(self.answer)


def _visual_tokens(pipe, vision, video: int, query: dict[str, np.ndarray]) -> np.ndarray:
    values, keys = vision(pipe, video)
    return pool(pipe.sessions["prompt_pool"], query["clip_ids"], keys, values, query.get("clip_mask"))[0]


def reference_pair(ref, input_ids: np.ndarray, query: dict[str, np.ndarray], video: int, ref_tokens: np.ndarray, tokens: int) -> Reference:
    """The fp32 export reads the prompt and answers `tokens` tokens greedily, keeping its distribution everywhere."""
    image = int(np.flatnonzero(input_ids == ref.manifest.image_token_id)[0])
    prompt = ref.embed_prompt(input_ids, ref_tokens)
    first_text = image + ref_tokens.shape[0]
    p = _positions(ref.decoder, ref.embed, prompt, first_text, [])
    answer: list[int] = []
    while True:
        answer.append(int(np.argmax(p[-1])))
        if len(answer) == tokens:
            break
        p.append(log_softmax(ref.decoder.forward(ref.embed(np.asarray(answer[-1:], np.int64)))[0]))
    return Reference(input_ids, query, video, first_text, [x.astype(np.float32) for x in p], answer)


def compare_pair(qs, r: Reference, q_tokens: np.ndarray) -> PairTrace:
    """Q teacher-forced on the fp32 prompt and answer (its own visual tokens `q_tokens`), then answering freely."""
    from ..runtime.generation import GenerationConfig, generate

    tokens = len(r.answer)
    q_prompt = qs.embed_prompt(r.input_ids, q_tokens)
    q = _positions(qs.decoder, qs.embed, q_prompt, r.first_text, r.answer[:-1])
    p = [x.astype(np.float64) for x in r.logp]
    n = r.n_prefill
    top1 = [int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(p, q)]
    kls = [kl(a, b) for a, b in zip(p, q)]
    ref_nll = [-float(p[n + k][t]) for k, t in enumerate(r.answer)]
    q_nll = [-float(q[n + k][t]) for k, t in enumerate(r.answer)]
    # Q answering freely gives the same ids as long as its argmax agrees under teacher forcing; run it when they part
    if all(top1[n:]):
        q_ids = list(r.answer)
    else:
        q_ids = list(generate(qs.decoder, qs.embed, q_prompt, GenerationConfig(max_new_tokens=tokens, ignore_eos=True)).ids)
    return PairTrace(r.answer, q_ids, top1[:n], kls[:n], top1[n:], kls[n:], ref_nll, q_nll)


@dataclass
class QualitySummary:
    pairs: int
    tokens: int
    prefill_positions: int
    decode_steps: int
    top1_prefill: float
    top1_decode: float
    kl_prefill: float
    kl_decode: float
    ppl_fp32: float
    ppl_q: float
    exact_match: float
    common_prefix: float

    @property
    def ppl_change(self) -> float:
        """Relative perplexity change of the fp32 answers under Q (0.02 = +2 %)."""
        return self.ppl_q / self.ppl_fp32 - 1.0


def summarize(traces: list[PairTrace], tokens: int) -> QualitySummary:
    def mean(xs) -> float:
        xs = list(xs)
        return float(np.mean(xs)) if xs else float("nan")

    pre_t = [x for t in traces for x in t.prefill_top1]
    dec_t = [x for t in traces for x in t.decode_top1]
    prefix = [next((k for k, (a, b) in enumerate(zip(t.ref_ids, t.q_ids)) if a != b), min(len(t.ref_ids), len(t.q_ids))) for t in traces]
    return QualitySummary(
        pairs=len(traces), tokens=tokens, prefill_positions=len(pre_t), decode_steps=len(dec_t),
        top1_prefill=mean(pre_t), top1_decode=mean(dec_t),
        kl_prefill=mean(x for t in traces for x in t.prefill_kl), kl_decode=mean(x for t in traces for x in t.decode_kl),
        ppl_fp32=float(np.exp(mean(x for t in traces for x in t.ref_nll))), ppl_q=float(np.exp(mean(x for t in traces for x in t.q_nll))),
        exact_match=mean(t.ref_ids == t.q_ids for t in traces), common_prefix=mean(prefix),
    )


def _pairs(calib, max_pairs: int | None):
    pool_by_source = {r["source"]: r for r in calib.records("prompt_pool", "all")}
    for r in [r for r in calib.eval_records("decoder") if r["kind"] == "prefill"][:max_pairs]:
        query = calib.load(pool_by_source[r["source"]])
        yield r, {k: query[k] for k in ("clip_ids", "clip_mask") if k in query}, calib.load(r)["input_ids"]


def reference_answers(ref, calib, tokens: int = 32, max_pairs: int | None = None, progress=None) -> list[Reference]:
    """`reference_pair` on CALIB's held-out (video, question) pairs (all pairs when it has no held-out split)."""
    vision = VisionCache(calib)
    out = []
    for r, query, input_ids in _pairs(calib, max_pairs):
        out.append(reference_pair(ref, input_ids, query, r["video"], _visual_tokens(ref, vision, r["video"], query), tokens))
        if progress:
            progress(len(out))
    return out


def compare_answers(qs, calib, refs: list[Reference], progress=None) -> QualitySummary:
    """`compare_pair` of export Q on every fp32 `Reference` (from `reference_answers` on the same CALIB)."""
    vision = VisionCache(calib)
    traces = []
    for r in refs:
        traces.append(compare_pair(qs, r, _visual_tokens(qs, vision, r.video, r.query)))
        if progress:
            progress(len(traces))
    return summarize(traces, len(refs[0].answer) if refs else 0)


def measure_quality(ref, qs, calib, tokens: int = 32, max_pairs: int | None = None) -> QualitySummary:
    """The quality rows of export Q against the fp32 export `ref` on CALIB's held-out pairs (see the module doc)."""
    return compare_answers(qs, calib, reference_answers(ref, calib, tokens, max_pairs))
