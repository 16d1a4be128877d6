"""Streaming checkpoint IO: the safetensors writer/reader against the safetensors library, make-checkpoint against
the former in-memory path, partial reads, the released-size presets (by their dims, never written here), and the
streamed fp16 activation check."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ppllava_edge.config import config_from_dict  # noqa: E402
from ppllava_edge.errors import CheckpointError  # noqa: E402
from ppllava_edge.model.checkpoint import (  # noqa: E402
    CheckpointReader,
    build_skeleton,
    checkpoint_hash,
    load_weights,
    read_state_dict,
    release_weights,
)
from ppllava_edge.model.make import make_checkpoint  # noqa: E402
from ppllava_edge.model.presets import FAN_IN_CHUNK, PRESETS, preset_config, random_tensors  # noqa: E402
from ppllava_edge.model.shards import SafetensorsFile, SafetensorsWriter, TensorSpec  # noqa: E402

from .legacy_checkpoint import legacy_random_state_dict, legacy_save_shards  # noqa: E402
from .test_external_checkpoint import released_tensor_names  # noqa: E402


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "w.f16": torch.randn(3, 4, 2, generator=g).to(torch.float16),
        "w.f32": torch.randn(11, generator=g),
        "scalar": torch.tensor(4.605),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
    }


# ---- the safetensors writer and reader --------------------------------------------------------

def test_writer_output_is_byte_identical_to_save_file_and_safe_open_reads_it(tmp_path):
    tensors = _mixed_tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with SafetensorsWriter(tmp_path / "ours.safetensors", specs) as w:
        for name in reversed(list(tensors)):  # any arrival order; big ones in two row chunks
            t = tensors[name]
            w.write(name, [t[:1], t[1:]] if t.dim() and t.shape[0] > 1 else t)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata() == {"format": "pt"}
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), tensors[name]), name
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:  # our reader on the library's file
        for name, t in tensors.items():
            got = f.read(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name


def test_writer_refuses_wrong_dtype_size_and_unwritten_tensors(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.bfloat16), TensorSpec("b", (4,), torch.float32)]
    w = SafetensorsWriter(tmp_path / "x.safetensors", specs)
    with pytest.raises(CheckpointError, match="declared torch.bfloat16, got a torch.float32"):
        w.write("a", torch.zeros(2, 3))
    with pytest.raises(CheckpointError, match="needs 12 bytes, got 6"):
        w.write("a", torch.zeros(1, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="got more than 16 bytes"):
        w.write("b", torch.zeros(5))
    w.write("a", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="already written"):
        w.write("a", torch.zeros(2, 3, dtype=torch.bfloat16))
    with pytest.raises(CheckpointError, match="never written: b"):
        w.close()


def test_reader_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="bad.safetensors: cannot read safetensors shard .header length"):
        SafetensorsFile(bad)
    save_file({"t": torch.zeros(64)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="offsets .* do not hold shape \\[64\\] F32"):
        SafetensorsFile(tmp_path / "cut.safetensors")


# ---- make-checkpoint: streamed == the former in-memory path -----------------------------------

def test_streamed_tiny_checkpoint_equals_the_in_memory_path_byte_for_byte(tiny_ckpt, tmp_path):
    """Same tensor values, same shard files and index (so the same checkpoint_hash) as before streaming."""
    config = json.loads((tiny_ckpt / "config.json").read_text())
    model = build_skeleton(config_from_dict(config, tiny_ckpt))
    state = legacy_random_state_dict(model, PRESETS["tiny"]["init_std"], seed=0)
    old = tmp_path / "old"
    old.mkdir()
    for f in ("config.json", "clip"):
        os.symlink(tiny_ckpt / f, old / f)
    legacy_save_shards({k: v.to(torch.bfloat16) for k, v in state.items()}, old)
    for f in ["model.safetensors.index.json"] + [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]:
        assert (tiny_ckpt / f).read_bytes() == (old / f).read_bytes(), f
    assert checkpoint_hash(tiny_ckpt) == checkpoint_hash(old)
    streamed = read_state_dict(tiny_ckpt)
    assert set(streamed) == set(state)
    for k, v in state.items():
        assert torch.equal(streamed[k], v.to(torch.bfloat16).float()), k


def test_make_checkpoint_reports_progress_and_an_interrupt_leaves_nothing(tmp_path):
    calls = []
    make_checkpoint("tiny", tmp_path / "ok", progress=lambda done, total: calls.append((done, total)))
    total = json.loads((tmp_path / "ok" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert calls[-1] == (total, total) and [d for d, _ in calls] == sorted(d for d, _ in calls)

    def stop_halfway(done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        make_checkpoint("tiny", tmp_path / "cut", progress=stop_halfway)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # no OUT, no temp folder


def test_sigterm_during_make_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    """A killed `make-checkpoint` (SIGTERM, e.g. from a job scheduler or `timeout`) removes its temp folder."""
    from click.testing import CliRunner

    from ppllava_edge.cli.main import cli
    from ppllava_edge.model import presets

    def killed(folder):  # arrives after the shards are written, before the tokenizer files
        assert sorted(p.name for p in folder.glob("model-*")) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(presets, "write_tokenizer_files", killed)
    previous = signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(cli, ["make-checkpoint", "--preset", "tiny", str(tmp_path / "ck")])
    assert res.exit_code == 130 and "interrupted" in res.output and "Traceback" not in res.output, res.output
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous  # the CLI restores the handler


# ---- partial reads and the skeleton -----------------------------------------------------------

def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_reading_the_vision_tower_reads_only_its_bytes(tiny_ckpt, tiny_model):
    with CheckpointReader(tiny_ckpt) as ck:
        vision = ck.names("vision_tower.")
        vision_bytes = sum(ck.spec(n).nbytes for n in vision)
        all_bytes = sum(ck.spec(n).nbytes for n in ck.names())
    assert vision and vision_bytes < all_bytes / 10
    headers = 0
    for i in (1, 2, 3):
        with open(tiny_ckpt / f"model-0000{i}-of-00003.safetensors", "rb") as f:
            headers += 8 + int.from_bytes(f.read(8), "little")
    before = _rchar() if Path("/proc/self/io").is_file() else None
    with CheckpointReader(tiny_ckpt) as ck:
        state = {n: ck.read(n, torch.float32) for n in ck.names("vision_tower.")}
        assert ck.bytes_read == vision_bytes
    if before is not None:  # what the OS counted: the vision tensors plus the shard headers, not the LLM
        assert vision_bytes <= _rchar() - before <= vision_bytes + headers + 64 * 1024
    assert set(state) == set(read_state_dict(tiny_ckpt, prefix="vision_tower."))
    model_state = tiny_model.state_dict()
    assert all(torch.equal(state[n], model_state[n]) for n in state)


def test_read_state_dict_by_names_lists_unknown_names(tiny_ckpt):
    got = read_state_dict(tiny_ckpt, torch.bfloat16, names=["image_newline"])
    assert list(got) == ["image_newline"] and got["image_newline"].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="1 requested tensor.*\n  vision_tower.nope"):
        read_state_dict(tiny_ckpt, names=["image_newline", "vision_tower.nope"])


def test_load_weights_materialises_one_submodule_of_the_skeleton(tiny_ckpt, tiny_model):
    model = build_skeleton(tiny_ckpt)
    assert all(p.is_meta for p in model.parameters())
    vision = load_weights(model, tiny_ckpt, "vision_tower", "fp32")
    ref = tiny_model.vision_tower.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in vision.state_dict().items())
    assert all(p.is_meta for n, p in model.named_parameters() if not n.startswith("vision_tower."))
    layer = load_weights(model, tiny_ckpt, "language_model.model.layers.1", "fp16")
    assert {p.dtype for p in layer.parameters()} == {torch.float16}
    assert all(p.is_meta for p in model.language_model.model.layers[0].parameters())
    release_weights(vision)
    assert all(p.is_meta for p in model.vision_tower.parameters())
    pixels = torch.randn(2, 3, 84, 84)
    load_weights(model, tiny_ckpt, "vision_tower")
    assert torch.equal(model.vision_tower(pixels), tiny_model.vision_tower(pixels))


def test_single_file_checkpoint_loads_like_the_sharded_one(tiny_ckpt, tiny_model, tmp_path):
    import shutil

    from ppllava_edge.model.checkpoint import load_model

    ck = tmp_path / "single"
    shutil.copytree(tiny_ckpt, ck)
    save_file(read_state_dict(tiny_ckpt, torch.bfloat16), str(ck / "model.safetensors"))
    for f in ["model.safetensors.index.json"] + [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]:
        (ck / f).unlink()
    state = load_model(ck).state_dict()
    assert all(torch.equal(v, state[k]) for k, v in tiny_model.state_dict().items())


def test_load_weights_lists_missing_tensors_under_its_prefix(tiny_ckpt, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    del index["weight_map"]["vision_tower.vision_model.post_layernorm.bias"]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    model = build_skeleton(ck)
    load_weights(model, ck, "language_model")  # other prefixes are unaffected
    with pytest.raises(CheckpointError, match="under 'vision_tower'.*\nMissing 1 tensor.*\n  vision_tower.vision_model.post_layernorm.bias"):
        load_weights(model, ck, "vision_tower")


# ---- released-size presets (dims and counts from the meta device; never written in tests) ------

RELEASED_DIMS = {"vd": 1024, "vff": 4096, "ps": 14, "vpos": 577, "td": 768, "tff": 3072, "pd": 768, "ld": 4096, "lff": 11008}


@pytest.mark.parametrize("preset,llm_layers,params", [("7b", 32, 7_259_643_393), ("mid", 4, 1_592_909_313)])
def test_released_presets_have_the_released_tensors(preset, llm_layers, params):
    config, clip = preset_config(preset)
    assert clip is None and config["clip_weight"] == "openai/clip-vit-large-patch14-336"
    cfg = config_from_dict(config)
    assert (cfg.text.hidden_size, cfg.text.intermediate_size, cfg.text.num_attention_heads, cfg.text.num_hidden_layers) == (4096, 11008, 32, llm_layers)
    assert (cfg.vision.image_size, cfg.vision.num_hidden_layers, cfg.vision.hidden_size, cfg.vision.btadapter_depth) == (336, 24, 1024, 4)
    assert (cfg.clip_text.num_hidden_layers, cfg.clip_text.hidden_size, cfg.clip_text.context_length) == (12, 768, 248)
    expected = {k: tuple(RELEASED_DIMS[d] if isinstance(d, str) else d for d in shape)
                for k, shape in released_tensor_names(24, 4, 12, llm_layers).items()}
    state = build_skeleton(cfg).state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(math.prod(s) for s in expected.values()) == params


def test_vision_l_preset_has_the_released_tower_and_clip_text(tmp_path):
    """`vision-l`: every vision_tower / CLIP tensor of the release (shapes as `mid`), the small preset's LLM."""
    def skeleton(name):
        config, clip = preset_config(name)
        if clip is not None:
            (tmp_path / name / "clip").mkdir(parents=True)
            (tmp_path / name / "clip" / "config.json").write_text(json.dumps(clip))
        return build_skeleton(config_from_dict(config, tmp_path / name)).state_dict()

    vl, mid, small = skeleton("vision-l"), skeleton("mid"), skeleton("small")
    vision = ("vision_tower.", "multi_modal_projector.clip_")
    assert {k: v.shape for k, v in vl.items() if k.startswith(vision)} == {k: v.shape for k, v in mid.items() if k.startswith(vision)}
    assert {k: v.shape for k, v in vl.items() if k.startswith("language_model.")} == {k: v.shape for k, v in small.items() if k.startswith("language_model.")}
    assert vl["multi_modal_projector.linear_1.weight"].shape == (768, 1024)


def test_released_presets_scale_matrices_by_fan_in():
    """The 7b stream's first tensors (drawn lazily; the rest is never generated): std 1/sqrt(fan_in) for
    matrices, 0.02 for embeddings, ~1 for norm gains; chunks of at most FAN_IN_CHUNK elements."""
    model = build_skeleton(config_from_dict(preset_config("7b")[0]))
    specs, stream = random_tensors(model, "fan_in", seed=0, dtype=torch.bfloat16)
    assert len(specs) == len(model.state_dict()) and specs[0].dtype == torch.bfloat16
    seen = {}
    for name, chunks in stream:
        parts = list(chunks)
        assert all(c.numel() <= FAN_IN_CHUNK for c in parts)
        seen[name] = torch.cat([c.reshape(-1, *c.shape[1:]) for c in parts]).float() if parts[0].dim() else parts[0].float()
        if name.endswith("encoder.layers.0.mlp.fc2.weight"):
            break
    vm = "vision_tower.vision_model."
    assert seen[vm + "embeddings.patch_embedding.weight"].shape == (1024, 3, 14, 14)
    for name, std in [(vm + "embeddings.patch_embedding.weight", 1 / math.sqrt(588)), (vm + "encoder.layers.0.self_attn.q_proj.weight", 1 / 32),
                      (vm + "encoder.layers.0.mlp.fc2.weight", 1 / 64), (vm + "embeddings.position_embedding.weight", 0.02)]:
        assert abs(float(seen[name].std()) / std - 1) < 0.02, name
    assert abs(float(seen[vm + "encoder.layers.0.layer_norm1.weight"].mean()) - 1) < 0.01


# ---- the streamed fp16 activation check -------------------------------------------------------

def test_activation_check_streams_one_layer_at_a_time_and_stays_finite(tiny_ckpt, monkeypatch):
    from ppllava_edge.model import activations

    resident = []
    real_load = activations.load_weights

    def counting_load(model, folder, prefix, dtype, exclude=(), reader=None):
        module = real_load(model, folder, prefix, dtype, exclude=exclude, reader=reader)
        streamed = [n for n in model.named_modules() if n[0].startswith(activations.STREAMED_LAYERS) and n[0].rsplit(".", 1)[-1].isdigit()]
        streamed = [n for n, _ in streamed] + list(activations.STREAMED_MODULES)
        resident.append(sum(not next(model.get_submodule(n).parameters()).is_meta for n in streamed))
        return module

    monkeypatch.setattr(activations, "load_weights", counting_load)
    rows = activations.check_activations(tiny_ckpt, dtype="fp16")
    # the skeleton without layers, token tables and lm_head; then one of them at a time
    assert resident[0] == 0 and set(resident[1:]) == {1} and len(resident) == 1 + 6 + 8 + 2 + 2 + 1 + 2 + 1
    stages = [r.stage for r in rows]
    assert stages.count("vision") == 6 + 1 and stages.count("adapter") == 8 and stages.count("clip_text") == 2 + 1
    assert [r.module for r in rows if r.stage == "llm"] == [f"language_model.model.layers.{i}" for i in range(2)] + ["language_model.model.norm", "language_model.lm_head"]
    assert all(r.finite and 0 < r.max_abs < 1e3 for r in rows)


def test_converting_reads_go_block_by_block_and_equal_whole_tensor_casts(tiny_ckpt, monkeypatch):
    """read(name, dtype) and read_numpy(name, dtype) convert the stored bf16 tensor block by block (the 7B export's
    memory bound: no stored copy beside the converted one, no fp32 copy beside an fp16 one); the values are those of
    the whole-tensor conversion, byte for byte, and every stored byte is read exactly once."""
    import numpy as np

    from ppllava_edge.model import shards

    monkeypatch.setattr(shards, "READ_BLOCK_BYTES", 1000)  # many blocks per matrix, a partial last one
    with CheckpointReader(tiny_ckpt) as r:
        name = "language_model.model.embed_tokens.weight"
        stored = r._file(name).read(name)
        assert stored.dtype == torch.bfloat16 and stored.numel() * 2 > 10 * 1000
        assert len(list(r._file(name).blocks(name))) == math.ceil(stored.numel() * 2 / 1000)
        for n in r.names()[:40] + [name]:
            whole = r._file(n).read(n)
            before = r.bytes_read
            assert torch.equal(r.read(n, torch.float32), whole.to(torch.float32)), n
            assert r.bytes_read - before == whole.numel() * whole.element_size()
            assert torch.equal(r.read(n, torch.float16), whole.to(torch.float16)), n
            for dt in (np.float32, np.float16):
                got = r.read_numpy(n, dt)
                want = whole.to(torch.float32).numpy().astype(dt)
                assert got.dtype == dt and got.shape == want.shape and got.tobytes() == want.tobytes(), n
