"""Two servers on one data directory: the second does not start while the first runs.

Both used to start. Each restored the same sessions and appended its own steps to the same
logs, so both acknowledged a version 2 of one session with different gradients, and a restart
kept one of them. Now the store holds ``<data dir>/.lock`` (:mod:`app.engine.data_dir_lock`):
a second ``python -m app`` waits up to ``OPTSERVE_DATA_DIR_WAIT_S`` and exits 2 (as for a
configuration that cannot work) with one line naming the first, no traceback; one still
waiting when the first is killed (``kill -9``) takes over with every step the first
acknowledged. Real servers (``python -m app``), values against in-process torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from app.config import EXIT_CONFIG
from tests import forked_server
from tests.integration.test_durability import BINARY, Proc, bitwise, free_port, jt, pull

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"w": (6,), "b": (3,)}


def grads(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + k)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


class Local:
    """The session's in-process twin: torch's Adam on the same parameters."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.params = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=0.01)

    def create_body(self) -> dict[str, Any]:
        return {"id": "one", "optimizer": "Adam", "options": {"lr": 0.01},
                "params": {n: jt(t) for n, t in self.params.items()}}

    def step(self, g: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = g[n].clone()
        self.opt.step()


def step(url: str, local: Local, k: int, sid: str = "one") -> int:
    """Step the session with gradient ``k`` on the server and in ``local``; the answer's
    parameters must equal torch's bitwise. Returns the acknowledged version."""
    g = grads(k)
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", content=safetensors.torch.save(g),
                   headers={"Content-Type": BINARY, "Accept": BINARY}, timeout=30)
    assert r.status_code == 200, r.text
    local.step(g)
    got = safetensors.torch.load(r.content)
    for n, p in local.params.items():
        assert bitwise(got[n], p.detach()), n
    return int(r.headers["X-Optserve-Version"])


def assert_holds(url: str, local: Local, version: int, sid: str = "one") -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        got_version, got = pull(client, sid)
    assert got_version == version
    for n, p in local.params.items():
        assert bitwise(got[n], p.detach()), n


@dataclass
class Setup:
    """The first server on ``data``, its session stepped once (``local`` its twin), and a
    second ``python -m app`` on the same directory once :meth:`start_second` started it."""

    data: Path
    first: Proc
    local: Local
    log: Path
    second: forked_server.ServerProcess | None = None
    second_url: str = ""

    def start_second(self, wait_s: float) -> forked_server.ServerProcess:
        port = free_port()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")},
               "OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": str(port),
               "OPTSERVE_DATA_DIR": str(self.data), "OPTSERVE_DEVICE": "cpu",
               "OPTSERVE_DURABILITY": "step", "OPTSERVE_TORCH_THREADS": "1",
               "OPTSERVE_LOG_FORMAT": "text", "OPTSERVE_WARM_UP": "0",
               "OPTSERVE_DATA_DIR_WAIT_S": str(wait_s)}
        self.second = forked_server.start(env, REPO, self.log)
        self.second_url = f"http://127.0.0.1:{port}"
        return self.second

    def second_log(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until(self, done: Callable[[], bool]) -> None:
        """Until ``done()``, while the second server runs (2 minutes at most)."""
        assert self.second is not None
        deadline = time.monotonic() + 120
        while not done():
            assert self.second.poll() is None, self.second_log()
            assert time.monotonic() < deadline, self.second_log()
            time.sleep(0.05)

    def second_ready(self) -> bool:
        try:
            return httpx.get(f"{self.second_url}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    data = tmp_path / "data"
    first = Proc(data).start()
    it = Setup(data, first, Local(), tmp_path / "second.log")
    try:
        r = httpx.post(f"{first.url}/v1/sessions", json=it.local.create_body(), timeout=60)
        assert r.status_code == 201, r.text
        assert step(first.url, it.local, 1) == 1
        yield it
    finally:
        if it.second is not None and it.second.poll() is None:
            it.second.kill()
            it.second.wait(30)
        first.stop()


def test_a_second_server_refuses_the_data_dir_and_leaves_the_first_whole(setup: Setup) -> None:
    first, local = setup.first, setup.local
    assert setup.start_second(1).wait(120) == EXIT_CONFIG, setup.second_log()
    assert first.proc is not None
    said = setup.second_log()
    # one line naming the directory and its holder, as a configuration that cannot work is
    # refused: no traceback, nothing logged as an error before it
    refusal = [line for line in said.splitlines() if "optserve: cannot start:" in line]
    assert len(refusal) == 1, said
    assert refusal[0].startswith(
        f"optserve: cannot start: the data directory {setup.data.resolve()} is in use by "
        f"another optserve process (pid {first.proc.pid} on "), said
    assert "still after 1 s" in refusal[0]
    assert "Traceback" not in said and "ERROR" not in said, said
    assert "Application startup failed" not in said, said
    assert not setup.second_ready()
    # the first goes on as if the second had never been started, and keeps what it acked
    assert step(first.url, local, 2) == 2
    assert_holds(first.url, local, 2)
    first.kill9()
    first.start()
    assert_holds(first.url, local, 2)
    assert step(first.url, local, 3) == 3


def test_uvicorn_factory_refuses_the_data_dir_in_one_line(setup: Setup) -> None:
    """``uvicorn --factory app.main:create_app`` on the held directory says the same one line
    as ``python -m app``, without uvicorn's traceback of the lifespan (which it logged, with
    "Application startup failed"), and exits with uvicorn's code for a failed startup, 3 (the
    lifespan cannot choose it: uvicorn catches whatever it raises); the first goes on."""
    first, local = setup.first, setup.local
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")},
           "OPTSERVE_DATA_DIR": str(setup.data), "OPTSERVE_DEVICE": "cpu",
           "OPTSERVE_TORCH_THREADS": "1", "OPTSERVE_WARM_UP": "0",
           "OPTSERVE_DATA_DIR_WAIT_S": "0"}
    proc = subprocess.run([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                           "--host", "127.0.0.1", "--port", "0"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 3, said
    assert first.proc is not None
    refusal = proc.stderr.strip().splitlines()[-1]  # (after uvicorn's INFO lines, the last)
    assert refusal.startswith(
        f"optserve: cannot start: the data directory {setup.data.resolve()} is in use by "
        f"another optserve process (pid {first.proc.pid} on "), said
    assert said.count("optserve: cannot start:") == 1 and "still after 0 s" in refusal
    assert "Traceback" not in said and "ERROR" not in said, said
    assert "Application startup failed" not in said, said
    assert step(first.url, local, 2) == 2


def test_a_waiting_server_takes_over_with_every_acknowledged_step(setup: Setup) -> None:
    first, local = setup.first, setup.local
    second = setup.start_second(600)
    assert first.proc is not None
    waiting = f"in use by another optserve process (pid {first.proc.pid} on "
    setup.wait_until(lambda: waiting in setup.second_log())
    # acknowledged by the first while the second waits: the second must restore it
    assert step(first.url, local, 2) == 2
    assert not setup.second_ready()
    first.kill9()
    setup.wait_until(setup.second_ready)
    assert_holds(setup.second_url, local, 2)
    assert step(setup.second_url, local, 3) == 3
    assert (f"optserve ready on device cpu: 1 stored session(s) restored from "
            f"{setup.data.resolve()} (durability step)") in setup.second_log()
    assert f"pid {second.pid} on " in (setup.data / ".lock").read_text()
