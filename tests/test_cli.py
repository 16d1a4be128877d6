"""CLI: the acceptance commands, help for every command, clean errors, missing extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from ppllava_edge.cli.main import cli


def test_every_command_has_help():
    runner = CliRunner()
    res = runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    commands = [line.split()[0] for line in res.output.split("Commands:")[1].strip().splitlines()]
    assert {"make-checkpoint", "generate", "export", "ask", "chat", "demo"} <= set(commands)
    for name in commands:
        sub = runner.invoke(cli, [name, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, name


def test_make_checkpoint_and_generate_dump_shapes(tmp_path, sample_video):
    pytest.importorskip("torch")
    runner = CliRunner()
    ck = tmp_path / "T"
    res = runner.invoke(cli, ["make-checkpoint", "--preset", "tiny", str(ck)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in ck.glob("model-*.safetensors")) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for f in ("config.json", "model.safetensors.index.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json"):
        assert (ck / f).is_file(), f
    d = tmp_path / "D"
    res = runner.invoke(cli, ["generate", str(ck), str(sample_video), "What happens?", "--dump", str(d), "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip()  # the answer
    arrays = {p.stem: np.load(p) for p in d.glob("*.npy")}
    assert set(arrays) == {"pixel_values", "clip_ids", "input_ids", "features", "relevance", "visual_tokens", "output_ids"}
    assert arrays["pixel_values"].shape == (8, 3, 84, 84) and arrays["pixel_values"].dtype == np.float32
    assert arrays["clip_ids"].shape == (248,) and arrays["clip_ids"].dtype == np.int64
    assert arrays["input_ids"].dtype == np.int64 and int((arrays["input_ids"] == 32000).sum()) == 1
    assert arrays["features"].shape == (8, 36, 48) and arrays["features"].dtype == np.float32
    assert arrays["relevance"].shape == (8, 6, 6) and abs(float(arrays["relevance"].sum()) - 1) < 1e-5
    assert arrays["visual_tokens"].shape == (16, 64) and arrays["visual_tokens"].dtype == np.float32
    assert arrays["output_ids"].dtype == np.int64 and 1 <= arrays["output_ids"].size <= 8


def test_make_checkpoint_progress_goes_to_stderr_and_lists_every_preset(tmp_path):
    pytest.importorskip("torch")
    from ppllava_edge.cli.main import PRESET_NAMES
    from ppllava_edge.model.presets import PRESETS

    assert PRESET_NAMES == tuple(PRESETS)
    assert "[tiny|small|vision-l|mid|7b|qwen-tiny|qwen-small|qwen-7b]" in CliRunner().invoke(cli, ["make-checkpoint", "--help"]).output
    res = CliRunner().invoke(cli, ["make-checkpoint", "--preset", "tiny", str(tmp_path / "T")])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"{tmp_path / 'T'}  (tiny preset, 12.8 MB)\n"  # the result only
    assert "random weights, tensor by tensor: 100 %" in res.stderr and "done random weights" in res.stderr


def test_check_activations_prints_one_row_per_layer(tiny_ckpt):
    pytest.importorskip("torch")
    import json

    res = CliRunner().invoke(cli, ["check-activations", str(tiny_ckpt), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["module"] for r in rows if r["stage"] == "llm"][:2] == ["language_model.model.layers.0", "language_model.model.layers.1"]
    assert len(rows) == 6 + 8 + 2 + 2 + 7 and all(r["finite"] for r in rows)


def test_make_checkpoint_refuses_non_empty_out(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "x"
    out.mkdir()
    (out / "f").write_text("keep")
    res = CliRunner().invoke(cli, ["make-checkpoint", str(out)])
    assert res.exit_code == 1 and "--force" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "/nonexistent/ckpt", "v.mp4", "q"], "no such directory"),
        (["export", "/nonexistent/ckpt", "/tmp/out-never"], "no such directory"),
        (["ask", "/nonexistent/export", "v.mp4", "q"], "no such export folder"),
    ],
)
def test_missing_folders_are_one_line_errors(args, needle):
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and needle in res.output and "Traceback" not in res.output


def test_generate_odd_and_out_of_range_frames(tiny_ckpt, sample_video, tmp_path):
    pytest.importorskip("torch")
    runner = CliRunner()
    res = runner.invoke(cli, ["generate", str(tiny_ckpt), str(sample_video), "q", "--frames", "65"])
    assert res.exit_code == 1 and "2 <= T <= 64" in res.output
    res = runner.invoke(cli, ["generate", str(tiny_ckpt), str(sample_video), "q", "--frames", "5", "--max-new-tokens", "2", "--dump", str(tmp_path / "d")])
    assert res.exit_code == 0 and "odd" in res.output
    assert np.load(tmp_path / "d" / "visual_tokens.npy").shape[0] == 2 * 4


def test_missing_extra_names_the_extra(tiny_ckpt, sample_video):
    """Without torch, torch-needing commands say which extra to install (and exit 1, no traceback)."""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers'):
                    raise ImportError('No module named ' + repr(name))
        sys.meta_path.insert(0, Block())
        from ppllava_edge.cli.main import main
        sys.argv = ['ppllava-edge'] + sys.argv[1:]
        main()
        """
    )
    for args in (["generate", str(tiny_ckpt), str(sample_video), "q"], ["export", str(tiny_ckpt), "/tmp/never-written"], ["make-checkpoint", "/tmp/never-written"]):
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        assert "ppllava-edge[export]" in out.stderr and "Traceback" not in out.stderr, out.stderr


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk's ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    from ppllava_edge.cli.main import main
    sys.argv = ['ppllava-edge', *sys.argv[1:]]
    main()
    """)


@pytest.mark.parametrize("command", ["make-checkpoint", "export", "ask --dump"])
def test_full_disk_is_one_error_line_and_leaves_nothing(command, tmp_path, tiny_ckpt, tiny_export, sample_video):
    """A write that fails for lack of space (make-checkpoint's shards; export, where a stage wraps the OSError;
    ask --dump, outside an atomic output): exit 1, one `error:` line naming the output, no traceback, no temp folder."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    args = {"make-checkpoint": ["make-checkpoint", str(out)], "export": ["export", str(tiny_ckpt), str(out)],
            "ask --dump": ["ask", str(tiny_export), str(sample_video), "q", "--max-new-tokens", "2", "--dump", str(out)]}[command]
    res = subprocess.run([sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "file too large while writing" in errors[0] and "Traceback" not in res.stderr, res.stderr
    if command != "ask --dump":
        assert str(out) in errors[0] and "partial output was removed" in errors[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == []


SLOW_LOADER = textwrap.dedent("""
    import sys, threading, time
    from ppllava_edge.runtime import pipeline
    real, real_ask, asked = pipeline.create_session, pipeline.Pipeline.ask, threading.Event()

    def ask(self, *args, **kwargs):
        asked.set()
        return real_ask(self, *args, **kwargs)

    def slow(path, *args, **kwargs):  # the background loader is surely inside a session load when the input fails
        asked.wait(5)
        time.sleep(1.0)
        session = real(path, *args, **kwargs)
        print('session loaded:', path, file=sys.stderr, flush=True)
        return session

    pipeline.create_session, pipeline.Pipeline.ask = slow, ask
    from ppllava_edge.cli.main import main
    sys.argv = ['ppllava-edge', 'ask', *sys.argv[1:], 'What?', '--max-new-tokens', '2']
    main()
    """)


def _damaged_export(src, dst, name, damage):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("ort_cache"))
    data = (dst / name).read_bytes()
    (dst / name).write_bytes(damage(data))
    return dst


@pytest.mark.parametrize("case", ["missing", "folder", "wrong-shape npy", "object npy", "truncated tokenizer", "half embeddings"])
def test_ask_bad_input_joins_the_session_loader(case, tiny_export, sample_video, tmp_path):
    """`ask` on a bad input or a damaged export: exit 1 with one `error:` line naming the file, never an abort
    (signal 6, "terminate called without an active exception") from a loader thread still inside ONNX Runtime.
    The session loads in flight finish (joined) and the rest are cancelled."""
    export, target = tiny_export, None
    if case == "missing":
        target = tmp_path / "missing.mp4"
    elif case == "folder":
        target = tmp_path
    elif case == "wrong-shape npy":
        target = tmp_path / "wrong.npy"
        np.save(target, np.zeros((8, 3, 10, 10), np.float32))
    elif case == "object npy":
        target = tmp_path / "object.npy"
        np.save(target, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    elif case == "truncated tokenizer":
        export = _damaged_export(tiny_export, tmp_path / "ex", "llama_tokenizer.json", lambda b: b[: len(b) // 2])
        target = export / "llama_tokenizer.json"
    else:
        export = _damaged_export(tiny_export, tmp_path / "ex", "embed_tokens.npy", lambda b: b[: len(b) // 2])
        target = export / "embed_tokens.npy"
    video = target if export is tiny_export else sample_video
    res = subprocess.run([sys.executable, "-c", SLOW_LOADER, str(export), str(video)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(target) in errors[0], res.stderr
    assert "Traceback" not in res.stderr and "terminate called" not in res.stderr
    loaded = res.stderr.count("session loaded:")
    # the loads in flight (one per loader thread: the decoder's, the vision side's) joined, the later one cancelled
    assert loaded == 2 if export is tiny_export else loaded <= 2, res.stderr
    assert "prompt_pool.onnx" not in res.stderr


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path, caplog):
    """make-checkpoint killed with SIGKILL leaves its `.OUT.tmp-HOST-PID-*` folder; the next atomic write of OUT
    removes it (its process is gone) with a warning, keeps a live process's and another host's folder, and only
    names (with the command to remove it) a pid-less folder of an older version."""
    import signal
    import time

    from ppllava_edge.atomic import AtomicDir

    pytest.importorskip("torch")
    out = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", "from ppllava_edge.cli.main import main; main()", "make-checkpoint", "--preset", "small", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".ck.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (killed,) = list(tmp_path.glob(".ck.tmp-*"))
    assert f"-{proc.pid}-" in killed.name
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = killed.name.split(".tmp-")[1].rsplit("-", 2)[0]
        kept = [tmp_path / f".ck.tmp-{host}-{live.pid}-abcd1234", tmp_path / f".ck.tmp-otherhost-{proc.pid}-abcd1234"]
        legacy = tmp_path / ".ck.tmp-abcd1234"
        for p in [*kept, legacy]:
            p.mkdir()
        with AtomicDir(out) as tmp:
            (tmp / "f").write_text("x")
        assert not killed.exists() and all(p.exists() for p in kept) and legacy.exists()
        assert f"removed {killed}, the temp folder of process {proc.pid}, which is gone" in caplog.text
        assert f"rm -rf {legacy}" in caplog.text
        assert (out / "f").read_text() == "x"
    finally:
        live.kill()
        live.wait()
