"""`ppllava-edge export`: checkpoint -> vision.onnx, prompt_pool.onnx, image_pool.onnx, decoder.onnx + manifest.

torch.onnx (dynamo) is used directly: optimum-onnx pins transformers < 4.58 and has no LLaVA-style export
(toolchain-notes §7). Every export ends with a validation pass (PyTorch vs ONNX Runtime on shapes that differ
from the traced ones); a failed validation leaves nothing in OUT.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..atomic import AtomicDir
from ..errors import AccuracyError, ExportError, InputError
from ..manifest import MANIFEST_NAME, PROMPT_TEMPLATE, STAGES
from ..model.checkpoint import checkpoint_hash, load_model
from ..model.ppllava import PPLLaVAForConditionalGeneration
from ..tokenization import ClipTokenizer, LlamaPromptTokenizer, load_llama_tokenizer_from_checkpoint
from ..runtime.decoder import CONCAT, INPLACE
from .decoder_builder import DecoderDims, build_decoder
from .fusion import FUSED_OPS, TRT_OPS, export_fused_vision
from .graphs import DecoderGraph, ProjectorHeadGraph, PromptPoolGraph, VisionGraph
from .validate import ValidationReport, validate_export

log = logging.getLogger(__name__)

# Validation thresholds per export dtype: max |ort - torch| <= rel_max_abs * max|torch| and cosine >= min_cosine.
THRESHOLDS = {
    "fp32": {"rel_max_abs": 1e-4, "min_cosine": 0.99999},
    "fp16": {"rel_max_abs": 5e-2, "min_cosine": 0.999},
}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin
IMAGE_MAX_TILES = 64  # the image_pool graph's tile range (a checkpoint's pinpoints may need more: then theirs)
IMAGE_NEWLINE_FILE = "image_newline.npy"


@dataclass
class ExportOptions:
    frames: tuple[int, int, int] = (2, 8, 64)  # MIN:OPT:MAX (clamped to max_T)
    dtype: str = "fp32"
    opset: int = 20
    force: bool = False
    validate: bool = True
    tensorrt: bool = False  # also write decoder_trt.onnx and vision_trt.onnx (standard ops; the ORT graphs use contrib ops)


@dataclass
class ExportResult:
    out: Path
    manifest: dict
    report: ValidationReport
    timings: dict[str, float] = field(default_factory=dict)


def parse_frames(spec: str, max_t: int | None = None) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' -> (min, opt, max), with 1 <= min <= opt <= max (<= max_T)."""
    try:
        parts = [int(p) for p in spec.split(":")]
    except ValueError as exc:
        raise InputError(f"--frames {spec!r}: expected MIN:OPT:MAX integers, e.g. 2:8:64") from exc
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise InputError(f"--frames {spec!r}: expected MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 2:8:64")
    if max_t is not None and parts[2] > max_t:
        raise InputError(f"--frames {spec!r}: MAX {parts[2]} exceeds the checkpoint's max_T = {max_t} (BT-Adapter time table rows)")
    return parts[0], parts[1], parts[2]


def _quiet():
    """Silence the exporter's own prints/warnings (pitfall 14): stdout carries results only."""
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return stack


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, opset: int, external: bool) -> None:
    with _quiet():
        try:
            torch.onnx.export(
                module.eval(),
                args,
                str(path),
                dynamo=True,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                external_data=external,
                optimize=True,
            )
        except Exception as exc:  # the exporter raises many types; wrap with the graph name
            raise ExportError(f"exporting {path.name} failed: {type(exc).__name__}: {str(exc)[:2000]}") from exc


def example_clip_ids(length: int, n_words: int = 6) -> torch.Tensor:
    ids = torch.full((1, length), 49407, dtype=torch.int64)
    ids[0, 0] = 49406
    ids[0, 1 : 1 + n_words] = torch.arange(320, 320 + n_words)
    return ids


def graph_io(path: Path) -> dict:
    """Input/output names, dims (int or dynamic name) and dtypes read back from an exported ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = []
        for vi in values:
            tt = vi.type.tensor_type
            dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
            out.append({"name": vi.name, "dims": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output)}


def _param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graphs(model: PPLLaVAForConditionalGeneration, tmp: Path, opts: ExportOptions, on_stage: Callable[[str], None]) -> dict[str, float]:
    """Trace and export the four graphs into `tmp`; returns export seconds per graph."""
    from torch.export import Dim

    cfg = model.cfg
    P, size = cfg.vision.num_patches, cfg.vision.image_size
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    fmin, _, fmax = opts.frames
    frames = Dim("frames", min=1 if fmin <= 2 else fmin, max=fmax)  # min 1 so the image path (one tile) runs too
    ctx = cfg.clip_text.context_length
    timings: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)

    on_stage("vision.onnx")
    t0 = time.perf_counter()
    px = torch.randn(4, 3, size, size, generator=gen, dtype=torch.float32).to(dtype)  # example T=4 (T=1 would specialise)
    _onnx_export(VisionGraph(model), (px,), tmp / "vision.onnx", ["pixel_values"], ["values", "keys"], ({0: frames},), opts.opset, _param_bytes(model.vision_tower) > EXTERNAL_DATA_BYTES)
    timings["vision"] = time.perf_counter() - t0
    # issue 18: ONNX Runtime runs the fused vision graph written from the weights; the traced standard-ops graph
    # stays as vision_trt.onnx for TensorRT (--tensorrt), as the decoder does
    fused = export_fused_vision(model, tmp, opts.dtype, opts.opset, keep_traced=opts.tensorrt)
    if opts.tensorrt:
        timings["vision_trt"] = timings["vision"]
    timings["vision"] = fused["seconds"]

    with torch.no_grad():
        values, keys = VisionGraph(model)(px)
    on_stage("prompt_pool.onnx")
    t0 = time.perf_counter()
    _onnx_export(
        PromptPoolGraph(model), (example_clip_ids(ctx), keys, values), tmp / "prompt_pool.onnx",
        ["clip_ids", "keys", "values"], ["visual_tokens", "relevance"], (None, {0: P * frames}, {0: frames}), opts.opset, False,
    )
    timings["prompt_pool"] = time.perf_counter() - t0

    on_stage("image_pool.onnx")
    t0 = time.perf_counter()
    # an image's anyres tiles (base + crops), one relevance softmax over all of them; traced with 4 tiles (1 would specialise)
    tiles = Dim("tiles", min=1, max=max(IMAGE_MAX_TILES, cfg.image_max_tiles()))
    _onnx_export(
        PromptPoolGraph(model, image=True), (example_clip_ids(ctx), keys, values), tmp / "image_pool.onnx",
        ["clip_ids", "keys", "values"], ["visual_tokens", "relevance"], (None, {0: P * tiles}, {0: tiles}), opts.opset, False,
    )
    timings["image_pool"] = time.perf_counter() - t0

    on_stage("projector_head.onnx")
    t0 = time.perf_counter()
    tokens = Dim("tokens", min=1, max=65536)
    _onnx_export(ProjectorHeadGraph(model), (values.reshape(-1, values.shape[-1])[:8],), tmp / "projector_head.onnx", ["values"], ["tokens"], ({0: tokens},), opts.opset, False)
    timings["projector_head"] = time.perf_counter() - t0

    on_stage("decoder.onnx")
    t0 = time.perf_counter()
    export_inplace_decoder(model, tmp / "decoder.onnx", opts)
    timings["decoder"] = time.perf_counter() - t0
    if opts.tensorrt:
        on_stage("decoder_trt.onnx")
        t0 = time.perf_counter()
        export_concat_decoder(model, tmp / "decoder_trt.onnx", opts)
        timings["decoder_trt"] = time.perf_counter() - t0
    return timings


ROTARY_HEADROOM = 2
"""The in-place decoder's rotary tables cover 2x max_position_embeddings, so the bench's no-pooling baseline (which
runs past the trained context, as LLaVA-NeXT-Video does) still has positions; the runtime's own context check
stays at max_position_embeddings."""


def rotary_tables(model: PPLLaVAForConditionalGeneration) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2] exactly as transformers' rotary module computes them (float32)."""
    t = model.cfg.text
    lm = model.language_model.model
    positions = torch.arange(ROTARY_HEADROOM * t.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    half = t.head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def export_inplace_decoder(model: PPLLaVAForConditionalGeneration, path: Path, opts: ExportOptions) -> None:
    """decoder.onnx for ONNX Runtime: GroupQueryAttention with an in-place KV cache, written by decoder_builder."""
    state = model.state_dict()
    cos, sin = rotary_tables(model)
    build_decoder(lambda name: state[name].detach().float().numpy(), DecoderDims.from_config(model.cfg.text), cos, sin, path, opts.dtype, opts.opset)


def export_concat_decoder(model: PPLLaVAForConditionalGeneration, path: Path, opts: ExportOptions) -> None:
    """decoder_trt.onnx: standard ONNX ops only (TensorRT's parser takes it), traced from transformers' LLaMA;
    present = concat(past, new) each step."""
    from torch.export import Dim

    cfg = model.cfg
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    t = cfg.text
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=8192)
    past_len, total = Dim("past", min=0, max=8192), Dim("total", min=1, max=16384)
    B, S, Pl = 2, 2, 5  # trace with batch 2 and seq 2: batch/seq of 1 would be specialised (pitfall 6)
    emb = torch.randn(B, S, t.hidden_size, generator=gen).to(dtype)
    mask = torch.ones(B, Pl + S, dtype=torch.int64)
    pos = torch.arange(Pl, Pl + S, dtype=torch.int64)[None].repeat(B, 1)
    past = tuple(torch.randn(B, t.num_key_value_heads, Pl, t.head_dim, generator=gen).to(dtype) for _ in range(2 * t.num_hidden_layers))
    names = [f"past.{i}.{kv}" for i in range(t.num_hidden_layers) for kv in ("key", "value")]
    _onnx_export(
        DecoderGraph(model), (emb, mask, pos, past), path,
        ["inputs_embeds", "attention_mask", "position_ids", *names],
        ["logits", *[n.replace("past", "present") for n in names]],
        ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in names)),
        opts.opset, _param_bytes(model.language_model) > EXTERNAL_DATA_BYTES,
    )


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import transformers

    return {
        "ppllava_edge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def image_manifest(cfg, opts: ExportOptions) -> dict:
    """What the runtime needs for images (export.json `image`): LLaVA-NeXT anyres preprocessing and assembly."""
    from ..media import CLIP_MEAN, CLIP_STD

    return {
        "tile_size": cfg.vision.image_size,
        "grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "pooled_grid": cfg.image_pooled_grid,
        "newline": {"file": IMAGE_NEWLINE_FILE, "dtype": "float16" if opts.dtype == "fp16" else "float32"} if cfg.use_image_newline_parameter else None,
        "max_tiles": cfg.image_max_tiles(),
        "max_tokens": cfg.image_max_tokens(),
        "resample": "bicubic",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
    }


def build_manifest(model: PPLLaVAForConditionalGeneration, checkpoint: Path, tmp: Path, opts: ExportOptions, timings: dict[str, float]) -> dict:
    cfg = model.cfg
    t, v = cfg.text, cfg.vision
    preset_file = checkpoint / "ppllava_edge.json"
    preset = json.loads(preset_file.read_text()).get("preset") if preset_file.is_file() else None
    graphs = {}
    names = ["vision", "prompt_pool", "image_pool", "projector_head", "decoder"] + (["decoder_trt", "vision_trt"] if opts.tensorrt else [])
    for name in names:
        graphs[name] = {"file": f"{name}.onnx", "precision": opts.dtype, **graph_io(tmp / f"{name}.onnx"), "export_seconds": round(timings.get(name, 0.0), 3)}
    kv_dtype = "float16" if opts.dtype == "fp16" else "float32"
    graphs["decoder"].update({
        "contract": INPLACE,
        "kv_cache": {"dtype": kv_dtype, "layout": "[batch, kv_heads, capacity, head_dim]", "shared_past_present": True},
        "rotary_positions": ROTARY_HEADROOM * t.max_position_embeddings,
        "ops": "com.microsoft GroupQueryAttention (RoPE fused), SkipSimplifiedLayerNormalization, QuickGelu; ONNX Runtime only",
    })
    if opts.tensorrt:
        graphs["decoder_trt"].update({
            "contract": CONCAT,
            "kv_cache": {"dtype": kv_dtype, "layout": "[batch, kv_heads, past, head_dim]", "shared_past_present": False},
            "ops": "standard ONNX ops (TensorRT's parser takes them)",
        })
    graphs["vision"]["ops"] = FUSED_OPS
    backends = {"ort": {s: s for s in STAGES}}
    if opts.tensorrt:
        graphs["vision_trt"]["ops"] = TRT_OPS
        backends["trt"] = {**{s: s for s in STAGES}, "decoder": "decoder_trt", "vision": "vision_trt"}
    h, w = cfg.frame_shape
    return {
        "format": "ppllava-edge-export",
        "format_version": 1,
        "preset": preset,
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": checkpoint_hash(checkpoint)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(sum(timings.values()), 3),
        "opset": opts.opset,
        "dtype": opts.dtype,
        "graphs": graphs,
        "backends": backends,
        "versions": _versions(),
        "frames": {"min": opts.frames[0], "opt": opts.frames[1], "max": opts.frames[2]},
        "visual_tokens_per_frame_pair": cfg.visual_tokens(2),
        "pooling": {"kernel": list(cfg.pooling_kernel), "image_kernel": list(cfg.image_pooling_kernel), "temperature": cfg.pooling_temp},
        "image_tokens": cfg.image_max_tokens(),
        "image": image_manifest(cfg, opts),
        "image_token_id": cfg.image_token_index,
        "prompt_template": PROMPT_TEMPLATE,
        "special_tokens": {"bos": t.bos_token_id, "eos": t.eos_token_id, "pad": cfg.pad_token_id, "image": cfg.image_token_index},
        "model": {
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "grid": [h, w],
            "patches_per_frame": v.num_patches,
            "vision_hidden_size": v.hidden_size,
            "vision_layers": v.num_hidden_layers,
            "btadapter_depth": v.btadapter_depth,
            "max_frames": cfg.max_frames,
            "clip_text_length": cfg.clip_text.context_length,
            "clip_embed_dim": cfg.clip_text.projection_dim,
            "hidden_size": t.hidden_size,
            "num_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_kv_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "intermediate_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings,
            "vision_params": sum(p.numel() for p in model.vision_tower.parameters()),
            "llm_params": sum(p.numel() for p in model.language_model.parameters()),
        },
        "embeddings": {"file": "embed_tokens.npy", "shape": [t.vocab_size, t.hidden_size], "dtype": "float16" if opts.dtype == "fp16" else "float32"},
        "tokenizers": {"llama": "llama_tokenizer.json", "clip": "clip_tokenizer.json"},
        "validation": None,
    }


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    opts: ExportOptions | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a checkpoint folder to an export folder (atomically; nothing is left in OUT on failure)."""
    opts = opts or ExportOptions()
    on_stage = on_stage or (lambda s: None)
    checkpoint = Path(checkpoint)
    if opts.dtype not in THRESHOLDS:
        raise InputError(f"--dtype {opts.dtype!r}: choose fp32 or fp16")
    on_stage("load checkpoint")
    # The reference (validation) model uses SDPA attention; the exported graphs are traced from a second copy
    # whose LLM uses eager attention: its ONNX graph has no Where/IsNaN mask plumbing and runs ~10% faster in
    # ONNX Runtime, and validating it against the SDPA model is a stricter, independent check.
    reference = load_model(checkpoint, dtype="fp32")
    cfg = reference.cfg
    fmin, fopt, fmax = opts.frames
    if fmax > cfg.max_frames:
        raise InputError(f"--frames max {fmax} exceeds the checkpoint's max_T = {cfg.max_frames}")
    model = load_model(checkpoint, dtype="fp16" if opts.dtype == "fp16" else "fp32", attn_implementation="eager")
    with AtomicDir(out, force=opts.force) as tmp:
        timings = export_graphs(model, tmp, opts, on_stage)
        on_stage("tokenizers + embeddings")
        table = model.language_model.get_input_embeddings().weight.detach().numpy()
        np.save(tmp / "embed_tokens.npy", table)
        if cfg.use_image_newline_parameter:
            np.save(tmp / IMAGE_NEWLINE_FILE, model.image_newline.detach().numpy())
        LlamaPromptTokenizer(load_llama_tokenizer_from_checkpoint(checkpoint), image_token_id=cfg.image_token_index).save(tmp / "llama_tokenizer.json")
        ClipTokenizer().save(tmp / "clip_tokenizer.json")
        manifest = build_manifest(model, checkpoint, tmp, opts, timings)
        report = ValidationReport([])
        if opts.validate:
            on_stage("validate")
            report = validate_export(reference, tmp, manifest, THRESHOLDS[opts.dtype])
            manifest["validation"] = report.to_json(THRESHOLDS[opts.dtype])
            if not report.passed:
                raise AccuracyError("export validation failed (nothing written to the output folder):\n" + report.text())
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return ExportResult(out=Path(out), manifest=manifest, report=report, timings=timings)
