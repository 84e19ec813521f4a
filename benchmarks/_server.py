"""Start an optserve server (by default benchmarks.bench_app, which adds a raw echo route) in a
uvicorn subprocess on a free loopback port, and wait until it is ready."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

#: base URL -> pid of the server process serving it (for signalling a profiled server)
PIDS: dict[str, int] = {}
#: base URL -> the server process (to tell a dead server from a slow one)
PROCS: dict[str, subprocess.Popen[bytes]] = {}


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
) -> Iterator[str]:
    """Yield the base URL of a ready server; ``command`` replaces the uvicorn command line
    (it must serve on ``port``). CPU, a 2 GB body limit and a fresh data directory unless
    ``env`` says otherwise; ``start_timeout_s`` bounds the wait for ``/readyz``; ``log``
    takes the server's stdout and stderr (default: this process's)."""
    port = port or free_port()
    cmd = command or uvicorn_command(app, port)
    full_env = {**os.environ, "OPTSERVE_DEVICE": "cpu", "OPTSERVE_MAX_BODY_MB": "2048",
                "OPTSERVE_DATA_DIR": tempfile.mkdtemp(prefix="optserve-bench-"),
                "OPTSERVE_LOG_LEVEL": "warning", **(env or {})}
    out = open(log, "ab") if log else None  # closed in the finally below
    proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT if out
                            else None)
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = proc.pid
    PROCS[url] = proc
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("benchmark server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        PIDS.pop(url, None)
        PROCS.pop(url, None)
        if out:
            out.close()
