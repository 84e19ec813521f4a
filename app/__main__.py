"""``python -m app``: serve with the settings from ``OPTSERVE_*``.
``python -m app --check-config``: only check them (exit 0 or 2; compose runs it first).

A configuration that cannot work (a port that is not a number, an API key under 16 characters,
``OPTSERVE_DEVICE=cuda`` where torch sees no CUDA, an unknown durability, ...) ends the process
before anything starts: one line on stderr naming the variable, exit code 2. Exit code 2 means
"fix the configuration": a supervisor should not restart the process (see docs/docker.md).
So does a data directory another server still holds after ``OPTSERVE_DATA_DIR_WAIT_S``
(:mod:`app.engine.data_dir_lock`): one line naming the directory and its holder, without
uvicorn's traceback of the lifespan that refused to start (:mod:`app.startup_refusal`).

SIGTERM drains: uvicorn stops accepting, in-flight requests finish, readiness turns false, the
lifespan snapshots every session, and the process exits 0 (uvicorn alone would re-raise the
signal and exit 143). Without API keys the server refuses a non-loopback bind unless
``OPTSERVE_ALLOW_OPEN=1``.

A listening socket that stops listening while the server runs (uvloop closes it without a word
when an accept fails in a way it does not recover from: EMFILE when libuv's spare descriptor
could not be taken back) would leave a process that is alive and never accepts a connection
again. The server checks its listeners every second (:func:`listener_problem`); one that is
gone is logged as an error and the server drains and exits 1, for its supervisor to restart
it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI

from app import startup_refusal
from app.api.connection_cap import reserve_warning
from app.api.malformed_http import http_protocol
from app.config import (
    EXIT_CONFIG,
    ConfigError,
    Settings,
    load_settings,
    metrics_readers,
    parse_keys,
    warn_misspelt_settings,
)
from app.data_dir_engine import engine_problem
from app.observability import configure_logging

log = logging.getLogger("optserve")

#: the listening sockets are checked every this many ticks of uvicorn's main loop (0.1 s each)
LISTENER_CHECK_TICKS = 10


def listener_identity(sock: Any) -> tuple[int, int]:
    """(device, inode) of a listening socket's descriptor, to tell it from another file that
    takes its number once it is closed."""
    st = os.fstat(sock.fileno())
    return st.st_dev, st.st_ino


def listener_problem(sock: Any, identity: tuple[int, int]) -> str | None:
    """Why the listening socket ``sock`` (``identity``: :func:`listener_identity` at start)
    no longer accepts connections, or None. Takes no descriptor."""
    try:
        if listener_identity(sock) != identity:
            return "its descriptor was closed (another file has its number now)"
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "it no longer listens"
    except OSError as exc:
        return f"its descriptor was closed ({exc.strerror or exc})"
    return None


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.optserve_app = app
        #: why a listening socket stopped accepting connections (the server then exits 1)
        self.listener_lost: str | None = None
        #: each listening socket, its identity and its address, as they were at start
        self._listeners: list[tuple[Any, tuple[int, int], str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def _drain(self) -> None:
        """Readiness turns false, the engine's open sync rounds fail at once (409
        ``round_aborted``) and its long polls answer at once: their requests would otherwise
        keep the drain waiting until the rounds time out, the polls' waits end."""
        self.optserve_app.state.draining = True
        engine = getattr(self.optserve_app.state, "engine", None)
        drain = getattr(engine, "drain", None)
        if callable(drain) and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(drain)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self._listeners = [(sock, listener_identity(sock), str(sock.getsockname()))
                           for server in self.servers for sock in server.sockets]

    async def on_tick(self, counter: int) -> bool:
        if counter % LISTENER_CHECK_TICKS == 0 and self.listener_lost is None:
            for sock, identity, where in self._listeners:
                problem = listener_problem(sock, identity)
                if problem is None:
                    continue
                self.listener_lost = f"the listening socket {where}: {problem}"
                log.error("%s: no connection can be accepted any more (the event loop closes "
                          "it when an accept fails, e.g. out of file descriptors); draining "
                          "and exiting with status 1 for a supervisor to restart the server",
                          self.listener_lost)
                self._drain()
                self.should_exit = True
                break
        return await super().on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain()
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:  # a drained SIGTERM (even a repeated one) is a clean exit
            self._captured_signals[:] = [s for s in self._captured_signals if s != sig]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> str | None:
    """Why this configuration must not start, or None."""
    keys = parse_keys(settings.api_keys, settings.api_keys_file)
    if keys:
        return None
    if not is_loopback(settings.host) and not settings.allow_open:
        return (f"refusing to serve on {settings.host} without API keys: anyone who can reach "
                "it could read and change every session. Set OPTSERVE_API_KEYS (or "
                "OPTSERVE_API_KEYS_FILE), bind to 127.0.0.1, or set OPTSERVE_ALLOW_OPEN=1.")
    return None


def check_data_dir(settings: Settings, make: bool = True) -> str | None:
    """Why the data directory cannot hold sessions, or None. ``make``: make it when missing
    (the server); else (``--check-config``, which changes nothing) a missing one only needs
    a nearest existing ancestor that is a directory this process can make one in (one made
    there and removed). An existing
    one must not hold the other engine's sessions (:mod:`app.data_dir_engine`)."""
    path = settings.data_dir
    if not make and not path.exists():
        return _could_make(path)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        return f"OPTSERVE_DATA_DIR={str(path)!r:.200}: cannot write there: {exc.strerror or exc}"
    return engine_problem(path, settings.engine)


def _could_make(path: Path) -> str | None:
    """Why the missing directory ``path`` could not be made, or None."""
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (f"OPTSERVE_DATA_DIR={str(path)!r:.200}: cannot make it: {ancestor} is not a "
                "directory")
    # (a directory made there and removed: ``os.access`` says yes to root wherever the mode
    # bits would, /proc included, where nothing can be made)
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".optserve-check-"))
    except OSError as exc:
        return (f"OPTSERVE_DATA_DIR={str(path)!r:.200}: cannot make it in {ancestor}: "
                f"{exc.strerror or exc}")
    return None


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """How ``python -m app`` runs uvicorn: a request its HTTP parser refuses is answered in
    problem+json (:mod:`app.api.malformed_http`), not uvicorn's ``text/plain``; a request asking
    to upgrade (a WebSocket handshake, ``curl --http2``'s h2c) is served as plain HTTP, its body
    read (``ws="none"``: the API has no WebSocket routes)."""
    return uvicorn.Config(app, host=settings.host, port=settings.port,
                          log_level=settings.log_level, timeout_graceful_shutdown=30,
                          access_log=False, log_config=None, http=http_protocol(), ws="none")


def main(argv: list[str] | None = None) -> int:
    args = argv or []
    if args and args != ["--check-config"] or "-h" in args or "--help" in args:
        print("usage: python -m app [--check-config]\n\nServe optserve with the settings from "
              "OPTSERVE_* (or .env). --check-config: check them, print one line and exit: 0 "
              "when the server would start, 2 when not.", file=sys.stderr)
        return 0 if "-h" in args or "--help" in args else EXIT_CONFIG
    try:
        settings = load_settings()
        keys = parse_keys(settings.api_keys, settings.api_keys_file)
        metrics_readers(settings, keys)
    except ConfigError as exc:
        print(f"optserve: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format)
    warn_misspelt_settings(log)
    problem = check_exposure(settings)
    if problem:
        print(f"optserve: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    unwritable = check_data_dir(settings, make=args != ["--check-config"])
    if unwritable:
        print(f"optserve: invalid configuration: {unwritable}", file=sys.stderr)
        return EXIT_CONFIG
    if args == ["--check-config"]:
        print(f"optserve: configuration OK: {settings.host}:{settings.port}, device "
              f"{settings.device}, {len(keys)} API key(s), data in {settings.data_dir}, "
              f"durability {settings.durability}")
        return 0
    log.info("optserve on %s:%d, authentication %s", settings.host, settings.port,
             f"on ({len(keys)} keys)" if keys else "OFF (no OPTSERVE_API_KEYS)")
    if not keys and not is_loopback(settings.host):
        log.warning("serving %s WITHOUT authentication (OPTSERVE_ALLOW_OPEN=1): anyone who can "
                    "reach it can read and change every session", settings.host)
    crowded = reserve_warning(settings.max_connections)
    if crowded:
        log.warning("%s", crowded)
    from app.main import create_app  # torch and the engine: only once the settings are sound
    from app.runtime import settle_gc

    app = create_app(settings)
    settle_gc(sessions=settings.gc_freeze_sessions)
    server = DrainingServer(server_config(app, settings), app)
    refusal = startup_refusal.StartupRefusal(app)
    uvicorn_log = logging.getLogger(startup_refusal.UVICORN_LOG)
    uvicorn_log.addFilter(refusal)
    try:
        server.run()
    except SystemExit:  # uvicorn's exit when the lifespan failed to start
        problem = getattr(app.state, "startup_problem", None)
        if problem is None:
            raise
        startup_refusal.say(problem)
        return EXIT_CONFIG
    finally:
        uvicorn_log.removeFilter(refusal)
    return 0 if server.started and server.listener_lost is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
