"""kill -9 under steps through shared memory: every step the same-host transport acknowledged
(durability ``step``, the server's default) is in the session after a restart, and the
session equals an in-process torch run of exactly the steps it holds (the acknowledged ones,
and at most the one in flight when the server died)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import optserve
from tests.integration.test_durability import Proc

pytestmark = pytest.mark.integration
N, STEPS = 4096, 400


def grad(k: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(1000 + k))


def replay(p0: torch.Tensor, steps: int) -> torch.Tensor:
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=1e-2)
    for k in range(steps):
        p.grad = grad(k)
        opt.step()
    return p.detach()


@pytest.mark.timeout(600)
def test_acknowledged_shared_memory_steps_survive_kill9(tmp_path: Path) -> None:
    proc = Proc(tmp_path / "data")
    try:
        run(proc)
    finally:
        proc.stop()


def run(proc: Proc) -> None:
    proc.start()
    p0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
    acked = 0
    killed = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 60
        while acked < 25 and time.monotonic() < deadline:  # well into the run, mid-step
            time.sleep(0.001)
        proc.kill9()
        killed.set()

    with optserve.Client(proc.url, transport="local", max_retries=0, timeout=30) as c:
        sid = c.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"w": p0}).id
        assert c.get_session(sid).durability == "step"
        thread = threading.Thread(target=killer)
        thread.start()
        try:
            for k in range(STEPS):
                out = c.step(sid, {"w": grad(k)})
                assert out.version == k + 1
                if k == 0:  # through shared memory
                    assert c._local is not None and sid in c._local._bindings
                acked = k + 1
        except (optserve.OptserveError, OSError, ConnectionError):
            pass
        thread.join(60)
        assert killed.is_set() and 25 <= acked < STEPS, acked
    proc.start()
    with optserve.Client(proc.url, transport="http") as c:
        held = c.get_session(sid).version
        assert held in (acked, acked + 1), (held, acked)
        got = c.get_params(sid).params["w"]
        assert torch.equal(got, replay(p0, held)), (held, acked)
        out = c.step(sid, {"w": grad(held)})  # and it goes on as torch does
        assert out.params is not None and torch.equal(out.params["w"], replay(p0, held + 1))


def test_a_reconnect_dropped_before_its_hello_is_answered_is_retried(tmp_path: Path) -> None:
    """kill -9 while a client connects again: the dying server's socket can still take the
    connection, then drops it before the hello is answered (a listener at the old socket's path
    that closes every connection it takes stands for it here). ``RemoteOptimizer.step`` rides
    that out as any dropped connection: the restarted server names its new socket and the step
    is applied there, once; it raised the socket's own ``ConnectionError`` instead."""
    proc = Proc(tmp_path / "data")
    dropped = 0
    listener: socket.socket | None = None

    def drop_all() -> None:
        nonlocal dropped
        assert listener is not None
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            dropped += 1
            conn.close()

    try:
        proc.start()
        p0 = torch.randn(N, generator=torch.Generator().manual_seed(3))
        mine = p0.clone().requires_grad_(True)
        with optserve.Client(proc.url, transport="auto", max_retries=3, timeout=30) as c:
            opt = optserve.RemoteOptimizer([mine], "Adam", client=c, lr=1e-2)
            mine.grad = grad(0)
            opt.step()
            old = httpx.get(f"{proc.url}/v1/transport").json()["local"]["socket"]
            assert c._local_path == old and c._thread.channel.connected  # through it
            proc.kill9()
            os.unlink(old)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(old)
            listener.listen()
            threading.Thread(target=drop_all, daemon=True).start()
            proc.start()
            mine.grad = grad(1)
            opt.step()
            assert dropped >= 1
            assert c.get_session(opt.session_id).step == 2
        assert torch.equal(mine.detach(), replay(p0, 2))
    finally:
        if listener is not None:
            listener.close()
        proc.stop()
