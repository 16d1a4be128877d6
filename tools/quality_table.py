#!/usr/bin/env python
"""The README's "Quantization quality on trained weights" table: every LLM mode, with and without --vision int8.

    ppllava-edge make-checkpoint --preset tiny --llm SmolLM2-135M-Instruct.Q4_1.gguf T
    ppllava-edge export T TE
    ppllava-edge calibrate TE --videos videos --questions questions.jsonl --out C --samples 40 --holdout 0.5
    python tools/quality_table.py TE C WORK [--tokens 32] [--pairs N] [--modes int4-weight:32:0:asym,...]

Each configuration is written by `quantize_export` (the gate's own decoder / pipeline rows are cut short here; the
quality rows are computed below) and measured with calibration/quality.py - the same code as the gate's quality
rows - against the fp32 answers, which are computed once and shared by all configurations. Writes WORK/quality.json
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import pickle
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from ppllava_edge.calibration.options import QuantizeOptions
from ppllava_edge.calibration.quality import compare_answers, reference_answers
from ppllava_edge.calibration.quantize import quantize_export
from ppllava_edge.calibration.readers import load_calibration
from ppllava_edge.manifest import load_manifest
from ppllava_edge.runtime.pipeline import Pipeline

# (--llm, --block-size, --accuracy-level, asymmetric, --weight-algorithm): ONNX Runtime's weight-only variants measured for the README
LLM_MODES = [("int8-weight", 32, 4, False, "rtn"), ("int8-weight", 32, 4, False, "gptq"),
             ("int4-weight", 32, 4, False, "rtn"), ("int4-weight", 32, 4, True, "rtn"), ("int4-weight", 32, 4, True, "hqq"), ("int4-weight", 32, 4, True, "gptq"),
             ("int4-weight", 128, 4, False, "rtn"), ("int4-weight", 128, 4, False, "gptq"),
             ("int4-weight", 128, 4, True, "rtn"), ("int4-weight", 128, 4, True, "hqq"), ("int4-weight", 128, 4, True, "gptq")]


def parse_modes(text: str) -> list[tuple[str, int, int, bool, str]]:
    """'int4-weight:32:0:asym:gptq,int8-weight:32:4' -> LLM_MODES entries (llm:block:accuracy_level[:asym|sym[:algorithm]])."""
    out = []
    for item in filter(None, text.split(",")):
        llm, block, level, *rest = item.split(":")
        out.append((llm, int(block), int(level), rest[:1] == ["asym"], rest[1] if len(rest) > 1 else "rtn"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--first", type=int, default=None, help="Measure on the first N of the cached fp32 answers only (CPU time).")
    ap.add_argument("--vision", default="fp32,int8")
    ap.add_argument("--llm", default="int8-weight,int4-weight")
    ap.add_argument("--modes", default=None, help="LLM variants llm:block:accuracy_level[:asym|sym[:rtn|hqq|gptq]], comma-separated (default: LLM_MODES).")
    args = ap.parse_args()
    console = Console(stderr=True)
    args.work.mkdir(parents=True, exist_ok=True)
    calib = load_calibration(args.calib, load_manifest(args.export))
    results_file = args.work / "quality.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    refs_file = args.work / f"fp32-answers-{args.tokens}-{args.pairs}.pkl"  # shared by runs over the same export and CALIB
    if refs_file.is_file():
        refs = pickle.loads(refs_file.read_bytes())
    else:
        ref = Pipeline.from_export(args.export, provider="cpu")
        with Progress(console=console) as bar:
            n = len([r for r in calib.eval_records("decoder") if r["kind"] == "prefill"][: args.pairs])
            task = bar.add_task("fp32 answers", total=n)
            t0 = time.perf_counter()
            refs = reference_answers(ref, calib, args.tokens, args.pairs, progress=lambda k: bar.update(task, completed=k))
            console.print(f"fp32 answers: {len(refs)} pairs x {args.tokens} tokens in {time.perf_counter() - t0:.0f} s")
        del ref
        refs_file.write_bytes(pickle.dumps(refs))
    refs = refs[: args.first]
    vision_int8 = None
    if "int8" in args.vision.split(","):  # the vision graph quantized once; joined to each LLM mode's export below
        vision_int8 = _quantize(args, "vision-int8_llm-fp32", "int8", "fp32", 32)[0].sessions["vision"]
    modes = parse_modes(args.modes) if args.modes else LLM_MODES
    for llm, block, level, asym, algorithm in [m for m in modes if m[0] in args.llm.split(",")]:
        name = f"llm-{llm}-b{block}-acc{level}" + ("-asym" if asym else "") + ("" if algorithm == "rtn" else f"-{algorithm}")
        todo = [v for v in args.vision.split(",") if f"vision-{v}_{name}" not in results]
        if not todo:
            continue
        qs, t_quant, mb = _quantize(args, f"vision-fp32_{name}", "fp32", llm, block, level, asym, algorithm)
        for vision in todo:
            if vision == "int8":
                # the same as `quantize --vision int8 --llm ...`: every graph is quantized on its own from the fp32 export
                qs.sessions["vision"] = vision_int8
            with Progress(console=console) as bar:
                task = bar.add_task(f"vision {vision}, {name}", total=len(refs))
                summary = compare_answers(qs, calib, refs, progress=lambda k: bar.update(task, completed=k))
            row = {"vision": vision, "llm": llm, "block_size": block, "accuracy_level": level, "asymmetric": asym, "algorithm": algorithm,
                   "quantize_s": round(t_quant, 1),
                   **summary.__dict__, "ppl_change": summary.ppl_change, "decoder_mb": mb}
            results[f"vision-{vision}_{name}"] = row
            results_file.write_text(json.dumps(results, indent=2))
            console.print(f"vision {vision}, {name}: top-1 {summary.top1_prefill:.3f}/{summary.top1_decode:.3f} KL {summary.kl_prefill:.4f}/"
                          f"{summary.kl_decode:.4f} ppl {summary.ppl_change:+.2%} exact {summary.exact_match:.2f} prefix {summary.common_prefix:.1f}")
        del qs
    print(markdown(results))


def _quantize(args, name: str, vision: str, llm: str, block: int, level: int | None = None, asym: bool = False, algorithm: str = "rtn"):
    """quantize_export (reusing a finished folder), its Pipeline, seconds and decoder MB. The gate's own decoder and
    pipeline rows are cut short (1 prefix cut, 1 greedy token): the quality rows are measured by the caller."""
    out = args.work / name
    t0 = time.perf_counter()
    if not (out / "export.json").is_file():
        options = QuantizeOptions(vision=vision, pool="fp32", llm=llm, llm_trt="fp32", block_size=block, accuracy_level=level,
                                  asymmetric=asym, weight_algorithm=algorithm, accept_degraded=True, prefill_positions=1,
                                  greedy_tokens=1, quality_tokens=0)
        quantize_export(args.export, args.calib, out, options, force=True)
    mb = round(sum(f.stat().st_size for f in out.glob("decoder*")) / 1e6, 1)
    return Pipeline.from_export(out, provider="cpu"), time.perf_counter() - t0, mb


def markdown(results: dict) -> str:
    head = ("| --vision | --llm | --accuracy-level | decoder MB | top-1 prefill | top-1 decode | KL prefill | KL decode | perplexity (fp32 → Q) | "
            "exact match | common prefix |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
    rows = []
    for r in results.values():
        llm = r["llm"] + f" (block {r['block_size']}{', asymmetric' if r.get('asymmetric') else ''}, {r.get('algorithm', 'rtn')})"
        rows.append(f"| {r['vision']} | {llm} | {r.get('accuracy_level', 4)} | {r['decoder_mb']:.0f} | {r['top1_prefill']:.3f} | {r['top1_decode']:.3f} | {r['kl_prefill']:.4f} | "
                    f"{r['kl_decode']:.4f} | {r['ppl_fp32']:.3f} → {r['ppl_q']:.3f} ({r['ppl_change']:+.1%}) | "
                    f"{round(r['exact_match'] * r['pairs'])}/{r['pairs']} | {r['common_prefix']:.1f} / {r['tokens']} |")
    return head + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
