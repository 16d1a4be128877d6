"""A real `ppllava-edge serve` process on a free loopback port, for the server tests (always stopped)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 60.0
# The server process cannot import torch / transformers / tensorrt: every server test also proves it is torch-free.
BOOT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'tensorrt'):
            raise ImportError('blocked: the server must not import ' + name)
sys.meta_path.insert(0, Block())
from ppllava_edge.cli.main import main
main()
"""


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, url: str, stderr: list[str]):
        self.proc, self.url, self.stderr = proc, url, stderr
        self.host, self.port = re.match(r"http://([^:]+):(\d+)", url).groups()
        self.port = int(self.port)

    def request(self, method: str, path: str, body: dict | bytes | None = None, headers: dict | None = None,
                timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict, bytes]:
        """(status, headers, body) of one request on a fresh connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        """Prometheus samples as {'name{labels}': value}."""
        status, _, body = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


@contextmanager
def running_server(export: Path, *args: str, env: dict | None = None, preexec_fn=None):
    """Start `ppllava-edge serve EXPORT --port 0 ARGS`, wait until /ready, yield it; stop it whatever happens.
    `env` adds environment variables; `preexec_fn` runs in the child before the server (e.g. to set an rlimit)."""
    cmd = [sys.executable, "-c", BOOT, "serve", str(export), "--port", "0", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env} if env else None, preexec_fn=preexec_fn)
    lines: list[str] = []
    listening = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                listening.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not listening.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start (exit {proc.poll()}):\n{''.join(lines)}")
        url = re.search(r"listening on (http://\S+)", "".join(lines)).group(1)
        server = ServerProcess(proc, url, lines)
        while True:
            try:
                status, _, _ = server.request("GET", "/ready", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server never became ready (exit {proc.poll()}):\n{''.join(lines)}")
            time.sleep(0.2)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        reader.join(timeout=5)
