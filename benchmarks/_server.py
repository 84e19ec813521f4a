"""Start an optserve server (by default benchmarks.bench_app, which adds a raw echo route) in a
uvicorn subprocess on a free loopback port, and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import httpx

#: what :func:`server` adds to a server's environment unless ``env`` says otherwise
SERVER_DEFAULTS = {"OPTSERVE_DEVICE": "cpu", "OPTSERVE_MAX_BODY_MB": "2048",
                   "OPTSERVE_LOG_LEVEL": "warning"}
#: base URL -> pid of the server process serving it (for signalling a profiled server)
PIDS: dict[str, int] = {}
#: base URL -> the server process (to tell a dead server from a slow one)
PROCS: dict[str, subprocess.Popen[bytes]] = {}


def user_defaults(env: dict[str, str]) -> list[str]:
    """What to ``unset`` for a server configured by ``env`` alone, as a user's ``scripts/serve``
    with those variables: :data:`SERVER_DEFAULTS` and this shell's other ``OPTSERVE_*`` (not
    ``OPTSERVE_DATA_DIR``: a benchmark's server always gets a fresh one)."""
    inherited = {**os.environ, **SERVER_DEFAULTS}
    return [k for k in inherited
            if k.startswith("OPTSERVE_") and k not in env and k != "OPTSERVE_DATA_DIR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def uvicorn_command(app: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"]


@contextmanager
def server(
    env: dict[str, str] | None = None,
    command: list[str] | None = None,
    port: int | None = None,
    app: str = "benchmarks.bench_app:app",
    start_timeout_s: float = 90,
    log: Path | None = None,
    cwd: Path | str | None = None,
    unset: Iterable[str] = (),
) -> Iterator[str]:
    """Yield the base URL of a ready server; ``command`` replaces the uvicorn command line
    (it must serve on ``port``). CPU, a 2 GB body limit and a fresh data directory unless
    ``env`` says otherwise; ``start_timeout_s`` bounds the wait for ``/readyz``; ``log``
    takes the server's stdout and stderr (default: this process's); ``cwd`` is the server's
    working directory (default: this process's); ``unset`` names variables removed from the
    server's environment (after ``env`` and the defaults above are applied)."""
    port = port or free_port()
    cmd = command or uvicorn_command(app, port)
    env = env or {}
    full_env = {**os.environ, **SERVER_DEFAULTS, **env}
    if "OPTSERVE_DATA_DIR" not in env:
        full_env["OPTSERVE_DATA_DIR"] = tempfile.mkdtemp(prefix="optserve-bench-")
    for key in unset:
        full_env.pop(key, None)
    out = open(log, "ab") if log else None  # closed in the finally below
    proc = subprocess.Popen(cmd, env=full_env, cwd=cwd, stdout=out,
                            stderr=subprocess.STDOUT if out else None)
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    PROCS[url] = proc
    try:
        deadline = time.monotonic() + start_timeout_s
        # one client for the whole wait: httpx.get would build a new TLS context (about 45 ms
        # of CPU) on every try, taking the CPU the starting server needs
        with httpx.Client(timeout=1) as poll:
            while True:
                try:
                    if poll.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    raise RuntimeError(f"benchmark server did not start: it exited with code "
                                       f"{proc.returncode} before /readyz answered 200")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"benchmark server did not start: /readyz did not "
                                       f"answer 200 within {start_timeout_s:g} s")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        PIDS.pop(url, None)
        PROCS.pop(url, None)
        if out:
            out.close()


def app_env(port: int, settings: Iterable[str] = ()) -> dict[str, str]:
    """The environment of ``python -m app`` (what ``scripts/serve`` runs) on ``port`` at its
    defaults but ``OPTSERVE_DURABILITY=memory`` and ``settings`` (``NAME=VALUE``); the line
    that says so is printed."""
    env = {"OPTSERVE_PORT": str(port), "OPTSERVE_DURABILITY": "memory",
           **dict(e.split("=", 1) for e in settings)}
    print("server: python -m app, defaults but " + " ".join(f"{k}={v}" for k, v in env.items()
                                                              if k != "OPTSERVE_PORT"))
    return env


def app_server(env: dict[str, str], log: Path | None = None) -> AbstractContextManager[str]:
    """:func:`server` running ``python -m app`` with ``env`` alone, as a user's
    ``scripts/serve`` with those variables (:func:`user_defaults`)."""
    return server(env, command=[sys.executable, "-m", "app"], port=int(env["OPTSERVE_PORT"]),
                  log=log, unset=user_defaults(env))


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's resident memory (``VmRSS``) and its peak (``VmHWM``), MB."""
    status = open(f"/proc/{pid}/status").read()
    rss = int(status.split("VmRSS:")[1].split()[0]) / 1024
    hwm = int(status.split("VmHWM:")[1].split()[0]) / 1024
    return rss, hwm

