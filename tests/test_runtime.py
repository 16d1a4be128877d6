"""The torch-free runtime: parity with the PyTorch reference, feature cache, sampling, beam search, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from ppllava_edge.cli.main import cli
from ppllava_edge.errors import InferenceError, InputError, VideoError
from ppllava_edge.runtime.generation import GenerationConfig
from ppllava_edge.runtime.pipeline import Pipeline

QUESTIONS = ["What is happening in the video?", "What colour is the square?", "Count the   objects, please."]


def test_runtime_is_torch_free_and_answers(tiny_export, sample_video):
    """Import the runtime where importing torch/transformers fails, and run a full answer."""
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'tensorrt'):
                    raise ImportError('blocked for this test: ' + name)
        sys.meta_path.insert(0, Block())
        from ppllava_edge.runtime.pipeline import Pipeline
        from ppllava_edge.runtime.generation import GenerationConfig
        pipe = Pipeline.from_export({str(tiny_export)!r}, provider='cpu')
        r = pipe.ask({str(sample_video)!r}, 'What happens?', num_frames=8, generation=GenerationConfig(max_new_tokens=6))
        assert len(r.ids) >= 1 and isinstance(r.text, str)
        assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
        print('OK', len(r.ids))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK")


@pytest.mark.parametrize("frames", [8, 16])
def test_greedy_ask_equals_generate(pipe, reference, sample_videos, frames):
    for video in sample_videos:
        for q in QUESTIONS:
            want = reference.answer(video, q, num_frames=frames, max_new_tokens=12)
            got = pipe.ask(video, q, num_frames=frames, generation=GenerationConfig(max_new_tokens=12), keep_arrays=True)
            assert got.ids == want.output_ids, (video.name, q, frames)
            assert got.visual_tokens == frames // 2 * 4
            np.testing.assert_array_equal(got.arrays["input_ids"], want.arrays["input_ids"])
            np.testing.assert_array_equal(got.arrays["clip_ids"], want.arrays["clip_ids"])
            assert np.abs(got.arrays["visual_tokens"] - want.arrays["visual_tokens"]).max() <= 1e-4


def test_image_input_uses_image_path(pipe, reference, tmp_path):
    from PIL import Image

    img = tmp_path / "frame.png"
    Image.fromarray((np.random.default_rng(1).random((60, 90, 3)) * 255).astype(np.uint8)).save(img)
    want = reference.answer(img, "What is this?", max_new_tokens=8)
    got = pipe.ask(img, "What is this?", generation=GenerationConfig(max_new_tokens=8))
    # 90x60 -> pinpoint 84x168 (1x2 crops): 4 base tokens + a 2x4 crop map with a newline per row
    assert got.visual_tokens == 4 + 2 * (4 + 1) and got.ids == want.output_ids


def test_second_question_hits_the_feature_cache(tiny_export, sample_video):
    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    first = pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=8))
    assert pipe.vision_runs == 1 and not first.timings.cache_hit
    second = pipe.ask(sample_video, QUESTIONS[1], generation=GenerationConfig(max_new_tokens=8))
    again = pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=8))
    assert pipe.vision_runs == 1 and second.timings.cache_hit and again.timings.cache_hit
    assert second.timings.vision == 0.0 and second.timings.decode_video == 0.0
    assert again.ids == first.ids
    pipe.ask(sample_video, QUESTIONS[0], num_frames=16, generation=GenerationConfig(max_new_tokens=2))
    assert pipe.vision_runs == 2  # other frame count -> other key


def test_disk_cache_survives_a_new_pipeline(tiny_export, sample_video, tmp_path):
    a = Pipeline.from_export(tiny_export, provider="cpu", cache_dir=tmp_path / "cache")
    first = a.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=4))
    b = Pipeline.from_export(tiny_export, provider="cpu", cache_dir=tmp_path / "cache")
    second = b.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=4))
    assert b.vision_runs == 0 and second.timings.cache_hit and second.ids == first.ids


def test_sampling_is_reproducible_with_a_seed(pipe, sample_video):
    cfg = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(seed=7, **cfg))
    b = pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(seed=7, **cfg))
    outs = {tuple(pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(seed=s, **cfg)).ids) for s in range(4)}
    assert a.ids == b.ids and len(outs) > 1


@pytest.mark.parametrize("beams", [3, 5])
def test_beam_search_equals_transformers(pipe, reference, sample_video, beams):
    want = reference.answer(sample_video, QUESTIONS[0], num_frames=8, max_new_tokens=10, num_beams=beams)
    got = pipe.ask(sample_video, QUESTIONS[0], num_frames=8, generation=GenerationConfig(max_new_tokens=10, num_beams=beams))
    assert got.ids == want.output_ids


def test_kv_cache_is_one_buffer_sized_to_the_request(tiny_export, sample_video):
    """One KV buffer per layer tensor (past and present share it), allocated for prompt + new tokens, reused by
    requests that fit, grown once by one that needs more, never past the model's context."""
    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    dec = pipe.decoder
    m = pipe.manifest.model
    r = pipe.ask(sample_video, QUESTIONS[1], generation=GenerationConfig(max_new_tokens=12, ignore_eos=True))
    assert len(r.ids) == 12 and len(r.timings.decode_steps) == 11
    used = r.context_len + 12 - 1  # the last token is never fed back
    row = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * 4  # fp32 keys + values per position
    assert (dec.allocations, dec.capacity, dec.max_batch) == (1, used, 1)
    assert dec.allocated_bytes == used * row == dec.used_bytes
    pipe.ask(sample_video, QUESTIONS[1], generation=GenerationConfig(max_new_tokens=5, ignore_eos=True))
    assert (dec.allocations, dec.capacity) == (1, used)  # a smaller request reuses the buffer
    longer = pipe.ask(sample_video, QUESTIONS[2], generation=GenerationConfig(max_new_tokens=20, ignore_eos=True))
    assert (dec.allocations, dec.capacity) == (2, longer.context_len + 19)
    assert dec.capacity < m["max_position_embeddings"]


def test_prompt_longer_than_context_fails_before_compute(pipe, sample_video):
    with pytest.raises(InputError, match="exceeds the LLM context"):
        pipe.ask(sample_video, "q", generation=GenerationConfig(max_new_tokens=5000))
    assert pipe.cache.misses == pipe.cache.misses  # nothing ran: no exception from the graphs


def test_unknown_or_missing_provider(tiny_export):
    with pytest.raises(InferenceError, match="not available"):
        Pipeline.from_export(tiny_export, provider="tensorrt")


def _bad_inputs(tmp_path):
    from ppllava_edge.media import write_test_audio

    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    audio = write_test_audio(tmp_path / "sound.m4a")
    bad_npy = tmp_path / "frames.npy"
    np.save(bad_npy, np.zeros((4, 84, 84), np.float32))
    return {"missing": tmp_path / "nope.mp4", "corrupt": text, "empty": empty, "audio-only": audio, "bad npy": bad_npy}


def test_bad_inputs_raise_video_errors(pipe, tmp_path):
    for label, path in _bad_inputs(tmp_path).items():
        with pytest.raises((VideoError, InputError)) as err:
            pipe.ask(path, "q", generation=GenerationConfig(max_new_tokens=2))
        assert path.name in str(err.value), label


def test_cli_bad_inputs_exit_nonzero_without_traceback(tiny_export, sample_video, tmp_path):
    runner = CliRunner()
    cases = [[str(tiny_export), str(p), "q"] for p in _bad_inputs(tmp_path).values()]
    cases.append([str(tiny_export), str(sample_video), "q", "--frames", "40"])
    cases.append([str(tiny_export), str(sample_video), "q", "--provider", "cuda"])
    cases.append([str(tmp_path / "no-export"), str(sample_video), "q"])
    for args in cases:
        res = runner.invoke(cli, ["ask", *args])
        assert res.exit_code == 1, (args, res.output)
        assert "error:" in res.output and "Traceback" not in res.output, (args, res.output)


def test_cli_ask_dump_equals_generate_dump(tiny_export, tiny_ckpt, sample_video, tmp_path):
    pytest.importorskip("torch")
    runner = CliRunner()
    g = runner.invoke(cli, ["generate", str(tiny_ckpt), str(sample_video), "What happens?", "--dump", str(tmp_path / "g"), "--max-new-tokens", "12"])
    assert g.exit_code == 0, g.output
    a = runner.invoke(cli, ["ask", str(tiny_export), str(sample_video), "What happens?", "--dump", str(tmp_path / "a"), "--max-new-tokens", "12", "--json"])
    assert a.exit_code == 0, a.output
    for name in ("relevance", "visual_tokens"):
        ga, aa = np.load(tmp_path / "g" / f"{name}.npy"), np.load(tmp_path / "a" / f"{name}.npy")
        assert ga.shape == aa.shape and np.abs(ga - aa).max() <= 1e-4, name
    for name in ("output_ids", "input_ids", "clip_ids", "pixel_values"):
        np.testing.assert_array_equal(np.load(tmp_path / "g" / f"{name}.npy"), np.load(tmp_path / "a" / f"{name}.npy"))
    assert os.path.exists(tmp_path / "g" / "features.npy")


def test_cli_trt_backend_without_tensorrt_says_how_to_install(tiny_export, sample_video):
    from ppllava_edge.engine.availability import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here")
    res = CliRunner().invoke(cli, ["ask", str(tiny_export), str(sample_video), "q", "--backend", "trt"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "pip install 'ppllava-edge[tensorrt]'" in res.output and "python3-libnvinfer" in res.output


def test_feature_cache_is_bounded_in_bytes_and_lru():
    from ppllava_edge.runtime.cache import FeatureCache

    cache = FeatureCache(max_bytes=3 * 800)
    item = (np.zeros(100, np.float32), np.zeros(100, np.float32))  # 800 bytes
    for k in "abc":
        cache.put(k, *item)
    assert cache.get("a") is not None  # a becomes most recent
    cache.put("d", *item)  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    assert cache.bytes <= 3 * 800 and len(cache) == 3


def test_feature_cache_folder_that_cannot_be_written_is_skipped(tmp_path, monkeypatch, caplog):
    """A full --cache-dir: the entry is not written (no partial file left), a warning says so, the in-memory
    cache still holds it, and the next write works once there is space."""
    import errno

    from ppllava_edge.runtime import cache as cache_mod

    real = np.savez

    def full_disk(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = cache_mod.FeatureCache(max_bytes=1 << 20, folder=tmp_path / "features")
    item = (np.ones(100, np.float32), np.zeros(100, np.float32))
    monkeypatch.setattr(cache_mod.np, "savez", full_disk)
    cache.put("k1", *item)
    assert "feature cache entry not written (No space left on device)" in caplog.text
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == []
    assert cache.get("k1") is not None
    monkeypatch.setattr(cache_mod.np, "savez", real)
    cache.put("k2", *item)
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == ["k2.npz"]


def test_file_fingerprint_changes_with_content(tmp_path):
    from ppllava_edge.runtime.cache import file_digest

    big = tmp_path / "v.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 255, 5 << 20, dtype=np.uint8).tobytes())
    big.write_bytes(data)
    first = file_digest(big)
    data[len(data) // 2 + 10] ^= 1  # inside the middle window
    big.write_bytes(data)
    assert file_digest(big) != first
    data[len(data) // 2 + 10] ^= 1
    big.write_bytes(data)
    assert file_digest(big) == first


# ---- thread safety ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoders", [1, 3])
def test_one_pipeline_shared_by_threads_gives_the_sequential_answers(tiny_export, sample_videos, decoders):
    """4 threads x 8 asks on one Pipeline (3 videos, 3 questions, greedy and sampled): every answer equals the
    sequential one. On main before the decoder pool, half of such answers came back wrong with no error."""
    import threading

    pipe = Pipeline.from_export(tiny_export, provider="cpu", max_decoders=decoders)
    gens = [GenerationConfig(max_new_tokens=10, ignore_eos=True), GenerationConfig(max_new_tokens=10, do_sample=True, seed=3, temperature=1.5)]
    jobs = [(v, q, g) for v in sample_videos for q in QUESTIONS for g in range(2)]
    want = {job: pipe.ask(job[0], job[1], generation=gens[job[2]]).ids for job in jobs}
    got: dict[tuple, list] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(8):
                job = jobs[(3 * k + i) % len(jobs)]
                got[(k, i)] = (job, pipe.ask(job[0], job[1], generation=gens[job[2]]).ids)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(got) == 32
    wrong = [job for job, ids in got.values() if ids != want[job]]
    assert wrong == []
    assert pipe._made <= decoders


def test_concurrent_first_questions_run_the_vision_graph_once(tiny_export, sample_video):
    import threading

    pipe = Pipeline.from_export(tiny_export, provider="cpu", max_decoders=2)
    results = []
    barrier = threading.Barrier(4)

    def work(q: str) -> None:
        barrier.wait()
        results.append(pipe.ask(sample_video, q, generation=GenerationConfig(max_new_tokens=3)))

    threads = [threading.Thread(target=work, args=(q,)) for q in QUESTIONS + ["One more?"]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4 and pipe.vision_runs == 1
    assert sorted(r.timings.cache_hit for r in results) == [False, True, True, True]


def test_pipeline_decoder_stays_usable_for_single_threaded_callers(tiny_export, sample_video):
    pipe = Pipeline.from_export(tiny_export, provider="cpu", max_decoders=4)
    pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=3))
    first = pipe.decoder
    pipe.ask(sample_video, QUESTIONS[1], generation=GenerationConfig(max_new_tokens=3))
    assert pipe.decoder is first and pipe._made == 1  # sequential calls reuse one decoder
    with pytest.raises(InputError, match="max_decoders"):
        Pipeline.from_export(tiny_export, provider="cpu", max_decoders=0)


# ---- input hardening ---------------------------------------------------------------------------------------------
def test_npy_with_non_finite_pixels_is_refused_naming_the_file(pipe, tmp_path):
    px = np.zeros((8, 3, 84, 84), np.float32)
    px[2, 0, 5, 5] = np.nan
    px[6, 2, 1, 1] = np.inf
    path = tmp_path / "bad_pixels.npy"
    np.save(path, px)
    with pytest.raises(InputError) as err:
        pipe.ask(path, "q", generation=GenerationConfig(max_new_tokens=2))
    msg = str(err.value)
    assert str(path) in msg and "2 non-finite" in msg and "frame(s) 2, 6" in msg


@pytest.mark.parametrize("frames", [18, 40])
def test_npy_frame_count_out_of_range_names_the_file_and_count(pipe, tmp_path, frames):
    path = tmp_path / f"frames{frames}.npy"
    np.save(path, np.zeros((frames, 3, 84, 84), np.float32))
    with pytest.raises(InputError) as err:
        pipe.ask(path, "q", generation=GenerationConfig(max_new_tokens=2))
    msg = str(err.value)
    assert str(path) in msg and f"holds {frames} frames" in msg and "2..16" in msg and "--frames" not in msg.splitlines()[0]


def _truncated_video(tmp_path):
    from .conftest import write_truncated_video

    return write_truncated_video(tmp_path / "cut.mp4")


def test_truncated_video_is_answered_with_a_warning(tiny_export, tmp_path):
    path = _truncated_video(tmp_path)
    pipe = Pipeline.from_export(tiny_export, provider="cpu", cache_dir=tmp_path / "cache")
    r = pipe.ask(path, "q", generation=GenerationConfig(max_new_tokens=2))
    assert len(r.ids) >= 1 and len(r.warnings) == 1
    assert str(path) in r.warnings[0] and "of 48 announced frames decoded" in r.warnings[0]
    again = pipe.ask(path, "another q", generation=GenerationConfig(max_new_tokens=2))
    assert again.timings.cache_hit and again.warnings == r.warnings
    fresh = Pipeline.from_export(tiny_export, provider="cpu", cache_dir=tmp_path / "cache")  # the disk cache keeps it too
    third = fresh.ask(path, "q", generation=GenerationConfig(max_new_tokens=2))
    assert fresh.vision_runs == 0 and third.warnings == r.warnings


def test_cli_ask_reports_the_truncated_video_warning(tiny_export, tmp_path):
    import json

    path = _truncated_video(tmp_path)
    runner = CliRunner()
    res = runner.invoke(cli, ["ask", str(tiny_export), str(path), "q", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() and "warning:" not in res.stdout
    assert "warning:" in res.stderr and "cut.mp4" in res.stderr and "announced frames decoded" in res.stderr
    res = runner.invoke(cli, ["ask", str(tiny_export), str(path), "q", "--max-new-tokens", "2", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["warnings"]) == 1 and "cut.mp4" in data["warnings"][0]


def test_inplace_decoder_paths_agree(tiny_export, sample_video):
    """The device-buffer path (OrtValues, as on CUDA; run here on cpu), the numpy path with a reserved buffer and
    the numpy path that grows as it goes give the same greedy and beam ids, and the same cache contents."""
    from ppllava_edge.runtime.decoder import InplaceKVDecoder
    from ppllava_edge.runtime.generation import generate

    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    m = pipe.manifest.model
    r = pipe.ask(sample_video, QUESTIONS[0], keep_arrays=True, generation=GenerationConfig(max_new_tokens=4))
    embeds = pipe.embed_prompt(r.arrays["input_ids"], r.arrays["visual_tokens"])
    args = (pipe.sessions["decoder"], m["num_layers"], m["num_kv_heads"], m["head_dim"], m["max_position_embeddings"])
    for cfg in (GenerationConfig(max_new_tokens=9, ignore_eos=True), GenerationConfig(max_new_tokens=7, num_beams=3)):
        outs, caches = [], []
        for dec in (InplaceKVDecoder(*args), InplaceKVDecoder(*args, device_buffers=True)):
            outs.append(generate(dec, pipe.embed, embeds, cfg).ids)
            caches.append([np.array(p) for p in dec.past()])
        grow = InplaceKVDecoder(*args)
        grow.reset(1)  # no reserve: the buffer grows geometrically while decoding
        grow.forward(embeds[None, :5])
        assert grow.capacity == 5 and grow.allocations == 1
        grow.forward(embeds[None, 5:])
        assert grow.capacity == max(embeds.shape[0], 10) and grow.allocations == 2
        assert outs[0] == outs[1]
        for a, b in zip(*caches):
            np.testing.assert_array_equal(a, b)
    assert len(outs[0]) >= 1


def test_chunked_prefill_equals_one_run_and_generate(tiny_export, reference, sample_video):
    """The CPU decoder prefills a long prompt in chunks of `prefill_chunk` positions (one graph run each, the cache
    bound in place): the same ids as PyTorch's generate (greedy and beam search) and the same cache as one run."""
    from ppllava_edge.runtime.decoder import PREFILL_CHUNK, InplaceKVDecoder
    from ppllava_edge.runtime.generation import generate

    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    assert pipe.decoder.prefill_chunk == PREFILL_CHUNK > 0
    m = pipe.manifest.model
    session = pipe.sessions["decoder"]
    runs = []

    class Counting:  # the decoder's session, counting graph runs
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, io, options=None):
            runs.append(1)
            return session.run_with_iobinding(io, options)

    args = (Counting(), m["num_layers"], m["num_kv_heads"], m["head_dim"], m["max_position_embeddings"])
    r = pipe.ask(sample_video, QUESTIONS[0], keep_arrays=True, generation=GenerationConfig(max_new_tokens=2))
    embeds = pipe.embed_prompt(r.arrays["input_ids"], r.arrays["visual_tokens"])
    n = embeds.shape[0]
    assert n > 16
    for beams in (1, 3):
        cfg = GenerationConfig(max_new_tokens=10, num_beams=beams)
        want = reference.answer(sample_video, QUESTIONS[0], num_frames=8, max_new_tokens=10, num_beams=beams)
        ids, caches = [], []
        for chunk in (0, 7):
            dec = InplaceKVDecoder(*args)
            dec.prefill_chunk = chunk
            dec.reset(1)
            runs.clear()
            dec.forward(embeds[None])
            assert len(runs) == (1 if chunk == 0 else -(-n // chunk))
            caches.append([p.copy() for p in dec.past()])
            ids.append(generate(dec, pipe.embed, embeds, cfg).ids)
        assert ids[0] == ids[1] == want.output_ids, beams
        for a, b in zip(*caches):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    greedy = reference.answer(sample_video, QUESTIONS[0], num_frames=8, max_new_tokens=12)
    pipe.decoder.prefill_chunk = 5
    assert pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=12)).ids == greedy.output_ids


def test_per_request_graphs_give_their_memory_back_after_each_run(tiny_export, sample_video):
    """The graphs run once per request give their memory back after every run (README "Vision at 2 threads"):
    vision without ONNX Runtime's CPU arena and the C heap trimmed after the run; the pools on the arena without the
    memory pattern, shrunk after every run, their outputs written outside it (arrays that own their memory). The
    decoder keeps its arena for the decode steps. The answer is the one the decoder alone gives."""
    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    r = pipe.ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=4))
    vision = pipe.sessions["vision"]
    o = vision.session.get_session_options()
    assert (o.enable_cpu_mem_arena, o.enable_mem_pattern, vision.trim, vision.bind_outputs) == (False, False, True, False)
    for stage in ("prompt_pool", "image_pool"):
        s = pipe.sessions[stage]
        o = s.session.get_session_options()
        assert (o.enable_cpu_mem_arena, o.enable_mem_pattern, s.trim) == (True, False, False), stage
        assert s.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0", stage
    from ppllava_edge.engine.profiles import eval_dim

    rng = np.random.default_rng(0)
    feed = {i["name"]: (np.zeros if i["dtype"] == "int64" else rng.standard_normal)([eval_dim(d, {"frames": 2}) for d in i["dims"]]).astype(i["dtype"])
            for i in pipe.manifest.graph("prompt_pool")["inputs"]}
    pooled = pipe.sessions["prompt_pool"].run(None, feed)
    assert pooled and all(a.flags.owndata for a in pooled)  # not views of arena memory
    dec = pipe.sessions["decoder"]
    assert dec.run_options is None and dec.session.get_session_options().enable_cpu_mem_arena and not dec.trim
    again = Pipeline.from_export(tiny_export, provider="cpu").ask(sample_video, QUESTIONS[0], generation=GenerationConfig(max_new_tokens=4))
    assert again.ids == r.ids



_SHRINK_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from ppllava_edge.runtime.session import create_session

    def rss_mib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 1024])
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Sigmoid", ["a"], ["b"]), helper.make_node("Add", ["a", "b"], ["c"]),
             helper.make_node("Mul", ["c", "b"], ["d"]), helper.make_node("Add", ["d", "x"], ["y"])]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
    s = create_session(sys.argv[1], "cpu", threads=1, arena="shrink")
    feed = np.random.default_rng(0).standard_normal((16384, 1024)).astype(np.float32)  # 64 MiB
    s.run(None, {"x": feed[:16]})  # the session's one-time allocations (thread pool, the arena's first small region)
    before = rss_mib()
    out = s.run(None, {"x": feed})[0]
    c = np.maximum(feed, 0)
    b = 1 / (1 + np.exp(-c))
    np.testing.assert_allclose(out, (c + b) * b + feed, rtol=1e-5, atol=1e-5)
    del out, c, b
    print(rss_mib() - before)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident set from /proc (Linux)")
def test_a_shrinking_arena_gives_back_all_of_a_run(tmp_path):
    """A per-request graph (create_session(arena="shrink")) keeps nothing of a run once the caller drops the
    outputs: they are written into arrays outside ONNX Runtime's arena, so the shrink at the end of the run frees
    every region. Before, the arena region holding the outputs stayed reserved after they were dropped (66 MiB
    here; 0.75 GB after a 32-frame CLIP-L vision run, which took the 7B answer over 7 GB). A graph with 64 MiB
    activations and a 64 MiB output, as the vision graph's. Measured in a process of its own: the suite's heap
    (hundreds of tests' allocations) moves a process's RSS by tens of MiB on its own."""
    run = subprocess.run([sys.executable, "-c", _SHRINK_RUN, str(tmp_path / "g.onnx")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    kept = float(run.stdout.split()[-1])
    assert kept < 16, f"RSS stayed {kept:.0f} MiB above its level before the run after its output was dropped"


class _FakeLogitsSession:
    """Only what the decoders' constructors read (the logits output); no graph runs."""

    def get_outputs(self):
        return [type("Out", (), {"type": "tensor(float)", "shape": ["batch", 11]})()]


@pytest.mark.parametrize("device_buffers", [False, True])
def test_kv_growth_before_a_request_copies_nothing(device_buffers):
    """reserve() for a longer request drops the previous request's cache instead of copying it into the grown
    buffer (on a device that copy went through the host, every layer); a growth in the middle of a request still
    keeps the cached positions."""
    from ppllava_edge.runtime.decoder import ConcatKVDecoder, InplaceKVDecoder

    decoders = [InplaceKVDecoder(_FakeLogitsSession(), 2, 1, 4, 64, device_buffers=device_buffers)]
    if not device_buffers:
        decoders.append(ConcatKVDecoder(_FakeLogitsSession(), 2, 1, 4, 64))
    for dec in decoders:
        copies = []
        past = dec.past
        dec.past = lambda: copies.append(1) or past()  # ConcatKVDecoder copies through past()
        host = getattr(dec, "_host", None)
        if host is not None:
            dec._host = lambda i: copies.append(i) or host(i)
        dec.reserve(1, 8)
        dec.reset(1)
        dec.length = 6  # as after the previous request's prefill and decode steps
        dec.reserve(1, 30)  # the next request needs more: a new buffer, nothing copied
        dec.reset(1)
        assert (dec.capacity, dec.length, copies) == (30, 0, []), type(dec).__name__
        dec.length = 20
        grow = getattr(dec, "_grow", None) or dec._ensure
        grow(1, 40)  # mid-request growth keeps the 20 cached positions
        assert dec.capacity == 40 and copies, type(dec).__name__


def test_decoder_feed_contracts(tiny_export):
    """One concat-contract feed, fitted to each decoder graph (in-place: seqlens_k / total_sequence_length), gives
    the same logits from decoder.onnx and decoder_trt.onnx."""
    import onnxruntime as ort

    from ppllava_edge.runtime.decoder import adapt_feed, kv_names

    data = json.loads((tiny_export / "export.json").read_text())
    m = data["model"]
    assert data["graphs"]["decoder"]["contract"] == "gqa-inplace-v1" and data["graphs"]["decoder_trt"]["contract"] == "concat-v1"
    assert data["backends"]["trt"]["decoder"] == "decoder_trt" and data["backends"]["ort"]["decoder"] == "decoder"
    rng = np.random.default_rng(0)
    L = 9
    feed = {"inputs_embeds": rng.standard_normal((1, L, m["hidden_size"]), dtype=np.float32) * 0.1,
            "attention_mask": np.ones((1, L), np.int64), "position_ids": np.arange(L, dtype=np.int64)[None]}
    feed.update({n: np.zeros((1, m["num_kv_heads"], 0, m["head_dim"]), np.float32) for n in kv_names(m["num_layers"])[0]})
    logits = []
    for g in ("decoder", "decoder_trt"):
        s = ort.InferenceSession(str(tiny_export / data["graphs"][g]["file"]), providers=["CPUExecutionProvider"])
        logits.append(s.run(["logits"], adapt_feed(feed, [i.name for i in s.get_inputs()]))[0])
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4)


def test_ort_graph_cache_is_written_once_by_processes_opening_the_export_together(tiny_export, tmp_path):
    """Triton's instances open one export at the same moment: the optimised-graph cache ends up with one complete
    entry (no half-written or temporary files), which a later load uses and which gives the graph's own outputs."""
    from ppllava_edge.runtime.session import CACHED_GRAPH, create_session

    cache = tmp_path / "ort_cache"
    code = "import sys; from ppllava_edge.runtime.session import create_session; create_session(sys.argv[1], 'cpu', 1, graph_cache=sys.argv[2])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tiny_export / "vision.onnx"), str(cache)]) for _ in range(3)]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    entries = sorted(cache.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("vision-"), entries
    assert sorted(p.name for p in entries[0].iterdir()) == [CACHED_GRAPH, CACHED_GRAPH + ".data"]
    cached = create_session(tiny_export / "vision.onnx", "cpu", 1, graph_cache=cache)
    assert cached.session._model_path == str(entries[0] / CACHED_GRAPH)
    px = np.random.default_rng(0).standard_normal((4, 3, 84, 84)).astype(np.float32)
    want = create_session(tiny_export / "vision.onnx", "cpu", 1).run(None, {"pixel_values": px})
    for got, ref in zip(cached.run(None, {"pixel_values": px}), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_ort_graph_cache_never_publishes_a_failed_write(tiny_export, tmp_path):
    """A cache write that fails (here: a file-size limit, as a full disk) is skipped with a warning, the graph still
    loads, nothing half-written is published, and a later load writes a good entry. An entry damaged before this
    rule (a 0-byte model.onnx) is removed with a warning and rewritten instead of failing every later load."""
    from ppllava_edge.runtime.session import CACHED_GRAPH, _cache_key, create_session

    cache = tmp_path / "ort_cache"
    full_disk = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as ENOSPC would
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from ppllava_edge.runtime.session import create_session
        s = create_session(sys.argv[1], 'cpu', 1, graph_cache=sys.argv[2])
        print('loaded', [o.name for o in s.get_outputs()])
        """)
    res = subprocess.run([sys.executable, "-c", full_disk, str(tiny_export / "vision.onnx"), str(cache)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "loaded ['values', 'keys']" in res.stdout
    assert "graph cache skipped: writing the optimised copy failed" in res.stderr and "Traceback" not in res.stderr
    assert [p for p in cache.iterdir()] == []  # nothing published, no temporary folder left

    key = f"vision-{_cache_key(tiny_export / 'vision.onnx', 'cpu', 1)}"
    (cache / key).mkdir()
    (cache / key / CACHED_GRAPH).write_bytes(b"")  # what the old code published after a failed write
    px = np.random.default_rng(0).standard_normal((4, 3, 84, 84)).astype(np.float32)
    want = create_session(tiny_export / "vision.onnx", "cpu", 1).run(None, {"pixel_values": px})
    healed = create_session(tiny_export / "vision.onnx", "cpu", 1, graph_cache=cache)
    assert (cache / key / CACHED_GRAPH).stat().st_size > 0
    for s in (healed, create_session(tiny_export / "vision.onnx", "cpu", 1, graph_cache=cache)):
        for got, ref in zip(s.run(None, {"pixel_values": px}), want):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in cache.iterdir()) == [key]


def test_background_load_gives_the_same_answers_and_reports_each_load(tiny_export, pipe, sample_video, tmp_path):
    """`background_load=True` (what `ask` uses): the constructor returns before the sessions exist; the answers are
    the eager pipeline's, each session's load time is recorded, and a graph that fails to load raises its
    InferenceError at first use, in the caller's thread."""
    import shutil

    bg = Pipeline.from_export(tiny_export, provider="cpu", background_load=True)
    for q in QUESTIONS[:2]:
        got = bg.ask(sample_video, q, num_frames=8, generation=GenerationConfig(max_new_tokens=8))
        assert got.ids == pipe.ask(sample_video, q, num_frames=8, generation=GenerationConfig(max_new_tokens=8)).ids
    assert {"vision", "prompt_pool", "decoder"} <= set(bg.sessions.load_ms) and bg.sessions.wait_ms >= 0
    assert bg.dtype == pipe.dtype and bg.decoder.allocated_bytes > 0

    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken, ignore=shutil.ignore_patterns("ort_cache"))
    (broken / "decoder.onnx").write_bytes(b"not an onnx graph")
    bad = Pipeline.from_export(broken, provider="cpu", background_load=True)
    with pytest.raises(InferenceError, match="decoder.onnx"):
        bad.ask(sample_video, QUESTIONS[0], num_frames=8, generation=GenerationConfig(max_new_tokens=2))


def test_background_load_creates_the_decoder_beside_the_vision_side(tiny_export, pipe, sample_video, monkeypatch):
    """The decoder's session (the slowest to create: its weights are pre-packed) loads on a thread of its own, beside
    the vision and pool sessions rather than after them: here the vision session's creation cannot finish until the
    decoder's has started (one loader thread, vision first, would wait forever). The answer is the eager pipeline's."""
    import threading

    from ppllava_edge.runtime import pipeline as P

    decoder_started = threading.Event()
    real = P._open_graph
    waited = []

    def gated(manifest, path, *args, **kwargs):
        if path.name == "decoder.onnx":
            decoder_started.set()
        elif path.name == "vision.onnx":
            waited.append(decoder_started.wait(20))
        return real(manifest, path, *args, **kwargs)

    monkeypatch.setattr(P, "_open_graph", gated)
    bg = Pipeline.from_export(tiny_export, provider="cpu", background_load=True)
    try:
        gen = GenerationConfig(max_new_tokens=6)
        got = bg.ask(sample_video, QUESTIONS[0], num_frames=8, generation=gen)
        assert waited == [True]  # the decoder's load began while the vision session was still being created
        assert got.ids == pipe.ask(sample_video, QUESTIONS[0], num_frames=8, generation=gen).ids
    finally:
        decoder_started.set()
        bg.close()


def test_background_load_parses_the_tokenizers_on_a_thread(tiny_export, pipe, monkeypatch):
    """With `background_load` the tokenizers are parsed on a thread of their own (the constructor returns before
    they exist, a fresh `ask` decodes the video meanwhile): the same ids as the eager pipeline's, and a tokenizer
    that cannot be read raises its own error at first use, in the caller's thread; the eager constructor still
    raises it itself."""
    import threading

    from ppllava_edge.errors import TokenizerError
    from ppllava_edge.manifest import ExportManifest

    parsed_on = []
    real = ExportManifest.relevance_tokenizer

    def spy(self):
        parsed_on.append(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(ExportManifest, "relevance_tokenizer", spy)
    bg = Pipeline.from_export(tiny_export, provider="cpu", background_load=True)
    q = QUESTIONS[0]
    assert bg.llama.prompt_ids(q) == pipe.llama.prompt_ids(q)
    np.testing.assert_array_equal(bg.relevance_query(q)[0], pipe.relevance_query(q)[0])
    assert parsed_on == ["ppllava-tokenizers"]
    bg.close()

    def broken(self):
        raise TokenizerError("Cannot load tokenizer file clip_tokenizer.json: planted")

    monkeypatch.setattr(ExportManifest, "relevance_tokenizer", broken)
    late = Pipeline.from_export(tiny_export, provider="cpu", background_load=True)
    with pytest.raises(TokenizerError, match="planted"):
        late.clip
    late.close()
    with pytest.raises(TokenizerError, match="planted"):
        Pipeline.from_export(tiny_export, provider="cpu")


def test_export_records_digests_and_verify_checks_them(tiny_export, tmp_path, sample_video):
    """export.json records size + sha256 of every file the runtime reads; `verify` hashes every byte (a flipped
    byte anywhere is found), loading checks size + a sampled digest (a zeroed or truncated file is refused with one
    error naming it), and an export without digests (older versions) still loads, `verify` saying so."""
    import hashlib
    import shutil

    data = json.loads((tiny_export / "export.json").read_text())
    files = sorted(p.name for p in tiny_export.iterdir() if p.is_file() and p.name != "export.json")
    assert sorted(data["weights"]) == files
    for name, rec in data["weights"].items():
        assert rec["bytes"] == (tiny_export / name).stat().st_size
        assert rec["sha256"] == hashlib.sha256((tiny_export / name).read_bytes()).hexdigest()
    runner = CliRunner()
    res = runner.invoke(cli, ["verify", str(tiny_export)])
    assert res.exit_code == 0 and f"all {len(files)} files match export.json (sha256)" in res.stdout, res.output

    def damaged(name, change):
        folder = tmp_path / name
        shutil.copytree(tiny_export, folder, ignore=shutil.ignore_patterns("ort_cache"))
        change(folder)
        return folder

    def flip(folder):  # one byte at a quarter of the 9 MB decoder data: outside the sampled windows
        p = folder / "decoder.onnx.data"
        b = bytearray(p.read_bytes())
        b[len(b) // 4] ^= 0x40
        p.write_bytes(bytes(b))

    flipped = damaged("flipped", flip)
    res = runner.invoke(cli, ["verify", str(flipped)])
    assert res.exit_code == 1 and "1 of" in res.stderr and "decoder.onnx.data (sha256 differs from export.json)" in res.stderr
    zeroed = damaged("zeroed", lambda f: (f / "vision.onnx.data").write_bytes(bytes((f / "vision.onnx.data").stat().st_size)))
    with pytest.raises(InferenceError, match=r"vision.onnx.data: damaged \(its content differs from the digest export.json records\)"):
        Pipeline.from_export(zeroed, provider="cpu")
    half = damaged("half", lambda f: (f / "embed_tokens.npy").write_bytes((f / "embed_tokens.npy").read_bytes()[:1000]))
    res = runner.invoke(cli, ["ask", str(half), str(sample_video), "q", "--max-new-tokens", "2"])
    assert res.exit_code == 1 and "embed_tokens.npy: damaged (1000 bytes, export.json records" in res.stderr

    def drop_digests(folder):
        m = json.loads((folder / "export.json").read_text())
        del m["weights"]
        (folder / "export.json").write_text(json.dumps(m))

    old = damaged("old", drop_digests)
    assert len(Pipeline.from_export(old, provider="cpu").ask(sample_video, "q", generation=GenerationConfig(max_new_tokens=2)).ids) >= 1
    res = runner.invoke(cli, ["verify", str(old)])
    assert res.exit_code == 0 and "records no digests" in res.stdout and "content not verified" in res.stdout
