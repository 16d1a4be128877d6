"""The issue targets a bench result is checked against (`evaluate_targets`), from the result dict alone."""

from __future__ import annotations

from pathlib import Path

from .plan import reference_entry

TARGETS = (
    ("ort_vs_torch_e2e", "ORT end to end vs --backend torch (speed-up)", ">=", 1.5),
    ("ort_vs_torch_vision", "ORT vision vs --backend torch (speed-up)", ">=", 1.2),
    ("ort_vs_torch_prefill", "ORT prefill time / --backend torch's prefill time", "<=", 0.7),
    ("prefill_vs_nopool", "prefill, pooled vs nopool (speed-up)", ">=", 4.0),
    ("ttft_vs_nopool", "time to first token, pooled vs nopool (speed-up)", ">=", 2.0),
    ("second_question", "second question / first on the same video (feature cache)", "<=", 0.35),
    ("decode_efficiency", "decode efficiency ((weights + KV) bytes/token x tok/s / bandwidth)", ">=", 0.8),
    ("tpot_int8_weight", "int8-weight TPOT / fp32 TPOT", "<=", 0.55),
    ("tpot_int4_weight", "int4-weight TPOT / fp32 TPOT", "<=", 0.35),
    ("kv_allocated", "KV cache bytes allocated / used by the largest request", "<=", 1.1),
    ("vision_efficiency", "vision compute efficiency (FLOP/s / GEMM FLOP/s)", ">=", 0.7),
    ("vision_vs_first", "fp32 vision vs the first export's fp32 vision (speed-up; before/after exports in one run)", ">=", 1.6),
    ("vision_int8", "int8 vision vs fp32 vision (speed-up)", ">=", 2.0),
    ("vision_int8_cosine", "int8 vision cosine to fp32 (min over its gate's held-out clips)", ">=", 0.99),
    ("prefill_efficiency", "prefill compute efficiency (FLOP/s / GEMM FLOP/s)", ">=", 0.5),
    ("cold_start_s", "cold start: a fresh-process `ask` minus the warm answer (s)", "<=", 1.0),
)
TARGET_PRESETS = ("small", "vision-l", "mid", "7b")
"""Presets whose numbers mean something against the targets; on others (tiny, a toy model dominated by fixed
overheads) the targets are not evaluated."""
PER_VARIANT = ("decode_efficiency", "kv_allocated", "vision_efficiency", "vision_vs_first", "vision_int8", "vision_int8_cosine")


def _mean(entry: dict | None, stage: str) -> float | None:
    if not entry or entry.get("error"):
        return None
    return entry["stages"][stage]["mean"]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def evaluate_targets(result: dict) -> list[dict]:
    """The issue's targets at the headline frames, for what was measured (a target without data is left out)."""
    entries = [e for e in result["variants"] if not e.get("error")]
    frames = result["config"]["headline_frames"]
    ref = reference_entry(result["variants"], frames)

    def find(pred) -> dict | None:
        return next((e for e in entries if pred(e)), None)

    ort = find(lambda e: e["kind"] == "export" and e["backend"] == "ort" and e["frames"] == frames and e["precision"] == "fp32") or find(
        lambda e: e["kind"] == "export" and e["backend"] == "ort" and e["frames"] == frames
    )
    torch = find(lambda e: e["kind"] == "torch" and e["frames"] == frames)
    nopool = find(lambda e: e.get("baseline") == "nopool")
    values: dict[str, tuple[float | None, str]] = {}
    if ort and torch:
        cmp = f"{ort['name']} vs {torch['name']}, {frames} frames"
        values["ort_vs_torch_e2e"] = (_ratio(_mean(torch, "e2e"), _mean(ort, "e2e")), cmp)
        values["ort_vs_torch_vision"] = (_ratio(_mean(torch, "vision"), _mean(ort, "vision")), cmp)
        values["ort_vs_torch_prefill"] = (_ratio(_mean(ort, "prefill"), _mean(torch, "prefill")), cmp)
    if ref and nopool:
        cmp = f"{ref['name']} {frames}f ({ref['visual_tokens']} tok) vs nopool {nopool['frames']}f ({nopool['visual_tokens']} tok)"
        values["prefill_vs_nopool"] = (_ratio(_mean(nopool, "prefill"), _mean(ref, "prefill")), cmp)
        values["ttft_vs_nopool"] = (_ratio(_mean(nopool, "ttft"), _mean(ref, "ttft")), cmp)
    if ref and ref.get("cache"):
        values["second_question"] = (ref["cache"]["ratio"], f"{ref['name']} {frames}f")
    if ref and ref.get("prefill_efficiency") is not None:
        values["prefill_efficiency"] = (ref["prefill_efficiency"], f"{ref['name']} {frames}f")
    cold = result.get("cold_start")
    if cold and cold.get("overhead_ms") is not None:
        values["cold_start_s"] = (cold["overhead_ms"] / 1e3, f"{cold['variant']} {frames}f: fresh {cold['wall_ms'] / 1e3:.2f} s - warm {cold['warm_e2e_ms'] / 1e3:.2f} s")
    per_variant: dict[str, list[tuple[float | None, str]]] = {k: [] for k in PER_VARIANT}
    exports = [e for e in entries if e["kind"] == "export" and e["frames"] == frames]
    for e in exports:
        per_variant["decode_efficiency"].append((e.get("decode_efficiency"), f"{e['name']} ({e.get('llm_precision', e['precision'])}) {frames}f"))
        used = e.get("kv_cache_peak_used_bytes") or e.get("kv_cache_bytes")
        if e.get("kv_cache_allocated_bytes") and used:
            per_variant["kv_allocated"].append((e["kv_cache_allocated_bytes"] / used, f"{e['name']} {frames}f"))
    _vision_targets(exports, ref, frames, per_variant)
    fp32 = next((e for e in exports if e["backend"] == "ort" and e.get("llm_precision") == "fp32"), None)
    for prec, tid in (("int8-weight", "tpot_int8_weight"), ("int4-weight", "tpot_int4_weight")):
        q = next((e for e in exports if e["backend"] == "ort" and e.get("llm_precision") == prec), None)
        if fp32 and q:
            values[tid] = (_ratio(_mean(q, "decode_step"), _mean(fp32, "decode_step")), f"{q['name']} vs {fp32['name']}, {frames}f")
    out = []
    for tid, desc, op, target in TARGETS:
        rows = per_variant.get(tid) or ([values[tid]] if tid in values else [])
        for v, cmp in rows:
            if v is None:
                continue
            passed = v >= target if op == ">=" else v <= target
            out.append({"id": tid, "description": desc, "compared": cmp, "frames": frames, "value": v, "op": op, "target": target, "passed": bool(passed)})
    return out


def _vision_targets(exports: list[dict], ref: dict | None, frames: int, per_variant: dict[str, list]) -> None:
    """Vision efficiency of every export; fp32 vision of later exports vs the first (the before/after of a graph
    change, e.g. the traced graph vs the fused one); int8 vision vs the fp32 export it was quantized from (else the
    first fp32 one) and its gate's vision cosine."""
    def vis(e: dict) -> str:
        return e.get("vision_precision", e["precision"])

    fp32 = [e for e in exports if vis(e) == "fp32"]
    for e in exports:
        if e.get("vision_efficiency") is not None:
            per_variant["vision_efficiency"].append((e["vision_efficiency"], f"{e['name']} ({vis(e)} vision) {frames}f"))
        if ref and ref.get("kind") == "export" and e is not ref and vis(ref) == "fp32" and vis(e) == "fp32" and e["backend"] == ref["backend"]:
            per_variant["vision_vs_first"].append((_ratio(_mean(ref, "vision"), _mean(e, "vision")), f"{e['name']} vs {ref['name']}, {frames}f"))
        if vis(e) == "int8":
            src = e.get("quantized_from")
            base = next((b for b in fp32 if src and str(Path(b["export"]).resolve()) == src and b["backend"] == e["backend"]), None)
            base = base or next((b for b in fp32 if b["backend"] == e["backend"]), None)
            if base:
                per_variant["vision_int8"].append((_ratio(_mean(base, "vision"), _mean(e, "vision")), f"{e['name']} vs {base['name']}, {frames}f"))
            if e.get("vision_cosine") is not None:
                per_variant["vision_int8_cosine"].append((e["vision_cosine"], f"{e['name']} (quantize gate)"))


def targets_apply(result: dict) -> bool:
    """Whether the run's presets are meaningful for the targets (small or larger); see TARGET_PRESETS."""
    presets = result.get("presets") or []
    return bool(presets) and all(p in TARGET_PRESETS for p in presets)


# ---- markdown -----------------------------------------------------------------------------------------------
