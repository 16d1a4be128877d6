"""Validation pass: PyTorch vs ONNX Runtime on shapes that differ from the traced ones (like optimum-cli)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.ppllava import PPLLaVAForConditionalGeneration
from .graphs import DecoderGraph, PromptPoolGraph, VisionGraph


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


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _pick_frames(fmin: int, fmax: int, traced: int = 4) -> list[int]:
    """Two even frame counts different from the traced one, and an odd one, inside [fmin, fmax]."""
    want = [2, 6, 5, 10, 3]
    out = [t for t in want if fmin <= t <= fmax and t != traced]
    return out[:3] or [fmin]


def validate_export(model: PPLLaVAForConditionalGeneration, folder: Path, manifest: dict, thresholds: dict) -> ValidationReport:
    cfg = model.cfg
    half = manifest["dtype"] == "fp16"
    np_dtype = np.float16 if half else np.float32
    rel, min_cos = thresholds["rel_max_abs"], thresholds["min_cosine"]
    checks: list[Check] = []

    def record(graph, case, name, ref, got):
        max_abs, scale, cos = compare(ref, got)
        checks.append(Check(graph, case, name, max_abs, scale, cos, max_abs <= rel * max(scale, 1e-12) and cos >= min_cos))

    gen = torch.Generator().manual_seed(1234)
    size = cfg.vision.image_size
    vision = _session(folder / "vision.onnx")
    pool = _session(folder / "prompt_pool.onnx")
    image_pool = _session(folder / "image_pool.onnx")
    decoder = _session(folder / "decoder.onnx")
    vision_trt = _session(folder / manifest["graphs"]["vision_trt"]["file"]) if "vision_trt" in manifest["graphs"] else None
    fmin, _, fmax = manifest["frames"]["min"], None, manifest["frames"]["max"]
    ctx = cfg.clip_text.context_length
    short = torch.full((1, ctx), 49407, dtype=torch.int64)
    short[0, :7] = torch.tensor([49406, 768, 533, 4284, 530, 518, 1455])
    long = torch.full((1, ctx), 49407, dtype=torch.int64)
    long[0, 0] = 49406
    long[0, 1:61] = torch.randint(300, 40000, (60,), generator=gen)
    vg, pg = VisionGraph(model), PromptPoolGraph(model)
    with torch.no_grad():
        for T in _pick_frames(max(fmin, 2), fmax):
            px = torch.randn(T, 3, size, size, generator=gen)
            ref_values, ref_keys = vg(px)
            values, keys = vision.run(None, {"pixel_values": px.numpy().astype(np_dtype)})
            record("vision", f"T={T}", "values", ref_values.numpy(), values)
            record("vision", f"T={T}", "keys", ref_keys.numpy(), keys)
            if vision_trt is not None:  # the traced standard-ops graph TensorRT builds (export --tensorrt)
                for name, ref, got in zip(("values", "keys"), (ref_values, ref_keys), vision_trt.run(None, {"pixel_values": px.numpy().astype(np_dtype)})):
                    record("vision_trt", f"T={T}", name, ref.numpy(), got)
            for qname, ids in (("short q", short), ("long q", long)):
                ref_tokens, ref_g = pg(ids, ref_keys, ref_values)
                tokens, g = pool.run(None, {"clip_ids": ids.numpy(), "keys": ref_keys.numpy().astype(np_dtype), "values": ref_values.numpy().astype(np_dtype)})
                record("prompt_pool", f"T={T} {qname}", "visual_tokens", ref_tokens.numpy(), tokens)
                record("prompt_pool", f"T={T} {qname}", "relevance", ref_g.numpy(), g)
        ipg = PromptPoolGraph(model, image=True)
        for tiles in (1, 3, 5):  # an image's anyres tiles, each through the vision graph with T = 1 (traced with 4)
            px = torch.randn(tiles, 3, size, size, generator=gen)
            outs = [vg(px[i : i + 1]) for i in range(tiles)]
            ref_values, ref_keys = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
            if tiles == 1:
                values, keys = vision.run(None, {"pixel_values": px.numpy().astype(np_dtype)})
                record("vision", "T=1 (image tile)", "values", ref_values.numpy(), values)
                record("vision", "T=1 (image tile)", "keys", ref_keys.numpy(), keys)
            ref_tokens, ref_g = ipg(short, ref_keys, ref_values)
            tokens, g = image_pool.run(None, {"clip_ids": short.numpy(), "keys": ref_keys.numpy().astype(np_dtype), "values": ref_values.numpy().astype(np_dtype)})
            record("image_pool", f"{tiles} tiles", "visual_tokens", ref_tokens.numpy(), tokens)
            record("image_pool", f"{tiles} tiles", "relevance", ref_g.numpy(), g)
        head = _session(folder / "projector_head.onnx")
        flat = ref_values.reshape(-1, ref_values.shape[-1])
        record("projector_head", f"N={flat.shape[0]}", "tokens", model.multi_modal_projector.linear_2(flat).numpy(), head.run(None, {"values": flat.numpy().astype(np_dtype)})[0])

        for graph in ("decoder", "decoder_trt"):
            if graph in manifest["graphs"]:
                _check_decoder(model, graph, _session(folder / manifest["graphs"][graph]["file"]), np_dtype, gen, record)
    return ValidationReport(checks)


def _check_decoder(model: PPLLaVAForConditionalGeneration, graph: str, session, np_dtype, gen: torch.Generator, record) -> None:
    """Prefill at two lengths and a decode step on top of the reference past (plain run), and for the in-place
    graph the runtime's own binding (one shared buffer) over a prefill and three decode steps."""
    from ..runtime.decoder import InplaceKVDecoder, adapt_feed

    cfg = model.cfg
    t = cfg.text
    dg = DecoderGraph(model)
    names = [f"past.{i}.{kv}" for i in range(t.num_hidden_layers) for kv in ("key", "value")]
    inputs = [i.name for i in session.get_inputs()]
    table = model.language_model.get_input_embeddings().weight

    def run(emb, past, length):
        feed = {"inputs_embeds": emb.numpy().astype(np_dtype), "attention_mask": np.ones((1, length + emb.shape[1]), np.int64),
                "position_ids": np.arange(length, length + emb.shape[1], dtype=np.int64)[None]}
        feed.update({n: p.numpy().astype(np_dtype) for n, p in zip(names, past)})
        return session.run(None, adapt_feed(feed, inputs))

    for L in (7, 19):
        ids = torch.randint(3, t.vocab_size, (1, L), generator=gen)
        emb = table[ids]
        empty = tuple(torch.zeros(1, t.num_key_value_heads, 0, t.head_dim) for _ in names)
        ref = dg(emb, torch.ones(1, L, dtype=torch.int64), torch.arange(L)[None], empty)
        got = run(emb, empty, 0)
        record(graph, f"prefill L={L}", "logits", ref[0].numpy(), got[0])
        record(graph, f"prefill L={L}", "present.0.key", ref[1].numpy(), got[1])
        nxt = table[torch.randint(3, t.vocab_size, (1, 1), generator=gen)]
        ref2 = dg(nxt, torch.ones(1, L + 1, dtype=torch.int64), torch.tensor([[L]]), tuple(ref[1:]))
        got2 = run(nxt, ref[1:], L)
        record(graph, f"decode past={L}", "logits", ref2[0].numpy(), got2[0])
        record(graph, f"decode past={L}", f"present.{t.num_hidden_layers - 1}.value", ref2[-1].numpy(), got2[-1])
    if "seqlens_k" not in inputs:
        return
    # the in-place path as the runtime binds it: past and present share one buffer, written position by position
    L, steps = 11, 3
    dec = InplaceKVDecoder(session, t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.max_position_embeddings, dtype=np_dtype)
    dec.reserve(1, L + steps)
    dec.reset(1)
    seq = table[torch.randint(3, t.vocab_size, (1, L + steps), generator=gen)]
    empty = tuple(torch.zeros(1, t.num_key_value_heads, 0, t.head_dim) for _ in names)
    ref = dg(seq, torch.ones(1, L + steps, dtype=torch.int64), torch.arange(L + steps)[None], empty)
    dec.forward(seq[:, :L].numpy())
    for j in range(steps):
        logits = dec.forward(seq[:, L + j : L + j + 1].numpy())
    ref_last = dg(seq[:, -1:], torch.ones(1, L + steps, dtype=torch.int64), torch.tensor([[L + steps - 1]]), tuple(r[:, :, :-1] for r in ref[1:]))
    record(graph, f"in-place L={L}+{steps}", "logits", ref_last[0].numpy(), logits)
    record(graph, f"in-place L={L}+{steps}", "cache (all layers)", np.concatenate([r.numpy().ravel() for r in ref[1:]]),
           np.concatenate([p.ravel() for p in dec.past()]))
