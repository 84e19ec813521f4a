"""SIGTERM on a Ray-engine front (two ``python -m app`` fronts on one local Ray cluster, sharing
its host actors): the draining front answers what waits through it at once, and only that.

A sync round of three workers is open (w1 pushed through front A, w2 through front B, w3 not
yet), and a long poll waits on each front. SIGTERM to A: w1's push gets 409 ``round_aborted``
(withdrawn from the round: nothing of it applied), A's long poll is answered with the current
state (200, version 0), and A exits 0 without waiting for the round's timeout or the poll's
60 s. B's worker and B's long poll keep waiting (B is not draining): the round still holds w2.
A starts again (a rolling restart); w1 pushes again with its key through it, w3 through B: the
round steps once, every worker gets torch's Adam step on the mean of the three gradients, B's
long poll is answered with it, and a further retry of w1's key is replayed, not applied.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from tests.conftest import kill_hosts
from tests.integration.test_ray_cluster import Front, ready_front, start_front
from tests.torch_reference import adam_after as reference_adam_after
from tests.torch_reference import assert_tensors_equal, make_params

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]
BINARY = "application/octet-stream"
SHAPES = {"w": (3, 4), "b": (4,)}
LR = 0.01
Tensors = dict[str, torch.Tensor]
Answer = httpx.Response | Exception


tensors = partial(make_params, SHAPES)
adam_after = partial(reference_adam_after, lr=LR)


def push(url: str, sid: str, worker: str, key: str, grads: Tensors) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=300) as c:
        return c.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(grads),
                      headers={"Content-Type": BINARY, "Accept": BINARY,
                               "X-Optserve-Worker": worker, "Idempotency-Key": key})


def poll(url: str, sid: str, min_version: int) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=300) as c:
        return c.get(f"/v1/sessions/{sid}/params?min_version={min_version}&wait_s=60",
                     headers={"Accept": BINARY})


def in_thread(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[Answer]]:
    """``call`` running in a thread of its own: the thread, and the list its answer (or
    transport error) lands in."""
    out: list[Answer] = []

    def run() -> None:
        try:
            out.append(call())
        except httpx.TransportError as exc:
            out.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_until(check: Callable[[], bool], what: str) -> None:
    """Until ``check`` holds (a generous bound that only catches a hang)."""
    deadline = time.monotonic() + 120
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


def pending(url: str, sid: str) -> list[str]:
    with httpx.Client(base_url=url, timeout=60) as c:
        out: list[str] = c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"]
        return out


def the_answer(thread: threading.Thread, out: list[Answer]) -> httpx.Response:
    thread.join(300)
    assert not thread.is_alive() and len(out) == 1, out
    answer = out[0]
    assert isinstance(answer, httpx.Response), answer
    return answer


@pytest.fixture
def fronts(ray_cluster: Any, tmp_path: Path) -> Iterator[list[Front]]:
    """Two fronts on one data directory and cluster; the test may replace one (a restart)."""
    data = tmp_path / "data"
    started = [start_front(ray_cluster, data, tmp_path) for _ in range(2)]
    try:
        for i, f in enumerate(started):
            started[i] = ready_front(ray_cluster, data, tmp_path, f)
        yield started
    finally:
        for f in started:
            if f.proc.poll() is None:
                f.proc.send_signal(signal.SIGTERM)
        for f in started:
            try:
                f.proc.wait(60)
            except Exception:  # noqa: BLE001 - whatever it is, it goes
                f.proc.kill()
        kill_hosts(data)


def test_a_draining_front_answers_its_own_round_pushes_and_long_polls(
        ray_cluster: Any, tmp_path: Path, fronts: list[Front]) -> None:
    a, b = fronts
    sid, p0 = "drained-front", tensors(1)
    g = {w: tensors(10 + i) for i, w in enumerate(("w1", "w2", "w3"))}
    keys = {w: f"drain-{w}-{time.time_ns()}" for w in g}
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": LR},
            "sync": {"workers": 3, "timeout_s": 600},
            "params": {n: {"dtype": "float32", "shape": list(t.shape),
                           "data": t.reshape(-1).tolist()} for n, t in p0.items()}}
    with httpx.Client(base_url=a.url, timeout=300) as c:
        made = c.post("/v1/sessions", json=body)
        assert made.status_code == 201, made.text

    # w1 waits in the round through A, w2 through B; a long poll waits on each front
    w1 = in_thread(lambda: push(a.url, sid, "w1", keys["w1"], g["w1"]))
    wait_until(lambda: pending(b.url, sid) == ["w1"], "w1 in the round")
    w2 = in_thread(lambda: push(b.url, sid, "w2", keys["w2"], g["w2"]))
    wait_until(lambda: pending(b.url, sid) == ["w1", "w2"], "w2 in the round")
    poll_a = in_thread(lambda: poll(a.url, sid, 1))
    poll_b = in_thread(lambda: poll(b.url, sid, 1))
    time.sleep(1.0)  # (the polls wait for version 1)
    assert not (w1[1] or w2[1] or poll_a[1] or poll_b[1])

    a.proc.send_signal(signal.SIGTERM)
    aborted = the_answer(*w1)
    assert aborted.status_code == 409, aborted.text
    assert aborted.json()["code"] == "round_aborted"
    polled = the_answer(*poll_a)
    assert polled.status_code == 200, polled.text
    assert polled.headers["X-Optserve-Version"] == "0"
    assert_tensors_equal(safetensors.torch.load(polled.content), p0, "polled at the drain")
    assert a.proc.wait(120) == 0, a.log.read_text()[-3000:]

    # B is not draining: its worker and its poll still wait; the round holds w2 alone
    assert pending(b.url, sid) == ["w2"]
    assert w2[0].is_alive() and poll_b[0].is_alive()

    # the rolling restart: A again; w1's retry (same key) through it, w3 through B
    a = fronts[0] = ready_front(ray_cluster, tmp_path / "data", tmp_path,
                                start_front(ray_cluster, tmp_path / "data", tmp_path))
    w3 = in_thread(lambda: push(b.url, sid, "w3", keys["w3"], g["w3"]))
    wait_until(lambda: pending(b.url, sid) == ["w2", "w3"], "w3 in the round")
    again = push(a.url, sid, "w1", keys["w1"], g["w1"])
    mean = {n: g["w1"][n].clone().add_(g["w2"][n]).add_(g["w3"][n]).div_(3) for n in p0}
    want = adam_after(p0, mean)
    for answer in (again, the_answer(*w2), the_answer(*w3), the_answer(*poll_b)):
        assert answer.status_code == 200, answer.text
        assert answer.headers["X-Optserve-Version"] == "1"
        assert_tensors_equal(safetensors.torch.load(answer.content), want, "the round")

    replayed = push(a.url, sid, "w1", keys["w1"], g["w1"])
    assert replayed.status_code == 200, replayed.text
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.headers["X-Optserve-Version"] == "1"
    for front in (a, b):
        with httpx.Client(base_url=front.url, timeout=60) as c:
            got = c.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
            assert got.status_code == 200, got.text
            assert got.headers["X-Optserve-Version"] == "1"
            assert_tensors_equal(safetensors.torch.load(got.content), want, "pulled")
            assert c.get(f"/v1/sessions/{sid}").json()["sync"]["pending"] == []
