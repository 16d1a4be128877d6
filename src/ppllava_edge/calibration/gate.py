"""The accuracy gate of a quantized export against its source (`quantize.py` runs it; written to Q/accuracy.json),
on the held-out CALIB samples (all samples if CALIB has none):

- vision, prompt_pool, image_pool: per output, the minimum over samples of the cosine to the fp32 export
  (gated, default ≥ 0.99) and the maximum |difference| (reported). Pools get fp32 inputs, so each graph is judged
  on its own; the row ``pipeline`` reports Q-vision → Q-pool against fp32 for information.
- decoder (the graph returns only the last position's logits, so "all positions" are reached by re-running):
  ``logits cosine`` — min cosine of the last-position logits over the held-out prefill and decode-step feeds
  (gated, ≥ 0.98); ``top-1 prefill positions`` — top-1 agreement at ``prefill_positions`` cut points of each
  held-out prompt (each cut is one prefill of that prefix, so every position is compared on identical inputs;
  gated, ≥ 0.60); ``top-1 decode`` — teacher forcing: the fp32 greedy continuation is fed to both exports for
  ``greedy_tokens`` steps and the argmax compared at each step (gated, ≥ 0.60); ``greedy`` — the full pipeline
  (Q vision → Q pool → Q decoder vs all-fp32) generates ``greedy_tokens`` tokens; the value is the mean fraction
  of tokens before the first divergence (reported; gated only if ``Thresholds.greedy`` is set).

  Why these decoder numbers: the presets have random weights, whose next-token distribution is nearly uniform
  (max probability ≈ 0.0004 over 32k tokens on tiny; top-1/top-2 logit gaps ≈ 0.1–0.2 against a logit std of
  0.65), so a logit error of a few percent flips near-ties. Measured: default int8 → logits cosine 0.996 (tiny) /
  0.986 (small), top-1 0.72–0.94; ``op_types="all"`` → cosine 0.87, top-1 0.38. 0.98 / 0.60 separate these.
  For a trained checkpoint, whose logits are peaked, raise top-1 to ≈ 0.9 and logits cosine to 0.99
  (``Thresholds`` / ``--min-top1`` / ``--min-logits-cosine``).

Below a threshold, `quantize_export` raises AccuracyError (nothing is written to `out`) unless `accept_degraded`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..manifest import load_manifest
from ..runtime.stages import decoder_feed, empty_past, pool
from .convert import _quantize_nbits, _split_excludes
from .options import QuantizeOptions, Thresholds, default_thresholds
from .quality import VisionCache, measure_quality
from .readers import CalibrationSet

ACCURACY_NAME = "accuracy.json"


@dataclass(frozen=True)
class Check:
    graph: str
    precision: str
    metric: str
    value: float
    threshold: float | None
    samples: int
    lower_is_better: bool = False

    @property
    def passed(self) -> bool:
        if self.threshold is None:
            return True
        return self.value <= self.threshold if self.lower_is_better else self.value >= self.threshold


@dataclass
class AccuracyReport:
    checks: list[Check]
    held_out: bool
    thresholds: Thresholds
    notes: list[str] = field(default_factory=list)
    quality: dict | None = None  # calibration/quality.py's QualitySummary (trained-LLM measures)

    HEADER = ["graph", "precision", "metric", "value", "threshold", "n", "result"]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def rows(self) -> list[list[str]]:
        def fmt(v: float) -> str:
            return f"{v:.2e}" if (v != 0 and abs(v) < 1e-3) or abs(v) >= 1e4 else f"{v:.4f}"

        return [
            [c.graph, c.precision, c.metric, fmt(c.value), "" if c.threshold is None else f"{'<=' if c.lower_is_better else '>='} {c.threshold:g}", str(c.samples),
             "info" if c.threshold is None else ("ok" if c.passed else "FAIL")]
            for c in self.checks
        ]

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "held_out": self.held_out,
            "thresholds": asdict(self.thresholds),
            "checks": [{**asdict(c), "passed": c.passed} for c in self.checks],
            "notes": self.notes,
            "quality": self.quality,
        }


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / (na * nb + 1e-300))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) if np.size(a) else 0.0


# ---- accuracy gate ---------------------------------------------------------------------------------------
def _graph_checks(graph: str, precision: str, ref, qs, calib: CalibrationSet, th: Thresholds, sessions: tuple | None = None) -> list[Check]:
    """Per output: min cosine (gated) and max |difference| of `qs` against `ref` on the held-out feeds; `sessions`
    (fp32, quantized) replaces the pipelines' own sessions of `graph`."""
    recs = calib.eval_records(graph)
    a_s, b_s = sessions or (ref.sessions[graph], qs.sessions[graph])
    outs = [o.name for o in a_s.get_outputs()]
    cos = {o: [] for o in outs}
    mabs = {o: [] for o in outs}
    for r in recs:
        a = a_s.run(None, calib.feed(graph, r, input_names=_inputs(a_s)))
        b = b_s.run(None, calib.feed(graph, r, input_names=_inputs(b_s)))
        for o, x, y in zip(outs, a, b):
            cos[o].append(_cosine(x, y))
            mabs[o].append(_max_abs(x, y))
    checks = []
    for o in outs:
        checks.append(Check(graph, precision, f"{o} cosine (min)", min(cos[o]), th.cosine, len(recs)))
        checks.append(Check(graph, precision, f"{o} max-abs", max(mabs[o]), None, len(recs)))
    return checks


def _inputs(session) -> list[str]:
    return [i.name for i in session.get_inputs()]


def _decoder_checks(precision: str, ref, qs, calib: CalibrationSet, th: Thresholds, positions: int, tokens: int) -> list[Check]:
    """Logits cosine, top-1 over prefill positions and over teacher-forced decode steps (decoder graph alone)."""
    m = ref.model
    empty = empty_past(m["num_layers"], m["num_kv_heads"], m["head_dim"], np.float32)
    recs = calib.eval_records("decoder")
    # 1) last-position logits on the stored feeds (prefill + decode steps)
    cos = []
    rs, qd = ref.sessions["decoder"], qs.sessions["decoder"]
    for r in recs:
        a = rs.run(["logits"], calib.feed("decoder", r, input_names=_inputs(rs)))[0]
        cos.append(_cosine(a, qd.run(["logits"], calib.feed("decoder", r, input_names=_inputs(qd)))[0]))
    checks = [Check("decoder", precision, "logits cosine (min)", min(cos), th.decoder_cosine, len(recs))]
    prefills = [r for r in recs if r["kind"] == "prefill"]
    # 2) top-1 over prefill positions: the graph returns the last position only, so one prefill per prefix cut
    agree = total = 0
    for r in prefills:
        e = calib.load(r)["inputs_embeds"]
        L = e.shape[1]
        for p in sorted({int(round(x)) for x in np.linspace(max(2, L // 8), L, positions)}):
            prefix = np.ascontiguousarray(e[:, :p], np.float32)
            a = rs.run(["logits"], decoder_feed(prefix, empty, _inputs(rs)))[0]
            b = qd.run(["logits"], decoder_feed(prefix, empty, _inputs(qd)))[0]
            agree += int(np.argmax(a[0]) == np.argmax(b[0]))
            total += 1
    checks.append(Check("decoder", precision, "top-1 prefill positions", agree / max(total, 1), th.top1, total))
    # 3) teacher forcing: both decoders get the fp32 greedy continuation; compare the argmax at every step
    agree = total = 0
    for r in prefills:
        e = calib.load(r)["inputs_embeds"]
        ref.decoder.reset(1)
        qs.decoder.reset(1)
        la, lb = ref.decoder.forward(e), qs.decoder.forward(e)
        for _ in range(min(tokens, m["max_position_embeddings"] - e.shape[1])):
            ta = int(np.argmax(la[0]))
            agree += int(ta == int(np.argmax(lb[0])))
            total += 1
            x = ref.embed(np.asarray([ta]))
            la, lb = ref.decoder.forward(x), qs.decoder.forward(x)
    checks.append(Check("decoder", precision, "top-1 decode (teacher-forced)", agree / max(total, 1), th.top1, total))
    return checks


def _trt_decoder_checks(precision: str, ref, qs, calib: CalibrationSet, th: Thresholds) -> list[Check]:
    """The TensorRT decoder graph (run here by ONNX Runtime on CPU): last-position logits cosine on held-out feeds."""
    from ..runtime.session import create_session

    a_s = create_session(ref.manifest.path("decoder_trt"), "cpu")
    b_s = create_session(qs.manifest.path("decoder_trt"), "cpu")
    recs = calib.eval_records("decoder_trt")
    cos = [_cosine(a_s.run(["logits"], calib.feed("decoder_trt", r, input_names=_inputs(a_s)))[0],
                   b_s.run(["logits"], calib.feed("decoder_trt", r, input_names=_inputs(b_s)))[0]) for r in recs]
    return [Check("decoder_trt", precision, "logits cosine (min)", min(cos), th.decoder_cosine, len(recs))]


def _trt_vision_checks(precision: str, ref, qs, calib: CalibrationSet, th: Thresholds) -> list[Check]:
    """The TensorRT vision graph (traced standard ops, run here by ONNX Runtime on CPU), gated as the vision graph."""
    from ..runtime.session import create_session

    sessions = (create_session(ref.manifest.path("vision_trt"), "cpu"), create_session(qs.manifest.path("vision_trt"), "cpu"))
    return _graph_checks("vision_trt", precision, ref, qs, calib, th, sessions)


def _pipeline_checks(ref, qs, calib: CalibrationSet, th: Thresholds, tokens: int, pooled: bool) -> list[Check]:
    """End to end, Q (vision -> prompt_pool -> decoder) against fp32: pooled visual tokens (information) and greedy."""
    from ..runtime.generation import GenerationConfig, generate

    vision = VisionCache(calib)
    pool_by_source = {r["source"]: r for r in calib.records("prompt_pool", "all")}
    cfg = GenerationConfig(max_new_tokens=tokens, ignore_eos=True)
    cos, prefix, exact = [], [], 0
    prefills = [r for r in calib.eval_records("decoder") if r["kind"] == "prefill"]
    for r in prefills:
        query = calib.load(pool_by_source[r["source"]])
        input_ids = calib.load(r)["input_ids"]
        vts, ids = [], []
        for pipe in (ref, qs):
            values, keys = vision(pipe, r["video"])
            vt, _ = pool(pipe.sessions["prompt_pool"], query["clip_ids"], keys, values, query.get("clip_mask"))
            vts.append(vt)
            ids.append(list(generate(pipe.decoder, pipe.embed, pipe.embed_prompt(input_ids, vt), cfg).ids))
        cos.append(_cosine(*vts))
        a, b = ids
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
        exact += int(a == b)
    n = len(prefills)
    checks = [Check("pipeline", "", "visual_tokens cosine (vision+pool, min)", min(cos), None, n)] if pooled and cos else []
    checks.append(Check("pipeline", "", f"greedy {tokens} tokens: prefix agreement (mean)", float(np.mean(prefix)) if prefix else 1.0, th.greedy, n))
    checks.append(Check("pipeline", "", f"greedy {tokens} tokens: exact sequences", exact / max(n, 1), None, n))
    return checks


# The targets on a trained LLM (printed, not gated): (top-1 decode steps >=, perplexity change <=) per LLM mode
QUALITY_TARGETS = {"int8-weight": (0.98, 0.02), "int4-weight": (0.90, 0.10)}


def _quality_checks(ref, qs, calib: CalibrationSet, th: Thresholds, tokens: int, pairs: int | None, llm: str) -> tuple[list[Check], dict, list[str]]:
    """The trained-LLM rows (calibration/quality.py): top-1 and KL at prefill positions and teacher-forced decode
    steps, perplexity of the fp32 answers under Q, greedy exact match and common prefix."""
    q = measure_quality(ref, qs, calib, tokens, pairs)
    checks = [
        Check("quality", "", "top-1 prefill positions", q.top1_prefill, th.quality_top1, q.prefill_positions),
        Check("quality", "", "top-1 decode steps (teacher-forced)", q.top1_decode, th.quality_top1, q.decode_steps),
        Check("quality", "", "mean KL prefill positions (nats)", q.kl_prefill, th.quality_kl, q.prefill_positions, lower_is_better=True),
        Check("quality", "", "mean KL decode steps (nats)", q.kl_decode, th.quality_kl, q.decode_steps, lower_is_better=True),
        Check("quality", "", "perplexity of fp32 answers: change", q.ppl_change, th.quality_ppl, q.decode_steps, lower_is_better=True),
        Check("quality", "", "perplexity of fp32 answers: fp32", q.ppl_fp32, None, q.decode_steps),
        Check("quality", "", "perplexity of fp32 answers: Q", q.ppl_q, None, q.decode_steps),
        Check("quality", "", f"greedy {tokens} tokens: exact match", q.exact_match, None, q.pairs),
        Check("quality", "", f"greedy {tokens} tokens: common prefix (tokens)", q.common_prefix, None, q.pairs),
    ]
    notes = []
    if q.pairs < 20:
        notes.append(f"quality rows measured on {q.pairs} held-out (video, question) pairs; the README's table uses >= 20")
    if llm in QUALITY_TARGETS:
        t1, ppl = QUALITY_TARGETS[llm]
        met = q.top1_decode >= t1 and q.top1_prefill >= t1 and q.ppl_change <= ppl
        notes.append(f"target for --llm {llm}: top-1 >= {t1:g} and perplexity within +{ppl:.0%}: "
                     f"{'met' if met else 'MISSED'} (top-1 {q.top1_prefill:.3f} / {q.top1_decode:.3f}, perplexity {q.ppl_change:+.1%})")
    return checks, asdict(q) | {"ppl_change": q.ppl_change}, notes


GATE_LAYERS = 2
FULL_GATE_FRACTION = 0.25  # auto: the full gate when the source decoder takes at most this fraction of RAM


def _gate_mode(mode: str, manifest) -> str:
    """--gate auto resolved against the export: "full" when the source decoder fits in a quarter of RAM."""
    if mode != "auto":
        return mode
    import psutil

    from ..external_data import graph_weight_bytes

    decoder = graph_weight_bytes(manifest.path(manifest.graph_for("decoder")), skip_prefixes=())
    return "full" if decoder <= FULL_GATE_FRACTION * psutil.virtual_memory().total else "truncated"


@dataclass
class GateSide:
    """One side of the gate, what the checks read: the sessions by graph name and, for the decoder checks, the model
    dims, a KV decoder over `sessions["decoder"]` and its embedding lookup. `of_pipeline` takes them from a Pipeline;
    `truncated_decoder` builds them from a depth-truncated decoder file."""

    sessions: dict
    model: dict = field(default_factory=dict)
    decoder: object = None
    embed: Callable[[np.ndarray], np.ndarray] | None = None

    @classmethod
    def of_pipeline(cls, pipe) -> GateSide:
        return cls(pipe.sessions, pipe.manifest.model, pipe.decoder, pipe.embed)

    @classmethod
    def truncated_decoder(cls, manifest, decoder_path: Path, layers: int) -> GateSide:
        from ..runtime.decoder import open_decoder
        from ..runtime.session import create_session

        model = dict(manifest.model, num_layers=layers)
        session = create_session(decoder_path, "cpu")
        table = np.load(manifest.path("embeddings"), mmap_mode="r")
        decoder = open_decoder(session, {"contract": "gqa-inplace-v1"}, model, np.float32, "cpu")

        def embed(ids: np.ndarray) -> np.ndarray:
            return np.asarray(table[np.asarray(ids, dtype=np.int64)], dtype=decoder.dtype)[:, None, :]

        return cls({"decoder": session}, model, decoder, embed)


def evaluate_accuracy_truncated(manifest, q_dir: Path, calib: CalibrationSet, precisions: dict[str, str], thresholds: Thresholds,
                                options: QuantizeOptions, work: Path) -> AccuracyReport:
    """The gate at a scale where the source decoder does not fit: the vision / pool graphs against the source's as
    usual; the decoder as a depth-truncated pair (its first GATE_LAYERS layers and the real head, written from the
    checkpoint in the export's dtype, and the same quantization of it) on CALIB's held-out prompts. The end-to-end
    greedy comparison needs both full decoders and is not run (said in the report). `options`: the decoder's
    weight-only settings and the gate's prefix cuts / tokens."""
    from ..export.exporter import decoder_copy
    from ..runtime.session import create_session

    checks: list[Check] = []
    notes = [f"decoder gate on depth-truncated decoders (first {GATE_LAYERS} of {manifest.model['num_layers']} layers, real embeddings and head); "
             "the end-to-end greedy comparison is not run at this scale"]
    if not calib.has_holdout():
        notes.append("CALIB has no held-out samples: measured on the calibration samples themselves")
    q = load_manifest(q_dir)
    for g in ("vision", "prompt_pool", "image_pool"):
        if precisions.get(g, "fp32") != "fp32":
            ref = GateSide({g: create_session(manifest.path(g), "cpu")})
            qs = GateSide({g: create_session(q.path(g), "cpu")})
            checks += _graph_checks(g, precisions[g], ref, qs, calib, thresholds)
            del ref, qs
    prec = precisions.get("decoder", "fp32")
    if prec in ("int8-weight", "int4-weight"):
        work.mkdir(parents=True, exist_ok=True)
        try:
            src_dtype = manifest.dtype
            ref_path = decoder_copy(manifest.checkpoint["path"], work / "decoder.ref.onnx", src_dtype, GATE_LAYERS)
            q_path = work / "decoder.q.onnx"
            bits = 8 if prec == "int8-weight" else 4
            _quantize_nbits(ref_path, q_path, bits, options.block_size, _split_excludes(options.exclude_nodes, "decoder"),
                            **options.weight_only(bits, src_dtype))
            ref, qs = GateSide.truncated_decoder(manifest, ref_path, GATE_LAYERS), GateSide.truncated_decoder(manifest, q_path, GATE_LAYERS)
            checks += _decoder_checks(prec, ref, qs, calib, thresholds, options.prefill_positions, options.greedy_tokens)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return AccuracyReport(checks, calib.has_holdout(), thresholds, notes)


def evaluate_accuracy(
    ref_dir: str | Path,
    q_dir: str | Path,
    calib: CalibrationSet,
    precisions: dict[str, str],
    thresholds: Thresholds | None = None,
    prefill_positions: int = 8,
    greedy_tokens: int = 16,
    quality_tokens: int = 32,
    quality_pairs: int | None = None,
) -> AccuracyReport:
    """Compare export `q_dir` against the fp32 export `ref_dir` on CALIB's held-out samples (see module doc).
    `thresholds` None: `default_thresholds` of the fp32 export. `quality_tokens` 0 skips the quality rows."""
    from ..runtime.pipeline import Pipeline

    ref = Pipeline.from_export(ref_dir, provider="cpu")
    qs = Pipeline.from_export(q_dir, provider="cpu")
    thresholds = thresholds or default_thresholds(ref.manifest)
    checks: list[Check] = []
    notes: list[str] = []
    if not calib.has_holdout():
        notes.append("CALIB has no held-out samples: measured on the calibration samples themselves")
    for g in ("vision", "prompt_pool", "image_pool"):
        if precisions.get(g, "fp32") != "fp32":
            checks += _graph_checks(g, precisions[g], ref, qs, calib, thresholds)
    if precisions.get("decoder", "fp32") != "fp32":
        checks += _decoder_checks(precisions["decoder"], GateSide.of_pipeline(ref), GateSide.of_pipeline(qs), calib, thresholds, prefill_positions, greedy_tokens)
    if precisions.get("decoder_trt", "fp32") != "fp32":
        checks += _trt_decoder_checks(precisions["decoder_trt"], ref, qs, calib, thresholds)
    if precisions.get("vision_trt", "fp32") != "fp32":
        checks += _trt_vision_checks(precisions["vision_trt"], ref, qs, calib, thresholds)
    if any(p != "fp32" for p in precisions.values()):
        pooled = precisions.get("vision", "fp32") != "fp32" or precisions.get("prompt_pool", "fp32") != "fp32"
        checks += _pipeline_checks(ref, qs, calib, thresholds, greedy_tokens, pooled)
    quality = None
    if quality_tokens > 0 and any(p != "fp32" for p in precisions.values()):
        qchecks, quality, qnotes = _quality_checks(ref, qs, calib, thresholds, quality_tokens, quality_pairs, precisions.get("decoder", "fp32"))
        checks += qchecks
        notes += qnotes
    return AccuracyReport(checks, calib.has_holdout(), thresholds, notes, quality)
