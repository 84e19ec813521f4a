"""Two servers on one data directory: the second does not start while the first runs.

Both used to start. Each restored the same sessions and appended its own steps to the same
logs, so both acknowledged a version 2 of one session with different gradients, and a restart
kept one of them. Now the store holds ``<data dir>/.lock`` (:mod:`app.engine.data_dir_lock`):
a second ``python -m app`` waits up to ``OPTSERVE_DATA_DIR_WAIT_S`` and exits 1 naming the
first; one still waiting when the first is killed (``kill -9``) takes over with every step the
first acknowledged. Real servers (``python -m app``), values against in-process torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

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


def step(url: str, local: Local, k: int) -> int:
    """Step the session with gradient ``k`` on the server and in ``local``; the answer's
    parameters must equal torch's bitwise. Returns the acknowledged version."""
    g = grads(k)
    r = httpx.post(f"{url}/v1/sessions/one/step", content=safetensors.torch.save(g),
                   headers={"Content-Type": BINARY, "Accept": BINARY}, timeout=30)
    assert r.status_code == 200, r.text
    local.step(g)
    got = safetensors.torch.load(r.content)
    for n, p in local.params.items():
        assert bitwise(got[n], p.detach()), n
    return int(r.headers["X-Optserve-Version"])


def assert_holds(url: str, local: Local, version: int) -> None:
    with httpx.Client(base_url=url, timeout=30) as client:
        got_version, got = pull(client, "one")
    assert got_version == version
    for n, p in local.params.items():
        assert bitwise(got[n], p.detach()), n


def second_server(data: Path, wait_s: float, log: Path) -> tuple[forked_server.ServerProcess,
                                                                  str]:
    port = free_port()
    env = {"OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": str(port),
           "OPTSERVE_DATA_DIR": str(data), "OPTSERVE_DEVICE": "cpu",
           "OPTSERVE_DURABILITY": "step", "OPTSERVE_TORCH_THREADS": "1",
           "OPTSERVE_LOG_FORMAT": "text", "OPTSERVE_WARM_UP": "0",
           "OPTSERVE_DATA_DIR_WAIT_S": str(wait_s)}
    return forked_server.start(env, REPO, log), f"http://127.0.0.1:{port}"


def wait_for(what: str, log: Path, proc: forked_server.ServerProcess) -> None:
    deadline = time.monotonic() + 120
    while what not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        time.sleep(0.05)


def test_a_second_server_refuses_the_data_dir_and_leaves_the_first_whole(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Proc(data).start()
    second = None
    try:
        local = Local()
        assert httpx.post(f"{first.url}/v1/sessions", json=local.create_body()).status_code == 201
        assert step(first.url, local, 1) == 1
        log = tmp_path / "second.log"
        second, second_url = second_server(data, 1, log)
        assert second.wait(120) == 1, log.read_text(errors="replace")
        text = log.read_text(errors="replace")
        assert first.proc is not None
        assert (f"optserve: cannot start: the data directory {data.resolve()} is in use by "
                f"another optserve process (pid {first.proc.pid} on ") in text
        assert "still after 1 s" in text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{second_url}/readyz", timeout=2)
        # the first goes on as if the second had never been started, and keeps what it acked
        assert step(first.url, local, 2) == 2
        assert_holds(first.url, local, 2)
        first.kill9()
        first.start()
        assert_holds(first.url, local, 2)
        assert step(first.url, local, 3) == 3
    finally:
        if second is not None and second.poll() is None:
            second.kill()
        first.stop()


def test_a_waiting_server_takes_over_with_every_acknowledged_step(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = Proc(data).start()
    second = None
    try:
        local = Local()
        assert httpx.post(f"{first.url}/v1/sessions", json=local.create_body()).status_code == 201
        assert step(first.url, local, 1) == 1
        log = tmp_path / "second.log"
        second, second_url = second_server(data, 600, log)
        assert first.proc is not None
        wait_for(f"in use by another optserve process (pid {first.proc.pid} on ", log, second)
        # acknowledged by the first while the second waits: the second must restore it
        assert step(first.url, local, 2) == 2
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{second_url}/readyz", timeout=2)
        first.kill9()
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{second_url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert second.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        assert_holds(second_url, local, 2)
        assert step(second_url, local, 3) == 3
        assert (f"optserve ready on device cpu: 1 stored session(s) restored from "
                f"{data.resolve()} (durability step)") in log.read_text(errors="replace")
        assert f"pid {second.pid} on " in (data / ".lock").read_text()
    finally:
        if second is not None and second.poll() is None:
            second.kill()
            second.wait(30)
        first.stop()
