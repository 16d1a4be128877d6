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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..manifest import ExportManifest, load_manifest
from ..memory import MemorySampler
from . import hardware
from .stats import mean_std, summarize

log = logging.getLogger(__name__)

BACKENDS = ("ort", "trt", "torch")
BASELINES = ("nopool", "avgpool")
STAGES = ("decode_video", "preprocess", "vision", "pool", "prefill", "decode_step", "e2e")
"""Timed stages (ms). `decode_step` pools every decode step of every run (TPOT)."""
DERIVED_STAGES = ("ttft", "decode")
"""Per run: `ttft` = e2e minus the decode steps (time to first token); `decode` = all decode steps."""
DEFAULT_FRAMES = (8, 16, 32, 64)
NOPOOL_FRAMES = 8
"""LLaVA-NeXT's video setting in the paper: 8 frames x 576 patch tokens = 4608 visual tokens."""
HEADLINE_FRAMES = 32
"""Top-level numbers and targets use 32 frames (the paper's setting) when measured, else the largest frames."""
QUESTIONS = (
    "What is happening in the video?",
    "Describe the colours and the shapes you can see.",
    "Which object moves fastest, and in which direction?",
    "How many distinct objects appear in the clip?",
    "Summarise the video in one sentence.",
    "What changes between the beginning and the end?",
    "Is there any text or number visible?",
    "Where is the square at the end of the clip?",
)

ProgressFn = Callable[[int, int, str], None]


# ---- options and validation ---------------------------------------------------------------------------------
@dataclass
class BenchOptions:
    exports: list[Path]
    video: Path | None = None
    image: Path | None = None  # bench an image instead of a video (its anyres tiles play the frames' part)
    synthetic: bool = False
    frames: list[int] | None = None  # None: DEFAULT_FRAMES within every export's range
    questions: int = 2
    max_new_tokens: int = 32
    warmup: int = 1
    iterations: int = 5
    provider: str = "auto"
    backends: tuple[str, ...] = ("ort",)
    baselines: tuple[str, ...] = ()
    threads: int | None = None
    engines: tuple[Path, ...] = ()  # one TensorRT engine folder per export, for backend "trt"
    hardware: bool = True  # measure bandwidth / GEMM FLOP/s (a few seconds)
    bandwidth_mb: int | None = None  # working set of the bandwidth probe (default: 1 GiB or 16x the LLC)
    gemm_n: int = 1536
    workdir: Path | None = None  # where --synthetic writes its video (default: a temporary folder)
    raise_errors: bool = False  # re-raise a failing variant's exception instead of recording it
    cold_start: bool = False  # after the runs: one fresh-process `ask` of the reference export (its wall minus the warm answer)
    command: str | None = None


def parse_choices(value: str | list[str] | tuple[str, ...] | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    """'a,b' (or a list) -> ('a', 'b'), each checked against `allowed`; duplicates dropped, order kept."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [v for part in value for v in str(part).split(",")]
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        if name not in allowed:
            raise InputError(f"unknown {what} {raw.strip()!r}; choose from: {', '.join(allowed)}")
        if name not in out:
            out.append(name)
    return tuple(out)


def parse_frames(value: str | list[int] | None) -> list[int] | None:
    """'8,16,32' -> [8, 16, 32]; every value must be an even integer >= 2."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    frames: list[int] = []
    for raw in items:
        text = str(raw).strip()
        if not text:
            continue
        try:
            f = int(text)
        except ValueError:
            raise InputError(f"--frames: {text!r} is not an integer (expected a list such as 8,16,32)") from None
        if f < 2 or f % 2:
            raise InputError(
                f"--frames {f}: frame counts must be even and >= 2 (the (2,3,3) pooling pairs frames, so the token "
                "count is T/2 x tokens per pair).\nHint: use 8,16,32 or 64."
            )
        if f not in frames:
            frames.append(f)
    if not frames:
        raise InputError("--frames is empty; give a list such as 8,16,32")
    return frames


@dataclass
class VariantSpec:
    name: str
    kind: str  # "export" | "torch" | "baseline"
    backend: str  # "ort" | "trt" | "torch"
    manifest: ExportManifest
    frames: list[int]
    baseline: str | None = None
    engines: Path | None = None
    precision: str = "fp32"


def precision_label(manifest: ExportManifest) -> str:
    """Precision of the graphs a pooled answer runs: 'fp32' when vision, prompt_pool and decoder agree, else
    'vis int8 / pool fp32 / llm int8'."""
    graphs = manifest.data["graphs"]
    default = manifest.data.get("dtype", "fp32")
    precs = [graphs.get(g, {}).get("precision", default) for g in ("vision", "prompt_pool", "decoder")]
    if len(set(precs)) == 1:
        return precs[0]
    return " / ".join(f"{short} {p}" for short, p in zip(("vis", "pool", "llm"), precs))


def _check_frames(manifest: ExportManifest, frames: list[int], what: str) -> None:
    fmin, _, fmax = manifest.frames
    lo = max(fmin, 2)
    bad = [f for f in frames if not lo <= f <= fmax]
    if bad:
        raise InputError(
            f"{what} {','.join(map(str, bad))} outside the frame range {lo}..{fmax} of export {manifest.folder}.\n"
            "Hint: re-export with --frames MIN:OPT:MAX covering it, or bench fewer frames."
        )


def _prompt_len(manifest: ExportManifest, questions: int) -> int:
    """Longest prompt (text ids, image token excluded) of the first `questions` questions."""
    tok = manifest.llama_tokenizer()
    return max(len(tok.prompt_ids(q)) - 1 for q in QUESTIONS[:questions])


def plan(opts: BenchOptions) -> list[VariantSpec]:
    """Check the options against the exports and list the variants; raises InputError / ConfigError."""
    if not opts.exports:
        raise InputError("give at least one EXPORT folder")
    for name, value, low in (("--iterations", opts.iterations, 1), ("--warmup", opts.warmup, 0), ("--questions", opts.questions, 1), ("--max-new-tokens", opts.max_new_tokens, 1)):
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    if opts.questions > len(QUESTIONS):
        raise InputError(f"--questions must be <= {len(QUESTIONS)}, got {opts.questions}")
    if opts.video is not None and opts.synthetic:
        raise InputError("give either --video FILE or --synthetic, not both")
    if opts.image is not None and (opts.video is not None or opts.synthetic):
        raise InputError("give either --image FILE or a video (--video / --synthetic), not both")
    if opts.threads is not None and opts.threads < 1:
        raise InputError(f"--threads must be >= 1, got {opts.threads}")
    backends = parse_choices(list(opts.backends), BACKENDS, "backend")
    baselines = parse_choices(list(opts.baselines), BASELINES, "baseline")
    if not backends and not baselines:
        raise InputError("nothing to run: give at least one --backend or --baseline")
    manifests = [load_manifest(e) for e in opts.exports]
    engines: list[Path] = []
    if "trt" in backends:
        if opts.engines and len(opts.engines) != len(manifests):
            raise ConfigError(
                f"--backend trt takes one --engines folder per EXPORT ({len(manifests)} export(s), {len(opts.engines)} --engines given)."
            )
        engines = [Path(e) for e in opts.engines] or [m.folder / "engines" for m in manifests]
        from ..engine.metadata import ENGINES_JSON

        missing = [str(e) for e in engines if not (e / ENGINES_JSON).is_file()]
        if missing:
            raise ConfigError(
                f"--backend trt: no TensorRT engine folder ({ENGINES_JSON}) at {', '.join(missing)}.\n"
                "Hint: build one with `ppllava-edge build EXPORT --out EXPORT/engines` (the default place), or pass --engines DIR per EXPORT."
            )
        from ..engine.availability import require_tensorrt

        require_tensorrt("--backend trt")
    if any(b in backends for b in ("ort", "trt")) or baselines:
        from ..runtime.session import resolve_provider

        resolve_provider(opts.provider)  # unknown / unavailable provider -> InferenceError

    if opts.image is not None:
        frames = _image_frames(opts, manifests, baselines)
    else:
        if opts.frames is None:
            frames = [f for f in DEFAULT_FRAMES if all(max(m.frames[0], 2) <= f <= m.frames[2] for m in manifests)]
            frames = frames or [manifests[0].frames[1] + manifests[0].frames[1] % 2]
        else:
            frames = parse_frames(opts.frames)
        for m in manifests:
            _check_frames(m, frames, "--frames")
            limit = m.model["max_position_embeddings"]
            longest = _prompt_len(m, opts.questions) + m.visual_tokens(max(frames)) + opts.max_new_tokens
            if longest > limit:
                raise InputError(
                    f"{max(frames)} frames ({m.visual_tokens(max(frames))} visual tokens) + prompt + --max-new-tokens "
                    f"{opts.max_new_tokens} = {longest} positions exceed the LLM context of {limit} ({m.folder}).\n"
                    "Hint: bench fewer frames or fewer new tokens."
                )
    if "nopool" in baselines:
        _check_frames(manifests[0], [NOPOOL_FRAMES], "the nopool baseline's frames")

    labels = [m.folder.name or str(m.folder) for m in manifests]
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i + 1}" for i, lab in enumerate(labels)]
    specs: list[VariantSpec] = []
    for i, (m, label) in enumerate(zip(manifests, labels)):
        for b in backends:
            if b == "torch":
                continue
            name = label if b == "ort" else f"{label} {b}"
            specs.append(VariantSpec(name, "export", b, m, frames, engines=engines[i] if b == "trt" else None, precision=precision_label(m)))
    for b in baselines:
        m = manifests[0]
        specs.append(VariantSpec(b, "baseline", "ort", m, [NOPOOL_FRAMES] if b == "nopool" else frames, baseline=b, precision=precision_label(m)))
    if "torch" in backends:
        seen: list[str] = []
        for m in manifests:
            ck = m.data["checkpoint"]["path"]
            if ck in seen:
                continue
            seen.append(ck)
        for ck in seen:
            m = next(x for x in manifests if x.data["checkpoint"]["path"] == ck)
            name = "torch" if len(seen) == 1 else f"torch {Path(ck).name}"
            specs.append(VariantSpec(name, "torch", "torch", m, frames, precision="fp32"))
    return specs


def _image_frames(opts: BenchOptions, manifests: list[ExportManifest], baselines: tuple[str, ...]) -> list[int]:
    """--image: the image's tile count stands in for the frames (one entry per variant); checks the options."""
    from ..media import input_kind, read_image_size

    if opts.frames is not None:
        raise InputError("--frames is for videos; an image's tiles follow from its size and the export's image_grid_pinpoints")
    if baselines:
        raise InputError("--baseline nopool/avgpool are video baselines; drop --baseline with --image")
    image = Path(opts.image)
    if not image.is_file():
        raise InputError(f"--image {image}: no such file")
    if input_kind(image) != "image":
        raise InputError(f"--image {image}: not an image file (by its extension)")
    size = read_image_size(image)
    tiles = set()
    for m in manifests:
        layout = m.image_layout(size)
        tiles.add(layout.tiles)
        limit = m.model["max_position_embeddings"]
        longest = _prompt_len(m, opts.questions) + layout.num_tokens + opts.max_new_tokens
        if longest > limit:
            raise InputError(
                f"the image ({layout.num_tokens} visual tokens) + prompt + --max-new-tokens {opts.max_new_tokens} = {longest} "
                f"positions exceed the LLM context of {limit} ({m.folder}).\nHint: bench fewer new tokens."
            )
    if len(tiles) != 1:
        raise InputError(f"--image {image}: the exports cut it into different tile counts ({sorted(tiles)}); bench them separately")
    return [tiles.pop()]


def headline_frames(frames: list[int]) -> int:
    return HEADLINE_FRAMES if HEADLINE_FRAMES in frames else max(frames)


# ---- memory sampling ----------------------------------------------------------------------------------------
def _device_used_bytes() -> int | None:
    try:
        from ..device import mem_get_info

        free, total = mem_get_info()
        return int(total - free)
    except Exception:
        return None


# ---- one run ------------------------------------------------------------------------------------------------
@dataclass
class RunRecord:
    """One answer: stage times (ms), decode steps, token counts."""

    stages: dict[str, float]
    decode_steps: list[float]
    visual_tokens: int
    context_len: int
    new_tokens: int
    cache_hit: bool = False

    @property
    def ttft(self) -> float:
        return self.stages["e2e"] - float(sum(self.decode_steps))


def _generation(max_new_tokens: int):
    from ..runtime.generation import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)


def _files_bytes(paths) -> int:
    """Bytes of graph files and their external data, each file once (the pools share pools.onnx.data)."""
    from ..manifest import graph_files

    files = {f for p in paths for f in (graph_files(p) if p.suffix == ".onnx" else [p])}
    return sum(f.stat().st_size for f in files if f.is_file())


class _PipelineRunner:
    """A pooled export variant: Pipeline.ask (ONNX Runtime sessions, or TensorRT engines swapped in)."""

    uses_cache = True

    def __init__(self, spec: VariantSpec, opts: BenchOptions):
        from ..runtime.pipeline import Pipeline

        self.spec = spec

        def load():
            t0 = time.perf_counter()
            pipe = Pipeline(spec.manifest, provider=opts.provider, threads=opts.threads, backend="trt" if spec.backend == "trt" else "ort", engines=spec.engines)
            return pipe, (time.perf_counter() - t0) * 1e3

        # session load: the first Pipeline of this process (graphs read, optimised copies written on a first run), then
        # a second one (page cache warm, ONNX Runtime's optimised graphs reused) - the cold / warm load of an answer
        self.pipe, self.load_ms = load()
        if spec.backend != "trt":
            extra, self.reload_ms = load()
            extra.close()
            del extra
        else:
            self.reload_ms = None
        self.provider = self.pipe.provider
        self.gen = _generation(opts.max_new_tokens)
        m = spec.manifest
        self.itemsize = np.dtype(self.pipe.dtype).itemsize
        graphs = self._graphs()
        self.weight_bytes = _files_bytes([*(m.path(m.graph_for(g)) for g in graphs), m.path("embeddings")])
        self.decoder_weight_bytes = hardware.graph_weight_bytes(m.path(m.graph_for("decoder")))
        self.llm_precision = m.graph(m.graph_for("decoder")).get("precision", m.data.get("dtype", "fp32"))
        self.vision_precision = m.graph(m.graph_for("vision")).get("precision", m.data.get("dtype", "fp32"))
        self.notes: list[str] = []

    def _graphs(self) -> tuple[str, ...]:
        return ("vision", "prompt_pool", "decoder")

    def kv_allocated_bytes(self) -> int | None:
        """KV-cache bytes the decoder holds (every buffer it allocated), or None when it does not say."""
        return getattr(self.pipe.decoder, "allocated_bytes", None)

    def kv_peak_used_bytes(self) -> int | None:
        """KV-cache bytes of the largest request the decoder served (its buffer never needs to be larger)."""
        dec = self.pipe.decoder
        if not hasattr(dec, "peak_used_positions"):
            return None
        return hardware.kv_cache_bytes(self.spec.manifest.model, dec.peak_used_positions, dec.dtype.itemsize, max(1, dec.max_batch))

    def clear_cache(self) -> None:
        from ..runtime.cache import FeatureCache

        self.pipe.cache = FeatureCache(self.pipe.cache.max_bytes)

    def run(self, video: Path, question: str, frames: int) -> RunRecord:
        r = self.pipe.ask(video, question, num_frames=frames, generation=self.gen)
        t = r.timings
        stages = {"decode_video": t.decode_video, "preprocess": t.preprocess, "vision": t.vision, "pool": t.pool, "prefill": t.prefill, "e2e": t.e2e}
        return RunRecord(stages, list(t.decode_steps), r.visual_tokens, r.context_len, len(r.ids), t.cache_hit)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
        self.pipe = None


class _BaselineRunner(_PipelineRunner):
    """`nopool` / `avgpool` on the export's graphs: vision -> (all T*P tokens | mean over T) -> projector_head
    (linear_2) -> LLM. The `pool` stage is the reshape / mean plus projector_head."""

    uses_cache = False

    def __init__(self, spec: VariantSpec, opts: BenchOptions):
        super().__init__(spec, opts)
        m = spec.manifest.model
        if spec.baseline == "nopool":
            need = _prompt_len(spec.manifest, 1) + NOPOOL_FRAMES * m["patches_per_frame"] + opts.max_new_tokens
            if need > m["max_position_embeddings"]:
                rotary = spec.manifest.graph(spec.manifest.graph_for("decoder")).get("rotary_positions")
                if rotary is not None and need > rotary:
                    raise InputError(f"nopool needs {need} positions; this export's decoder has rotary tables for {rotary}")
                self.pipe.decoder.max_len = need  # the runtime's own context check stays at max_position_embeddings
                self.notes.append(
                    f"context {need} > max_position_embeddings {m['max_position_embeddings']}: the decoder runs past its "
                    "trained context (RoPE extrapolates; timing only, as LLaVA-NeXT-Video extends the context)"
                )

    def _graphs(self) -> tuple[str, ...]:
        return ("vision", "projector_head", "decoder")

    def run(self, video: Path, question: str, frames: int) -> RunRecord:
        from ..media import load_video, preprocess_frames
        from ..runtime.generation import generate

        pipe = self.pipe
        s: dict[str, float] = {}
        start = time.perf_counter()
        input_ids = np.asarray(pipe.llama.prompt_ids(question), dtype=np.int64)
        t0 = time.perf_counter()
        raw = load_video(video, frames).frames
        t1 = time.perf_counter()
        px = preprocess_frames(raw, pipe.manifest.model["image_size"])
        t2 = time.perf_counter()
        values, _keys = pipe.sessions["vision"].run(None, {"pixel_values": px.astype(pipe.dtype)})
        t3 = time.perf_counter()
        values = np.asarray(values)
        flat = values.reshape(-1, values.shape[-1]) if self.spec.baseline == "nopool" else values.mean(axis=0)
        (tokens,) = pipe.sessions["projector_head"].run(None, {"values": np.ascontiguousarray(flat, dtype=pipe.dtype)})
        t4 = time.perf_counter()
        embeds = pipe.embed_prompt(input_ids, np.asarray(tokens))
        out = generate(pipe.decoder, pipe.embed, embeds, self.gen)
        s.update(decode_video=(t1 - t0) * 1e3, preprocess=(t2 - t1) * 1e3, vision=(t3 - t2) * 1e3, pool=(t4 - t3) * 1e3, prefill=out.prefill_ms)
        s["e2e"] = (time.perf_counter() - start) * 1e3
        return RunRecord(s, list(out.step_ms), int(tokens.shape[0]), int(embeds.shape[0]), len(out.ids))


class _TorchRunner:
    """The PyTorch reference (fp32, sdpa) timed stage by stage on the same inputs; greedy decoding with a manual
    KV-cache loop (transformers DynamicCache), exactly `max_new_tokens` tokens."""

    uses_cache = False

    def __init__(self, spec: VariantSpec, opts: BenchOptions):
        from .._deps import require

        torch = require("torch", "export", "--backend torch (the PyTorch reference)")
        require("transformers", "export", "--backend torch (the PyTorch reference)")
        ck = Path(spec.manifest.data["checkpoint"]["path"])
        if not (ck / "config.json").is_file():
            raise ConfigError(
                f"--backend torch: the checkpoint recorded in {spec.manifest.folder}/export.json ({ck}) is not there.\n"
                "Hint: bench on the machine that exported, or drop torch from --backend."
            )
        from ..model.generate import ReferenceModel

        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.torch = torch
        self.spec = spec
        self.ref = ReferenceModel(ck)
        self.model = self.ref.model.eval()
        self.max_new_tokens = opts.max_new_tokens
        self.provider = f"cpu ({torch.get_num_threads()} threads)"
        params = list(self.model.parameters())
        self.weight_bytes = sum(p.numel() * p.element_size() for p in params)
        lm = self.model.language_model
        emb = lm.get_input_embeddings().weight
        self.decoder_weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters()) - emb.numel() * emb.element_size()
        self.itemsize = 4
        self.notes: list[str] = []

    def kv_allocated_bytes(self) -> int | None:
        return None  # DynamicCache grows with the context

    def clear_cache(self) -> None:
        pass

    def run(self, video: Path, question: str, frames: int) -> RunRecord:
        """One answer on a video (`frames` frames) or an image (its anyres tiles; `frames` is their count)."""
        from ..media import input_kind, load_video, preprocess_frames, preprocess_image, read_image

        torch, model = self.torch, self.model
        proj, lm, cfg = model.multi_modal_projector, model.language_model, model.cfg
        image = input_kind(video) == "image"
        s: dict[str, float] = {}
        steps: list[float] = []
        start = time.perf_counter()
        clip_ids, input_ids = self.ref.tokenize(question)
        t0 = time.perf_counter()
        raw, shown = read_image(video) if image else (load_video(video, frames).frames, None)
        t1 = time.perf_counter()
        if image:
            px = preprocess_image(raw, cfg.vision.image_size, cfg.image_grid_pinpoints, image_size=shown).pixel_values
        else:
            px = preprocess_frames(raw, cfg.vision.image_size)
        t2 = time.perf_counter()
        with torch.inference_mode():
            feats = model.encode_tiles(torch.from_numpy(px)) if image else model.encode_video(torch.from_numpy(px))
            keys, values = proj.keys(feats), proj.values(feats)
            t3 = time.perf_counter()
            _g, tokens = proj.pool(keys, values, torch.from_numpy(clip_ids)[None], image=image)
            if image:
                tokens = model.assemble_image(tokens, model.image_layout(px.shape[0], shown))
            t4 = time.perf_counter()
            embeds = model.embed_prompt(torch.from_numpy(input_ids), tokens)  # [1, L, D]
            t5 = time.perf_counter()
            out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            t6 = time.perf_counter()
            cache = out.cache
            ids = [tok]
            table = lm.get_input_embeddings()
            while len(ids) < self.max_new_tokens:
                a = time.perf_counter()
                out = lm(inputs_embeds=table(torch.tensor([[tok]])), cache=cache, use_cache=True, logits_to_keep=1)
                cache = out.cache
                tok = int(out.logits[0, -1].argmax())
                ids.append(tok)
                steps.append((time.perf_counter() - a) * 1e3)
        s.update(decode_video=(t1 - t0) * 1e3, preprocess=(t2 - t1) * 1e3, vision=(t3 - t2) * 1e3, pool=(t4 - t3) * 1e3, prefill=(t6 - t5) * 1e3)
        s["e2e"] = (time.perf_counter() - start) * 1e3
        return RunRecord(s, steps, int(tokens.shape[0]), int(embeds.shape[1]), len(ids))

    def close(self) -> None:
        self.model = self.ref = None


def _open(spec: VariantSpec, opts: BenchOptions):
    if spec.kind == "torch":
        return _TorchRunner(spec, opts)
    if spec.kind == "baseline":
        return _BaselineRunner(spec, opts)
    return _PipelineRunner(spec, opts)


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


def _entry(spec: VariantSpec, runner, frames: int, opts: BenchOptions, records: list[RunRecord], seconds: list[RunRecord],
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
    kv_item = getattr(getattr(runner, "pipe", None), "decoder", None)
    kv_item = kv_item.dtype.itemsize if kv_item is not None and hasattr(kv_item, "dtype") else runner.itemsize
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
        "checkpoint": spec.manifest.data["checkpoint"].get("path"),
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
        "llm_precision": getattr(runner, "llm_precision", spec.precision),
        "vision_precision": getattr(runner, "vision_precision", spec.precision),
        "vision_cosine": _gate_vision_cosine(spec.manifest) if spec.kind == "export" else None,
        "quantized_from": _quantized_from(spec.manifest) if spec.kind == "export" else None,
        "kv_cache_bytes": hardware.kv_cache_bytes(m, positions, kv_item),
        "kv_cache_allocated_bytes": runner.kv_allocated_bytes(),
        "kv_cache_peak_used_bytes": runner.kv_peak_used_bytes() if hasattr(runner, "kv_peak_used_bytes") else None,
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
        "load_ms": getattr(runner, "load_ms", None),
        "reload_ms": getattr(runner, "reload_ms", None),
        "error": None,
    }


def _gate_vision_cosine(manifest: ExportManifest) -> float | None:
    """A quantized export's vision accuracy: the lowest output cosine to the fp32 export in its gate (accuracy.json)."""
    import json

    acc = ((manifest.data.get("quantization") or {}).get("accuracy") or {}).get("file")
    if not acc or not (manifest.folder / acc).is_file():
        return None
    checks = json.loads((manifest.folder / acc).read_text()).get("checks", [])
    values = [c["value"] for c in checks if c.get("graph") == "vision" and c.get("metric", "").endswith("cosine (min)")]
    return min(values) if values else None


def _quantized_from(manifest: ExportManifest) -> str | None:
    """The fp32 export a quantized export was made from (resolved path), if any."""
    src = ((manifest.data.get("quantization") or {}).get("source_export") or {}).get("path")
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


def _video(opts: BenchOptions, frames: list[int], tmp: list) -> tuple[Path, dict]:
    from ..media import input_kind, write_test_video

    if opts.image is not None:
        return Path(opts.image), {"path": str(opts.image), "image": True, "bytes": Path(opts.image).stat().st_size}
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
        if opts.image is not None:  # what the image turns into: size, best resolution, tiles, visual tokens
            from ..media import read_image_size

            video_info.update(specs[0].manifest.image_layout(read_image_size(video)).as_dict())
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
                    runner = _open(spec, opts)
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
        if opts.cold_start and ref and ref.get("kind") == "export" and ref.get("backend") == "ort" and opts.image is None:
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
    from .report import evaluate_targets, targets_apply

    result["presets"] = sorted({str(s.manifest.data.get("preset")) for s in specs})
    result["targets"] = evaluate_targets(result)
    result["targets_apply"] = targets_apply(result)  # False on toy presets (tiny): the markdown does not print them
    result["failed"] = sum(1 for e in entries if e.get("error"))
    return result


def cold_start(opts: BenchOptions, entry: dict, video: Path) -> dict:
    """One fresh-process `python -m ppllava_edge ask EXPORT VIDEO QUESTION --json` on the entry's export (page cache and
    ort_cache warm, as a user's second command): its wall time minus the warm answer's mean e2e in this run. A fresh
    answer that stops at EOS before max_new_tokens is compared with the warm answer less the warm TPOT per token it did not generate."""
    import subprocess

    cmd = [sys.executable, "-m", "ppllava_edge", "ask", str(entry["export"]), str(video), QUESTIONS[0], "--frames", str(entry["frames"]),
           "--max-new-tokens", str(opts.max_new_tokens), "--provider", opts.provider, "--json"]
    if opts.threads is not None:
        cmd += ["--threads", str(opts.threads)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall_ms = (time.perf_counter() - t0) * 1e3
    if proc.returncode != 0:
        log.warning("cold start: `%s` exited %d: %s", shlex.join(cmd), proc.returncode, proc.stderr.strip()[-500:])
        return {"command": shlex.join(cmd), "error": f"exit {proc.returncode}"}
    ans = json.loads(proc.stdout)
    tokens = len(ans.get("ids") or [])
    warm = entry["stages"]["e2e"]["mean"]
    tpot = (entry["stages"].get("decode_step") or {}).get("mean") or 0.0
    missing = max(0, opts.max_new_tokens - tokens)
    overhead = wall_ms - (warm - missing * tpot)  # the warm answer cut to the tokens the fresh one generated
    return {"command": shlex.join(cmd), "variant": entry["name"], "wall_ms": wall_ms, "fresh_e2e_ms": (ans.get("timings_ms") or {}).get("e2e"),
            "warm_e2e_ms": warm, "tokens": tokens, "missing_tokens": missing, "overhead_ms": overhead}


def reference_entry(entries: list[dict], frames: int) -> dict | None:
    """The first variant's entry at `frames` (the reference of ratios and headline numbers), if it ran."""
    if not entries:
        return None
    first = entries[0]["name"]
    return next((e for e in entries if e["name"] == first and e["frames"] == frames and not e.get("error")), None)


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


TORCH_RATIO_STAGES = ("vision", "prefill", "decode_step", "ttft", "e2e")


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
