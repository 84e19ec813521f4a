"""``python -m app``: serve with the settings from ``OPTSERVE_*``.
``python -m app --check-config``: only check them (exit 0 or 2; compose runs it first).

A configuration that cannot work (a port that is not a number, an API key under 16 characters,
``OPTSERVE_DEVICE=cuda`` where torch sees no CUDA, an unknown durability, ...) ends the process
before anything starts: one line on stderr naming the variable, exit code 2. Exit code 2 means
"fix the configuration": a supervisor should not restart the process (see docs/docker.md).

SIGTERM drains: uvicorn stops accepting, in-flight requests finish, readiness turns false, the
lifespan snapshots every session, and the process exits 0 (uvicorn alone would re-raise the
signal and exit 143). Without API keys the server refuses a non-loopback bind unless
``OPTSERVE_ALLOW_OPEN=1``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.api.connection_cap import reserve_warning
from app.api.malformed_http import http_protocol
from app.config import (
    EXIT_CONFIG,
    ConfigError,
    Settings,
    load_settings,
    metrics_readers,
    parse_keys,
)
from app.observability import configure_logging

log = logging.getLogger("optserve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.optserve_app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.optserve_app.state.draining = True
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
    a nearest existing ancestor that is a directory this process may write in."""
    path = settings.data_dir
    if not make and not path.exists():
        return _could_make(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as exc:
        return f"OPTSERVE_DATA_DIR={str(path)!r:.200}: cannot write there: {exc.strerror or exc}"
    return None


def _could_make(path: Path) -> str | None:
    """Why the missing directory ``path`` could not be made, or None."""
    ancestor = path.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return (f"OPTSERVE_DATA_DIR={str(path)!r:.200}: cannot make it: {ancestor} is not a "
                "directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return (f"OPTSERVE_DATA_DIR={str(path)!r:.200}: cannot make it: {ancestor} is not "
                "writable")
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
    settle_gc()
    server = DrainingServer(server_config(app, settings), app)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
