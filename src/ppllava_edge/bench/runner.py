"""The benchmark loop: every variant on the same video, questions and token budget, side by side.

    opts = BenchOptions(exports=[Path("E2")], video=Path("clip.mp4"), frames=[32], backends=("ort", "torch"),
                        baselines=("nopool", "avgpool"), iterations=3)
    result = run_bench(opts, progress=lambda done, total, msg: ...)   # a JSON-ready dict (see bench/report.py)

Variants, in this order (the first is the reference of every ratio):

- each EXPORT folder x each runtime backend (`ort`: ONNX Runtime with --provider; `trt`: the engines of
  `ppllava-edge build`, given with `engines=`);
- the paper's baselines on the same backbone, run on the first export with ONNX Runtime: `nopool` (LLaVA-NeXT
  without pooling: 8 frames x all P patch tokens through linear_2 into the LLM) and `avgpool` (the T frames
  averaged: P tokens);
- `torch`: the PyTorch reference model loaded from the checkpoint recorded in the manifest (last, because
  importing torch raises the process RSS for good and would inflate the others' peak RSS).

Rules (llama-bench's): warm-up runs are not timed; every run generates exactly `max_new_tokens` tokens (EOS
ignored); each timed iteration starts cold (empty feature cache); progress is reported only between timed runs.
With `questions >= 2` each iteration of a runtime variant then asks the other questions on the same video, which
hit the feature cache: that is the feature-cache measure (second question vs first).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import InputError
from ..manifest import ExportManifest
from ..memory import MemorySampler
from . import hardware
from .plan import (BACKENDS, NOPOOL_FRAMES, QUESTIONS, STAGES, TORCH_RATIO_STAGES, BenchOptions, ProgressFn, VariantSpec,
                   headline_frames, plan, reference_entry)
from .stats import mean_std, summarize
from .targets import evaluate_targets, targets_apply
from .variants import RunRecord, VariantRunner, _device_used_bytes, open_runner

log = logging.getLogger(__name__)


# ---- the loop -----------------------------------------------------------------------------------------------
def _stage_stats(records: list[RunRecord]) -> dict:
    out = {}
    for st in STAGES:
        if st == "decode_step":
            samples = [x for r in records for x in r.decode_steps]
        else:
            samples = [r.stages[st] for r in records]
        out[st] = {**summarize(samples), "samples": [round(x, 4) for x in samples]}
    out["ttft"] = {**summarize([r.ttft for r in records]), "samples": [round(r.ttft, 4) for r in records]}
    dec = [float(sum(r.decode_steps)) for r in records]
    out["decode"] = {**summarize(dec), "samples": [round(x, 4) for x in dec]}
    return out


def _entry(spec: VariantSpec, runner: VariantRunner, frames: int, opts: BenchOptions, records: list[RunRecord], seconds: list[RunRecord],
           peak_rss: int, rss_before: int, peak_dev: int | None, dev_base: int | None, hw: dict) -> dict:
    m = spec.manifest.model
    first = records[0]
    # tokens/s per run (llama-bench: rates per sample, then averaged): decode tokens over decode time, and new
    # tokens over the whole answer.
    tps = [len(r.decode_steps) / (sum(r.decode_steps) / 1e3) for r in records if r.decode_steps and sum(r.decode_steps) > 0]
    tps_mean, tps_std = mean_std(tps)
    e2e_tps, _ = mean_std([r.new_tokens / (r.stages["e2e"] / 1e3) for r in records])
    stages = _stage_stats(records)
    positions = first.context_len + first.new_tokens - 1
    kv_item = runner.kv_itemsize()
    w_bytes, kv_bytes = hardware.decode_bytes_per_token(runner.decoder_weight_bytes, m, first.context_len, first.new_tokens, kv_item)
    vis_frames = frames
    vflops = hardware.vision_flops(m, vis_frames)
    pflops = hardware.prefill_flops(m, first.context_len)
    gflops = hw.get("gemm_gflops")
    bw = hw.get("memory_bandwidth_gbs")
    cache = None
    if seconds:
        f_ms = stages["e2e"]["mean"]
        s_ms, s_std = mean_std([r.stages["e2e"] for r in seconds])
        cache = {
            "first_ms": f_ms,
            "second_ms": s_ms,
            "second_stddev_ms": s_std,
            "ratio": s_ms / f_ms if f_ms else None,
            "second_hits": sum(r.cache_hit for r in seconds),
            "second_runs": len(seconds),
            "second_stages": {st: summarize([r.stages[st] for r in seconds])["mean"] for st in ("vision", "pool", "prefill", "e2e")},
        }
    return {
        "name": spec.name,
        "kind": spec.kind,
        "backend": spec.backend,
        "baseline": spec.baseline,
        "provider": runner.provider,
        "export": str(spec.manifest.folder),
        "checkpoint": spec.manifest.checkpoint.get("path"),
        "precision": spec.precision,
        "frames": frames,
        "questions": opts.questions if runner.uses_cache else 1,
        "warmup": opts.warmup,
        "iterations": len(records),
        "visual_tokens": first.visual_tokens,
        "context_len": first.context_len,
        "new_tokens": first.new_tokens,
        "tokens_per_s": tps_mean,
        "tokens_per_s_stddev": tps_std,
        "tokens_per_s_samples": [round(x, 4) for x in tps],
        "e2e_tokens_per_s": e2e_tps,
        "peak_rss_mb": peak_rss / 2**20,
        "rss_before_mb": rss_before / 2**20,
        "peak_device_mb": peak_dev / 2**20 if peak_dev is not None else None,
        "device_before_mb": dev_base / 2**20 if dev_base is not None else None,
        "weight_bytes": int(runner.weight_bytes),
        "decoder_weight_bytes": int(runner.decoder_weight_bytes),
        "llm_precision": runner.llm_precision or spec.precision,
        "vision_precision": runner.vision_precision or spec.precision,
        "vision_cosine": _gate_vision_cosine(spec.manifest) if spec.kind == "export" else None,
        "quantized_from": _quantized_from(spec.manifest) if spec.kind == "export" else None,
        "kv_cache_bytes": hardware.kv_cache_bytes(m, positions, kv_item),
        "kv_cache_allocated_bytes": runner.kv_allocated_bytes(),
        "kv_cache_peak_used_bytes": runner.kv_peak_used_bytes(),
        "decode_weight_bytes": w_bytes,
        "decode_kv_bytes": kv_bytes,
        "decode_bytes_per_token": w_bytes + kv_bytes,
        "vision_flops": vflops,
        "prefill_flops": pflops,
        "vision_efficiency": hardware.compute_efficiency(vflops, stages["vision"]["mean"], gflops),
        "prefill_efficiency": hardware.compute_efficiency(pflops, stages["prefill"]["mean"], gflops),
        "decode_efficiency": hardware.decode_efficiency(w_bytes + kv_bytes, tps_mean, bw),
        "stages": stages,
        "runs": [{"visual_tokens": r.visual_tokens, "context_len": r.context_len, "new_tokens": r.new_tokens, "e2e_ms": round(r.stages["e2e"], 4)} for r in records],
        "cache": cache,
        "notes": list(runner.notes),
        "load_ms": runner.load_ms,
        "reload_ms": runner.reload_ms,
        "error": None,
    }


def _gate_vision_cosine(manifest: ExportManifest) -> float | None:
    """A quantized export's vision accuracy: the lowest output cosine to the fp32 export in its gate (accuracy.json)."""
    import json

    acc = (manifest.quantization.get("accuracy") or {}).get("file")
    if not acc or not (manifest.folder / acc).is_file():
        return None
    checks = json.loads((manifest.folder / acc).read_text()).get("checks", [])
    values = [c["value"] for c in checks if c.get("graph") == "vision" and c.get("metric", "").endswith("cosine (min)")]
    return min(values) if values else None


def _quantized_from(manifest: ExportManifest) -> str | None:
    """The fp32 export a quantized export was made from (resolved path), if any."""
    src = (manifest.quantization.get("source_export") or {}).get("path")
    return str(Path(src).resolve()) if src else None


def _failed(spec: VariantSpec, frames: int, exc: BaseException) -> dict:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return {"name": spec.name, "kind": spec.kind, "backend": spec.backend, "baseline": spec.baseline, "export": str(spec.manifest.folder),
            "precision": spec.precision, "frames": frames, "error": f"{type(exc).__name__}: {msg}"}


def _environment(provider: str, threads: int | None) -> dict:
    try:
        from ..engine.environment import collect_environment

        env = collect_environment()
    except Exception as exc:  # the environment block never stops a benchmark
        import platform

        env = {"python": {"version": platform.python_version()}, "platform": {"platform": platform.platform()},
               "cpu": {"model": platform.processor(), "logical": os.cpu_count()}, "error": f"{type(exc).__name__}: {exc}"}
    env["provider"] = provider
    env["threads"] = threads
    env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return env


def _video(opts: BenchOptions, frames: list[int], tmp: list) -> tuple[Path | list[Path], dict]:
    """What every run answers about: --image (one path; several --image: the list), --video, or a synthetic clip."""
    from ..media import input_kind, write_test_video

    if opts.image:
        paths = [Path(p) for p in opts.image]
        info = {"path": ", ".join(map(str, paths)), "image": True, "bytes": sum(p.stat().st_size for p in paths)}
        return (paths[0], info) if len(paths) == 1 else (paths, {**info, "images": len(paths)})
    if opts.video is not None:
        video = Path(opts.video)
        if not video.is_file():
            raise InputError(f"--video {video}: no such file")
        if input_kind(video) != "video":
            raise InputError(f"--video {video}: not a video (the bench samples frames from a clip)")
        return video, {"path": str(video), "synthetic": False, "bytes": video.stat().st_size}
    folder = opts.workdir
    if folder is None:
        td = tempfile.TemporaryDirectory(prefix="ppllava-bench-")
        tmp.append(td)
        folder = Path(td.name)
    folder.mkdir(parents=True, exist_ok=True)
    n = max(96, 2 * max(frames + [NOPOOL_FRAMES]))
    video = write_test_video(folder / "synthetic.mp4", num_frames=n, size=(640, 360))
    return video, {"path": str(video), "synthetic": True, "frames": n, "size": [640, 360], "bytes": video.stat().st_size}


def run_bench(opts: BenchOptions, progress: ProgressFn | None = None) -> dict:
    """Run every variant and return the report dict (environment, hardware, variants, cache, targets...)."""
    specs = plan(opts)
    all_frames = sorted({f for s in specs for f in s.frames})
    pooled_frames = specs[0].frames
    head = headline_frames(pooled_frames)
    tmp: list = []
    per_entry = opts.warmup + opts.iterations
    total = sum(len(s.frames) for s in specs) * per_entry + len(specs) + (2 if opts.hardware else 0)
    done = 0

    def tick(msg: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, msg)

    try:
        video, video_info = _video(opts, all_frames, tmp)
        if len(opts.image) == 1:  # what the image turns into: size, best resolution, tiles, visual tokens
            from ..media import read_image_size

            video_info.update(specs[0].manifest.image_layout(read_image_size(video)).as_dict())
        elif opts.image:  # several images: g*g visual tokens each
            video_info["tokens"] = len(opts.image) * specs[0].manifest.image_rules["pooled_grid"] ** 2
        provider = specs[0].backend
        if any(s.backend in ("ort", "trt") for s in specs):
            from ..runtime.session import resolve_provider

            provider = resolve_provider(opts.provider)
        env = _environment(provider, opts.threads)
        hw: dict = {}
        if opts.hardware:
            bw = hardware.memory_bandwidth(opts.bandwidth_mb, threads=opts.threads)
            tick(f"memory bandwidth {bw['gbs']:.1f} GB/s (spread {bw['spread']:.0%})")
            mm = hardware.gemm_flops(opts.gemm_n, threads=opts.threads)
            tick(f"fp32 GEMM {mm['gflops']:.1f} GFLOP/s")
            hw = {"memory_bandwidth_gbs": bw["gbs"], "gemm_gflops": mm["gflops"], "bandwidth_probe": bw, "gemm_probe": mm}

        gpu = provider in ("cuda", "tensorrt") or any(s.backend == "trt" for s in specs)
        sampler = MemorySampler(device_fn=_device_used_bytes if gpu else None).start()
        entries: list[dict] = []
        questions = QUESTIONS[: opts.questions]
        try:
            for spec in specs:
                rss_before = sampler.reset()
                dev_base = sampler.device_base
                try:
                    runner = open_runner(spec, opts)
                except Exception as exc:
                    if opts.raise_errors or isinstance(exc, KeyboardInterrupt):
                        raise
                    log.warning("%s: %s", spec.name, exc)
                    entries += [_failed(spec, f, exc) for f in spec.frames]
                    done += len(spec.frames) * per_entry + 1
                    if progress is not None:
                        progress(done, total, f"{spec.name}: failed to load ({type(exc).__name__})")
                    continue
                tick(f"{spec.name}: loaded ({runner.provider})")
                try:
                    for frames in spec.frames:
                        label = f"{spec.name} {frames}f"
                        try:
                            for i in range(opts.warmup):
                                runner.clear_cache()
                                runner.run(video, questions[0], frames)
                                tick(f"{label}: warm-up {i + 1}/{opts.warmup}")
                            records: list[RunRecord] = []
                            seconds: list[RunRecord] = []
                            for i in range(opts.iterations):
                                runner.clear_cache()
                                rec = runner.run(video, questions[0], frames)
                                records.append(rec)
                                if runner.uses_cache:
                                    for q in questions[1:]:
                                        seconds.append(runner.run(video, q, frames))
                                tick(f"{label}: {i + 1}/{opts.iterations} e2e {rec.stages['e2e']:.0f} ms")
                            peak_rss, peak_dev = sampler.peaks()
                            entries.append(_entry(spec, runner, frames, opts, records, seconds, peak_rss, rss_before, peak_dev, dev_base, hw))
                        except Exception as exc:
                            if opts.raise_errors or isinstance(exc, KeyboardInterrupt):
                                raise
                            log.warning("%s: %s", label, exc)
                            entries.append(_failed(spec, frames, exc))
                finally:
                    runner.close()
                    del runner
                    gc.collect()
        finally:
            sampler.stop()
        cold = None  # before the --synthetic video is removed
        ref = reference_entry(entries, head)
        if opts.cold_start and ref and ref.get("kind") == "export" and ref.get("backend") == "ort" and not opts.image:
            if progress is not None:
                progress(done, total, f"{ref['name']}: cold start (a fresh `ask` process)")
            cold = cold_start(opts, ref, video)
    finally:
        for td in tmp:
            td.cleanup()

    _add_ratios(entries, head)
    result = {
        "schema": "ppllava-edge-bench/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command,
        "environment": env,
        "config": {
            "exports": [str(e) for e in opts.exports], "video": None if opts.image else video_info, "image": video_info if opts.image else None,
            "frames": pooled_frames, "headline_frames": head,
            "nopool_frames": NOPOOL_FRAMES, "questions": list(questions), "max_new_tokens": opts.max_new_tokens, "warmup": opts.warmup,
            "iterations": opts.iterations, "provider": opts.provider, "threads": opts.threads,
            "backends": sorted({s.backend for s in specs if s.kind != "baseline"}, key=BACKENDS.index),
            "baselines": [s.baseline for s in specs if s.baseline], "ignore_eos": True,
        },
        "hardware": hw,
        "memory_bandwidth_gbs": hw.get("memory_bandwidth_gbs"),
        "gemm_gflops": hw.get("gemm_gflops"),
        "process_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "variants": entries,
    }
    ref = reference_entry(entries, head)
    result["reference"] = {"name": ref["name"], "frames": ref["frames"]} if ref else None
    for key in ("decode_efficiency", "vision_efficiency", "prefill_efficiency"):
        result[key] = ref.get(key) if ref else None
    result["decode_efficiency_by_variant"] = {e["name"]: e.get("decode_efficiency") for e in entries if not e.get("error") and e["frames"] == head}
    result["cache"] = (dict(ref["cache"], variant=ref["name"], frames=ref["frames"]) if ref and ref.get("cache") else None)
    result["cold_start"] = cold
    result["presets"] = sorted({str(s.manifest.preset) for s in specs})
    result["targets"] = evaluate_targets(result)
    result["targets_apply"] = targets_apply(result)  # False on toy presets (tiny): the markdown does not print them
    result["failed"] = sum(1 for e in entries if e.get("error"))
    return result


COLD_RUNS = 3


def cold_start(opts: BenchOptions, entry: dict, video: Path, runs: int = COLD_RUNS) -> dict:
    """`runs` fresh-process `python -m ppllava_edge ask EXPORT VIDEO QUESTION --json` on the entry's export, one after
    the other (page cache and ort_cache warm, as a user's next command); the median by wall time counts: its wall
    minus the warm answer's mean e2e in this run. A fresh answer that stops at EOS before max_new_tokens is compared
    with the warm answer less the warm TPOT per token it did not generate. The median, since the first process after
    the bench's own runs measured up to 1.2 s slower on this VM (a host effect: the bench process is idle then)."""
    import subprocess

    cmd = [sys.executable, "-m", "ppllava_edge", "ask", str(entry["export"]), str(video), QUESTIONS[0], "--frames", str(entry["frames"]),
           "--max-new-tokens", str(opts.max_new_tokens), "--provider", opts.provider, "--json"]
    if opts.threads is not None:
        cmd += ["--threads", str(opts.threads)]
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        wall_ms = (time.perf_counter() - t0) * 1e3
        if proc.returncode != 0:
            log.warning("cold start: `%s` exited %d: %s", shlex.join(cmd), proc.returncode, proc.stderr.strip()[-500:])
            return {"command": shlex.join(cmd), "error": f"exit {proc.returncode}"}
        samples.append((wall_ms, json.loads(proc.stdout)))
    walls = [w for w, _ in samples]
    wall_ms, ans = sorted(samples, key=lambda s: s[0])[len(samples) // 2]  # the median process (runs is odd)
    tokens = len(ans.get("ids") or [])
    warm = entry["stages"]["e2e"]["mean"]
    tpot = (entry["stages"].get("decode_step") or {}).get("mean") or 0.0
    missing = max(0, opts.max_new_tokens - tokens)
    overhead = wall_ms - (warm - missing * tpot)  # the warm answer cut to the tokens the fresh one generated
    return {"command": shlex.join(cmd), "variant": entry["name"], "wall_ms": wall_ms, "walls_ms": walls,
            "fresh_e2e_ms": (ans.get("timings_ms") or {}).get("e2e"), "session_load_ms": ans.get("session_load_ms"),
            "warm_e2e_ms": warm, "tokens": tokens, "missing_tokens": missing, "overhead_ms": overhead}


def _add_ratios(entries: list[dict], head: int) -> None:
    """Speed-up of each entry vs the first variant at the same frames (nopool: at the headline frames):
    reference time / this time, so > 1 is faster than the reference."""
    if not entries:
        return
    first = entries[0]["name"]
    refs = {e["frames"]: e for e in entries if e["name"] == first and not e.get("error")}
    for e in entries:
        if e.get("error"):
            continue
        ref = refs.get(head if e.get("baseline") == "nopool" else e["frames"])
        e["reference"] = f"{ref['name']} {ref['frames']}f" if ref else None
        e["ratios"] = {}
        for st in ("e2e", "ttft", "prefill", "vision", "decode_step"):
            a, b = (ref["stages"][st]["mean"] if ref else None), e["stages"][st]["mean"]
            e["ratios"][st] = a / b if a and b else None
    _add_torch_ratios(entries)


def _add_torch_ratios(entries: list[dict]) -> None:
    """Speed-up of each runtime entry vs the PyTorch reference of the same run at the same frames (`vs_torch`:
    torch time / this time per stage, > 1 = faster than PyTorch); None when no torch variant ran at those frames.
    With several checkpoints, the torch variant of the entry's own checkpoint."""
    torch = [e for e in entries if e["kind"] == "torch" and not e.get("error")]
    for e in entries:
        if e.get("error") or e["kind"] == "torch":
            continue
        same = [t for t in torch if t["frames"] == e["frames"]]
        ref = next((t for t in same if t.get("checkpoint") == e.get("checkpoint")), same[0] if same else None)
        if ref is None:
            e["vs_torch"] = None
            continue
        e["vs_torch"] = {"reference": f"{ref['name']} {ref['frames']}f"}
        for st in TORCH_RATIO_STAGES:
            a, b = ref["stages"][st]["mean"], e["stages"][st]["mean"]
            e["vs_torch"][st] = a / b if a and b else None
