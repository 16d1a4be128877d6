"""Triton: the repository writer (configs parsed with Triton's own ModelConfig protobuf), and the real `tritonserver`
(nvidia-pytriton 0.7.0) on free loopback ports serving a repository made from the tiny export.

The server tests need the `triton` extra and the server files (the README's test command installs both). Without
them they are skipped, except under CI (CI=true), where that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ppllava_edge.cli.main import cli
from ppllava_edge.errors import ConfigError, InferenceError, InputError, MissingDependencyError
from ppllava_edge.manifest import load_manifest
from ppllava_edge.runtime.generation import GenerationConfig
from ppllava_edge.triton.protocol import parse_request
from ppllava_edge.triton.repository import RepositoryOptions, write_repository

from .conftest import write_truncated_video

QUESTIONS = ["What is happening in the video?", "What colour is the square?", "Count the   objects, please.", "Is it moving? ¿Sí?"]
MAX_TOKENS = 12


# ---- helpers ---------------------------------------------------------------------------------------------------
def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def free_ports(n: int = 3) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def need_triton() -> None:
    """Skip (or, under CI, fail) when the triton extra or the server files are missing."""
    from ppllava_edge.triton.server import find_server

    try:
        import tritonclient.grpc  # noqa: F401

        find_server()
    except (ImportError, MissingDependencyError) as exc:
        msg = f"Triton is not installed ({exc}); the README's test command installs it"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metrics_when(fetch, ready, timeout: float = 15.0) -> str:
    """Metrics text once `ready(text)` holds (Triton counts a request when it is released, just after its final
    response reaches the client), or the last text read after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        text = fetch()
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def local_answers(tiny_export, video, questions, generation) -> dict[str, tuple[list[int], str]]:
    from ppllava_edge.runtime.pipeline import Pipeline

    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    out = {}
    for q in questions:
        r = pipe.ask(video, q, num_frames=8, generation=generation)
        out[q] = (r.ids, r.text)
    return out


def stop_process_group(proc: subprocess.Popen, pgid_pids: list[int]) -> None:
    """Last resort of a fixture: SIGINT, wait, SIGKILL; then the tritonserver's group if anything is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in pgid_pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---- protocol (no server) ----------------------------------------------------------------------------------------
def test_parse_request_defaults_and_errors():
    def get(values):
        return lambda name: None if values.get(name) is None else np.array([values[name]], dtype=np.object_ if isinstance(values[name], bytes) else None)

    opts = parse_request(get({"video": b"\x00\x01", "question": "Was? ¿Qué?".encode()}), default_frames=8, default_max_tokens=32)
    assert (opts.frames, opts.max_tokens, opts.temperature, opts.seed, opts.question) == (8, 32, None, None, "Was? ¿Qué?")
    assert opts.generation() == GenerationConfig(max_new_tokens=32)
    opts = parse_request(get({"video": b"v", "question": b"q", "frames": 4, "max_tokens": 3, "temperature": 0.5, "seed": 7}), 8, 32)
    assert opts.generation() == GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.5, seed=7) and opts.frames == 4
    assert parse_request(get({"video": b"v", "question": b"q", "temperature": 0.0}), 8, 32).generation().do_sample is False
    for values, needle in [
        ({"question": b"q"}, "'video' input is empty"),
        ({"video": b"", "question": b"q"}, "'video' input is empty"),
        ({"video": b"v"}, "'question' input is missing"),
        ({"video": b"v", "question": b"  "}, "'question' input is empty"),
        ({"video": b"v", "question": b"\xff\xfe"}, "not UTF-8"),
        ({"video": b"v", "question": b"q", "max_tokens": 0}, "'max_tokens' input must be >= 1, got 0"),
        ({"video": b"v", "question": b"q", "temperature": -1.0}, "'temperature' input must be a finite number >= 0"),
        ({"video": b"v", "question": b"q", "seed": -3}, "'seed' input must be >= 0, got -3"),
    ]:
        with pytest.raises(InputError, match=re.escape(needle)):
            parse_request(get(values), 8, 32)


def test_parse_request_takes_images_instead_of_a_video():
    def get(values):
        return lambda name: None if values.get(name) is None else np.array(values[name], dtype=np.object_)

    opts = parse_request(get({"images": [b"a", b"bb"], "question": [b"q"]}), 8, 32)
    assert (opts.images, opts.video, opts.question) == ((b"a", b"bb"), b"", "q")
    for values, needle in [
        ({"images": [b"a"], "video": [b"v"], "question": [b"q"]}, "either the 'video' input or the 'images' input, not both"),
        ({"images": [b"a", b""], "question": [b"q"]}, "the 'images' input holds no image or an empty one (element 1)"),
        ({"images": [], "question": [b"q"]}, "the 'images' input holds no image or an empty one"),
    ]:
        with pytest.raises(InputError, match=re.escape(needle)):
            parse_request(get(values), 8, 32)


# ---- repository (no server) --------------------------------------------------------------------------------------
def test_cpu_repository_configs_parse_and_link_the_export(tiny_export, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    repo = write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(instances=2, frames=6, max_tokens=7, threads=1))
    assert sorted(p.name for p in repo.iterdir()) == ["ppllava"]
    cfg = parse_config(repo / "ppllava" / "config.pbtxt")
    assert (cfg.name, cfg.backend, cfg.max_batch_size, cfg.model_transaction_policy.decoupled) == ("ppllava", "python", 0, True)
    assert [(i.name, dtype_name(i.data_type), list(i.dims), i.optional) for i in cfg.input] == [
        ("video", "TYPE_STRING", [1], True), ("images", "TYPE_STRING", [-1], True), ("question", "TYPE_STRING", [1], False),
        ("max_tokens", "TYPE_INT32", [1], True),
        ("frames", "TYPE_INT32", [1], True), ("temperature", "TYPE_FP32", [1], True), ("seed", "TYPE_INT64", [1], True),
    ]
    assert [(o.name, dtype_name(o.data_type)) for o in cfg.output] == [("text", "TYPE_STRING"), ("stats", "TYPE_STRING")]
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, cfg.instance_group[0].KIND_CPU)]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"export_dir": "export", "frames": "6", "max_tokens": "7", "provider": "cpu", "backend": "ort", "engines": "",
                      "threads": "1", "cache_dir": "", "cache_mb": "2048", "bls_stages": ""}
    assert "from ppllava_edge.triton.python_model import TritonPythonModel" in (repo / "ppllava" / "1" / "model.py").read_text()
    copied = load_manifest(repo / "ppllava" / "1" / "export")  # a complete export folder
    for f in [tiny_export / "export.json", tiny_export / "decoder.onnx.data", *(copied.path(g) for g in copied.data["graphs"])]:
        src = tiny_export / Path(f).name
        dst = repo / "ppllava" / "1" / "export" / src.name
        assert dst.stat().st_ino != src.stat().st_ino and dst.read_bytes() == src.read_bytes()  # copies (or reflinks)
    assert_external_data_beside(repo / "ppllava" / "1" / "export", [f"{g}.onnx" for g in copied.data["graphs"]])
    assert not list(tmp_path.glob(".repo.tmp-*"))


def test_triton_repo_leaves_the_source_export_usable(tiny_export, tmp_path):
    """After triton-repo the source export's files still have one link each, so onnx's external-data loader (what
    `quantize EXPORT` uses) still opens its graphs; with hard links it refused them as a "hardlink attack"."""
    import shutil

    onnx = pytest.importorskip("onnx")
    src = tmp_path / "export"
    shutil.copytree(tiny_export, src, ignore=shutil.ignore_patterns("ort_cache"))
    write_repository(src, tmp_path / "repo")
    assert all(f.stat().st_nlink == 1 for f in src.iterdir() if f.is_file())
    for graph in ("vision.onnx", "decoder.onnx", "prompt_pool.onnx"):
        model = onnx.load(str(src / graph), load_external_data=True)
        assert model.graph.initializer and max(t.ByteSize() for t in model.graph.initializer) > 1024


def assert_external_data_beside(folder: Path, graphs: list[str]) -> None:
    """Every external-data file a graph names (read with onnx: the pools share pools.onnx.data) sits next to it."""
    onnx = pytest.importorskip("onnx")
    from ppllava_edge.external_data import external_files

    for g in graphs:
        for location in external_files(onnx.load(str(folder / g), load_external_data=False)):
            assert (folder / location).is_file(), f"{folder / g} names {location}, which is not in {folder}"


def test_gpu_repository_ort_names_backends_and_shapes(tiny_export, tmp_path, monkeypatch):
    pytest.importorskip("tritonclient.grpc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repo = write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(instances=3, kind="gpu"))
    data = load_manifest(tiny_export).data
    assert sorted(p.name for p in repo.iterdir()) == ["image_pool", "ppllava", "prompt_pool", "vision"]
    main = parse_config(repo / "ppllava" / "config.pbtxt")
    params = {k: v.string_value for k, v in main.parameters.items()}
    assert (params["provider"], params["bls_stages"]) == ("cuda", "vision,prompt_pool,image_pool")
    assert [(g.count, g.kind) for g in main.instance_group] == [(3, main.instance_group[0].KIND_GPU)]
    for stage in ("vision", "prompt_pool", "image_pool"):
        cfg = parse_config(repo / stage / "config.pbtxt")
        graph = data["graphs"][stage]
        assert (cfg.name, cfg.backend, cfg.max_batch_size, cfg.default_model_filename) == (stage, "onnxruntime", 0, "model.onnx")
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(3, cfg.instance_group[0].KIND_GPU)]
        want = [(t["name"], "TYPE_FP32" if t["dtype"] == "float32" else "TYPE_INT64", [d if isinstance(d, int) else -1 for d in t["dims"]]) for t in graph["inputs"]]
        assert [(i.name, dtype_name(i.data_type), list(i.dims)) for i in cfg.input] == want
        assert [(o.name, list(o.dims)) for o in cfg.output] == [(t["name"], [d if isinstance(d, int) else -1 for d in t["dims"]]) for t in graph["outputs"]]
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in acc] == ["tensorrt"] and acc[0].parameters["precision_mode"] == "FP32"
        assert (repo / stage / "1" / "model.onnx").read_bytes() == (tiny_export / graph["file"]).read_bytes()
        assert_external_data_beside(repo / stage / "1", ["model.onnx"])
    vision = parse_config(repo / "vision" / "config.pbtxt").optimization.execution_accelerators.gpu_execution_accelerator[0].parameters
    # the export's frame range 2:8:16; images run one tile at a time, so the vision profile starts at 1
    assert (vision["trt_profile_min_shapes"], vision["trt_profile_opt_shapes"], vision["trt_profile_max_shapes"]) == (
        "pixel_values:1x3x84x84", "pixel_values:8x3x84x84", "pixel_values:16x3x84x84")
    assert list(parse_config(repo / "vision" / "config.pbtxt").input[0].dims) == [-1, 3, 84, 84]
    # the TensorRT engine cache: a per-user folder only its owner can write (not a shared /tmp path)
    cache = tmp_path / "cache" / "ppllava-edge" / "trt-cache"
    assert vision["trt_engine_cache_path"] == f"{cache}/vision" and (cache.stat().st_mode & 0o777) == 0o700
    assert list(parse_config(repo / "prompt_pool" / "config.pbtxt").output[0].dims) == [-1, 64]


def test_trt_engine_cache_folder_is_private(tiny_export, tmp_path):
    """A cache folder of ours that others could write is tightened to 0700; one owned by another user (pre-seeded
    engines) is refused with one error naming it."""
    pytest.importorskip("tritonclient.grpc")
    cache = tmp_path / "trt"
    cache.mkdir(mode=0o777)
    os.chmod(cache, 0o777)
    write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(kind="gpu", trt_cache_dir=str(cache)))
    assert (cache.stat().st_mode & 0o777) == 0o700
    if os.getuid() != 0:
        pytest.skip("changing a folder's owner needs root")
    os.chown(cache, 65534, 65534)
    with pytest.raises(ConfigError, match=f"{cache}: owned by another user"):
        write_repository(tiny_export, tmp_path / "repo2", RepositoryOptions(kind="gpu", trt_cache_dir=str(cache)))
    assert not (tmp_path / "repo2").exists()


def fabricated_engines(tiny_export: Path, folder: Path) -> Path:
    """An engines.json naming files that are not real engines: enough to check the repository layout, not to run."""
    from ppllava_edge.engine.metadata import engine_entry, export_fingerprint, new_metadata, write_metadata
    from ppllava_edge.engine.profiles import resolve_limits

    manifest = load_manifest(tiny_export)
    meta = new_metadata(trt_version="10.16.1.11", gpu={"name": "NVIDIA L4", "sm": 89}, export=export_fingerprint(manifest),
                        limits=resolve_limits(manifest).as_dict(), options={})
    folder.mkdir()
    for stage in ("vision", "prompt_pool", "image_pool", "decoder"):
        name = f"{stage}.trt10.16.1.sm89.engine"
        (folder / name).write_bytes(b"not a real engine: " + stage.encode())
        graph = manifest.graph_for(stage, "trt")
        meta["engines"][stage] = engine_entry(file=name, graph=graph, onnx=f"{graph}.onnx", onnx_sha256={}, precision="fp16", strongly_typed=False,
                                              profiles=[], device="gpu", size_bytes=1, build_seconds=0.0, trtexec="")
    write_metadata(folder, meta)
    return folder


def test_gpu_repository_trt_uses_the_engines(tiny_export, tmp_path):
    pytest.importorskip("tritonclient.grpc")
    engines = fabricated_engines(tiny_export, tmp_path / "engines")
    repo = write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(kind="gpu", backend="trt", engines=engines))
    for stage in ("vision", "prompt_pool", "image_pool"):
        cfg = parse_config(repo / stage / "config.pbtxt")
        assert (cfg.platform, cfg.backend, cfg.default_model_filename, cfg.max_batch_size) == ("tensorrt_plan", "", "model.plan", 0)
        assert (repo / stage / "1" / "model.plan").read_bytes() == b"not a real engine: " + stage.encode()
        assert not cfg.optimization.HasField("execution_accelerators")
    assert [i.name for i in parse_config(repo / "vision" / "config.pbtxt").input] == ["pixel_values"]
    meta = json.loads((repo / "ppllava" / "1" / "engines" / "engines.json").read_text())
    assert list(meta["engines"]) == ["decoder"] and (repo / "ppllava" / "1" / "engines" / meta["engines"]["decoder"]["file"]).is_file()
    params = {k: v.string_value for k, v in parse_config(repo / "ppllava" / "config.pbtxt").parameters.items()}
    assert (params["backend"], params["engines"]) == ("trt", "engines")
    # engines of another export are refused, and nothing is written
    meta = json.loads((engines / "engines.json").read_text())
    meta["export"]["checkpoint_sha256"] = "0" * 64
    (engines / "engines.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="built from another export"):
        write_repository(tiny_export, tmp_path / "repo2", RepositoryOptions(kind="gpu", backend="trt", engines=engines))
    assert not (tmp_path / "repo2").exists()


@pytest.mark.parametrize(
    "opts,error,needle",
    [
        (RepositoryOptions(backend="trt"), InputError, "--backend trt needs --kind gpu"),
        (RepositoryOptions(frames=40), InputError, "--frames 40 is outside this export's frame range 2..16"),
        (RepositoryOptions(instances=0), InputError, "--instances 0: must be >= 1"),
        (RepositoryOptions(kind="gpu", backend="trt"), ConfigError, "engines.json"),
    ],
)
def test_repository_option_errors_leave_nothing(tiny_export, tmp_path, opts, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        write_repository(tiny_export, tmp_path / "repo", opts)
    assert list(tmp_path.iterdir()) == []


def test_cli_triton_repo_errors_are_one_line(tiny_export, tmp_path):
    runner = CliRunner()
    res = runner.invoke(cli, ["triton-repo", str(tmp_path / "nothing"), str(tmp_path / "repo")])
    assert res.exit_code == 1 and "no such export folder" in res.stderr and "Traceback" not in res.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    res = runner.invoke(cli, ["triton-repo", str(tiny_export), str(tmp_path / "full")])
    assert res.exit_code == 1 and "--force" in res.stderr and (tmp_path / "full" / "keep").read_text() == "x"
    res = runner.invoke(cli, ["ask", "--triton", "127.0.0.1:1", "v.mp4"])
    assert res.exit_code == 2 and "with --triton give INPUT... QUESTION" in res.stderr
    res = runner.invoke(cli, ["ask", "--triton", "127.0.0.1:1", "v.mp4", "q", "--num-beams", "3"])
    assert res.exit_code == 2 and "--num-beams" in res.stderr


def test_python_model_never_raises_when_the_client_is_gone():
    """execute() answers a bad request with an error response; when sending it fails (the client went away, the
    sender is closed) the failure is logged and execute() returns normally: Triton is not handed an exception."""
    import types

    from ppllava_edge.triton.python_model import OUTCOMES, TritonPythonModel

    logged = []

    class Sender:
        def send(self, *args, **kwargs):
            raise RuntimeError("Unable to send response. Response sender has been closed.")

        def is_cancelled(self):
            return True

    class Counter:
        def __init__(self):
            self.n = 0

        def increment(self, k):
            self.n += k

    pb = types.SimpleNamespace(
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=1, InferenceResponse=lambda *a, **k: ("response", a, k),
        TritonError=type("TritonError", (), {"INVALID_ARG": 3, "INTERNAL": 13, "__init__": lambda self, msg, code=13: None}),
        get_input_tensor_by_name=lambda request, name: None,
        Logger=types.SimpleNamespace(log_warn=logged.append, log_error=logged.append, log_info=logged.append),
    )
    model = TritonPythonModel()
    model.pb, model.instance, model.frames, model.max_tokens = pb, "ppllava_0", 8, 4
    model.answers, model.cache_hits = {o: Counter() for o in OUTCOMES}, Counter()
    request = types.SimpleNamespace(get_response_sender=Sender)
    assert model.execute([request, request]) is None
    assert model.answers["invalid_input"].n == 2
    assert len(logged) == 2 and all("could not send the final response" in m for m in logged)


def test_missing_server_files_name_the_install_command(tmp_path):
    from ppllava_edge.triton.server import find_server

    with pytest.raises(MissingDependencyError, match=re.escape(f"pip install --no-deps --target {tmp_path} nvidia-pytriton==0.7.0 numpy==1.26.4")):
        find_server(tmp_path)


def test_failed_server_start_leaves_no_work_folder(tiny_export, tmp_path, monkeypatch):
    """tritonserver cannot be started (here: exec fails): the error comes out, and the work folder with the
    backends and the stub venv is removed."""
    import tempfile

    from ppllava_edge.triton import server as server_mod

    try:
        server_mod.find_server()
    except MissingDependencyError:
        pytest.skip("the Triton server files are not installed")
    repo = write_repository(tiny_export, tmp_path / "repo")
    work = tmp_path / "tmp"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))

    def no_exec(*args, **kwargs):
        raise PermissionError(13, "Permission denied", args[0][0])

    monkeypatch.setattr(server_mod.subprocess, "Popen", no_exec)
    ports = free_ports()
    with pytest.raises(PermissionError):
        with server_mod.TritonServer(repo, *ports):
            pass
    assert list(work.iterdir()) == []


# ---- the real server ---------------------------------------------------------------------------------------------
class Served:
    def __init__(self, proc: subprocess.Popen, log: Path, ports: list[int]):
        self.proc, self.log, (self.http, self.grpc, self.metrics) = proc, log, ports
        self.server_pid: int | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def metrics_text(self) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics}/metrics")[1]


@pytest.fixture(scope="module")
def served(tiny_export, tmp_path_factory):
    """`ppllava-edge triton-serve` (a subprocess, like a user's shell) on a 2-instance repository of the tiny export."""
    need_triton()
    work = tmp_path_factory.mktemp("triton")
    write_repository(tiny_export, work / "repo", RepositoryOptions(instances=2, max_tokens=MAX_TOKENS))
    ports = free_ports()
    log = work / "serve.log"
    cmd = [sys.executable, "-c", "import sys; from ppllava_edge.cli.main import main; sys.argv[0] = 'ppllava-edge'; main()", "triton-serve", str(work / "repo"),
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--ready-timeout", "120"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    s = Served(proc, log, ports)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"^ready: .*tritonserver pid (\d+)", log.read_text(), re.M)
            if found:
                s.server_pid = int(found.group(1))
                break
            time.sleep(0.3)
        assert s.server_pid is not None, f"triton-serve did not become ready:\n{log.read_text()[-4000:]}"
        yield s
    finally:
        stop_process_group(proc, [s.server_pid] if s.server_pid else [])


@pytest.fixture(scope="module")
def expected(tiny_export, sample_video):
    return local_answers(tiny_export, sample_video, QUESTIONS, GenerationConfig(max_new_tokens=MAX_TOKENS))


def test_model_ready_and_config(served):
    status, _ = http_get(f"http://127.0.0.1:{served.http}/v2/models/ppllava/ready")
    assert status == 200
    status, body = http_get(f"http://127.0.0.1:{served.http}/v2/models/ppllava/config")
    cfg = json.loads(body)
    assert status == 200 and cfg["model_transaction_policy"]["decoupled"] is True and cfg["instance_group"][0]["count"] == 2
    assert http_get(f"http://127.0.0.1:{served.http}/v2/models/nothing/ready")[0] == 400


def test_streamed_answers_equal_local_ask(served, sample_video, expected):
    from ppllava_edge.triton.client import ask_triton

    before = served.metrics_text()
    for q in QUESTIONS[:3]:
        seen = []
        a = ask_triton(served.url, sample_video, q, frames=8, on_text=seen.append, timeout=120)
        assert (a.ids, a.text) == expected[q], q
        assert "".join(seen) == a.text and len(seen) > 1  # streamed in pieces
        assert a.stats["visual_tokens"] == 16 and a.stats["provider"] == "cpu" and a.stats["timing_line"].startswith("decode ")
    # Triton counts the three requests as successful (released after their final response), and so does our counter
    def success(text):
        return metric(text, "nv_inference_request_success", model="ppllava") - metric(before, "nv_inference_request_success", model="ppllava")

    after = metrics_when(served.metrics_text, lambda t: success(t) >= 3)
    assert success(after) == 3
    assert metric(after, "ppllava_answers_total", outcome="ok") - metric(before, "ppllava_answers_total", outcome="ok") == 3
    assert metric(after, "nv_inference_request_failure", model="ppllava") == metric(before, "nv_inference_request_failure", model="ppllava")


def test_four_concurrent_streams_on_two_instances_get_the_sequential_answers(served, sample_video, expected):
    from ppllava_edge.triton.client import ask_triton

    results: dict[str, object] = {}

    def run(q):
        try:
            results[q] = ask_triton(served.url, sample_video, q, frames=8, timeout=120)
        except Exception as exc:  # reported below
            results[q] = exc

    threads = [threading.Thread(target=run, args=(q,)) for q in QUESTIONS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(not t.is_alive() for t in threads)
    for q in QUESTIONS:
        assert not isinstance(results[q], Exception), results[q]
        assert (results[q].ids, results[q].text) == expected[q], q
    assert {results[q].stats["instance"] for q in QUESTIONS} == {"ppllava_0_0", "ppllava_0_1"}
    # the instances' stub processes answered without torch: no torch library is mapped into them
    stubs = [pid for pid in child_pids(served.server_pid) if "triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(stubs) == 2
    for pid in stubs:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "onnxruntime" in maps and "/torch/" not in maps and "libtorch" not in maps


def child_pids(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def test_sampling_inputs_reach_the_sampler(served, tiny_export, sample_video):
    from ppllava_edge.triton.client import ask_triton

    gen = GenerationConfig(max_new_tokens=MAX_TOKENS, do_sample=True, temperature=0.8, seed=3)
    want = local_answers(tiny_export, sample_video, QUESTIONS[:1], gen)[QUESTIONS[0]]
    a = ask_triton(served.url, sample_video, QUESTIONS[0], frames=8, temperature=0.8, seed=3, timeout=120)
    assert (a.ids, a.text) == want
    assert a.ids != local_answers(tiny_export, sample_video, QUESTIONS[:1], GenerationConfig(max_new_tokens=MAX_TOKENS))[QUESTIONS[0]][0]


def test_bad_requests_get_errors_naming_the_problem_and_the_next_one_succeeds(served, sample_video, expected, tmp_path):
    from ppllava_edge.triton.client import ask_triton

    before = served.metrics_text()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video at all")
    with pytest.raises(InferenceError) as err:
        ask_triton(served.url, bad, QUESTIONS[0], timeout=60)
    assert "<video input, 26 bytes>: the file is corrupt or not a media file" in str(err.value)
    assert str(bad) not in str(err.value) and "ppllava-triton-" not in str(err.value)  # no server-side temp path
    with pytest.raises(InferenceError, match=re.escape("--frames 40 is outside this export's frame range 2..16")):
        ask_triton(served.url, sample_video, QUESTIONS[0], frames=40, timeout=60)
    with pytest.raises(InferenceError, match=re.escape("the 'max_tokens' input must be >= 1, got 0")):
        ask_triton(served.url, sample_video, QUESTIONS[0], max_tokens=0, timeout=60)
    a = ask_triton(served.url, sample_video, QUESTIONS[1], frames=8, timeout=120)
    assert (a.ids, a.text) == expected[QUESTIONS[1]]
    # a truncated video is answered with a warning that names the input, not the server's temporary copy (also
    # when the features, and the warning with them, come from the cache of an earlier request)
    truncated = write_truncated_video(tmp_path / "truncated.mp4")
    for _ in range(2):
        w = ask_triton(served.url, truncated, QUESTIONS[0], frames=8, timeout=120).stats["warnings"]
        assert len(w) == 1 and w[0].startswith("<video input>: truncated or partly corrupt video: only ") and "of 48 announced frames decoded" in w[0], w
    after = metrics_when(served.metrics_text, lambda t: metric(t, "ppllava_answers_total", outcome="ok") > metric(before, "ppllava_answers_total", outcome="ok"))
    assert metric(after, "ppllava_answers_total", outcome="invalid_input") - metric(before, "ppllava_answers_total", outcome="invalid_input") == 3


def test_load_test_levels(served, sample_video):
    from ppllava_edge.triton.loadtest import LoadOptions, load_markdown, run_load

    result = run_load(LoadOptions(url=served.url, video=sample_video, concurrency=[1, 2], requests=3, warmup=0, frames=8, max_tokens=4))
    assert [(lv["concurrency"], lv["requests"], lv["errors"]) for lv in result["levels"]] == [(1, 3, 0), (2, 3, 0)]
    for lv in result["levels"]:
        assert lv["requests_per_s"] > 0 and lv["tokens_per_s"] == pytest.approx(3 * 4 / lv["wall_s"]) and lv["e2e_ms"]["n"] == 3
    assert sum(lv["cache_hits"] for lv in result["levels"]) >= 4  # the same video: at most one miss per instance
    table = load_markdown(result).splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 | 3 | 0 |") and table[3].startswith("| 2 | 3 | 0 |")


def test_cli_ask_triton_prints_what_a_local_ask_prints(served, tiny_export, sample_video):
    runner = CliRunner()
    local = runner.invoke(cli, ["ask", str(tiny_export), str(sample_video), QUESTIONS[2], "--max-new-tokens", "9"])
    remote = runner.invoke(cli, ["ask", "--triton", served.url, str(sample_video), QUESTIONS[2], "--max-new-tokens", "9"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    assert remote.stdout == local.stdout and remote.stdout.strip()
    line = re.compile(r"provider cpu: 16 visual tokens, context (\d+) \| load [\d.]+ ms \| decode [\d.]+ ms \| preprocess [\d.]+ ms \| vision [\d.]+ ms \| "
                      r"pool [\d.]+ ms \| prefill [\d.]+ ms \| 8 steps x [\d.]+ ms \| total [\d.]+ ms( \(feature cache hit\))? \| peak RSS \d+ MB")
    local_err, remote_err = (" ".join(r.stderr.split()) for r in (local, remote))  # undo the console's line wrapping
    assert line.search(local_err) and line.search(remote_err) and line.search(local_err).group(1) == line.search(remote_err).group(1)
    assert re.search(r"triton 127\.0\.0\.1:\d+ \(ppllava_0_[01]\): first text [\d.]+ ms, answer [\d.]+ ms", remote_err)
    streamed = runner.invoke(cli, ["ask", "--triton", served.url, str(sample_video), QUESTIONS[2], "--max-new-tokens", "9", "--stream"])
    assert streamed.stdout == local.stdout
    as_json = json.loads(runner.invoke(cli, ["ask", "--triton", served.url, str(sample_video), QUESTIONS[2], "--max-new-tokens", "9", "--json"]).stdout)
    assert as_json["text"] == local.stdout.strip() and len(as_json["ids"]) == 9
    res = runner.invoke(cli, ["ask", "--triton", f"127.0.0.1:{free_ports(1)[0]}", str(sample_video), "q"])
    assert res.exit_code == 1 and "no Triton server answers at" in res.stderr and "Traceback" not in res.output


def test_images_are_answered_as_a_local_ask_answers_them(served, tiny_export, tmp_path):
    """One image (anyres) and several images (one question about all of them) over Triton == `ask` on the export."""
    from PIL import Image

    from ppllava_edge.media import make_test_photo
    from ppllava_edge.runtime.pipeline import Pipeline
    from ppllava_edge.triton.client import ask_triton

    photos = []
    for i, (w, h) in enumerate([(200, 120), (90, 150), (100, 100)]):
        photos.append(tmp_path / f"p{i}.png")
        Image.fromarray(make_test_photo(w, h, seed=20 + i)).save(photos[-1])
    pipe = Pipeline.from_export(tiny_export, provider="cpu")
    for inputs in ([photos[0]], photos[:2], photos):
        want = pipe.ask(inputs[0] if len(inputs) == 1 else inputs, QUESTIONS[1], generation=GenerationConfig(max_new_tokens=MAX_TOKENS))
        got = ask_triton(served.url, list(inputs), QUESTIONS[1], timeout=120)
        assert (got.ids, got.text, got.stats["visual_tokens"]) == (want.ids, want.text, want.visual_tokens), len(inputs)
    with pytest.raises(InferenceError, match=r"Cannot open image <image input 1, 13 bytes>: the file is corrupt or not an image"):
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not a picture")
        ask_triton(served.url, [photos[0], bad], QUESTIONS[1], timeout=120)
    with pytest.raises(InferenceError, match=r"17 image\(s\) in one question"):
        ask_triton(served.url, [photos[0]] * 17, QUESTIONS[1], timeout=120)


def test_ctrl_c_stops_the_server_and_its_stubs(served):
    """Runs last in this module: SIGINT to `triton-serve` stops tritonserver gracefully, stubs included."""
    served.proc.send_signal(signal.SIGINT)
    code = served.proc.wait(90)
    log = served.log.read_text()
    assert code == 0, log[-3000:]
    assert "stopped (tritonserver exit code 0)" in log
    with pytest.raises(ProcessLookupError):
        os.killpg(served.server_pid, 0)  # neither the server nor a stub of its group is left
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{served.http}/v2/health/ready", timeout=2)


# ---- the GPU layout's BLS calls, run on this CPU host ----------------------------------------------------------------
# The pip tritonserver has only the Python backend, so the stage models of a `--kind gpu` repository cannot run on
# Triton's onnxruntime backend here. This stand-in (a test fixture, not shipped) serves each stage's model.onnx with
# onnxruntime on the CPU under the same config inputs/outputs, so the `ppllava` model's BLS requests, tensor names,
# dtypes and output order are checked against a real server. The onnxruntime/TensorRT backends themselves are not.
ORT_STANDIN = '''
import json
import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.session = ort.InferenceSession(f"{args['model_repository']}/{args['model_version']}/model.onnx", providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}
            outs = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, np.ascontiguousarray(a)) for n, a in zip(self.outputs, outs)]))
        return responses
'''


def use_cpu_standins(repo: Path) -> Path:
    """A GPU-layout repository made to run on this CPU host: every instance group on the CPU, the main model on the
    cpu provider, and each stage model (onnxruntime backend) replaced by ORT_STANDIN (a Python model running its
    model.onnx with ONNX Runtime)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    for cfg_path in repo.glob("*/config.pbtxt"):
        cfg = parse_config(cfg_path)
        for g in cfg.instance_group:
            g.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        if cfg.name == "ppllava":
            cfg.parameters["provider"].string_value = "cpu"
        else:  # the stand-in instead of the onnxruntime backend
            cfg.backend, cfg.default_model_filename = "python", "model.py"
            cfg.ClearField("optimization")
            (cfg_path.parent / "1" / "model.py").write_text(ORT_STANDIN)
        cfg_path.write_text(text_format.MessageToString(cfg))
    return repo


def test_gpu_layout_bls_requests_on_a_cpu_stand_in(tiny_export, sample_video, expected, tmp_path):
    need_triton()
    from ppllava_edge.triton.client import ask_triton
    from ppllava_edge.triton.server import TritonServer

    repo = use_cpu_standins(write_repository(tiny_export, tmp_path / "repo", RepositoryOptions(kind="gpu", max_tokens=MAX_TOKENS)))
    ports = free_ports()
    with open(tmp_path / "server.log", "w") as log, TritonServer(repo, *ports, log=log) as server:
        for q in QUESTIONS[:2]:
            a = ask_triton(server.grpc_url, sample_video, q, frames=8, timeout=120)
            assert (a.ids, a.text) == expected[q], q
            assert a.stats["visual_tokens"] == 16
        text = metrics_when(lambda: http_get(server.metrics_url)[1], lambda t: metric(t, "nv_inference_request_success", model="prompt_pool") >= 2)
        # vision ran once (the second question hit the instance's feature cache), prompt_pool once per question
        assert metric(text, "nv_inference_request_success", model="vision") == 1
        assert metric(text, "nv_inference_request_success", model="prompt_pool") == 2
        assert metric(text, "ppllava_feature_cache_hits_total") == 1
