"""The variants a bench run times, each behind one `VariantRunner` interface: an export through `Pipeline.ask`
(`PipelineRunner`), the paper's no-pooling baselines on the same graphs (`BaselineRunner`) and the PyTorch reference
(`TorchRunner`). `open_runner(spec, opts)` picks one."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from ..external_data import graph_weight_bytes
from . import hardware
from .plan import NOPOOL_FRAMES, BenchOptions, VariantSpec, _prompt_len

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


class VariantRunner:
    """What the bench loop reads from a variant (Polygraphy's runner shape): the defaults here, each variant
    overrides what it has. `run` answers one question and returns its RunRecord."""

    uses_cache = False  # later questions on the same video hit a feature cache (the second-question measure)
    provider = ""
    weight_bytes = 0
    decoder_weight_bytes = 0
    itemsize = 4  # bytes per activation / KV element
    load_ms: float | None = None
    reload_ms: float | None = None
    llm_precision: str | None = None  # None: the variant's precision label
    vision_precision: str | None = None

    def kv_itemsize(self) -> int:
        """Bytes per KV-cache element."""
        return self.itemsize

    def kv_allocated_bytes(self) -> int | None:
        """KV-cache bytes the decoder holds (every buffer it allocated), or None when it does not say."""
        return None

    def kv_peak_used_bytes(self) -> int | None:
        """KV-cache bytes of the largest request the decoder served, or None when it does not say."""
        return None

    def clear_cache(self) -> None:
        pass

    def run(self, video: Path, question: str, frames: int) -> RunRecord:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PipelineRunner(VariantRunner):
    """A pooled export variant: Pipeline.ask (ONNX Runtime sessions, or TensorRT engines swapped in)."""

    uses_cache = True

    def __init__(self, spec: VariantSpec, opts: BenchOptions):
        from ..runtime.pipeline import Pipeline, PipelineOptions

        self.spec = spec
        options = PipelineOptions(provider=opts.provider, threads=opts.threads, backend="trt" if spec.backend == "trt" else "ort", engines=spec.engines)

        def load():
            t0 = time.perf_counter()
            pipe = Pipeline(spec.manifest, options)
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
        self.decoder_weight_bytes = graph_weight_bytes(m.path(m.graph_for("decoder")))
        self.llm_precision = m.precision(m.graph_for("decoder"))
        self.vision_precision = m.precision(m.graph_for("vision"))
        self.notes: list[str] = []

    def _graphs(self) -> tuple[str, ...]:
        return ("vision", "prompt_pool", "decoder")

    def kv_itemsize(self) -> int:
        dec = self.pipe.decoder
        return dec.dtype.itemsize if hasattr(dec, "dtype") else self.itemsize

    def kv_allocated_bytes(self) -> int | None:
        return getattr(self.pipe.decoder, "allocated_bytes", None)

    def kv_peak_used_bytes(self) -> int | None:
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


class BaselineRunner(PipelineRunner):
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
        from ..runtime.stages import encode, generate, project, read_frames

        pipe = self.pipe
        s: dict[str, float] = {}
        start = time.perf_counter()
        input_ids = np.asarray(pipe.llama.prompt_ids(question), dtype=np.int64)
        px = read_frames(video, frames, pipe.manifest.model["image_size"], pipe.manifest.preprocess)
        t2 = time.perf_counter()
        values, _keys = encode(pipe.sessions["vision"], px.pixel_values.astype(pipe.dtype))
        t3 = time.perf_counter()
        values = np.asarray(values)
        flat = values.reshape(-1, values.shape[-1]) if self.spec.baseline == "nopool" else values.mean(axis=0)
        tokens = project(pipe.sessions["projector_head"], np.ascontiguousarray(flat, dtype=pipe.dtype))
        t4 = time.perf_counter()
        embeds = pipe.embed_prompt(input_ids, np.asarray(tokens))
        out = generate(pipe.decoder, pipe.embed, embeds, self.gen)
        s.update(decode_video=px.decode_ms, preprocess=px.preprocess_ms, vision=(t3 - t2) * 1e3, pool=(t4 - t3) * 1e3, prefill=out.prefill_ms)
        s["e2e"] = (time.perf_counter() - start) * 1e3
        return RunRecord(s, list(out.step_ms), int(tokens.shape[0]), int(embeds.shape[0]), len(out.ids))


class TorchRunner(VariantRunner):
    """The PyTorch reference (fp32, sdpa) timed stage by stage on the same inputs; greedy decoding with a manual
    KV-cache loop (transformers DynamicCache), exactly `max_new_tokens` tokens."""

    uses_cache = False

    def __init__(self, spec: VariantSpec, opts: BenchOptions):
        from .._deps import require

        torch = require("torch", "export", "--backend torch (the PyTorch reference)")
        require("transformers", "export", "--backend torch (the PyTorch reference)")
        ck = Path(spec.manifest.checkpoint["path"])
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

    def run(self, video: Path | list[Path], question: str, frames: int) -> RunRecord:
        """One answer on a video (`frames` frames), an image (its anyres tiles; `frames` is their count) or several
        images (a list: one question about all of them, `frames` is their number)."""
        from ..media import input_kind
        from ..runtime.stages import read_frames, read_image_tiles, read_images

        torch, model = self.torch, self.model
        proj, lm, cfg = model.multi_modal_projector, model.language_model, model.cfg
        slots = len(video) if isinstance(video, list) else 1
        image = slots == 1 and input_kind(video) == "image"
        s: dict[str, float] = {}
        steps: list[float] = []
        start = time.perf_counter()
        clip_ids, clip_mask = self.ref.relevance.encode(question)  # SigLIP's padding mask (None for CLIP)
        input_ids = self.ref.prompt_ids(question, images=slots)
        spec = cfg.preprocess
        if slots > 1:
            read = read_images(video, cfg.vision.image_size, spec)
        else:
            read = read_image_tiles(video, cfg.vision.image_size, cfg.image_grid_pinpoints, spec) if image else read_frames(video, frames, cfg.vision.image_size, spec)
        px, shown = read.pixel_values, read.shown
        t2 = time.perf_counter()
        with torch.inference_mode():
            feats = model.encode_tiles(torch.from_numpy(px)) if image else model.encode_video(torch.from_numpy(px))  # several images: one clip
            keys, values = proj.keys(feats), proj.values(feats)
            t3 = time.perf_counter()
            mask = {} if clip_mask is None else {"clip_mask": torch.from_numpy(clip_mask)[None]}
            _g, tokens = proj.pool(keys, values, torch.from_numpy(clip_ids)[None], image=image or slots > 1, **mask)
            if image:
                tokens = model.assemble_image(tokens, model.image_layout(px.shape[0], shown))
            t4 = time.perf_counter()
            embeds = model.embed_prompt(torch.from_numpy(input_ids), tokens, slots)  # [1, L, D]
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
        s.update(decode_video=read.decode_ms, preprocess=read.preprocess_ms, vision=(t3 - t2) * 1e3, pool=(t4 - t3) * 1e3, prefill=(t6 - t5) * 1e3)
        s["e2e"] = (time.perf_counter() - start) * 1e3
        return RunRecord(s, steps, int(tokens.shape[0]), int(embeds.shape[1]), len(ids))

    def close(self) -> None:
        self.model = self.ref = None


def open_runner(spec: VariantSpec, opts: BenchOptions) -> VariantRunner:
    if spec.kind == "torch":
        return TorchRunner(spec, opts)
    if spec.kind == "baseline":
        return BaselineRunner(spec, opts)
    return PipelineRunner(spec, opts)
