"""Export at scale: the initializer-to-checkpoint weights check and depth-truncated validation (issue 12).

Both run on the tiny preset and on a small-width checkpoint (the small preset's widths, depth cut so the test stays
quick: the 7B flow validates the same way, on a truncated copy).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from ppllava_edge.config import load_config
from ppllava_edge.export.exporter import ExportOptions, ModelParts, export_checkpoint
from ppllava_edge.export.truncate import dropped_prefixes, truncated_config
from ppllava_edge.export.weights_check import check_weights, digest
from ppllava_edge.external_data import read_initializer
from ppllava_edge.model.checkpoint import CheckpointReader


def _check(folder: Path, ckpt: Path):
    m = json.loads((folder / "export.json").read_text())
    with CheckpointReader(ckpt) as r:
        dtype = np.float16 if m["dtype"] == "fp16" else np.float32
        return check_weights(folder, m["graphs"], lambda n: r.read_numpy(n, dtype), dtype)


def _defects(export: Path, ckpt: Path, tmp: Path) -> dict[str, list]:
    """Copy the export, plant one transposed, one missing and one duplicated tensor, return the findings by kind."""
    bad = tmp / "bad"
    shutil.copytree(export, bad)
    m = json.loads((bad / "export.json").read_text())
    # transposed: a square decoder matrix written as its transpose, in place in the external data
    dec = onnx.load(str(bad / "decoder.onnx"), load_external_data=False)
    t = next(t for t in dec.graph.initializer if t.name == "layers.0.attn.o_proj.weight")
    arr = np.array(read_initializer(t, bad))
    assert arr.shape[0] == arr.shape[1]
    offset = int({e.key: e.value for e in t.external_data}["offset"])
    with open(bad / "decoder.onnx.data", "r+b") as f:
        f.seek(offset)
        f.write(np.ascontiguousarray(arr.T).tobytes())
    # missing: a decoder matrix dropped from the graph
    gone = next(t for t in dec.graph.initializer if t.name == "layers.1.mlp.down_proj.weight" or t.name == "layers.0.mlp.down_proj.weight")
    dec.graph.initializer.remove(gone)
    onnx.save_model(dec, str(bad / "decoder.onnx"))
    # duplicated: a second copy of the patch embedding in vision.onnx
    vis = onnx.load(str(bad / "vision.onnx"))
    src = next(t for t in vis.graph.initializer if t.name.endswith("patch_embedding.weight"))
    dup = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(src).copy(), "copy_of_patch_embedding")
    vis.graph.initializer.append(dup)
    onnx.save_model(vis, str(bad / "vision.onnx"))
    rep = _check(bad, ckpt)
    assert not rep.passed and m
    out: dict[str, list] = {}
    for f in rep.findings:
        out.setdefault(f.kind, []).append((f.graph, f.initializer, f.detail))
    return out


def _assert_defects_found(found: dict[str, list]) -> None:
    assert [(g, i) for g, i, _ in found["transposed"]] == [("decoder", "layers.0.attn.o_proj.weight")]
    assert any(g == "decoder" and i.endswith("mlp.down_proj.weight") for g, i, _ in found["missing"])
    assert [(g, i) for g, i, _ in found["duplicated"]] == [("vision", "copy_of_patch_embedding")]
    assert "patch_embedding.weight" in found["duplicated"][0][2]
    assert set(found) == {"transposed", "missing", "duplicated"}  # nothing else is flagged


def test_weights_check_on_tiny(tiny_export, tiny_ckpt, tmp_path):
    m = json.loads((tiny_export / "export.json").read_text())
    assert m["weights_check"]["passed"] and m["weights_check"]["initializers"] > 100
    # every float initializer with real weight volume is mapped to the checkpoint, in every graph
    for g, entry in m["graphs"].items():
        wm = entry["weights"]
        model = onnx.load(str(tiny_export / entry["file"]), load_external_data=False)
        for t in model.graph.initializer:
            assert t.name in wm["map"] or t.name in wm["derived"], (g, t.name)
    assert m["graphs"]["decoder"]["weights"]["map"]["layers.0.attn.qkv_proj.weight"][0] == "concat_transpose"
    # the folded 248-row CLIP position table (the exporter names it after its constant-folded slice) is traced to
    # both checkpoint tables
    folded = [v for v in m["graphs"]["prompt_pool"]["weights"]["map"].values() if v[0] == "clip_positions"]
    assert [v[1] for v in folded] == [[f"multi_modal_projector.clip_text_model.embeddings.position_embedding{s}" for s in ("", "_res")]]
    assert _check(tiny_export, tiny_ckpt).passed  # re-checked from the files, independently of the export run
    _assert_defects_found(_defects(tiny_export, tiny_ckpt, tmp_path))


@pytest.fixture(scope="module")
def small_cut(tmp_path_factory):
    """A checkpoint at the small preset's widths (336 px, 24x24 grid, CLIP text 256, LLM 768), depth cut to the
    truncated-validation depth, with the small preset's own tensors for the kept layers; and its export."""
    from ppllava_edge.export.truncate import write_truncated_checkpoint
    from ppllava_edge.model.make import make_checkpoint

    root = tmp_path_factory.mktemp("small")
    full = make_checkpoint("small", root / "small")
    cut = write_truncated_checkpoint(full, root / "cut")
    out = root / "export"
    export_checkpoint(cut, out, ExportOptions(frames=(2, 4, 8)))
    return full, cut, out


def test_weights_check_on_small_widths(small_cut, tmp_path):
    full, cut, export = small_cut
    cfg = load_config(cut)
    assert (cfg.vision.hidden_size, cfg.vision.image_size, cfg.text.hidden_size) == (128, 336, 768)
    assert json.loads((export / "export.json").read_text())["weights_check"]["passed"]
    _assert_defects_found(_defects(export, cut, tmp_path))


def test_truncated_validation_uses_the_checkpoint_weights(tiny_ckpt, small_cut):
    """The truncated copy has fewer layers at full width, and each kept tensor is the checkpoint's own."""
    for ckpt in (tiny_ckpt, small_cut[0]):
        cfg = load_config(ckpt)
        cut = truncated_config(cfg)
        assert cut.text.num_hidden_layers == min(2, cfg.text.num_hidden_layers)
        assert cut.vision.num_hidden_layers == cfg.vision.btadapter_depth + 1 and cut.text.hidden_size == cfg.text.hidden_size
        with CheckpointReader(ckpt) as reader:
            parts = ModelParts(ckpt, cut, torch.float32, "sdpa", reader, dropped_prefixes(cfg, cut))
            with parts.vision_side() as model:
                state = model.vision_tower.state_dict()
                assert len(model.vision_tower.vision_model.encoder.layers) == cut.vision.num_hidden_layers
                for k in ("vision_model.encoder.layers.0.mlp.fc1.weight", "vision_model.btadapter_S_layers.0.self_attn.q_proj.weight"):
                    assert torch.equal(state[k], reader.read("vision_tower." + k, torch.float32))
            with parts.llm() as model:
                assert len(model.language_model.model.layers) == cut.text.num_hidden_layers
                w = model.language_model.model.layers[1].mlp.down_proj.weight
                assert torch.equal(w, reader.read("language_model.model.layers.1.mlp.down_proj.weight", torch.float32))


def test_first_rows_view_reads_only_the_first_rows(tiny_ckpt):
    """CheckpointReader.first_rows: the named tensor is its first rows (spec, read in any dtype, read_numpy), only
    their bytes are read, other tensors and the original reader are unchanged."""
    name = "language_model.lm_head.weight"
    with CheckpointReader(tiny_ckpt) as reader:
        full = reader.read(name)
        view = reader.first_rows({name: 5})
        before = view.bytes_read
        assert view.spec(name).shape == (5, full.shape[1]) and reader.spec(name).shape == tuple(full.shape)
        head = view.read(name)
        assert torch.equal(head, full[:5]) and head.dtype == full.dtype
        assert view.bytes_read - before == 5 * full.shape[1] * full.element_size()  # those rows' bytes only
        assert torch.equal(view.read(name, torch.float32), full[:5].float())
        np.testing.assert_array_equal(view.read_numpy(name, np.float16), full[:5].float().numpy().astype(np.float16))
        other = "language_model.model.norm.weight"
        assert torch.equal(view.read(other), reader.read(other)) and torch.equal(reader.read(name), full)


def test_truncated_validation_mode_on_tiny(tiny_ckpt, tmp_path, monkeypatch):
    """--validate truncated: the report says what was kept (the LM head's first rows too), every graph is checked,
    nothing of it stays in OUT."""
    from ppllava_edge.export import exporter

    monkeypatch.setattr(exporter, "HEAD_ROWS", 1000)  # (tiny's vocabulary is larger; Qwen2-7B's 152064 > the default)
    vocab = load_config(tiny_ckpt).text.vocab_size
    out = tmp_path / "e"
    res = export_checkpoint(tiny_ckpt, out, ExportOptions(frames=(2, 4, 8), validation="truncated"))
    assert res.report.passed and res.report.mode.startswith(f"truncated: vision 5/6 layers, CLIP text 2/2, LLM 2/2, LM head rows 1000/{vocab};")
    assert {c.graph for c in res.report.checks} == {"vision", "prompt_pool", "image_pool", "projector_head", "decoder"}
    m = json.loads((out / "export.json").read_text())
    assert m["validation"]["mode"] == res.report.mode
    assert not list(out.parent.glob(".validate-*")) and not list(out.glob(".validate-*"))
    for step in ("vision.onnx", "decoder.onnx", "weights check", "validate"):
        assert m["steps"][step]["seconds"] >= 0 and m["steps"][step]["peak_rss_mb"] > 50


def test_truncated_validation_of_a_qwen_checkpoint_keeps_the_head_rows(tmp_path, monkeypatch, capfd):
    """Qwen2's pad id (151643) lies past the kept head rows: the truncated copy still builds, and validates."""
    from ppllava_edge.export import exporter
    from ppllava_edge.model.make import make_checkpoint

    monkeypatch.setattr(exporter, "HEAD_ROWS", 1000)
    ckpt = make_checkpoint("qwen-tiny", tmp_path / "Q")
    vocab = load_config(ckpt).text.vocab_size
    capfd.readouterr()
    res = export_checkpoint(ckpt, tmp_path / "e", ExportOptions(frames=(2, 4, 8), validation="truncated"))
    assert res.report.passed and f", LM head rows 1000/{vocab};" in res.report.mode
    assert "within the vocabulary" not in capfd.readouterr().err  # transformers' warning on special ids past the rows
    assert {c.graph for c in res.report.checks} >= {"vision", "prompt_pool", "decoder"}


def test_digest_of_a_transposed_weight_is_hashed_in_row_blocks(monkeypatch):
    """The weights check hashes a transposed lm_head without a contiguous copy: the streamed digest equals the
    SHA-256 of the C-order bytes, for transposed, sliced and contiguous arrays."""
    import hashlib

    from ppllava_edge.export import weights_check

    monkeypatch.setattr(weights_check, "DIGEST_BLOCK_BYTES", 500)
    a = np.random.default_rng(0).standard_normal((37, 53)).astype(np.float16)
    for arr in (a, a.T, a[5:, ::2], a[:, 7:].T):
        assert digest(arr) == hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    assert digest(a.T) != digest(a)


def test_validation_reference_llm_leaves_the_untied_embedding_table_unloaded(tiny_ckpt):
    """Validation feeds the decoder rows of the exported table, so its PyTorch LLM does without embed_tokens (2.2 GB
    in fp32 at 7B); the head and layers are the checkpoint's, and a run from inputs_embeds works."""
    from ppllava_edge.export.graphs import DecoderGraph

    cfg = load_config(tiny_ckpt)
    assert not cfg.text.tie_word_embeddings
    with CheckpointReader(tiny_ckpt) as reader:
        parts = ModelParts(tiny_ckpt, cfg, torch.float32, "sdpa", reader)
        with parts.llm(embeddings=False) as model, torch.no_grad():
            lm = model.language_model
            assert lm.model.embed_tokens.weight.is_meta
            assert torch.equal(lm.lm_head.weight, reader.read("language_model.lm_head.weight", torch.float32))
            t = cfg.text
            past = tuple(torch.zeros(1, t.num_key_value_heads, 0, t.head_dim) for _ in range(2 * t.num_hidden_layers))
            out = DecoderGraph(lm)(torch.randn(1, 5, t.hidden_size), torch.ones(1, 5, dtype=torch.int64), torch.arange(5)[None], past)
            assert out[0].shape == (1, t.vocab_size) and torch.isfinite(out[0]).all()
        with parts.llm() as model:
            assert not model.language_model.model.embed_tokens.weight.is_meta
