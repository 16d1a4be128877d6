"""Running the app under uvicorn: bind first (so `--port 0` reports the real port), load the model in the
background (/health answers at once, /ready once loaded), stop cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from .._deps import require
from ..errors import InputError
from .app import ServeOptions, Server, create_app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run_server(opts: ServeOptions, on_listening: Callable[[str], None] | None = None, log_level: str = "warning", access_log: bool = False) -> None:
    """Serve until interrupted. Raises the model's load error (after the server stopped) if it could not load."""
    uvicorn = require("uvicorn", "serve", "ppllava-edge serve")
    require("starlette", "serve", "ppllava-edge serve")
    require("prometheus_client", "serve", "ppllava-edge serve")
    sock = bind(opts.host, opts.port)
    server = Server(opts)
    config = uvicorn.Config(create_app(server), log_level=log_level, access_log=access_log, lifespan="off",
                            timeout_graceful_shutdown=10, timeout_keep_alive=30)
    web = uvicorn.Server(config)

    def stop_on_error(exc: BaseException) -> None:
        web.should_exit = True

    server.on_load_error = stop_on_error
    host, port = sock.getsockname()[:2]
    loader = threading.Thread(target=server.load, name="ppllava-load", daemon=True)
    loader.start()
    if on_listening is not None:
        on_listening(f"http://{'[' + host + ']' if ':' in host else host}:{port}")
    try:
        web.run(sockets=[sock])
    finally:
        server.close()
        sock.close()
    if server.load_error is not None:
        raise server.load_error
