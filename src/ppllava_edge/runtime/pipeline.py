"""Torch-free pipeline over an export folder: video / image / .npy in, answer out, with per-stage timings.

    pipe = Pipeline.from_export("export/", provider="cpu")
    result = pipe.ask("clip.mp4", "What happens?", num_frames=8)
    print(result.text, result.timings.line())
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..anyres import ImageLayout, assemble_tokens
from ..errors import InputError
from ..manifest import ExportManifest, load_manifest
from ..media import input_kind, load_npy_pixel_values, load_video, preprocess_frames, preprocess_image, read_image, read_image_size
from ..tokenization import ClipTokenizer, LlamaPromptTokenizer
from .cache import FeatureCache, content_key, file_digest
from .decoder import open_decoder
from .generation import GenerationConfig, generate
from .session import create_session, resolve_provider


@dataclass
class Timings:
    """Milliseconds per stage of one answer (decode_video/preprocess/vision are 0 on a cache hit)."""

    decode_video: float = 0.0
    preprocess: float = 0.0
    vision: float = 0.0
    pool: float = 0.0
    prefill: float = 0.0
    decode_steps: list[float] = field(default_factory=list)
    e2e: float = 0.0
    cache_hit: bool = False

    @property
    def decode(self) -> float:
        return float(sum(self.decode_steps))

    def as_dict(self) -> dict:
        return {
            "decode_video": self.decode_video, "preprocess": self.preprocess, "vision": self.vision, "pool": self.pool,
            "prefill": self.prefill, "decode": self.decode, "decode_steps": list(self.decode_steps), "e2e": self.e2e, "cache_hit": self.cache_hit,
        }

    def line(self) -> str:
        tpot = self.decode / len(self.decode_steps) if self.decode_steps else 0.0
        hit = " (feature cache hit)" if self.cache_hit else ""
        return (
            f"decode {self.decode_video:.1f} ms | preprocess {self.preprocess:.1f} ms | vision {self.vision:.1f} ms | "
            f"pool {self.pool:.1f} ms | prefill {self.prefill:.1f} ms | {len(self.decode_steps)} steps x {tpot:.1f} ms | "
            f"total {self.e2e:.1f} ms{hit}"
        )


@dataclass
class AskResult:
    text: str
    ids: list[int]
    timings: Timings
    visual_tokens: int
    context_len: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class VideoInput:
    """Pixels (or only a cache key when the cache already holds the features)."""

    key: str
    kind: str
    pixel_values: np.ndarray | None


class Pipeline:
    def __init__(
        self,
        manifest: ExportManifest,
        provider: str = "auto",
        threads: int | None = None,
        cache: FeatureCache | None = None,
        trt_cache_dir: Path | None = None,
        backend: str = "ort",
        engines: str | Path | None = None,
        cuda_graph: bool = False,
        runners: dict | None = None,
    ):
        """`runners` maps a stage ("vision", "prompt_pool", ...) to an object with ONNX Runtime's `run(output_names,
        feed) -> [arrays]` that runs it instead of a local session (Triton's BLS requests, see triton/python_model.py)."""
        self.manifest = manifest
        m = manifest.model
        fp16 = manifest.data["dtype"] == "fp16"
        self.dtype = np.float16 if fp16 else np.float32
        self.trt = None
        if backend not in ("ort", "trt"):
            raise InputError(f"--backend {backend!r}: choose ort (ONNX Runtime) or trt (native TensorRT engines)")
        if cuda_graph:  # refused whatever the backend: see trt_backend.CUDA_GRAPH_REFUSAL
            from .trt_backend import check_cuda_graph

            check_cuda_graph(cuda_graph)
        if backend == "trt":
            from .trt_backend import open_engines  # lazy: needs tensorrt + cuda-python + a GPU

            self.trt = open_engines(engines or manifest.folder / "engines", manifest, cuda_graph=cuda_graph)
        self.provider = "tensorrt-native" if self.trt is not None else resolve_provider(provider)
        ort_provider = "cpu" if self.trt is not None else self.provider
        trt_cache = trt_cache_dir or manifest.folder / "trt_cache"
        self.sessions = dict(self.trt.runners) if self.trt is not None else {}
        self.sessions.update(runners or {})
        # sessions are keyed by stage; export.json says which graph ONNX Runtime runs for each stage
        for stage, graph in manifest.backend_graphs("ort").items():
            if stage not in self.sessions:
                self.sessions[stage] = create_session(manifest.path(graph), ort_provider, threads, trt_cache, fp16)
        self.embed_table = np.load(manifest.path("embeddings"), mmap_mode="r")
        self.llama = LlamaPromptTokenizer.from_file(manifest.path("llama"), image_token_id=manifest.data["image_token_id"])
        self.clip = ClipTokenizer.from_file(manifest.path("clip"))
        if self.trt is not None:
            self.decoder = self.trt.decoder
        else:
            entry = manifest.graph(manifest.graph_for("decoder", "ort"))
            self.decoder = open_decoder(self.sessions["decoder"], entry, m, self.dtype, self.provider)
        self.cache = cache if cache is not None else FeatureCache()
        self.vision_runs = 0
        self.image_spec = manifest.data.get("image")  # anyres rules (None: an export from before image tiles)
        has_newline = bool(self.image_spec and self.image_spec.get("newline"))
        self.image_newline = np.load(manifest.path("image_newline")) if has_newline else None
        self.export_id = manifest.data.get("created", "") + manifest.data["checkpoint"]["sha256"]

    def close(self) -> None:
        if self.trt is not None:
            self.trt.close()

    @classmethod
    def from_export(
        cls,
        folder: str | Path,
        provider: str = "auto",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
        cache_bytes: int = 2 << 30,
        backend: str = "ort",
        engines: str | Path | None = None,
        cuda_graph: bool = False,
        runners: dict | None = None,
    ) -> Pipeline:
        return cls(load_manifest(folder), provider=provider, threads=threads, cache=FeatureCache(cache_bytes, cache_dir), backend=backend, engines=engines, cuda_graph=cuda_graph, runners=runners)

    # ---- inputs -----------------------------------------------------------------------------
    def _check_frames(self, num_frames: int) -> None:
        fmin, _, fmax = self.manifest.frames
        if self.trt is not None:  # engines may have been built for a narrower range
            fmin, _, fmax = self.trt.metadata["limits"]["frames"]
        if not (max(fmin, 2) <= num_frames <= fmax):
            raise InputError(
                f"--frames {num_frames} is outside this export's frame range {max(fmin, 2)}..{fmax}.\n"
                "Hint: re-export with --frames MIN:OPT:MAX covering it."
            )

    def _pixels(self, path: Path, kind: str, num_frames: int, t: Timings) -> np.ndarray:
        size = self.manifest.model["image_size"]
        t0 = time.perf_counter()
        if kind == "npy":
            px = load_npy_pixel_values(path, size)
            t.decode_video = (time.perf_counter() - t0) * 1e3
            return px
        frames = load_video(path, num_frames).frames
        t1 = time.perf_counter()
        px = preprocess_frames(frames, size)
        t.decode_video, t.preprocess = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        return px

    def features(self, path: str | Path, num_frames: int, t: Timings, need_pixels: bool = False) -> tuple[np.ndarray, np.ndarray, VideoInput]:
        """(values, keys) for an input file, from the cache or the vision graph (an image: of its anyres tiles)."""
        path = Path(path)
        kind = input_kind(path)
        if kind == "video":
            self._check_frames(num_frames)
        if not path.is_file():
            from ..errors import VideoError

            raise VideoError(f"{path}: no such file.")
        if kind == "image":
            return self.image_features(path, t, need_pixels)
        frames_key = num_frames if kind == "video" else 1
        key = content_key(file_digest(path), frames_key, self.export_id)
        hit = self.cache.get(key)
        px = None
        if hit is None or need_pixels:
            px = self._pixels(path, kind, num_frames, t)
            if kind == "npy" and px.shape[0] > 1:
                self._check_frames(px.shape[0])
        if hit is not None:
            t.cache_hit = True
            values, keys = hit
        else:
            t0 = time.perf_counter()
            values, keys = self.sessions["vision"].run(None, {"pixel_values": px.astype(self.dtype)})
            t.vision = (time.perf_counter() - t0) * 1e3
            self.vision_runs += 1
            self.cache.put(key, values, keys)
        actual_kind = "image" if kind == "image" or values.shape[0] == 1 else "video"
        return values, keys, VideoInput(key, actual_kind, px)

    # ---- images (LLaVA-NeXT anyres, see anyres.py) -------------------------------------------
    def image_layout(self, path: str | Path | None) -> ImageLayout:
        """Token layout of an image file (from its header: EXIF-oriented size); None: a lone tile (a 1-row .npy)."""
        return self.manifest.image_layout(None if path is None else read_image_size(path))

    def image_features(self, path: str | Path, t: Timings, need_pixels: bool = False) -> tuple[np.ndarray, np.ndarray, VideoInput]:
        """(values, keys) of an image's anyres tiles, each run through the vision graph with T = 1; cached by the
        file's content like a video's features."""
        self.manifest.image_layout(None)  # an export from before image tiles: a clear error
        r = self.image_spec
        path = Path(path)
        key = content_key(file_digest(path), "anyres-image", self.export_id)
        hit = self.cache.get(key)
        px = None
        if hit is None or need_pixels:
            t0 = time.perf_counter()
            img, shown = read_image(path)
            t1 = time.perf_counter()
            px = preprocess_image(img, r["tile_size"], r["grid_pinpoints"], image_size=shown).pixel_values
            t.decode_video, t.preprocess = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        if hit is not None:
            t.cache_hit = True
            values, keys = hit
        else:
            t0 = time.perf_counter()
            outs = [self.sessions["vision"].run(None, {"pixel_values": px[i : i + 1].astype(self.dtype)}) for i in range(px.shape[0])]
            values, keys = np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
            t.vision = (time.perf_counter() - t0) * 1e3
            self.vision_runs += 1
            self.cache.put(key, values, keys)
        return values, keys, VideoInput(key, "image", px)

    # ---- answer -----------------------------------------------------------------------------
    def ask(
        self,
        path: str | Path,
        question: str,
        num_frames: int = 8,
        generation: GenerationConfig | None = None,
        on_token: Callable[[int], None] | None = None,
        keep_arrays: bool = False,
    ) -> AskResult:
        gen = generation or GenerationConfig()
        t = Timings()
        start = time.perf_counter()
        input_ids = np.asarray(self.llama.prompt_ids(question), dtype=np.int64)
        clip_ids = self.clip.encode(question, self.manifest.model["clip_text_length"])
        kind = input_kind(Path(path))
        layout = self.image_layout(path) if kind == "image" else None
        n_vis = layout.num_tokens if layout is not None else self.manifest.visual_tokens(num_frames)
        context = len(input_ids) - 1 + n_vis
        limit = self.manifest.model["max_position_embeddings"]
        if context + gen.max_new_tokens > limit:
            raise InputError(
                f"prompt of {context} tokens ({n_vis} visual) + max_new_tokens={gen.max_new_tokens} exceeds the LLM context of {limit}.\n"
                "Hint: use fewer frames, a shorter question or fewer new tokens."
            )
        values, keys, vin = self.features(path, num_frames, t, need_pixels=keep_arrays)
        graph = "image_pool" if vin.kind == "image" else "prompt_pool"
        t0 = time.perf_counter()
        tokens, relevance = self.sessions[graph].run(None, {"clip_ids": clip_ids[None], "keys": keys, "values": values})
        if vin.kind == "image":  # base tile, then the unpadded crop map with image_newline rows
            tokens = assemble_tokens(np.asarray(tokens), self.image_newline, layout or self.image_layout(None))
        t.pool = (time.perf_counter() - t0) * 1e3
        embeds = self.embed_prompt(input_ids, tokens)
        out = generate(self.decoder, self.embed, embeds, gen, on_token=on_token)
        t.prefill, t.decode_steps = out.prefill_ms, list(out.step_ms)
        t.e2e = (time.perf_counter() - start) * 1e3
        arrays = {}
        if keep_arrays:
            arrays = {
                "pixel_values": vin.pixel_values.astype(np.float32),
                "clip_ids": clip_ids,
                "input_ids": input_ids,
                "relevance": np.asarray(relevance, np.float32),
                "visual_tokens": np.asarray(tokens, np.float32),
                "output_ids": np.asarray(out.ids, np.int64),
            }
        return AskResult(self.llama.decode(out.ids), list(out.ids), t, int(tokens.shape[0]), int(embeds.shape[0]), arrays)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """[B] ids -> [B, 1, D] embeddings (a gather on the exported table)."""
        return np.asarray(self.embed_table[np.asarray(ids, dtype=np.int64)], dtype=self.dtype)[:, None, :]

    def embed_prompt(self, input_ids: np.ndarray, visual_tokens: np.ndarray) -> np.ndarray:
        """[L-1+N, D]: text embeddings with the single image token replaced by the visual tokens."""
        where = np.flatnonzero(input_ids == self.manifest.data["image_token_id"])
        if where.size != 1:
            raise InputError(f"the prompt must hold exactly one image token; found {where.size}")
        i = int(where[0])
        table = self.embed_table
        return np.concatenate([table[input_ids[:i]], visual_tokens.astype(table.dtype), table[input_ids[i + 1 :]]], axis=0).astype(self.dtype)
