"""`ppllava-edge triton-serve`: the real `tritonserver` (2.51) carried by the nvidia-pytriton 0.7.0 wheel, on loopback.

Set-up, measured on this project's CPU hosts (README: Triton):

- The server files are installed apart from the project's venv, with their own numpy:
  `pip install --no-deps --target .venv/triton nvidia-pytriton==0.7.0 numpy==1.26.4`. The 2.51 Python-backend
  stub reads tensors through pybind11 2.10, which misreads numpy >= 2 dtypes (every input arrives as copies of its
  first byte; fixed upstream in python_backend#384, Triton 24.11), and nvidia-pytriton declares numpy < 2, which
  pip cannot install beside the project's numpy 2 pin.
- The stub's embedded Python runs isolated (PYTHONPATH is ignored) and takes its prefix from the first `python3`
  on PATH. So each run makes a small venv without packages ("stub env") whose `.pth` files add, in this order,
  the server-files folder (numpy 1.26), the folder of the `ppllava_edge` package this process runs (so the stubs
  run the same code, also from a checkout on PYTHONPATH) and the project venv's site-packages (everything else,
  with its own .pth files, e.g. an editable install); its `bin` goes first on PATH. The runtime gives identical ids on numpy 1.26.
- The wheel has no `backends/python/triton_python_backend_stub`: the stub for this interpreter's version is copied
  from `python_backend_stubs/X.Y/` into a private backends folder, as PyTriton's own launcher does.
- LD_LIBRARY_PATH holds the wheel's `nvidia_pytriton.libs` and the interpreter's LIBDIR (libpython3.X.so).
- SIGINT stops the server gracefully (in-flight requests finish, models unload); SIGKILL to its process group only
  if it is still alive after its exit timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..errors import InferenceError, InputError, MissingDependencyError

SERVER_PACKAGES = ("nvidia-pytriton==0.7.0", "numpy==1.26.4")
LOOPBACK = "127.0.0.1"


def default_server_dir() -> Path:
    """Where the server files are looked for: `<venv>/triton`."""
    return Path(sys.prefix) / "triton"


def install_hint(folder: Path) -> str:
    return f"pip install --no-deps --target {folder} {' '.join(SERVER_PACKAGES)}"


@dataclass(frozen=True)
class ServerFiles:
    site: Path  # the --target folder: nvidia-pytriton's files and numpy 1.x for the stubs

    @property
    def root(self) -> Path:
        return self.site / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site / "nvidia_pytriton.libs"

    @property
    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / "triton_python_backend_stub"


def _numpy_version(site: Path) -> str | None:
    found = sorted(site.glob("numpy-*.dist-info"))
    return found[0].name[len("numpy-"):-len(".dist-info")] if found else None


def find_server(server_dir: str | Path | None = None) -> ServerFiles:
    """The server files in `server_dir` (default `<venv>/triton`), checked.

    Raises:
        MissingDependencyError: something is missing, with the pip command that installs it.
    """
    site = Path(server_dir) if server_dir is not None else default_server_dir()
    files = ServerFiles(site)
    problems = [str(p) for p in (files.binary, files.libs, files.stub, files.root / "backends" / "python" / "libtriton_python.so") if not p.exists()]
    numpy_version = _numpy_version(site)
    if numpy_version is None:
        problems.append(f"numpy 1.x in {site}")
    elif not numpy_version.startswith("1."):
        problems.append(f"numpy 1.x in {site} (it has numpy {numpy_version})")
    if problems:
        raise MissingDependencyError(
            f"Running Triton needs its server files, which are missing: {', '.join(problems)}.\n"
            f"Hint: {install_hint(site)}\n"
            "Note: they are installed apart from the venv: nvidia-pytriton carries the tritonserver binary, and its "
            "Python-backend stub (Triton 2.51) needs numpy < 2, which the project's own numpy pin excludes."
        )
    return files


def server_environment(files: ServerFiles, stub_env: Path) -> dict[str, str]:
    """The environment of the server and its Python stubs (see the module docstring)."""

    def join(*parts: object) -> str:
        return os.pathsep.join(str(p) for p in parts if p)

    env = dict(os.environ)
    env["PATH"] = join(stub_env / "bin", env.get("PATH"))
    env["LD_LIBRARY_PATH"] = join(files.libs, sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH"))
    return env


def prepare_backends(files: ServerFiles, folder: Path) -> Path:
    """A backends folder holding the Python backend with this interpreter's stub (the wheel ships none in place)."""
    python = folder / "python"
    python.mkdir(parents=True)
    for f in (files.root / "backends" / "python").iterdir():
        if f.is_file():
            shutil.copy2(f, python / f.name)
    shutil.copy2(files.stub, python / files.stub.name)
    (python / files.stub.name).chmod(0o755)
    return folder


def prepare_stub_env(files: ServerFiles, folder: Path) -> Path:
    """A package-less venv for the stubs: numpy 1.x from the server files first, then the project venv."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    site_dir = folder / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    project = Path(sysconfig.get_paths()["purelib"])
    (site_dir / "_a_triton_server_files.pth").write_text(f"import site; site.addsitedir({str(files.site.resolve())!r})\n")
    # the ppllava_edge this process runs (a checkout on PYTHONPATH, which the venv's editable install would hide)
    (site_dir / "_ab_this_package.pth").write_text(f"{Path(__file__).resolve().parents[2]}\n")
    (site_dir / "_b_project_venv.pth").write_text(f"import site; site.addsitedir({str(project)!r})\n")
    return folder


def check_port_free(port: int, option: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a port in TIME_WAIT is free
        try:
            s.bind((LOOPBACK, port))
        except OSError as exc:
            raise InputError(f"{option} {port}: {LOOPBACK}:{port} is not free ({exc.strerror}).\nHint: choose another port with {option}.") from None


def check_repository(repo: Path) -> None:
    if not repo.is_dir():
        raise InputError(f"{repo}: no such model repository.\nHint: write one with `ppllava-edge triton-repo EXPORT {repo}`.")
    if not any(repo.glob("*/config.pbtxt")):
        raise InputError(f"{repo}: not a Triton model repository (no MODEL/config.pbtxt in it).\nHint: write one with `ppllava-edge triton-repo EXPORT {repo}`.")


class TritonServer:
    """One `tritonserver` process on loopback; a context manager that starts it, waits for readiness and always
    stops it.

        with TritonServer("repo", http_port=18000, grpc_port=18001, metrics_port=18002) as server:
            ask_triton(server.grpc_url, ...)
    """

    def __init__(
        self,
        repository: str | Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        server_dir: str | Path | None = None,
        log: IO | None = None,
        exit_timeout: int = 30,
    ):
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = int(http_port), int(grpc_port), int(metrics_port)
        self.server_dir = server_dir
        self.log = log  # where the server's output goes (None: this process's stdout/stderr)
        self.exit_timeout = int(exit_timeout)
        self.process: subprocess.Popen | None = None
        self._work: Path | None = None  # this run's backends folder and stub env

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def command(self, files: ServerFiles, backends: Path) -> list[str]:
        return [
            str(files.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self.exit_timeout}",
        ]

    def start(self) -> None:
        check_repository(self.repository)
        files = find_server(self.server_dir)
        for port, option in ((self.http_port, "--http-port"), (self.grpc_port, "--grpc-port"), (self.metrics_port, "--metrics-port")):
            check_port_free(port, option)
        self._work = Path(tempfile.mkdtemp(prefix="ppllava-triton-"))
        try:
            backends = prepare_backends(files, self._work / "backends")
            stub_env = prepare_stub_env(files, self._work / "stub-env")
            out = self.log if self.log is not None else None
            self.process = subprocess.Popen(
                self.command(files, backends), env=server_environment(files, stub_env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT if out is not None else None,
                start_new_session=True,  # its own process group: Ctrl-C reaches us, we stop it (and its stubs) in order
            )
        except BaseException:  # a failed start (a full disk, an exec error, Ctrl-C) leaves no work folder behind
            self.stop()
            raise

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every model is loaded (`/v2/health/ready` is 200).

        Raises:
            InferenceError: the server exited (a model failed to load, a port was taken) or `timeout` passed.
        """
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise InferenceError(f"tritonserver exited with code {code} before it was ready (its log says why: a model that failed to load, a busy port).")
            if self.ready():
                return
            time.sleep(0.25)
        raise InferenceError(f"tritonserver was not ready after {timeout:.0f} s (models still loading?).\nHint: raise --ready-timeout.")

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self) -> int | None:
        """SIGINT, wait for the graceful exit (in-flight requests finish), SIGKILL the process group if it is still
        alive after the exit timeout; leftover stub processes of the group are killed too. Returns the exit code."""
        proc = self.process
        code = None
        if proc is not None:
            try:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(self.exit_timeout + 15)
                    except subprocess.TimeoutExpired:
                        _kill_group(proc.pid)
                        proc.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: do not wait any longer
                _kill_group(proc.pid)
                proc.wait()
            code = proc.returncode
            _reap_group(proc.pid)
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        return code

    def __enter__(self) -> TritonServer:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _reap_group(pgid: int, grace: float = 5.0) -> None:
    """After the server exited: its stub processes (same process group) follow within seconds; kill any that do not."""
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        _kill_group(pgid)
