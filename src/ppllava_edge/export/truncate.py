"""Depth-truncated copies of a model for validation at scales where the full fp32 reference does not fit in memory.

A truncated copy keeps the widths and the first layers of each tower (vision: the first `btadapter_depth + 1` main
layers, so every BT-Adapter pair still runs; CLIP text and the LLM: the first two layers) with the checkpoint's
own tensors for them (the same names, read from the same shards); the later layers are simply not built. Exporting
and validating such a copy checks every graph's maths at the real widths and with real weights. For validation the
LLM's head may also keep only its first `HEAD_ROWS` vocabulary rows (`head_rows`): the same MatMul over fewer output
rows. At Qwen2-7B's 152064 x 3584 untied head, ONNX Runtime's CPU session for the fp16 copy upcasts the whole head to
fp32 (2.2 GB, the export's peak); every byte of the full head is still checked against the checkpoint by the
weights check (weights_check.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..config import PPLLaVAConfig

VISION_LAYERS = "vision_tower.vision_model.encoder.layers."
TEXT_LAYERS = "multi_modal_projector.clip_text_model.encoder.layers."
LLM_LAYERS = "language_model.model.layers."
HEAD_TENSORS = ("language_model.lm_head.weight", "language_model.model.embed_tokens.weight")  # (a tied head reads the second)
HEAD_ROWS = 32768


def truncated_config(cfg: PPLLaVAConfig, text_layers: int = 2, llm_layers: int = 2, vision_layers: int | None = None,
                     head_rows: int | None = None) -> PPLLaVAConfig:
    """`cfg` with fewer layers (never more than it has) and, with `head_rows`, at most that many vocabulary rows
    (read them with `head_limits`)."""
    v = cfg.vision
    keep_v = vision_layers if vision_layers is not None else v.btadapter_depth + 1
    rows = min(cfg.text.vocab_size, head_rows or cfg.text.vocab_size)

    def kept(token_id):  # special ids past the kept rows (Qwen2's pad 151643): an out-of-range padding_idx and
        return token_id if token_id is None or token_id < rows else None  # transformers' warnings; nothing generates here

    return replace(
        cfg,
        pad_token_id=kept(cfg.pad_token_id),
        vision=replace(v, num_hidden_layers=min(v.num_hidden_layers, max(keep_v, v.btadapter_depth + 1))),
        clip_text=replace(cfg.clip_text, num_hidden_layers=min(cfg.clip_text.num_hidden_layers, text_layers)),
        text=replace(cfg.text, num_hidden_layers=min(cfg.text.num_hidden_layers, llm_layers), vocab_size=rows,
                     bos_token_id=kept(cfg.text.bos_token_id), eos_token_id=kept(cfg.text.eos_token_id)),
    )


def head_limits(cut: PPLLaVAConfig) -> dict[str, int]:
    """`CheckpointReader.first_rows` limits that give the head and embedding tensors `cut`'s vocabulary rows."""
    return {name: cut.text.vocab_size for name in HEAD_TENSORS}


def dropped_prefixes(full: PPLLaVAConfig, cut: PPLLaVAConfig) -> tuple[str, ...]:
    """Checkpoint-name prefixes of the layers the truncated copy does not have (excluded when loading it)."""
    out: list[str] = []
    for head, n_full, n_cut in (
        (VISION_LAYERS, full.vision.num_hidden_layers, cut.vision.num_hidden_layers),
        (TEXT_LAYERS, full.clip_text.num_hidden_layers, cut.clip_text.num_hidden_layers),
        (LLM_LAYERS, full.text.num_hidden_layers, cut.text.num_hidden_layers),
    ):
        out += [f"{head}{i}." for i in range(n_cut, n_full)]
    return tuple(out)


def describe(full: PPLLaVAConfig, cut: PPLLaVAConfig) -> str:
    head = "" if cut.text.vocab_size == full.text.vocab_size else f", LM head rows {cut.text.vocab_size}/{full.text.vocab_size}"
    return (f"vision {cut.vision.num_hidden_layers}/{full.vision.num_hidden_layers} layers, CLIP text "
            f"{cut.clip_text.num_hidden_layers}/{full.clip_text.num_hidden_layers}, LLM {cut.text.num_hidden_layers}/{full.text.num_hidden_layers}{head}; "
            "full widths, the checkpoint's weights")


def write_truncated_checkpoint(src: str | Path, dst: str | Path, text_layers: int = 2, llm_layers: int = 2, force: bool = False) -> Path:
    """A checkpoint folder holding `src`'s first layers only (vision: btadapter_depth + 1 main layers, CLIP text and
    LLM: the given counts) at full width, with `src`'s own tensors for them, streamed tensor by tensor. Used to run
    the full export at a real model's widths quickly (tests, trying a 7B export on a small machine)."""
    import json
    import shutil

    from ..atomic import AtomicDir
    from ..config import load_config, resolve_clip_config
    from ..model.checkpoint import CheckpointReader, write_shards

    src, dst = Path(src), Path(dst)
    cfg = load_config(src)
    cut = truncated_config(cfg, text_layers=text_layers, llm_layers=llm_layers)
    drop = dropped_prefixes(cfg, cut)
    raw = json.loads((src / "config.json").read_text())
    raw["vision_config"]["num_hidden_layers"] = cut.vision.num_hidden_layers
    raw["text_config"]["num_hidden_layers"] = cut.text.num_hidden_layers
    clip = dict(resolve_clip_config(raw.get("clip_weight") or "clip", src))
    clip["text_config"] = {**clip.get("text_config", {}), "num_hidden_layers": cut.clip_text.num_hidden_layers}
    raw["clip_weight"] = "clip"
    with AtomicDir(dst, force=force) as tmp, CheckpointReader(src) as reader:
        (tmp / "clip").mkdir()
        (tmp / "clip" / "config.json").write_text(json.dumps(clip, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        names = [n for n in reader.names() if not n.startswith(drop)]
        write_shards(tmp, [reader.spec(n) for n in names], ((n, reader.read(n)) for n in names))
        for f in src.iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "added_tokens.json", "generation_config.json")):
                shutil.copyfile(f, tmp / f.name)
        (tmp / "ppllava_edge.json").write_text(json.dumps({"preset": None, "truncated_from": str(src.resolve())}) + "\n")
    return dst
