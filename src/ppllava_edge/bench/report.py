"""Bench output: a llama-bench-like markdown table (stdout), JSON, CSV and a PNG plot; the issue's targets are
evaluated here as measured ratios with ✓/✗ (reported, never asserted).

JSON (`write_json`) is the `run_bench` dict as is: `environment`, `hardware`, `memory_bandwidth_gbs`,
`gemm_gflops`, `decode_efficiency`, `vision_efficiency`, `prefill_efficiency`, `cache` {first_ms, second_ms, ratio},
`variants` [{name, visual_tokens, context_len, tokens_per_s, peak_rss_mb, stages {stage: {min, mean, p50, p90,
p95, p99, stddev, max, n, samples}}, ...}], `targets`. CSV has one row per variant and frames with the same
fields flattened (`<stage>_<stat>_ms`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .plan import STAGES, TORCH_RATIO_STAGES, reference_entry
from .stats import STATS
from .targets import targets_apply

# (id, description, op, target)
def _pm(stat: dict | None, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['stddev']:.{digits}f}"


def _si(v: float, unit: str) -> str:
    """1.23e9 -> '1.23 G<unit>' (k, M, G, T)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}{unit}"
    return f"{v:.3g} {unit}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


COLUMNS = (
    # (header, right-aligned, cell(entry))
    ("variant", False, lambda e: e["name"]),
    ("backend", False, lambda e: e["backend"] if e.get("error") else f"{e['backend']}" + (f" ({e['provider']})" if e["backend"] != "torch" else "")),
    ("precision", False, lambda e: e["precision"]),
    ("frames", True, lambda e: str(e["frames"])),
    ("vis tok", True, lambda e: str(e["visual_tokens"])),
    ("ctx", True, lambda e: str(e["context_len"])),
    ("video ms", True, lambda e: _pm(e["stages"]["decode_video"])),
    ("prep ms", True, lambda e: _pm(e["stages"]["preprocess"])),
    ("vision ms", True, lambda e: _pm(e["stages"]["vision"])),
    ("pool ms", True, lambda e: _pm(e["stages"]["pool"])),
    ("prefill ms", True, lambda e: _pm(e["stages"]["prefill"])),
    ("TTFT ms", True, lambda e: _pm(e["stages"]["ttft"])),
    ("TPOT ms", True, lambda e: _pm(e["stages"]["decode_step"], 2)),
    ("tok/s", True, lambda e: "-" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:.2f} ± {e['tokens_per_s_stddev']:.2f}"),
    ("dec B/tok", True, lambda e: _si(e["decode_bytes_per_token"], "B") if e.get("decode_bytes_per_token") else "-"),
    ("dec eff", True, lambda e: _x(e.get("decode_efficiency"))),
    ("e2e ms", True, lambda e: _pm(e["stages"]["e2e"])),
    ("peak RSS MB", True, lambda e: f"{e['peak_rss_mb']:.0f}"),
    ("weights MB", True, lambda e: f"{e['weight_bytes'] / 1e6:.0f}"),
    ("vis eff", True, lambda e: _x(e.get("vision_efficiency"))),
    ("e2e ×", True, lambda e: _x(e.get("ratios", {}).get("e2e"))),
    ("TTFT ×", True, lambda e: _x(e.get("ratios", {}).get("ttft"))),
    ("prefill ×", True, lambda e: _x(e.get("ratios", {}).get("prefill"))),
    ("vision ×", True, lambda e: _x(e.get("ratios", {}).get("vision"))),
)
OPTIONAL = {"precision", "frames"}  # shown only when they vary (llama-bench prints informative columns only)


def _table(entries: list[dict]) -> list[str]:
    cols = list(COLUMNS)
    if any(e.get("peak_device_mb") is not None for e in entries if not e.get("error")):
        cols.insert(next(i for i, c in enumerate(cols) if c[0] == "peak RSS MB") + 1, ("peak dev MB", True, lambda e: "-" if e.get("peak_device_mb") is None else f"{e['peak_device_mb']:.0f}"))
    ok = [e for e in entries if not e.get("error")]
    keep = []
    for c in cols:
        if c[0] in OPTIONAL and len({c[2](e) for e in ok}) <= 1 and ok:
            continue
        keep.append(c)
    lines = ["| " + " | ".join(c[0] for c in keep) + " |", "|" + "|".join(" ---: " if c[1] else " --- " for c in keep) + "|"]
    meta = {"variant", "backend", "precision", "frames"}
    for e in entries:
        if e.get("error"):
            cells = [c[2](e) if c[0] in meta else "" for c in keep]
            cells[len([c for c in keep if c[0] in meta])] = f"FAILED: {e['error']}"
        else:
            cells = [c[2](e) for c in keep]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


VS_TORCH = (
    # (header, stage, speed-up target or None): torch time / this time, > 1 = faster than PyTorch
    ("vision", "vision", 1.2),
    ("prefill", "prefill", 1 / 0.7),  # the target is ORT's prefill in <= 0.7x PyTorch's time
    ("TPOT", "decode_step", None),
    ("TTFT", "ttft", None),
    ("e2e", "e2e", 1.5),
)


def vs_torch_table(entries: list[dict], marks: bool = True) -> list[str]:
    """Per runtime variant and stage, the same-run speed-up against the PyTorch reference (torch ms / this ms),
    marked ✓/✗ where the issue sets a target (`marks`: not on toy presets); empty when no torch variant ran."""
    rows = [e for e in entries if not e.get("error") and e.get("vs_torch")]
    if not rows:
        return []
    frames = len({e["frames"] for e in rows}) > 1
    lines = ["| variant | " + ("frames | " if frames else "") + " | ".join(h for h, _, _ in VS_TORCH) + " |",
             "| --- |" + (" ---: |" if frames else "") + " ---: |" * len(VS_TORCH)]
    for e in rows:
        cells = []
        for _, st, target in VS_TORCH:
            v = e["vs_torch"].get(st)
            mark = "" if v is None or target is None or not marks else (" ✓" if v >= target else " ✗")
            cells.append(_x(v) + mark)
        lines.append(f"| {e['name']} | " + (f"{e['frames']} | " if frames else "") + " | ".join(cells) + " |")
    return lines


def _env_line(result: dict) -> str:
    env = result["environment"]
    pkg = env.get("ppllava_edge", {})
    git = pkg.get("git") or {}
    build = f"ppllava-edge {pkg.get('version', '?')}" + (f" (git {git['commit'][:12]}{', dirty' if git.get('dirty') else ''})" if git.get("commit") else "")
    cpu = env.get("cpu", {})
    gpus = (env.get("gpu") or {}).get("gpus") or []
    gpu = ", ".join(f"{g['name']} (driver {g.get('driver') or '?'})" for g in gpus) or "none"
    ort = (env.get("onnxruntime") or {}).get("version") or "not installed"
    parts = [
        f"build: {build}",
        f"cpu: {cpu.get('model', '?')} ({cpu.get('logical', '?')} logical / {cpu.get('physical', '?')} physical cores)",
        f"gpu: {gpu}",
        f"onnxruntime {ort}",
        f"TensorRT {env.get('tensorrt') or 'not installed'}",
        f"numpy {env.get('numpy', '?')}",
        f"provider {env.get('provider')}" + (f", {env['threads']} threads" if env.get("threads") else ""),
    ]
    j = env.get("jetson")
    if j:
        pm = j.get("power_mode") or {}
        parts.append(f"Jetson {j.get('model') or '?'}: power mode {pm.get('name') or '?'}, jetson_clocks {(j.get('jetson_clocks') or {}).get('state', '?')}")
    la = env.get("load_average")
    if la:
        parts.append(f"load average {la[0]:.2f} at start")
    return " | ".join(parts)


def markdown(result: dict) -> str:
    """The table and the notes under it (environment, hardware, cache, efficiency, targets)."""
    cfg = result["config"]
    lines = _table(result["variants"])
    lines.append("")
    lines.append(f"- {_env_line(result)}")
    img = cfg.get("image")
    unit = "images" if img and img.get("images") else "tiles" if img else "frames"  # what stands in for the frames
    if img and img.get("images"):
        src = f"{img['images']} images in one question ({img['path']}; {img['tokens']} visual tokens; 'video ms' = image decode)"
    elif img:
        h, w = img["image_size"]
        src = (f"image {img['path']} ({w}x{h} px -> best resolution {img['best_resolution'][1]}x{img['best_resolution'][0]}, "
               f"{img['tiles']} tiles, {img['tokens']} visual tokens; 'video ms' = image decode)")
    else:
        v = cfg["video"]
        src = "video " + (f"synthetic {v['size'][0]}x{v['size'][1]}, {v['frames']} frames" if v.get("synthetic") else v["path"])
    lines.append(
        f"- {result['created']} | {src} | {cfg['max_new_tokens']} new tokens per run (EOS ignored) | warm-up {cfg['warmup']}, "
        f"{cfg['iterations']} timed iteration{'s' if cfg['iterations'] != 1 else ''} (cold feature cache) | values: mean ± sample stddev (N−1) | ×: speed-up vs the first "
        f"variant at the same {unit}" + ("" if img else f" (nopool: at {cfg['headline_frames']} frames)") + ", > 1 = faster"
    )
    hw = result.get("hardware") or {}
    if hw:
        bwp = hw["bandwidth_probe"]
        bp = ", ".join(f"{k} {x:.1f}" for k, x in bwp["probes"].items())
        gp = ", ".join(f"{k} {x:.1f}" for k, x in hw["gemm_probe"]["probes"].items())
        spread = (f" [{bwp['probe']}: median of {bwp['repeats']}, min {bwp['min']:.1f} / max {bwp['max']:.1f}, spread {bwp['spread']:.0%}; "
                  f"working set {_si(bwp['bytes'], 'B')}" + (f", LLC {_si(bwp['llc_bytes'], 'B')}]" if bwp.get("llc_bytes") else "]")) if "spread" in bwp else ""
        lines.append(f"- hardware: memory bandwidth {hw['memory_bandwidth_gbs']:.1f} GB/s ({bp}){spread}; fp32 GEMM {hw['gemm_gflops']:.1f} GFLOP/s ({gp})")
    ref = reference_entry(result["variants"], cfg["headline_frames"])
    if ref:
        c = ref.get("cache")
        if c:
            lines.append(
                f"- feature cache ({ref['name']}, {ref['frames']} {unit}): first question {c['first_ms']:.1f} ms, "
                f"second question on the same {'images' if unit == 'images' else 'image' if img else 'video'} {c['second_ms']:.1f} ms ({c['ratio']:.2f}×; vision {c['second_stages']['vision']:.1f} ms on a hit)"
            )
        parts = []
        if ref.get("vision_efficiency") is not None:
            parts.append(f"vision {ref['vision_efficiency']:.2f} ({_si(ref['vision_flops'], 'FLOP')} in {ref['stages']['vision']['mean']:.1f} ms)")
        if ref.get("prefill_efficiency") is not None:
            parts.append(f"prefill {ref['prefill_efficiency']:.2f} ({_si(ref['prefill_flops'], 'FLOP')} in {ref['stages']['prefill']['mean']:.1f} ms)")
        if parts:
            lines.append(f"- efficiency ({ref['name']}, {ref['frames']} {unit}): " + "; ".join(parts))
    for e in result["variants"]:
        if e.get("error") or e["frames"] != cfg["headline_frames"] or e.get("decode_efficiency") is None:
            continue
        lines.append(
            f"- decode ({e['name']}, {e.get('llm_precision', e['precision'])}): {e['decode_efficiency']:.2f} of the bandwidth = "
            f"({_si(e['decode_weight_bytes'], 'B')} weights + {_si(e['decode_kv_bytes'], 'B')} KV at ~{e['context_len'] + e['new_tokens'] // 2} positions) "
            f"× {e['tokens_per_s']:.2f} tok/s ÷ {hw['memory_bandwidth_gbs']:.1f} GB/s"
            + (f"; KV {_si(e['kv_cache_allocated_bytes'], 'B')} allocated / {_si(e.get('kv_cache_peak_used_bytes') or e['kv_cache_bytes'], 'B')} "
               f"used by the largest request (this question: {e['context_len']} + {e['new_tokens'] - 1} positions)" if e.get("kv_cache_allocated_bytes") else "")
        )
    loads = [f"{e['name']} {e['load_ms']:.0f} / {e['reload_ms']:.0f} ms" for e in result["variants"]
             if not e.get("error") and e["frames"] == cfg["headline_frames"] and e.get("load_ms") is not None and e.get("reload_ms") is not None]
    if loads:
        lines.append("- session load, first / second in this process (cold / warm: page cache, ONNX Runtime's optimised graphs): " + "; ".join(loads))
    cold = result.get("cold_start")
    if cold and cold.get("error"):
        lines.append(f"- cold start: `{cold['command']}` failed ({cold['error']})")
    elif cold:
        runs = cold.get("walls_ms") or [cold["wall_ms"]]
        each = f" (the median of {len(runs)} processes: {' / '.join(f'{w / 1e3:.2f}' for w in runs)} s)" if len(runs) > 1 else ""
        lines.append(f"- cold start ({cold['variant']}): `{cold['command']}` took {cold['wall_ms'] / 1e3:.2f} s{each} (its answer {cold['fresh_e2e_ms'] / 1e3:.2f} s, "
                     f"{cold['tokens']} tokens), the warm answer {cold['warm_e2e_ms'] / 1e3:.2f} s: overhead {cold['overhead_ms'] / 1e3:.2f} s"
                     + (f" (the warm answer less {cold['missing_tokens']} tokens at the warm TPOT: the fresh one stopped at EOS)" if cold["missing_tokens"] else ""))
    if ref:
        lines.append(f"- memory ({ref['name']}, {ref['frames']} {unit}): weights {_si(ref['weight_bytes'], 'B')}, KV cache {_si(ref['kv_cache_bytes'], 'B')} "
                     f"used by a run ({ref['context_len']} + {ref['new_tokens'] - 1} positions)")
    for e in result["variants"]:
        for n in e.get("notes") or []:
            lines.append(f"- note ({e['name']}): {n}")
    marks = targets_apply(result)
    vs = vs_torch_table(result["variants"], marks)
    if vs:
        lines += ["", "same run against the PyTorch reference (torch ms / this ms, > 1 = faster" + ("; ✓/✗: vision ≥ 1.2, prefill ≥ 1.43 "
                  "i.e. ≤ 0.7× PyTorch's time, e2e ≥ 1.5):" if marks else "):"), "", *vs]
    if result["targets"] and not targets_apply(result):
        lines.append("")
        lines.append(f"targets: not evaluated — preset {', '.join(map(str, result.get('presets') or ['unknown']))} is a toy model whose "
                     "timings are fixed overheads; run the bench on the small preset (or larger) for the targets.")
    elif result["targets"]:
        lines.append("")
        lines.append(f"targets ({cfg['headline_frames']} {unit}; measured, not asserted):")
        lines.append("")
        for t in result["targets"]:
            mark = "✓" if t["passed"] else "✗"
            lines.append(f"- {mark} {t['description']}: {t['value']:.2f} (target {t['op']} {t['target']}) [{t['compared']}]")
    if result.get("failed"):
        lines.append("")
        lines.append(f"{result['failed']} variant run(s) failed (see the FAILED rows).")
    return "\n".join(lines) + "\n"


# ---- JSON / CSV ---------------------------------------------------------------------------------------------
def _clean(obj):
    """NaN / inf -> None so the JSON is strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(result), indent=2, allow_nan=False) + "\n")
    return path


CSV_FIELDS = (
    "name", "kind", "backend", "baseline", "provider", "precision", "frames", "visual_tokens", "context_len", "new_tokens", "iterations",
    "tokens_per_s", "tokens_per_s_stddev", "e2e_tokens_per_s", "peak_rss_mb", "peak_device_mb", "weight_bytes", "decoder_weight_bytes",
    "kv_cache_bytes", "kv_cache_allocated_bytes", "kv_cache_peak_used_bytes", "llm_precision", "load_ms", "reload_ms", "decode_weight_bytes", "decode_kv_bytes", "decode_bytes_per_token",
    "vision_efficiency", "prefill_efficiency", "decode_efficiency", "vision_precision", "vision_cosine",
)
CSV_STAGES = (*STAGES, "ttft", "decode")


def csv_header() -> list[str]:
    return [
        *CSV_FIELDS, "cache_first_ms", "cache_second_ms", "cache_ratio", "speedup_e2e", "speedup_ttft", "speedup_prefill", "speedup_vision",
        *(f"vs_torch_{st}" for st in TORCH_RATIO_STAGES),
        *(f"{st}_{k}_ms" for st in CSV_STAGES for k in STATS), "created", "git_commit", "cpu", "error",
    ]


def csv_rows(result: dict) -> list[dict]:
    env = result["environment"]
    git = ((env.get("ppllava_edge") or {}).get("git") or {}).get("commit")
    rows = []
    for e in result["variants"]:
        row = {k: e.get(k) for k in CSV_FIELDS}
        c = e.get("cache") or {}
        row.update(cache_first_ms=c.get("first_ms"), cache_second_ms=c.get("second_ms"), cache_ratio=c.get("ratio"))
        r = e.get("ratios") or {}
        row.update(speedup_e2e=r.get("e2e"), speedup_ttft=r.get("ttft"), speedup_prefill=r.get("prefill"), speedup_vision=r.get("vision"))
        vt = e.get("vs_torch") or {}
        row.update({f"vs_torch_{st}": vt.get(st) for st in TORCH_RATIO_STAGES})
        for st in CSV_STAGES:
            stats = (e.get("stages") or {}).get(st) or {}
            for k in STATS:
                row[f"{st}_{k}_ms"] = stats.get(k)
        row.update(created=result["created"], git_commit=git, cpu=(env.get("cpu") or {}).get("model"), error=e.get("error"))
        rows.append(_clean(row))
    return rows


def csv_text(header: list[str], rows: list[dict]) -> str:
    """CSV with a header line; None cells are empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header)
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if v is None else v) for k, v in _clean(row).items()})
    return buf.getvalue()


def write_csv(result: dict, path: str | Path, header: list[str] | None = None, rows: list[dict] | None = None) -> Path:
    """The bench's CSV (or any `header` / `rows`, e.g. the load test's)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(csv_text(header or csv_header(), rows if rows is not None else csv_rows(result)), newline="")
    return path


# ---- plot ---------------------------------------------------------------------------------------------------
PLOT_STAGES = (("decode_video", "video decode"), ("preprocess", "preprocess"), ("vision", "vision"), ("pool", "text + pool"),
               ("prefill", "prefill"), ("decode", "decode steps"))


def write_plot(result: dict, path: str | Path) -> Path:
    """PNG: stacked mean stage times per variant (left) and end-to-end latency / TTFT vs frames (right)."""
    from .._deps import require

    require("matplotlib", "bench", "The bench plot (--plot)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = [e for e in result["variants"] if not e.get("error")]
    fig = Figure(figsize=(13, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{e['name']}\n{e['frames']}f, {e['visual_tokens']} tok" for e in entries]
    bottoms = [0.0] * len(entries)
    colors = ["#8c8c8c", "#bcbd22", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#e0e0e0"]
    for (key, name), color in zip(PLOT_STAGES, colors):
        vals = [e["stages"][key]["mean"] / 1e3 for e in entries]
        ax.bar(range(len(entries)), vals, bottom=bottoms, label=name, color=color)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    other = [max(0.0, e["stages"]["e2e"]["mean"] / 1e3 - b) for e, b in zip(entries, bottoms)]
    ax.bar(range(len(entries)), other, bottom=bottoms, label="other (tokenize, merge)", color=colors[-1])
    ax.set_xticks(range(len(entries)), labels, fontsize=8)
    ax.set_ylabel("seconds (mean)")
    cfg = result["config"]
    ax.set_title(f"stages per variant ({cfg['max_new_tokens']} new tokens)")
    ax.legend(fontsize=8)
    names = list(dict.fromkeys(e["name"] for e in entries))
    for name in names:
        pts = sorted((e["frames"], e["stages"]["e2e"]["mean"] / 1e3, e["stages"]["ttft"]["mean"] / 1e3) for e in entries if e["name"] == name)
        xs = [p[0] for p in pts]
        line = ax2.plot(xs, [p[1] for p in pts], marker="o", label=f"{name} e2e")[0]
        ax2.plot(xs, [p[2] for p in pts], marker="x", linestyle="--", color=line.get_color(), label=f"{name} TTFT")
    ax2.set_xlabel("frames")
    ax2.set_ylabel("seconds (mean)")
    ax2.set_title("latency vs frames")
    ax2.set_xticks(sorted({e["frames"] for e in entries}))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(f"ppllava-edge bench, {result['created']}, {(env.get('cpu') or {}).get('model', '?')}, provider {env.get('provider')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
