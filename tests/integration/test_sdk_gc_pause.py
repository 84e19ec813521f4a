"""The SDK's garbage-collector pause (``optserve._gc``) covers a many-tensor exchange's encoding
and decoding, not the wait for its answer: a sync round's push may wait long for the other
workers, and the collector is process-wide. ``Client.step`` and ``Client.create_session``
pause by themselves (1,000 tensors or more), as ``RemoteOptimizer`` does.

The server runs in a process of its own here: ``gc.isenabled()`` in this process then says
only what the SDK does (an in-process server pauses the same collector while it reads a
many-tensor body)."""

from __future__ import annotations

import gc
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import optserve
from optserve import _local

pytestmark = pytest.mark.integration

N = 1200  # tensors: past optserve._gc.PAUSE_GC_TENSORS


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """``python -m app`` on a random loopback port (CPU, nothing on disk kept)."""
    data = Path(tempfile.mkdtemp(prefix="h4gc-"))
    log = data / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    for _ in range(4):  # another port when the picked one was taken
        port = random.randint(20000, 40000)
        env.update(OPTSERVE_HOST="127.0.0.1", OPTSERVE_PORT=str(port), OPTSERVE_DEVICE="cpu",
                   OPTSERVE_DATA_DIR=str(data / str(port)), OPTSERVE_DURABILITY="memory",
                   OPTSERVE_LOG_LEVEL="warning")
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "app"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=out)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        with httpx.Client(timeout=1) as poll:  # one client: no new TLS context per try
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    if poll.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.2)
        if proc.poll() is None:
            break
    assert proc.poll() is None, log.read_text()
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


Points = list[tuple[str, bool]]


class Spy(httpx.BaseTransport):
    """An HTTP transport noting whether the collector runs when a request goes out (and,
    for a step, is answered only when its round has stepped)."""

    def __init__(self, points: Points, sending: threading.Event | None = None) -> None:
        self._real = httpx.HTTPTransport()
        self._points = points
        self._sending = sending

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(("/step", "/v1/sessions")):
            self._points.append(("wait", gc.isenabled()))
            if self._sending is not None:
                self._sending.set()
        return self._real.handle_request(request)

    def close(self) -> None:
        self._real.close()


def spy_on_coding(monkeypatch: pytest.MonkeyPatch, points: Points) -> None:
    """Note ``gc.isenabled()`` where a step or a create encodes and where its answer is
    decoded, over HTTP and over the same-host transport."""
    def noting(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            points.append((name, gc.isenabled()))
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(optserve._sparse, "encode_tensor_map",
                        noting("encode", optserve._sparse.encode_tensor_map))
    monkeypatch.setattr(optserve._api, "_groups", noting("encode", optserve._api._groups))
    monkeypatch.setattr(optserve._api, "_tensor_response",
                        noting("decode", optserve._api._tensor_response))
    monkeypatch.setattr(optserve._api, "_parse_session",
                        noting("decode", optserve._api._parse_session))
    monkeypatch.setattr(_local, "_copy_all", noting("encode", _local._copy_all))
    monkeypatch.setattr(optserve._api, "step_result", noting("decode", optserve._api.step_result))
    real_exchange = _local.LocalChannel._exchange

    def exchange(self: Any, message: dict[str, Any], *args: Any) -> Any:
        if message.get("op") == "step":
            points.append(("wait", gc.isenabled()))
        return real_exchange(self, message, *args)
    monkeypatch.setattr(_local.LocalChannel, "_exchange", exchange)


def values(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(3, generator=g) for i in range(n)}


@pytest.mark.parametrize(("transport", "binary"), [("http", True), ("http", False),
                                                    ("local", True)])
def test_client_step_and_create_pause_only_to_encode_and_decode(
        served: str, monkeypatch: pytest.MonkeyPatch, transport: str, binary: bool) -> None:
    """A plain ``Client`` creating and stepping a session of 1,200 tensors (safetensors or
    JSON, over HTTP or shared memory): the collector is paused where the request is encoded
    and where the answer is decoded, and runs while the answer is awaited; with 10 tensors
    it is never paused. The parameters equal a local SGD's bit for bit."""
    points: Points = []
    spy_on_coding(monkeypatch, points)
    for n in (N, 10):
        init = values(n, 1)
        master = {k: v.clone().requires_grad_() for k, v in init.items()}
        local = torch.optim.SGD(master.values(), lr=0.1, momentum=0.9)
        with httpx.Client(transport=Spy(points), timeout=60) as http, \
                optserve.Client(served, http_client=http, transport=transport,
                                max_retries=0) as client:
            points.clear()
            sid = client.create_session("SGD", init, options={"lr": 0.1, "momentum": 0.9},
                                        binary=binary).id
            paused = n >= 1000
            assert points == [("encode", not paused), ("wait", True), ("decode", not paused)]
            for k in range(2):
                grads = values(n, 10 + k)
                points.clear()
                result = client.step(sid, grads, binary=binary)
                assert points == [("encode", not paused), ("wait", True),
                                  ("decode", not paused)], (n, k)
                for name, g in grads.items():
                    master[name].grad = g
                local.step()
            assert result.params is not None
            for name, p in master.items():
                assert torch.equal(result.params[name], p.detach()), name
            client.delete_session(sid)
    assert gc.isenabled()


def test_a_sync_round_waits_with_the_collector_running(
        served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A (a ``RemoteOptimizer`` of 1,200 parameters) pushes into a sync round of two
    and waits for worker B: while it waits the collector runs (it is paused only while A
    encodes its push and decodes the answer, and while B, a plain ``Client.step``, does).
    Both get the parameters of one SGD step with the summed gradients, torch's bit for bit."""
    points: Points = []
    spy_on_coding(monkeypatch, points)
    init = values(N, 2)
    grads_a, grads_b = values(N, 20), values(N, 21)
    master = {k: v.clone().requires_grad_() for k, v in init.items()}
    for name, p in master.items():
        p.grad = grads_a[name] + grads_b[name]
    torch.optim.SGD(master.values(), lr=0.1).step()

    sending = threading.Event()
    with optserve.Client(served, transport="http", max_retries=0) as client_b, \
            httpx.Client(transport=Spy(points, sending), timeout=60) as http, \
            optserve.Client(served, http_client=http, transport="http",
                            max_retries=0) as client_a:
        sid = client_b.create_session("SGD", init, options={"lr": 0.1}, sync={
            "workers": 2, "reduce": "sum", "timeout_s": 60, "on_timeout": "fail"}).id
        params_a = {k: v.clone() for k, v in init.items()}
        worker_a = optserve.RemoteOptimizer(list(params_a.items()), client=client_a,
                                            session_id=sid, worker="a")
        for name, p in params_a.items():
            p.grad = grads_a[name]
        failed: list[BaseException] = []

        def push_a() -> None:
            try:
                worker_a.step()
            except BaseException as exc:  # noqa: BLE001 - reported by the test below
                failed.append(exc)
        points.clear()
        thread = threading.Thread(target=push_a)
        thread.start()
        assert sending.wait(60)
        # A is in its request now: answered only once B has pushed
        waiting = gc.isenabled()
        points.append(("B", True))
        result = client_b.step(sid, grads_b, worker="b")
        thread.join(60)
        assert not thread.is_alive() and not failed, failed
        assert waiting, "the collector was paused while worker A waited for the round"
        a_points = points[:points.index(("B", True))]
        assert a_points == [("encode", False), ("wait", True)]
        assert points[len(a_points) + 1:] == [("encode", False), ("decode", False),
                                              ("decode", False)]
        assert result.params is not None
        for name, p in master.items():
            assert torch.equal(params_a[name], p.detach()), name
            assert torch.equal(result.params[name], p.detach()), name
        client_b.delete_session(sid)
    assert gc.isenabled()


class PathSpy(Spy):
    """:class:`Spy` noting every request to a session's parameters or steps."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if "/params" in request.url.path or "/step" in request.url.path:
            self._points.append(("wait", gc.isenabled()))
        return self._real.handle_request(request)


def spy_on_tensors(monkeypatch: pytest.MonkeyPatch, points: Points) -> None:
    """Note ``gc.isenabled()`` where tensors are encoded (``put_params``, LBFGS evaluations),
    where an answer's tensors are decoded, and where ``RemoteOptimizer`` gathers gradients
    and copies values into its parameters."""
    def noting(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            points.append((name, gc.isenabled()))
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(optserve._tensors, "encode_tensor_map",
                        noting("encode", optserve._tensors.encode_tensor_map))
    monkeypatch.setattr(optserve._api, "_tensor_response",
                        noting("decode", optserve._api._tensor_response))
    opt = optserve.RemoteOptimizer
    monkeypatch.setattr(opt, "_grads", noting("grads", opt._grads))
    monkeypatch.setattr(opt, "_copy_in", noting("copy", opt._copy_in))


@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_pulls_and_puts_pause_only_to_encode_and_decode(
        served: str, monkeypatch: pytest.MonkeyPatch, binary: bool) -> None:
    """``put_params``, ``get_params`` (a long poll too), ``pull_rows``, a ``Client.step`` of a
    few gradients whose answer holds every parameter, and ``RemoteOptimizer.push_params`` /
    ``pull_params`` of 1,200 tensors: the collector is paused where tensors are encoded,
    decoded or copied in, and runs while each answer is awaited; with 10 tensors it is never
    paused. Pulls, puts and their answers used to be encoded and decoded with it running."""
    points: Points = []
    spy_on_tensors(monkeypatch, points)
    for n in (N, 10):
        paused = n >= 1000
        with httpx.Client(transport=PathSpy(points), timeout=60) as http, \
                optserve.Client(served, http_client=http, transport="http",
                                max_retries=0) as client:
            sid = client.create_session("SGD", values(n, 3), options={"lr": 0.5}).id
            put = values(n, 4)
            points.clear()
            assert client.put_params(sid, put, binary=binary).version == 1
            assert points == [("encode", not paused), ("wait", True), ("decode", not paused)]

            points.clear()
            pulled = client.get_params(sid, binary=binary, min_version=1, wait_s=5)
            assert points == [("wait", True), ("decode", not paused)], n
            assert all(torch.equal(pulled.params[k], v) for k, v in put.items())

            points.clear()
            rows = client.pull_rows(sid, {k: [0, 2] for k in put}, binary=binary)
            assert points == [("wait", True), ("decode", not paused)], n
            for k, v in put.items():
                assert torch.equal(rows.params[k]._values(), v[[0, 2]]), k

            points.clear()  # a step of one gradient: its answer holds every parameter
            stepped = client.step(sid, {"p0": torch.ones(3)}, binary=binary)
            assert points == [("wait", True), ("decode", not paused)], n
            assert stepped.params is not None
            assert torch.equal(stepped.params["p0"], put["p0"] - 0.5)
            assert all(torch.equal(stepped.params[k], v) for k, v in put.items() if k != "p0")

            params = {k: v.clone() for k, v in values(n, 5).items()}
            opt = optserve.RemoteOptimizer(list(params.items()), "SGD", client, lr=0.5,
                                           binary=binary)
            fresh = values(n, 6)
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(fresh[k])
            points.clear()
            opt.push_params()
            assert points == [("encode", not paused), ("wait", True), ("decode", not paused)]
            client.put_params(opt.session_id, values(n, 7), binary=binary)  # another writer
            points.clear()
            opt.pull_params()
            assert points == [("wait", True), ("decode", not paused), ("copy", not paused)]
            assert all(torch.equal(params[k], v) for k, v in values(n, 7).items())
            client.delete_session(opt.session_id)
            client.delete_session(sid)
    assert gc.isenabled()


def test_lbfgs_evaluations_pause_only_to_encode_and_decode(
        served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``RemoteOptimizer("LBFGS")`` step of 1,200 parameters: every evaluation's gradients
    are gathered and encoded, and every point the line search tries decoded and copied in,
    with the collector paused; it runs while the closure runs and while each answer is
    awaited (10 parameters: never paused). The parameters equal torch's LBFGS bit for bit.
    Evaluations used to be encoded and decoded with it running."""
    points: Points = []
    spy_on_tensors(monkeypatch, points)
    for n in (N, 10):
        paused = n >= 1000
        targets = values(n, 8)
        init = values(n, 9)

        def closure_for(params: dict[str, torch.Tensor], noted: bool,
                        targets: dict[str, torch.Tensor] = targets) -> Any:
            def closure() -> torch.Tensor:
                if noted:
                    points.append(("closure", gc.isenabled()))
                for p in params.values():
                    p.grad = None
                loss = sum(((p - targets[k]) ** 2 * (1 + int(k[1:]) % 3)).sum()
                           for k, p in params.items())
                assert isinstance(loss, torch.Tensor)
                loss.backward()
                return loss
            return closure
        local = {k: v.clone().requires_grad_() for k, v in init.items()}
        torch.optim.LBFGS(local.values(), lr=1, max_iter=4).step(closure_for(local, False))
        remote = {k: v.clone().requires_grad_() for k, v in init.items()}
        with httpx.Client(transport=PathSpy(points), timeout=60) as http, \
                optserve.Client(served, http_client=http, transport="http",
                                max_retries=0) as client:
            opt = optserve.RemoteOptimizer(list(remote.items()), "LBFGS", client, lr=1,
                                           max_iter=4)
            points.clear()
            opt.step(closure_for(remote, True))
            opt.close(delete_session=True)
        assert points.count(("wait", True)) >= 3, points  # an opening and 2+ evaluations
        assert points.count(("wait", True)) == points.count(("encode", not paused))
        assert {name for name, _ in points} == {"closure", "grads", "encode", "wait", "decode",
                                                "copy"}
        for name, enabled in points:
            assert enabled == (name in ("wait", "closure") or not paused), (n, name)
        for k, p in local.items():
            assert torch.equal(remote[k], p.detach()), k
    assert gc.isenabled()
