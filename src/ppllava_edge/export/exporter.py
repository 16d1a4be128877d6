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
from ..atomic import AtomicDir, save_npy
from ..errors import AccuracyError, ExportError, InputError
from ..integrity import file_digests
from ..manifest import MANIFEST_NAME, STAGES, WEIGHTS_KEY
from ..external_data import share_initializers
from ..memory import StepRecorder
from ..model.checkpoint import CheckpointReader, build_skeleton, checkpoint_hash, load_weights, release_weights
from ..config import QWEN_SIGLIP, clip_weight_folder, load_config
from ..model.ppllava import llm_config
from ..model.ppllava import PPLLaVAForConditionalGeneration
from ..tokenization import SIGLIP_MODEL_NAME, ClipTokenizer, LlamaPromptTokenizer, SiglipTextTokenizer, load_llama_tokenizer_from_checkpoint
from ..runtime.decoder import CONCAT, INPLACE, kv_names
from .decoder_builder import DecoderDims, build_decoder
from .fusion import FUSED_OPS, TRT_OPS, VisionDims, build_vision
from .graphs import DecoderGraph, ProjectorHeadGraph, VisionGraph, example_query, pool_graph
from .truncate import describe as describe_truncation
from .truncate import HEAD_ROWS, dropped_prefixes, head_limits, truncated_config
from .validate import ValidationReport, validate_export
from .weights_check import WeightMap, check_weights, checkpoint_name, map_traced_graph

log = logging.getLogger(__name__)

# Validation thresholds per export dtype: max |ort - torch| <= rel_max_abs * max|torch| and cosine >= min_cosine.
THRESHOLDS = {
    "fp32": {"rel_max_abs": 1e-4, "min_cosine": 0.99999},
    "fp16": {"rel_max_abs": 5e-2, "min_cosine": 0.999},
}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin
TRACED_INLINE_MAX_BYTES = 128 << 20
"""Traced graphs (the pools, projector_head, vision_trt) with more parameter bytes than this are written with external
data: torch.onnx serialises an inline model in memory several times over (qwen-7b's prompt_pool, 0.8 GB of SigLIP text
tower in fp16, took the export from 2.1 to 6.0 GB for its duration: the whole export's peak). share_initializers moves
the pools' tensors into pools.onnx.data either way."""
IMAGE_MAX_TILES = 64  # the image_pool graph's tile range (a checkpoint's pinpoints may need more: then theirs)
IMAGE_NEWLINE_FILE = "image_newline.npy"
EMBED_TOKENS = "language_model.model.embed_tokens."


@dataclass
class ExportOptions:
    frames: tuple[int, int, int] = (2, 8, 64)  # MIN:OPT:MAX (clamped to max_T)
    dtype: str = "fp32"
    opset: int = 20
    force: bool = False
    validate: bool = True
    validation: str = "auto"  # auto | full | truncated | none (see resolve_validation)
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


def _onnx_export(module: torch.nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, opset: int, external: bool):
    """torch.onnx.export (dynamo); returns the ONNXProgram (its exported_program names the parameters it uses)."""
    with _quiet():
        try:
            return torch.onnx.export(
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


class ModelParts:
    """The checkpoint's model, materialised one part at a time (the rest stays on the meta device), so no step of
    an export holds the whole model: the vision side (tower, projector, image_newline) or the LLM.

    `exclude` lists checkpoint-name prefixes the model does not have (the dropped layers of a depth-truncated copy).
    """

    def __init__(self, checkpoint: Path, cfg, dtype: torch.dtype, attn_implementation: str, reader: CheckpointReader, exclude: tuple[str, ...] = ()):
        self.checkpoint, self.cfg, self.dtype, self.reader, self.exclude = checkpoint, cfg, dtype, reader, exclude
        self.model = build_skeleton(cfg, attn_implementation)

    def _load(self, prefix: str, skip: tuple[str, ...] = ()) -> None:
        load_weights(self.model, self.checkpoint, prefix, self.dtype, exclude=self.exclude + skip, reader=self.reader)

    @contextlib.contextmanager
    def _part(self, step: str, prefixes: tuple[str, ...], steps: StepRecorder | None, load_extra=lambda m: None, skip: tuple[str, ...] = ()):
        """The model with the sub-modules under `prefixes` materialised from the shards (timed as `step`; tensors
        under `skip` stay on the meta device), released again on exit."""
        m = self.model
        try:
            with steps.step(step) if steps is not None else contextlib.nullcontext():
                for prefix in prefixes:
                    self._load(prefix, skip)
                load_extra(m)
            m.requires_grad_(False)
            m.eval()
            yield m
        finally:
            for prefix in prefixes:
                release_weights(m.get_submodule(prefix))

    @contextlib.contextmanager
    def vision_side(self, steps: StepRecorder | None = None):
        def newline(m) -> None:
            m.image_newline = torch.nn.Parameter(self.reader.read("image_newline", self.dtype), requires_grad=False)

        try:
            with self._part("load vision side", ("vision_tower", "multi_modal_projector"), steps, newline) as m:
                yield m
        finally:
            m = self.model
            m.image_newline = torch.nn.Parameter(torch.empty(m.image_newline.shape, device="meta"), requires_grad=False)

    @contextlib.contextmanager
    def llm(self, steps: StepRecorder | None = None, embeddings: bool = True):
        """The LLM; `embeddings=False` leaves its input embedding table on the meta device for a caller that feeds
        `inputs_embeds` (validation: 2.2 GB in fp32 at 7B) - unless the head is tied to it."""
        skip = () if embeddings or self.cfg.text.tie_word_embeddings else (EMBED_TOKENS,)
        with self._part("load LLM", ("language_model",), steps, skip=skip) as m:
            yield m


def _example_vision_outputs(vision_onnx: Path, frames: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random `values` [frames, P, D] and L2-normalised `keys` [P·frames, E] with the static dims of vision.onnx."""
    import onnx

    outs = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in onnx.load(str(vision_onnx), load_external_data=False).graph.output}
    _, p, d = outs["values"]
    e = outs["keys"][1]
    values = torch.randn(frames, p, d, generator=gen).to(dtype)
    keys = torch.nn.functional.normalize(torch.randn(p * frames, e, generator=gen), dim=-1).to(dtype)
    return values, keys


def export_graphs(parts: ModelParts, tmp: Path, opts: ExportOptions, steps: StepRecorder, on_stage: Callable[[str], None],
                  on_progress: Callable[[float, float], None]) -> dict[str, WeightMap]:
    """Trace / write every graph into `tmp`, one model part in memory at a time. Returns each graph's weight map
    (see weights_check.py); times and peak RSS go to `steps`."""
    from torch.export import Dim

    cfg = parts.cfg
    P, size = cfg.vision.num_patches, cfg.vision.image_size
    dtype = parts.dtype
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    fmin, _, fmax = opts.frames
    frames = Dim("frames", min=1 if fmin <= 2 else fmin, max=fmax)  # min 1 so the image path (one tile) runs too
    gen = torch.Generator().manual_seed(0)
    keys = set(parts.reader.names())
    maps: dict[str, WeightMap] = {}

    def traced(name: str, module: torch.nn.Module, args: tuple, inputs, outputs, shapes, params: dict) -> None:
        on_stage(f"{name}.onnx")
        with steps.step(f"{name}.onnx"):
            external = _param_bytes(module) > TRACED_INLINE_MAX_BYTES
            prog = _onnx_export(module, args, tmp / f"{name}.onnx", inputs, outputs, shapes, opts.opset, external)
            fqns = used_parameters(prog)
            composites = []
            if "position_table" in fqns:
                composites.append(("clip_positions", [POSITIONS + "position_embedding", POSITIONS + "position_embedding_res"]))
            if any(f.endswith(VALUE_HEAD_FQN) for f in fqns):  # SigLIP's head: the traced V slice is folded to a constant
                composites += [("value_slice", [VALUE_HEAD + p]) for p in ("weight", "bias")]
            used = [checkpoint_name(f, keys) for f in fqns]
            maps[name] = map_traced_graph(tmp / f"{name}.onnx", params, [u for u in used if u is not None], np_dtype, composites)

    # issue 18: ONNX Runtime runs vision.onnx written fused from the checkpoint's tensors, one tensor at a time
    # (export/fusion.py); the traced standard-ops graph is vision_trt.onnx for TensorRT (--tensorrt), as for the decoder
    on_stage("vision.onnx")
    with steps.step("vision.onnx"):
        maps["vision"] = build_vision(lambda name: parts.reader.read(name, torch.float32).numpy(), VisionDims.from_config(cfg),
                                      tmp / "vision.onnx", opts.dtype, opts.opset)["weights"]
    with parts.vision_side(steps) as model:
        params = {k: t for k, t in ((checkpoint_name(f, keys), p) for f, p in model.named_parameters() if not p.is_meta) if k is not None}
        params = {k: v.detach().numpy() for k, v in params.items()}
        px = torch.randn(4, 3, size, size, generator=gen, dtype=torch.float32).to(dtype)  # example T=4 (T=1 would specialise)
        if opts.tensorrt:
            traced("vision_trt", VisionGraph(model), (px,), ["pixel_values"], ["values", "keys"], ({0: frames},), params)
        # example pool inputs of the tower's output shapes (read from the fused graph): running the tower here would
        # cost minutes at CLIP-L width in fp16 on a CPU, and tracing needs only shapes and dtypes
        values, vkeys = _example_vision_outputs(tmp / "vision.onnx", 4, dtype, gen)
        query = example_query(cfg, torch.arange(320, 326) % cfg.clip_text.vocab_size)
        fixed = (None,) * len(query)  # [1, context]: clip_ids (and SigLIP's clip_mask)
        traced("prompt_pool", pool_graph(model), (*query.values(), vkeys, values), [*query, "keys", "values"],
               ["visual_tokens", "relevance"], (*fixed, {0: P * frames}, {0: frames}), params)
        # an image's anyres tiles (base + crops), one relevance softmax over all of them; traced with 4 tiles (1 would specialise)
        tiles = Dim("tiles", min=1, max=max(IMAGE_MAX_TILES, cfg.image_max_tiles()))
        traced("image_pool", pool_graph(model, image=True), (*query.values(), vkeys, values), [*query, "keys", "values"],
               ["visual_tokens", "relevance"], (*fixed, {0: P * tiles}, {0: tiles}), params)
        tokens = Dim("tokens", min=1, max=65536)
        traced("projector_head", ProjectorHeadGraph(model), (values.reshape(-1, values.shape[-1])[:8],), ["values"], ["tokens"], ({0: tokens},), params)
        if cfg.use_image_newline_parameter:
            save_npy(tmp / IMAGE_NEWLINE_FILE, model.image_newline.detach().numpy())
        del params, values, vkeys
    # prompt_pool and image_pool both hold the CLIP text encoder, and with projector_head linear_2: one copy on disk
    with steps.step("share pool weights"):
        share_initializers([tmp / "prompt_pool.onnx", tmp / "image_pool.onnx", tmp / "projector_head.onnx"], POOL_DATA)

    on_stage("decoder.onnx")
    with steps.step("decoder.onnx"):
        info = build_decoder(lambda name: parts.reader.read_numpy(name, np_dtype), DecoderDims.from_config(cfg.text),
                             *rotary_tables(cfg), tmp / "decoder.onnx", opts.dtype, opts.opset, on_layer=on_progress)
        maps["decoder"] = info["weights"]
    if opts.tensorrt:
        with parts.llm(steps) as model:
            on_stage("decoder_trt.onnx")
            with steps.step("decoder_trt.onnx"):
                prog = export_concat_decoder(model.language_model, tmp / "decoder_trt.onnx", opts)
                lm_params = {k: v.detach().numpy() for k, v in ((checkpoint_name(f, keys), p) for f, p in DecoderGraph(model.language_model).named_parameters()) if k is not None}
                used = [checkpoint_name(f, keys) for f in used_parameters(prog)]
                maps["decoder_trt"] = map_traced_graph(tmp / "decoder_trt.onnx", lm_params, [u for u in used if u is not None], np_dtype)
                del lm_params
    return maps


POSITIONS = "multi_modal_projector.clip_text_model.embeddings."
POOL_IDS, POOL_MASKED = "clip-ids-v1", "clip-ids-mask-v1"
"""The pools' question inputs: clip_ids (CLIP's causal text tower; exports without a `contract` entry are this one),
or clip_ids + clip_mask (SigLIP's bidirectional text tower under the tokenizer's padding mask)."""
VALUE_HEAD_FQN = "clip_visual_head.attention.in_proj_weight"
VALUE_HEAD = "multi_modal_projector.clip_visual_head.attention.in_proj_"
POOL_DATA = "pools.onnx.data"  # the initializers of prompt_pool, image_pool and projector_head, each stored once


def used_parameters(prog) -> list[str]:
    """Parameter FQNs the traced program reads (a lifted parameter without users, e.g. the dead last layer, is not)."""
    ep = prog.exported_program
    users = {n.name: len(n.users) for n in ep.graph.nodes if n.op == "placeholder"}
    return [fqn for ph, fqn in ep.graph_signature.inputs_to_parameters.items() if users.get(ph, 0)]


ROTARY_HEADROOM = 2
"""The in-place decoder's rotary tables cover 2x max_position_embeddings, so the bench's no-pooling baseline (which
runs past the trained context, as LLaVA-NeXT-Video does) still has positions; the runtime's own context check
stays at max_position_embeddings."""


def rotary_tables(cfg) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [positions, head_dim/2] exactly as transformers' rotary module computes them (float32), from the
    config alone (no weights)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    t = cfg.text
    rotary = LlamaRotaryEmbedding(llm_config(cfg))  # the default rope of LLaMA and Qwen2 alike, at the config's theta
    positions = torch.arange(ROTARY_HEADROOM * t.max_position_embeddings)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    half = t.head_dim // 2
    return cos[0, :, :half].float().numpy(), sin[0, :, :half].float().numpy()


def export_concat_decoder(lm: torch.nn.Module, path: Path, opts: ExportOptions):
    """decoder_trt.onnx: standard ONNX ops only (TensorRT's parser takes it), traced from transformers' causal LM
    (`model.language_model`: LlamaForCausalLM, or Qwen2ForCausalLM with its q/k/v biases); present = concat(past,
    new) each step."""
    from torch.export import Dim

    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    gen = torch.Generator().manual_seed(0)
    t = lm.config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=1, max=8192)
    past_len, total = Dim("past", min=0, max=8192), Dim("total", min=1, max=16384)
    B, S, Pl = 2, 2, 5  # trace with batch 2 and seq 2: batch/seq of 1 would be specialised (pitfall 6)
    emb = torch.randn(B, S, t.hidden_size, generator=gen).to(dtype)
    mask = torch.ones(B, Pl + S, dtype=torch.int64)
    pos = torch.arange(Pl, Pl + S, dtype=torch.int64)[None].repeat(B, 1)
    past = tuple(torch.randn(B, t.num_key_value_heads, Pl, head_dim, generator=gen).to(dtype) for _ in range(2 * t.num_hidden_layers))
    names, present = kv_names(t.num_hidden_layers)
    return _onnx_export(
        DecoderGraph(lm), (emb, mask, pos, past), path,
        ["inputs_embeds", "attention_mask", "position_ids", *names],
        ["logits", *present],
        ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in names)),
        opts.opset, _param_bytes(lm) > EXTERNAL_DATA_BYTES,
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
    """What the runtime needs for images (export.json `image`): anyres preprocessing and assembly, and the family's
    preprocessing spec (`preprocess`, read back by `ExportManifest.preprocess` for frames and tiles)."""
    spec = cfg.preprocess
    return {
        "tile_size": cfg.vision.image_size,
        "grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "pooled_grid": cfg.image_pooled_grid,
        "newline": {"file": IMAGE_NEWLINE_FILE, "dtype": "float16" if opts.dtype == "fp16" else "float32"} if cfg.use_image_newline_parameter else None,
        "max_tiles": cfg.image_max_tiles(),
        "max_tokens": cfg.image_max_tokens(),
        "resample": "bicubic",
        "mean": list(spec.mean),
        "std": list(spec.std),
        "preprocess": spec.as_dict(),
    }


def build_manifest(model: PPLLaVAForConditionalGeneration, checkpoint: Path, tmp: Path, opts: ExportOptions, timings: dict[str, float]) -> dict:
    """export.json for the graphs in `tmp`; `model` may be the meta-device skeleton (only sizes are read)."""
    cfg = model.cfg
    t, v = cfg.text, cfg.vision
    preset_file = checkpoint / "ppllava_edge.json"
    made = json.loads(preset_file.read_text()) if preset_file.is_file() else {}
    preset = made.get("preset")
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
    for g in ("prompt_pool", "image_pool"):  # which question inputs the pools take (see runtime/stages.pool)
        graphs[g]["contract"] = POOL_MASKED if cfg.family == QWEN_SIGLIP else POOL_IDS
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
        "family": cfg.family,
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
        "prompt_template": cfg.conversation.prompt_text(),
        "conversation_template": cfg.conversation.to_dict(),
        "llm": made.get("llm") or {"trained": None if preset is None else False},
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
        "tokenizers": {"llama": "llama_tokenizer.json", **relevance_tokenizer_entry(cfg)},
        "validation": None,
    }


SIGLIP_TOKENIZER_FILE = "siglip_spiece.model"


def relevance_tokenizer_entry(cfg) -> dict[str, str]:
    """export.json `tokenizers` entry of the pools' text tower: `clip` (CLIP's BPE as a tokenizers file) or `siglip`
    (SigLIP's sentencepiece model, copied from the checkpoint's clip_weight folder; the runtime reads it without
    sentencepiece, tokenization/siglip.py)."""
    return {"siglip": SIGLIP_TOKENIZER_FILE} if cfg.family == QWEN_SIGLIP else {"clip": "clip_tokenizer.json"}


def save_relevance_tokenizer(cfg, checkpoint: Path, tmp: Path) -> None:
    if cfg.family != QWEN_SIGLIP:
        ClipTokenizer().save(tmp / "clip_tokenizer.json")
        return
    import shutil

    src = clip_weight_folder(cfg.clip_weight, checkpoint) / SIGLIP_MODEL_NAME
    SiglipTextTokenizer.from_file(src)  # a clear error now for a missing or unusable model, not at the first question
    shutil.copyfile(src, tmp / SIGLIP_TOKENIZER_FILE)


VALIDATION_MODES = ("auto", "full", "truncated", "none")
FULL_VALIDATION_FRACTION = 0.25
"""`--validate auto` validates at full depth when the largest part of the fp32 reference (vision side or LLM) takes
at most this fraction of the machine's memory (tiny, small, mid on 24 GB), else on a depth-truncated copy (7B)."""


def resolve_validation(mode: str, skeleton: PPLLaVAForConditionalGeneration) -> str:
    if mode not in VALIDATION_MODES:
        raise InputError(f"--validate {mode!r}: choose one of {', '.join(VALIDATION_MODES)}")
    if mode != "auto":
        return mode
    import psutil

    vision = sum(p.numel() for p in skeleton.vision_tower.parameters()) + sum(p.numel() for p in skeleton.multi_modal_projector.parameters())
    llm = sum(p.numel() for p in skeleton.language_model.parameters())
    return "full" if 4 * max(vision, llm) <= FULL_VALIDATION_FRACTION * psutil.virtual_memory().total else "truncated"


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    opts: ExportOptions | None = None,
    on_stage: Callable[[str], None] | None = None,
    on_progress: Callable[[float, float], None] | None = None,
) -> ExportResult:
    """Export a checkpoint folder to an export folder (atomically; nothing is left in OUT on failure).

    Memory-bounded: the vision side is traced from a model holding only the tower and projector, the decoder is
    written tensor by tensor from the shards (decoder_builder), then every initializer is traced back to the
    checkpoint (weights_check) and the graphs are validated against PyTorch one part at a time - at full depth, or
    (`validate="truncated"`, the default when the fp32 reference would not fit) on a depth-truncated copy with the
    real weights of the kept layers. export.json records the time and peak RSS of every step.
    """
    opts = opts or ExportOptions()
    on_stage = on_stage or (lambda s: None)
    on_progress = on_progress or (lambda done, total: None)
    checkpoint = Path(checkpoint)
    if opts.dtype not in THRESHOLDS:
        raise InputError(f"--dtype {opts.dtype!r}: choose fp32 or fp16")
    cfg = load_config(checkpoint)
    fmin, fopt, fmax = opts.frames
    if fmax > cfg.max_frames:
        raise InputError(f"--frames max {fmax} exceeds the checkpoint's max_T = {cfg.max_frames}")
    dtype = torch.float16 if opts.dtype == "fp16" else torch.float32
    np_dtype = np.float16 if opts.dtype == "fp16" else np.float32
    thresholds = THRESHOLDS[opts.dtype]
    steps = StepRecorder()
    reader = CheckpointReader(checkpoint)
    try:
        # The exported graphs are traced from a model whose LLM uses eager attention (its ONNX graph has no Where/IsNaN
        # mask plumbing); the validation reference uses SDPA: an independent, stricter check.
        parts = ModelParts(checkpoint, cfg, dtype, "eager", reader)
        mode = resolve_validation(opts.validation if opts.validate else "none", parts.model)
        with AtomicDir(out, force=opts.force) as tmp:
            maps = export_graphs(parts, tmp, opts, steps, on_stage, on_progress)
            on_stage("tokenizers + embeddings")
            with steps.step("tokenizers + embeddings"):
                save_npy(tmp / "embed_tokens.npy", reader.read("language_model.model.embed_tokens.weight", dtype).numpy())
                LlamaPromptTokenizer(load_llama_tokenizer_from_checkpoint(checkpoint), image_token_id=cfg.image_token_index,
                                     template=cfg.conversation).save(tmp / "llama_tokenizer.json")
                save_relevance_tokenizer(cfg, checkpoint, tmp)
            timings = {k.removesuffix(".onnx"): v["seconds"] for k, v in steps.as_dict().items() if k.endswith(".onnx")}
            manifest = build_manifest(parts.model, checkpoint, tmp, opts, timings)
            for g, wm in maps.items():
                manifest["graphs"][g]["weights"] = wm.to_json()
            on_stage("weights check")
            with steps.step("weights check"):
                wreport = check_weights(tmp, manifest["graphs"], lambda n: reader.read_numpy(n, np_dtype), np_dtype, on_progress)
            manifest["weights_check"] = wreport.to_json()
            if not wreport.passed:
                raise AccuracyError("export weights check failed (nothing written to the output folder):\n" + wreport.text())
            report = ValidationReport([])
            if mode != "none":
                on_stage(f"validate ({mode} depth)" if mode == "full" else "validate (depth-truncated copy)")
                with steps.step("validate"):
                    report = validate(checkpoint, cfg, reader, tmp, manifest, opts, mode, thresholds, on_progress)
                manifest["validation"] = report.to_json(thresholds)
                if not report.passed:
                    raise AccuracyError("export validation failed (nothing written to the output folder):\n" + report.text())
            manifest["steps"] = steps.as_dict()
            manifest["peak_rss_mb"] = steps.peak_rss_mb
            manifest[WEIGHTS_KEY] = file_digests(tmp, manifest)  # checked at load and by `ppllava-edge verify`
            (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    finally:
        reader.close()
        steps.close()
    return ExportResult(out=Path(out), manifest=manifest, report=report, timings=timings)


def validate(checkpoint: Path, cfg, reader: CheckpointReader, folder: Path, manifest: dict, opts: ExportOptions, mode: str,
             thresholds: dict, on_progress: Callable[[float, float], None]) -> ValidationReport:
    """Full depth: the export's own graphs against the fp32 SDPA reference, one part at a time. Truncated: the same
    export code writes a depth-truncated copy (first layers of each tower and of the LLM, same widths, the
    checkpoint's tensors for them; the LM head's first HEAD_ROWS vocabulary rows) beside OUT, which is validated
    against the truncated reference and deleted."""
    import tempfile

    if mode == "full":
        report = validate_export(ModelParts(checkpoint, cfg, torch.float32, "sdpa", reader), folder, manifest, thresholds, on_progress)
        report.mode = "full"
        return report
    cut = truncated_config(cfg, head_rows=HEAD_ROWS)
    drop = dropped_prefixes(cfg, cut)
    reader = reader.first_rows(head_limits(cut))  # the head's first rows only (HEAD_ROWS: the fp16 session's peak)
    with tempfile.TemporaryDirectory(prefix=".validate-", dir=folder.parent) as td:
        sub = Path(td)
        sub_opts = ExportOptions(frames=opts.frames, dtype=opts.dtype, opset=opts.opset, tensorrt=opts.tensorrt)
        scratch = StepRecorder()
        try:
            export_graphs(ModelParts(checkpoint, cut, torch.float16 if opts.dtype == "fp16" else torch.float32, "eager", reader, drop),
                          sub, sub_opts, scratch, lambda s: None, lambda d, t: None)
        finally:
            scratch.close()
        # same vocab and width: the truncated copy reads the full export's embedding table
        (sub / manifest["embeddings"]["file"]).symlink_to((folder / manifest["embeddings"]["file"]).resolve())
        sub_manifest = build_manifest(build_skeleton(cut), checkpoint, sub, sub_opts, {})
        report = validate_export(ModelParts(checkpoint, cut, torch.float32, "sdpa", reader, drop), sub, sub_manifest, thresholds, on_progress)
    report.mode = "truncated: " + describe_truncation(cfg, cut)
    return report


def trace_vision_graph(checkpoint: str | Path, dst: Path, frames: tuple[int, int, int], dtype: str = "fp32", opset: int = 20) -> Path:
    """The traced standard-ops vision graph alone (vision_trt.onnx of a --tensorrt export), from the checkpoint's
    vision side (nothing else loaded): `quantize --vision int8` on an fp16 export calibrates and quantizes this fp32
    trace for the TensorRT twin."""
    from torch.export import Dim

    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    with CheckpointReader(checkpoint) as reader:
        parts = ModelParts(checkpoint, cfg, torch_dtype, "eager", reader)
        with parts.vision_side() as model:
            fmin, _, fmax = frames
            dim = Dim("frames", min=1 if fmin <= 2 else fmin, max=fmax)
            size = cfg.vision.image_size
            px = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)).to(torch_dtype)
            external = _param_bytes(model.vision_tower) > EXTERNAL_DATA_BYTES
            _onnx_export(VisionGraph(model), (px,), dst, ["pixel_values"], ["values", "keys"], ({0: dim},), opset, external)
    return dst


def write_vision_graph(checkpoint: str | Path, dst: Path, dtype: str = "fp32", opset: int = 20) -> Path:
    """The export's fused vision.onnx written again from the checkpoint (+ `dst.data`, one tensor at a time):
    `quantize --vision int8` on an fp16 export calibrates and quantizes this fp32 twin of the graph it replaces."""
    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)
    with CheckpointReader(checkpoint) as reader:
        build_vision(lambda name: reader.read(name, torch.float32).numpy(), VisionDims.from_config(cfg), dst, dtype, opset)
    return dst


def decoder_copy(checkpoint: str | Path, dst: Path, dtype: str, layers: int | None = None, opset: int = 20) -> Path:
    """decoder.onnx written from the checkpoint by decoder_builder, optionally with only its first `layers` layers
    (the quantization gate at 7B compares depth-truncated decoders: the full fp16 reference does not fit)."""
    from dataclasses import replace

    checkpoint = Path(checkpoint)
    cfg = load_config(checkpoint)
    if layers is not None:
        cfg = replace(cfg, text=replace(cfg.text, num_hidden_layers=min(layers, cfg.text.num_hidden_layers)))
    with CheckpointReader(checkpoint) as reader:
        build_decoder(lambda name: reader.read(name, torch.float32).numpy(), DecoderDims.from_config(cfg.text), *rotary_tables(cfg), dst, dtype, opset)
    return dst
