"""Running the app under uvicorn: bind first (so `--port 0` reports the real port), load the model in the
background (/health answers at once, /ready once loaded), stop cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from .._deps import require
from ..errors import InputError
from .app import create_app
from .scheduler import ServeOptions, Server

log = logging.getLogger(__name__)


def timed_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol, plus what uvicorn lacks: a connection that has not sent a request's complete headers
    within `header_timeout` seconds (of connecting, or of its previous response) is closed. uvicorn's keep-alive
    timeout covers only idle connections, so one that sends a partial request line or header stayed open forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self.loop.call_later(header_timeout, self._header_timeout, self.cycle)

        def _header_timeout(self, cycle) -> None:
            if self.cycle is cycle and not self.transport.is_closing():  # no new request since the timer was armed
                client = self.client
                log.info("closing a connection from %s: no complete request headers within %g s (--read-timeout)",
                         f"{client[0]}:{client[1]}" if client else "?", header_timeout)
                self.transport.close()

    return TimedH11Protocol


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
                            timeout_graceful_shutdown=10, timeout_keep_alive=30, http=timed_protocol(opts.read_timeout))
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
