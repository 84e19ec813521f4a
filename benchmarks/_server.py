"""Start benchmarks.bench_app in a uvicorn subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def server(env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", "benchmarks.bench_app:app", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--loop", "uvloop",
           "--http", "httptools"]
    full_env = {**os.environ, "OPTSERVE_DEVICE": "cpu", "OPTSERVE_MAX_BODY_MB": "2048",
                **(env or {})}
    proc = subprocess.Popen(cmd, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
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
        proc.wait(timeout=30)
