"""Validation pass: PyTorch vs ONNX Runtime on shapes that differ from the traced ones (like optimum-cli)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import QWEN_SIGLIP
from ..memory import trim_heap
from ..model.ppllava import PPLLaVAForConditionalGeneration
from ..runtime.decoder import kv_names
from ..runtime.stages import decoder_feed, empty_past, encode, pool, project
from .graphs import DecoderGraph, VisionGraph, example_query, pool_graph


@dataclass
class Check:
    graph: str
    case: str
    output: str
    max_abs: float
    scale: float
    cosine: float
    passed: bool


@dataclass
class ValidationReport:
    checks: list[Check]
    mode: str = "full"  # "full", or "truncated: <what was kept>" (export.py decides)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def rows(self) -> list[list[str]]:
        return [
            [c.graph, c.case, c.output, f"{c.max_abs:.2e}", f"{c.scale:.3g}", f"{c.cosine:.7f}", "ok" if c.passed else "FAIL"]
            for c in self.checks
        ]

    HEADER = ["graph", "case", "output", "max abs diff", "max |ref|", "cosine", "result"]

    def text(self) -> str:
        widths = [max(len(r[i]) for r in [self.HEADER, *self.rows()]) for i in range(len(self.HEADER))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(self.HEADER, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in self.rows()]
        return "\n".join(lines)

    def to_json(self, thresholds: dict) -> dict:
        return {
            "passed": self.passed,
            "mode": self.mode,
            "thresholds": thresholds,
            "checks": [c.__dict__ for c in self.checks],
        }


def compare(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(max abs diff, max |ref|, cosine) in float64."""
    r, g = np.asarray(ref, dtype=np.float64).ravel(), np.asarray(got, dtype=np.float64).ravel()
    if r.shape != g.shape:
        return float("inf"), float(np.abs(r).max(initial=0.0)), 0.0
    if r.size == 0:
        return 0.0, 0.0, 1.0
    denom = np.linalg.norm(r) * np.linalg.norm(g)
    cos = float(r @ g / denom) if denom > 0 else float(np.array_equal(r, g))
    return float(np.abs(r - g).max()), float(np.abs(r).max()), cos


def _session(path: Path, prepack: bool = True):
    """A CPU session for a check. `prepack=False` for an fp16 decoder: the CPU provider has no fp16 MatMul, so it
    runs the graph's weights as fp32 copies and, by default, also keeps a pre-packed copy of each (an untied
    152064 x 3584 head is 1.09 GB in the file, 2.18 GB upcast and as much again pre-packed: +6.0 GiB at the Qwen2-7B
    widths with the whole head; a truncated copy now keeps 32768 rows, see truncate.py). Without pre-packing the same
    math runs with unpacked operands (+4.9 GiB; logits within 4e-3 of the pre-packed kernels', far inside the checks'
    tolerance)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _pick_frames(fmin: int, fmax: int, traced: int = 4) -> list[int]:
    """Two even frame counts different from the traced one, and an odd one, inside [fmin, fmax]."""
    want = [2, 6, 5, 10, 3]
    out = [t for t in want if fmin <= t <= fmax and t != traced]
    return out[:3] or [fmin]


def validate_export(parts, folder: Path, manifest: dict, thresholds: dict, on_progress=None) -> ValidationReport:
    """PyTorch (fp32, SDPA) vs ONNX Runtime on shapes that differ from the traced ones. `parts` (exporter.ModelParts)
    holds one part of the reference at a time: the vision side for the vision / pool graphs, then the LLM."""
    checks: list[Check] = []
    record = _recorder(checks, thresholds)
    # the decoder graphs run first, while nothing else is loaded (their CPU session is validation's largest
    # allocation), and are closed before any PyTorch part is loaded: the two never share memory
    np_dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32
    m = manifest["model"]
    table = np.load(folder / manifest["embeddings"]["file"], mmap_mode="r")
    cases = decoder_cases(table, m["vocab_size"])
    ort_out = {}
    for graph in ("decoder", "decoder_trt"):
        if graph in manifest["graphs"]:
            session = _session(folder / manifest["graphs"][graph]["file"], prepack=np_dtype is not np.float16)
            ort_out[graph] = _ort_decoder_outputs(session, cases, m["num_layers"], m["num_kv_heads"], m["head_dim"], m["max_position_embeddings"], np_dtype)
            del session
    del table
    trim_heap()
    with parts.vision_side() as model:
        _check_vision_side(model, folder, manifest, record)
    if on_progress is not None:
        on_progress(1, 2)
    with parts.llm(embeddings=False) as model, torch.no_grad():  # the checks feed rows of the exported table
        for graph, out in ort_out.items():
            _check_decoder(model, graph, cases, out, record)
    if on_progress is not None:
        on_progress(2, 2)
    return ValidationReport(checks)


def _recorder(checks: list[Check], thresholds: dict):
    """record(graph, case, output, ref, got): compare and append a Check (max-abs relative to max|ref|, cosine)."""
    rel, min_cos = thresholds["rel_max_abs"], thresholds["min_cosine"]

    def record(graph, case, name, ref, got):
        max_abs, scale, cos = compare(ref, got)
        checks.append(Check(graph, case, name, max_abs, scale, cos, max_abs <= rel * max(scale, 1e-12) and cos >= min_cos))

    return record


def _reference_pool(model: PPLLaVAForConditionalGeneration, image: bool = False):
    """The PyTorch side of a pool check, (query inputs..., keys, values) -> (tokens, relevance): the traced module
    (PromptPoolGraph: the projector's own pool) for CLIP; for SigLIP the projector's own `pool` (logit_bias included)
    rather than the SiglipPoolGraph that was traced, so the check covers how that graph re-assembles it."""
    if model.cfg.family != QWEN_SIGLIP:
        return pool_graph(model, image=image)

    def run(clip_ids, clip_mask, keys, values):
        g, tokens = model.multi_modal_projector.pool(keys, values, clip_ids, image=image, clip_mask=clip_mask)
        return tokens, g

    return run


def _check_vision_side(model: PPLLaVAForConditionalGeneration, folder: Path, manifest: dict, record) -> None:
    cfg = model.cfg
    np_dtype = np.float16 if manifest["dtype"] == "fp16" else np.float32

    gen = torch.Generator().manual_seed(1234)
    size = cfg.vision.image_size
    vision = _session(folder / "vision.onnx")
    prompt_pool = _session(folder / "prompt_pool.onnx")
    image_pool = _session(folder / "image_pool.onnx")
    vision_trt = _session(folder / manifest["graphs"]["vision_trt"]["file"]) if "vision_trt" in manifest["graphs"] else None
    fmin, _, fmax = manifest["frames"]["min"], None, manifest["frames"]["max"]
    vocab = cfg.clip_text.vocab_size
    short = example_query(cfg, torch.tensor([768, 533, 4284, 530, 518, 1455]) % vocab)  # (a padded SigLIP question: the mask matters)
    long = example_query(cfg, torch.randint(300, min(40000, vocab), (60,), generator=gen))

    def run_pool(session, query: dict, keys: torch.Tensor, values: torch.Tensor):
        mask = query.get("clip_mask")
        return pool(session, query["clip_ids"].numpy(), keys.numpy().astype(np_dtype), values.numpy().astype(np_dtype), None if mask is None else mask.numpy())

    vg, pg = VisionGraph(model), _reference_pool(model)
    with torch.no_grad():
        for T in _pick_frames(max(fmin, 2), fmax):
            px = torch.randn(T, 3, size, size, generator=gen)
            ref_values, ref_keys = vg(px)
            values, keys = encode(vision, px.numpy().astype(np_dtype))
            record("vision", f"T={T}", "values", ref_values.numpy(), values)
            record("vision", f"T={T}", "keys", ref_keys.numpy(), keys)
            if vision_trt is not None:  # the traced standard-ops graph TensorRT builds (export --tensorrt)
                for name, ref, got in zip(("values", "keys"), (ref_values, ref_keys), encode(vision_trt, px.numpy().astype(np_dtype))):
                    record("vision_trt", f"T={T}", name, ref.numpy(), got)
            for qname, query in (("short q", short), ("long q", long)):
                ref_tokens, ref_g = pg(*query.values(), ref_keys, ref_values)
                tokens, g = run_pool(prompt_pool, query, ref_keys, ref_values)
                record("prompt_pool", f"T={T} {qname}", "visual_tokens", ref_tokens.numpy(), tokens)
                record("prompt_pool", f"T={T} {qname}", "relevance", ref_g.numpy(), g)
        ipg = _reference_pool(model, image=True)
        for tiles in (1, 3, 5):  # an image's anyres tiles, each through the vision graph with T = 1 (traced with 4)
            px = torch.randn(tiles, 3, size, size, generator=gen)
            outs = [vg(px[i : i + 1]) for i in range(tiles)]
            ref_values, ref_keys = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            if tiles == 1:
                values, keys = encode(vision, px.numpy().astype(np_dtype))
                record("vision", "T=1 (image tile)", "values", ref_values.numpy(), values)
                record("vision", "T=1 (image tile)", "keys", ref_keys.numpy(), keys)
            ref_tokens, ref_g = ipg(*short.values(), ref_keys, ref_values)
            tokens, g = run_pool(image_pool, short, ref_keys, ref_values)
            record("image_pool", f"{tiles} tiles", "visual_tokens", ref_tokens.numpy(), tokens)
            record("image_pool", f"{tiles} tiles", "relevance", ref_g.numpy(), g)
        head = _session(folder / "projector_head.onnx")
        flat = ref_values.reshape(-1, ref_values.shape[-1])
        record("projector_head", f"N={flat.shape[0]}", "tokens", model.multi_modal_projector.linear_2(flat).numpy(), project(head, flat.numpy().astype(np_dtype)))


def decoder_cases(table: np.ndarray, vocab: int, seed: int = 4321) -> list[tuple[str, np.ndarray, int]]:
    """(case, input embeddings [1, L, D], positions to prefill) of the decoder checks: prefills of 7 and 19
    positions followed by one decode step, and an 11-position prefill followed by three decode steps (the
    in-place path). Embeddings are rows of the exported table, so ONNX Runtime and PyTorch get identical inputs."""
    rng = np.random.default_rng(seed)
    out = []
    for L, steps in ((7, 1), (19, 1), (11, 3)):
        ids = rng.integers(3, vocab, L + steps)
        out.append((f"L={L}+{steps}", np.asarray(table[ids], np.float32)[None], L))
    return out


def _ort_decoder_outputs(session, cases, layers: int, kv: int, hd: int, max_len: int, np_dtype) -> list[dict]:
    """Phase 1 (no PyTorch weights in memory): each case through ONNX Runtime, every step fed its own past. The
    concat graph runs with plain `run()`; the in-place graph additionally through the runtime's own binding."""
    from ..runtime.decoder import InplaceKVDecoder

    inputs = [i.name for i in session.get_inputs()]
    results = []
    for case, emb, L in cases:
        past = empty_past(layers, kv, hd, np_dtype)
        logits = []
        for start, stop in [(0, L)] + [(j, j + 1) for j in range(L, emb.shape[1])]:
            out = session.run(None, decoder_feed(emb[:, start:stop].astype(np_dtype), past, inputs))
            logits.append(np.asarray(out[0], np.float32))
            past = list(out[1:])
        entry = {"case": case, "logits": logits, "cache": past}
        if "seqlens_k" in inputs:
            dec = InplaceKVDecoder(session, layers, kv, hd, max_len, dtype=np_dtype)
            dec.reserve(1, emb.shape[1])
            dec.reset(1)
            inplace = [dec.forward(emb[:, :L])] + [dec.forward(emb[:, j : j + 1]) for j in range(L, emb.shape[1])]
            entry["inplace_logits"] = inplace
            entry["inplace_cache"] = [np.array(p) for p in dec.past()]
        results.append(entry)
    return results


def _check_decoder(model: PPLLaVAForConditionalGeneration, graph: str, cases, ort_out: list[dict], record) -> None:
    """Phase 2: the same cases through the PyTorch reference (its own past each step), compared with phase 1."""
    t = model.cfg.text
    dg = DecoderGraph(model.language_model)
    names = kv_names(t.num_hidden_layers)[0]
    for (case, emb, L), got in zip(cases, ort_out):
        e = torch.from_numpy(emb)
        past = tuple(torch.zeros(1, t.num_key_value_heads, 0, t.head_dim) for _ in names)
        steps = [(0, L)] + [(j, j + 1) for j in range(L, e.shape[1])]
        for k, (start, stop) in enumerate(steps):
            out = dg(e[:, start:stop], torch.ones(1, stop, dtype=torch.int64), torch.arange(start, stop)[None], past)
            past = tuple(out[1:])
            what = "prefill" if k == 0 else f"decode step {k}"
            record(graph, f"{case} {what}", "logits", out[0].numpy(), got["logits"][k])
            if "inplace_logits" in got and k == len(steps) - 1:
                record(graph, f"{case} in-place", "logits", out[0].numpy(), got["inplace_logits"][k])
        ref_cache = np.concatenate([p.numpy().ravel() for p in past])
        record(graph, case, "cache (all layers)", ref_cache, np.concatenate([p.ravel() for p in got["cache"]]))
        if "inplace_cache" in got:
            record(graph, f"{case} in-place", "cache (all layers)", ref_cache, np.concatenate([p.ravel() for p in got["inplace_cache"]]))
