"""The same-host transport against a real server: steps through shared memory equal
in-process torch bitwise (SDK ``Client`` and ``RemoteOptimizer``); the socket's path is told
only to loopback clients; only the server's user can reach it; keys and tenants hold; a crashed
client's segments are freed; a broken connection is retried with the step's key and applied
once; and ``transport="http"`` never uses it."""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import LiveServer, _test_settings
from fastapi.testclient import TestClient

import optserve
from app.main import create_app
from app.transport.local import LocalTransport
from optserve._local import LocalUnavailable

pytestmark = pytest.mark.integration
KEY_A, KEY_B = "a" * 24, "b" * 24


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    live = LiveServer(_test_settings(api_keys=f"{KEY_A}:alpha,{KEY_B}:beta",
                                     durability="memory"))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


def socket_path(url: str, key: str | None = KEY_A) -> str:
    with optserve.Client(url, api_key=key, transport="http") as c:
        local = c._request(optserve._api.transport())["local"]
    assert local is not None
    return str(local["socket"])


def local_adam(p0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=1e-2)
    for g in grads:
        p.grad = g
        opt.step()
    return p.detach()


def test_steps_through_shared_memory_equal_torch(keyed_server: str) -> None:
    p0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    with optserve.Client(keyed_server, api_key=KEY_A) as c:
        info = c.create_session(optimizer="Adam", options={"lr": 1e-2},
                                params={"w": p0, "b": torch.zeros(2)})
        results = [c.step(info.id, {"w": g}) for g in grads]
        assert c._local is not None, "a loopback client uses the same-host transport"
        assert [r.version for r in results] == [1, 2, 3, 4]
        assert torch.equal(results[-1].params["w"], local_adam(p0, grads))
        # each result owns its values (the shared slots are overwritten by the next step)
        assert not torch.equal(results[0].params["w"], results[-1].params["w"])
        over_http = c._request(optserve._api.get_params(info.id, None, binary=True))
        assert torch.equal(over_http.params["w"], results[-1].params["w"])


def test_remote_optimizer_over_shared_memory_equals_local_training(keyed_server: str) -> None:
    torch.manual_seed(0)
    local_model = torch.nn.Linear(6, 2)
    remote_model = torch.nn.Linear(6, 2)
    remote_model.load_state_dict(local_model.state_dict())
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    with optserve.Client(keyed_server, api_key=KEY_A) as c:
        local = torch.optim.AdamW(local_model.parameters(), lr=1e-2)
        remote = optserve.RemoteOptimizer(remote_model.parameters(), optimizer="AdamW",
                                          client=c, lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(remote, 2, 0.5)
        local_sched = torch.optim.lr_scheduler.StepLR(local, 2, 0.5)
        for _ in range(6):
            for model, opt, s in ((local_model, local, local_sched),
                                  (remote_model, remote, sched)):
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                s.step()
        assert c._local is not None
        for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("durability", ["memory", "step"])
def test_many_small_tensors_of_mixed_dtypes_over_shared_memory_equal_torch(
        durability: str, tmp_path: Path) -> None:
    """Many small parameters of three dtypes (their gradient slots laid end to end per dtype,
    checked once and then known to the session, reduced one run at a time): bitwise equal to
    in-process SGD with momentum, through a step with a NaN that is refused whole."""
    live = LiveServer(_test_settings(durability=durability, data_dir=str(tmp_path)))
    url = live.start()
    try:
        gen = torch.Generator().manual_seed(0)
        dtypes = [torch.float32, torch.float64, torch.bfloat16]
        shapes = [(3,), (2, 2), (0,), (5,), (1,)]
        init = {f"p{i:03d}": torch.randn(shapes[i % 5], generator=gen).to(dtypes[i % 3])
                for i in range(120)}
        ref = {n: t.clone().requires_grad_(True) for n, t in init.items()}
        local = torch.optim.SGD(list(ref.values()), lr=0.1, momentum=0.9)
        with optserve.Client(url) as c:
            info = c.create_session(optimizer="SGD", options={"lr": 0.1, "momentum": 0.9},
                                    params=init)
            for k in range(4):
                grads = {n: torch.randn(t.shape, generator=gen).to(t.dtype)
                         for n, t in init.items()}
                if k == 2:  # refused whole, the session unchanged
                    grads["p004"] = torch.full_like(grads["p004"], float("nan"))
                    with pytest.raises(optserve.ValidationError) as bad:
                        c.step(info.id, grads)
                    assert "p004" in str(bad.value)
                    continue
                result = c.step(info.id, grads)
                for n, p in ref.items():
                    p.grad = grads[n]
                local.step()
            assert c._local is not None
            for n, p in ref.items():
                assert torch.equal(result.params[n], p.detach()), n
    finally:
        live.stop()


def test_the_path_is_told_only_to_loopback_clients() -> None:
    settings = _test_settings(durability="memory")
    app = create_app(settings)
    with TestClient(app, client=("10.1.2.3", 5000)) as remote:
        assert remote.get("/v1/transport").json() == {"local": None}
    with TestClient(create_app(settings), client=("127.0.0.1", 5000)) as near:
        local = near.get("/v1/transport").json()["local"]
        path = Path(local["socket"])
        assert local["protocol"] == 1 and path.name == "optserve.sock"
        mode = stat.S_IMODE(path.parent.stat().st_mode)
        assert mode == 0o700, oct(mode)  # no other local user can enter the directory


def frames(sock: socket.socket, message: dict[str, object]) -> dict[str, object]:
    """One same-host request and its answer (a segment's descriptor sent with it closed)."""
    body = json.dumps(message).encode()
    sock.sendall(struct.pack("<I", len(body)) + body)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
    for fd in fds:
        os.close(fd)
    while len(data) < 4:
        data += sock.recv(4 - len(data))
    (n,) = struct.unpack("<I", data[:4])
    while len(data) < 4 + n:
        data += sock.recv(4 + n - len(data))
    return dict(json.loads(data[4:4 + n]))


def test_keys_and_tenants_hold_on_the_socket(keyed_server: str) -> None:
    path = socket_path(keyed_server)
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        sid = a.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"x": torch.tensor([2.0])}).id
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        answer = frames(s, {"op": "hello", "key": "wrong" * 5})
        assert answer["ok"] is False and answer["problem"]["code"] == "unauthorized"  # type: ignore[index]
        # a 401 naming the key, as over HTTP (it was a 500 "Internal error": the client's
        # mistake as the server's)
        assert answer["problem"]["status"] == 401  # type: ignore[index]
        assert answer["problem"]["title"] == "Unauthorized"  # type: ignore[index]
        assert answer["problem"]["field"] == "key"  # type: ignore[index]
        answer = frames(s, {"op": "bind", "session": sid})
        assert answer["ok"] is False  # nothing before a valid hello
        assert answer["problem"]["code"] == "unauthorized"  # type: ignore[index]
        assert answer["problem"]["status"] == 401  # type: ignore[index]
        assert answer["problem"]["field"] == "op"  # type: ignore[index]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # another tenant
        s.connect(path)
        assert frames(s, {"op": "hello", "key": KEY_B})["ok"] is True
        answer = frames(s, {"op": "bind", "session": sid})
        assert answer["ok"] is False
        assert answer["problem"]["code"] == "session_not_found"  # type: ignore[index]
        assert answer["problem"]["field"] == "session"  # type: ignore[index]
        answer = frames(s, {"op": "step", "binding": 1, "grads": []})
        assert answer["problem"]["code"] == "unknown_binding"  # type: ignore[index]


def open_fds() -> set[str]:
    """What this process's open file descriptors point at (one another thread closes while
    they are listed is left out: it is not open)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.add(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:
            pass
    return found


def held() -> set[str]:
    """What this process's descriptors point at and the files it has mapped (a segment the
    server holds is a mapping, not a descriptor: the server maps it without one)."""
    with open("/proc/self/maps") as maps:
        mapped = {line.split(maxsplit=5)[5].strip() for line in maps
                  if len(line.split(maxsplit=5)) == 6}
    return open_fds() | mapped


def test_a_crashed_client_leaks_no_segment(keyed_server: str) -> None:
    """The server holds a bound segment only while the binding connection lives: a client
    killed with SIGKILL takes its segments with it (their memfds close at once)."""
    path = socket_path(keyed_server)
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        sid = a.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"x": torch.zeros(1000)}).id
    segment = f"memfd:optserve-{sid}"
    assert not any(segment in fd for fd in held())
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, socket, struct, sys, time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.connect({path!r})
        def call(m):
            b = json.dumps(m).encode(); s.sendall(struct.pack("<I", len(b)) + b)
            data, fds, _, _ = socket.recv_fds(s, 1 << 20, 4); return data
        call({{"op": "hello", "key": {KEY_A!r}}}); call({{"op": "bind", "session": {sid!r}}})
        print("bound", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "bound"
        assert any(segment in fd for fd in held())  # the server holds it
        child.kill()
        child.wait(10)
        deadline = time.monotonic() + 10
        while any(segment in fd for fd in held()):
            assert time.monotonic() < deadline, "the segment outlived its client"
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


def test_a_broken_connection_is_retried_with_the_steps_key(keyed_server: str) -> None:
    """The connection dies after the server applied the step (we close it under the client):
    the client reconnects, binds again, resends with the same key, and the server answers
    from its table: one step, not two."""
    with optserve.Client(keyed_server, api_key=KEY_A) as c:
        sid = c.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"x": torch.tensor([2.0])}).id
        assert c.step(sid, {"x": torch.tensor([16.0])}).params["x"].tolist() == [-14.0]
        channel = c._local
        assert channel is not None
        real = channel._exchange
        calls = {"n": 0}

        def flaky(message: dict[str, object]) -> tuple[dict[str, object], list[int]]:
            answer = real(message)
            if message.get("op") == "step" and calls["n"] == 0:
                calls["n"] += 1
                assert channel._sock is not None
                channel._sock.close()  # the answer is lost with the connection
                raise ConnectionResetError("simulated")
            return answer
        channel._exchange = flaky  # type: ignore[method-assign]
        out = c.step(sid, {"x": torch.tensor([-112.0])})
        assert out.replayed and out.version == 2 and out.params["x"].tolist() == [98.0]
        assert c.get_session(sid).version == 2


def test_an_interrupted_step_leaves_no_answer_to_the_next(keyed_server: str) -> None:
    """A step interrupted while it awaits its answer (a ``KeyboardInterrupt``, any exception
    in the read) closes its connection: the next step connects again and reads its own
    answer. The connection stayed open with the interrupted step's answer unread, so the next
    step took that answer as its own (its version, and the parameter slots while the server
    was still writing them), and every later step the answer of the one before."""
    import select

    with optserve.Client(keyed_server, api_key=KEY_A, timeout=10) as c:
        sid = c.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"x": torch.tensor([2.0])}).id
        first = c.step(sid, {"x": torch.tensor([1.0])}).params
        assert first is not None and first["x"].tolist() == [1.0]
        channel = c._local
        assert channel is not None
        real = channel._recv_exact
        armed = [True]

        def interrupted(n: int, fds: list[int]) -> bytes:
            if armed and armed.pop():
                assert channel._sock is not None
                select.select([channel._sock], [], [], 10)  # (its answer has come, unread)
                raise KeyboardInterrupt
            return real(n, fds)
        channel._recv_exact = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            c.step(sid, {"x": torch.tensor([1.0])})  # applied by the server: x = 0
        for version, x in ((3, -1.0), (4, -2.0), (5, -3.0)):
            out = c.step(sid, {"x": torch.tensor([1.0])})
            assert out.params is not None
            assert (out.version, out.params["x"].tolist()) == (version, [x])
        assert c._local is channel and c.get_session(sid).version == 5


@pytest.mark.parametrize("sync", [True, False], ids=["sync-round", "async"])
def test_threads_that_share_a_client_step_through_their_own_segments(keyed_server: str,
                                                                      sync: bool) -> None:
    """Two workers in two threads of one process, one ``Client`` between them, each with a
    ``RemoteOptimizer`` on the same session: every step goes through shared memory, on a
    connection and segment of the thread's own. A synchronous round's first push used to
    hold the one shared connection while it waited for the round, so the other worker could
    not push and every round timed out (409 ``round_timeout``); and a thread could copy out
    the new values another thread's step had written into the shared slots meanwhile."""
    import threading

    rounds, shape = 4, (3, 5)
    ready = threading.Barrier(2)
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    on_segment: dict[int, bool] = {}
    errors: list[BaseException] = []
    with optserve.Client(keyed_server, api_key=KEY_A, transport="local", max_retries=0) as c:
        sid = c.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"w": torch.zeros(shape)},
                               sync={"workers": 2, "reduce": "sum", "timeout_s": 30}
                               if sync else None).id

        def worker(k: int) -> None:
            try:
                w = torch.zeros(shape, requires_grad=True)
                opt = optserve.RemoteOptimizer([("w", w)], client=c, session_id=sid,
                                               worker=f"w{k}")
                for r in range(rounds):
                    ready.wait(timeout=60)
                    w.grad = torch.full(shape, float(10 ** k * (r + 1)))
                    opt.step()
                    seen[k].append(w.detach().clone())
                on_segment[k] = c._local is not None
            except BaseException as exc:  # noqa: BLE001 - raised in the test below
                errors.append(exc)
                ready.abort()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert on_segment == {0: True, 1: True}
        final = c.get_params(sid).params["w"]
    # every gradient is a whole number: the sums are exact, in any order
    total = -float(sum(10 ** k * (r + 1) for k in range(2) for r in range(rounds)))
    assert torch.equal(final, torch.full(shape, total))
    if sync:  # each round's answer: the sum of both gradients so far, the same for both
        for r in range(rounds):
            want = torch.full(shape, -float(sum(11 * (q + 1) for q in range(r + 1))))
            assert torch.equal(seen[0][r], want) and torch.equal(seen[1][r], want), r
    else:  # each answer is one whole step's values: every element the same
        for k in range(2):
            assert all(bool((v == v.reshape(-1)[0]).all()) for v in seen[k])


def test_the_channels_of_threads_that_have_ended_are_closed(keyed_server: str) -> None:
    """A thread per task (a thread pool made again, a server's thread per request) sharing one
    ``Client``: each new thread's channel closes those of the threads that have ended (their
    connections and segments were kept until ``close()``: 30 threads, 30 connections and
    ~150 open files)."""
    import threading

    with optserve.Client(keyed_server, api_key=KEY_A, transport="local", max_retries=0) as c:
        sid = c.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"w": torch.zeros(100)}).id
        c.step(sid, {"w": torch.ones(100)})
        files = len(os.listdir("/proc/self/fd"))
        for _ in range(30):
            t = threading.Thread(target=c.step, args=(sid, {"w": torch.ones(100)}))
            t.start()
            t.join(timeout=60)
        assert len(c._channels) <= 2  # this thread's and the last one's
        assert len(os.listdir("/proc/self/fd")) <= files + 10
        assert torch.equal(c.get_params(sid).params["w"], torch.full((100,), -31.0))

def test_transport_http_never_uses_the_socket(keyed_server: str) -> None:
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as c:
        sid = c.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"x": torch.tensor([2.0])}).id
        assert c.step(sid, {"x": torch.tensor([16.0])}).params["x"].tolist() == [-14.0]
        assert c._local is None
    with pytest.raises(ValueError):
        optserve.Client(keyed_server, transport="carrier-pigeon")


@pytest.mark.parametrize("durability", ["memory", "step", "interval"])
def test_a_logged_sessions_gradients_are_copied_out_of_the_segment(durability: str) -> None:
    """The client can write its segment at any time: for a session that logs its steps, the
    step takes a copy of each gradient slot, so the record, the checks and the optimizer see
    the same bytes (a memory-only session steps on the slots themselves: no copy)."""
    from types import SimpleNamespace

    from app.transport.local import Binding

    info = SimpleNamespace(params={"w": {"dtype": "float32", "shape": [5, 3]},
                                   "b": {"dtype": "bfloat16", "shape": [2]}},
                           durability=durability)
    binding = Binding("s", info)  # type: ignore[arg-type]
    try:
        for round_ in range(2):  # the copies' buffers are reused from step to step
            sent = {"w": torch.randn(5, 3), "b": torch.randn(2).bfloat16()}
            for name, g in sent.items():
                binding.grads[name].copy_(g)
            got = binding.gradients(["w", "b"])
            for name, g in sent.items():
                assert torch.equal(got[name], g) and got[name].dtype == g.dtype
            binding.grads["w"].fill_(float("nan"))  # the client scribbles on its slot
            assert torch.isnan(got["w"]).all().item() == (durability == "memory"), round_
    finally:
        binding.close()


def test_bindings_per_connection_are_bounded(keyed_server: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection holds at most MAX_BINDINGS segments (each one a file descriptor on the
    server): one more bind is a 429 problem naming the limit, and unbinding one makes room."""
    from app.transport import local

    monkeypatch.setattr(local, "MAX_BINDINGS", 3)
    path = socket_path(keyed_server)
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        sid = a.create_session(optimizer="SGD", options={"lr": 1.0},
                               params={"x": torch.zeros(8)}).id
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        assert frames(s, {"op": "hello", "key": KEY_A})["ok"] is True
        numbers = [frames(s, {"op": "bind", "session": sid})["binding"] for _ in range(3)]
        answer = frames(s, {"op": "bind", "session": sid})
        problem = answer["problem"]
        assert answer["ok"] is False and isinstance(problem, dict)
        assert problem["status"] == 429 and problem["code"] == "too_many_bindings"
        assert problem["field"] == "session" and problem["limit"] == 3
        assert frames(s, {"op": "unbind", "binding": numbers[0]})["ok"] is True
        assert frames(s, {"op": "bind", "session": sid})["ok"] is True


def test_the_sdk_steps_over_http_past_the_limit_and_deleting_unbinds(
        keyed_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sessions past the server's limit of bindings step over HTTP (equal to torch, without
    asking for a binding again each step); deleting a session lets go of its segment at once,
    and frees a place for the next."""
    from app.transport import local

    monkeypatch.setattr(local, "MAX_BINDINGS", 2)
    p0 = torch.randn(50, generator=torch.Generator().manual_seed(5))
    grads = [torch.randn(50, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    with optserve.Client(keyed_server, api_key=KEY_A, transport="auto") as c:
        sids = [c.create_session(optimizer="Adam", options={"lr": 1e-2},
                                 params={"p": p0}).id for _ in range(3)]
        for sid in sids:
            for g in grads:
                out = c.step(sid, {"p": g})
            assert out.params is not None
            assert torch.equal(out.params["p"], local_adam(p0, grads)), sid
        channel = c._local
        assert channel is not None
        assert set(channel._bindings) == set(sids[:2]) and channel._refused == {sids[2]}
        segment = f"memfd:optserve-{sids[0]}"
        assert any(segment in fd for fd in held())  # the server holds it
        c.delete_session(sids[0])
        assert not any(segment in fd for fd in held())
        assert set(channel._bindings) == {sids[1]} and not channel._refused
        c.step(sids[2], {"p": grads[0]})  # now through shared memory
        assert set(channel._bindings) == {sids[1], sids[2]}
        got = c.get_params(sids[2]).params["p"]
        assert torch.equal(got, local_adam(p0, [*grads, grads[0]]))


def test_an_optimizer_closed_or_dropped_lets_go_of_its_segment(keyed_server: str) -> None:
    """A ``RemoteOptimizer`` on a client that outlives it lets go of its session's binding
    when it is closed (``close()`` keeps the session) or garbage collected (at its client's
    next step on that thread), as a dropped ``torch.optim`` optimizer frees its memory. Each
    kept its segment (a descriptor and a mapping here, a mapping in the server) until the
    client closed: one more per optimizer, up to the connection's limit of bindings, past
    which every later optimizer stepped over HTTP."""
    with optserve.Client(keyed_server, api_key=KEY_A) as c:
        def trained(zero_copy: bool) -> tuple[optserve.RemoteOptimizer, str]:
            model = torch.nn.Linear(3, 2)
            opt = optserve.RemoteOptimizer(model.parameters(), "Adam", c, lr=1e-2,
                                           zero_copy=zero_copy)
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            segment = f"memfd:optserve-{opt.session_id}"
            assert c._local is not None and opt.session_id in c._local._bindings
            assert any(segment in fd for fd in held())
            return opt, segment

        closed, segment = trained(zero_copy=False)
        closed.close()
        assert c._local is not None and not c._local._bindings
        assert not any(segment in fd for fd in held())
        c.get_session(closed.session_id)  # (close() keeps the session)
        for zero_copy in (False, True):
            dropped, segment = trained(zero_copy)
            del dropped
            gc.collect()
            kept, _ = trained(zero_copy=False)  # its step lets go of the dropped one's binding
            assert set(c._local._bindings) == {kept.session_id}
            assert not any(segment in fd for fd in held())
            kept.close()


def train_counting_attempts(client: optserve.Client, monkeypatch: pytest.MonkeyPatch,
                            steps: int = 3) -> dict[str, int]:
    """``RemoteOptimizer`` (Adam, a local StepLR) training a small model through ``client``,
    every parameter equal to a local Adam's after each step; how many times the steps tried
    the same-host path (``Client._step_local``), connected to the socket and asked to bind."""
    counts = {"tries": 0, "connects": 0, "binds": 0}
    real_try, real_connect = optserve.Client._step_local, optserve._local.LocalChannel.connect
    real_exchange = optserve._local.LocalChannel._exchange

    def tried(self: optserve.Client, *args: Any, **kwargs: Any) -> Any:
        counts["tries"] += 1
        return real_try(self, *args, **kwargs)

    def connect(self: optserve._local.LocalChannel) -> None:
        counts["connects"] += 1
        real_connect(self)

    def exchange(self: optserve._local.LocalChannel, message: dict[str, Any]) -> Any:
        counts["binds"] += message.get("op") == "bind"
        return real_exchange(self, message)
    monkeypatch.setattr(optserve.Client, "_step_local", tried)
    monkeypatch.setattr(optserve._local.LocalChannel, "connect", connect)
    monkeypatch.setattr(optserve._local.LocalChannel, "_exchange", exchange)
    torch.manual_seed(3)
    local_model, remote_model = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    remote_model.load_state_dict(local_model.state_dict())
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    local = torch.optim.Adam(local_model.parameters(), lr=1e-2)
    remote = optserve.RemoteOptimizer(remote_model.named_parameters(), "Adam", client, lr=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 1, 0.5) for o in (local, remote)]
    for _ in range(steps):
        for model, opt, sched in zip((local_model, remote_model), (local, remote), scheds,
                                     strict=True):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()
        for p, q in zip(local_model.parameters(), remote_model.parameters(), strict=True):
            assert torch.equal(p, q)
    remote.close(delete_session=True)
    return counts


def test_a_refused_binding_is_tried_once_per_step_not_twice(
        keyed_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server binds no more sessions on this connection: each ``RemoteOptimizer`` step
    tries the same-host path once (asking for the binding only the first time, the refusal
    remembered), then steps over HTTP, equal to torch. It tried twice per step: once itself
    and once more in ``Client.step``, its way to HTTP."""
    from app.transport import local

    monkeypatch.setattr(local, "MAX_BINDINGS", 1)
    with optserve.Client(keyed_server, api_key=KEY_A) as c:
        sid = c.create_session("SGD", {"x": torch.zeros(2)}, options={"lr": 1.0}).id
        c.step(sid, {"x": torch.ones(2)})  # the connection's one binding
        channel = c._local
        assert channel is not None and set(channel._bindings) == {sid}
        counts = train_counting_attempts(c, monkeypatch)
        assert counts == {"tries": 3, "connects": 0, "binds": 1}
        assert set(channel._bindings) == {sid} and len(channel._refused) == 1


def test_an_unreachable_socket_is_tried_once_per_step_not_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server names a socket this client cannot connect to (its path gone): the first
    step connects once and every step goes over HTTP, equal to torch, each asking the
    same-host path once (the failed connection remembered). Each step asked twice."""
    live = LiveServer(_test_settings(durability="memory"))
    url = live.start()
    try:
        os.unlink(socket_path(url))
        with optserve.Client(url) as c:
            counts = train_counting_attempts(c, monkeypatch)
            assert counts == {"tries": 3, "connects": 1, "binds": 0}
            assert c._local is None
    finally:
        live.stop()


def test_slots_the_client_cannot_view_are_let_go_and_not_bound_again(
        keyed_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that returns numpy (torch not used) cannot view a bfloat16 slot: the first
    step's binding is let go at once and the session steps over HTTP from then on without
    asking to bind it again, the server holding no segment for it; the values are torch's.
    Every step bound it anew before, and the server kept each segment (up to its limit of
    bindings) until the connection closed."""
    monkeypatch.setattr(optserve._tensors, "USE_TORCH", False)
    binds = []
    real_exchange = optserve._local.LocalChannel._exchange

    def exchange(self: optserve._local.LocalChannel, message: dict[str, Any]) -> Any:
        binds.append(message.get("op") == "bind")
        return real_exchange(self, message)
    monkeypatch.setattr(optserve._local.LocalChannel, "_exchange", exchange)
    p0 = torch.randn(6, generator=torch.Generator().manual_seed(7))
    grads = [torch.randn(6, generator=torch.Generator().manual_seed(8 + k)) for k in range(3)]
    with optserve.Client(keyed_server, api_key=KEY_A) as c:
        sid = c.create_session("Adam", {"w": p0.numpy(), "h": torch.ones(2, dtype=torch.bfloat16)},
                               options={"lr": 1e-2}).id
        for g in grads:
            out = c.step(sid, {"w": g.numpy()}, return_params=False)
        assert out.version == 3 and sum(binds) == 1
        assert not any(f"memfd:optserve-{sid}" in fd for fd in held())
        assert c._local is not None and sid in c._local._unviewable
        got = c.get_params(sid, ["w"]).params["w"]
        assert isinstance(got, np.ndarray)
        assert torch.equal(torch.from_numpy(got), local_adam(p0, grads))
        c.delete_session(sid)
        assert sid not in c._local._unviewable


@pytest.mark.parametrize(("message", "status", "code", "field"), [
    ({"base_version": "abc"}, 422, "invalid_base_version", "base_version"),
    ({"base_version": [1]}, 422, "invalid_base_version", "base_version"),
    ({"base_version": 1.5}, 422, "invalid_base_version", "base_version"),
    ({"base_version": True}, 422, "invalid_base_version", "base_version"),
    ({"worker": {"a": 1}}, 422, "invalid_worker", "worker"),
    ({"worker": "bad worker"}, 422, "invalid_worker", "worker"),
    ({"idempotency_key": 7}, 422, "invalid_idempotency_key", "idempotency_key"),
    ({"return": 5}, 422, "invalid_message", "return"),
    ({"metrics": "none"}, 422, "invalid_message", "metrics"),
    ({"metrics": False}, 422, "invalid_message", "metrics"),
    ({"grads": "x"}, 422, "invalid_message", "grads"),
    ({"grads": ["nope"]}, 422, "unknown_parameter", "grads.nope"),
    ({"op": 7}, 400, "invalid_message", "op"),
    ({"op": "bind", "session": 5}, 422, "invalid_id", "session"),
    ({"op": "bind"}, 422, "missing_field", "session"),
    # json.dumps writes NaN, which is not JSON: answered as over HTTP, not a dropped connection
    ({"scalars": {"loss": float("nan")}}, 400, "invalid_json", "message"),
    ({"binding": "1"}, 404, "unknown_binding", "binding"),
])
def test_a_malformed_message_is_a_problem_naming_its_field_and_changes_nothing(
        keyed_server: str, message: dict[str, object], status: int, code: str,
        field: str) -> None:
    """Every malformed socket message is answered with a 4xx problem naming the message's
    field (never a 500); the session is unchanged: the next valid step equals torch's first."""
    path = socket_path(keyed_server)
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        sid = a.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"x": p0}).id
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        assert frames(s, {"op": "hello", "key": KEY_A})["ok"] is True
        bound = frames(s, {"op": "bind", "session": sid})
        assert bound["ok"] is True
        sent: dict[str, object] = {"op": "step", "binding": bound["binding"], "grads": ["x"],
                                   **message}
        if sent["op"] == "bind":  # (a bind message carries no step fields)
            del sent["binding"], sent["grads"]
        answer = frames(s, sent)
        problem = answer.get("problem")
        assert answer["ok"] is False and isinstance(problem, dict), answer
        assert (problem["status"], problem["code"], problem.get("field")) == (status, code,
                                                                              field)
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        info = a.get_session(sid)
        assert info.version == 0
        out = a.step(sid, {"x": g})
        assert out.params is not None and torch.equal(out.params["x"], local_adam(p0, [g]))


def test_a_frame_that_is_not_a_json_object_is_answered_and_the_connection_kept(
        keyed_server: str) -> None:
    """A whole frame whose bytes are not a JSON object (not JSON, NaN, an array) is a 400
    ``invalid_json`` answer, as an HTTP body is; the connection and its binding stay (it was
    closed without an answer, and its segments with it)."""
    path = socket_path(keyed_server)
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        sid = a.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"x": p0}).id
        a.step(sid, {"x": g})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        assert frames(s, {"op": "hello", "key": KEY_A})["ok"] is True
        bound = frames(s, {"op": "bind", "session": sid})
        assert bound["ok"] is True
        for body in (b'{"op": "pull", "binding": 1, "x": NaN}', b"[1, 2]", b"\xff{", b""):
            s.sendall(struct.pack("<I", len(body)) + body)
            (n,) = struct.unpack("<I", s.recv(4))
            reply = b""
            while len(reply) < n:
                reply += s.recv(n - len(reply))
            answer = json.loads(reply)
            assert answer["ok"] is False, answer
            assert (answer["problem"]["status"], answer["problem"]["code"]) == (
                400, "invalid_json"), answer
        pulled = frames(s, {"op": "pull", "binding": bound["binding"]})
        assert pulled["ok"] is True and pulled["version"] == 1, pulled
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        got = a.get_params(sid).params["x"]
        assert torch.equal(got, local_adam(p0, [g]))


@pytest.mark.parametrize("sync", [None, {"workers": 1}])
def test_a_binding_made_before_its_session_was_made_again_is_refused_whole(
        keyed_server: str, sync: dict[str, int] | None) -> None:
    """A session deleted and made again under the same id, with another shape for a
    parameter: a step through the old binding that sends no gradient for that parameter is a
    409 ``binding_stale`` before anything is applied (it was applied, then answered 500), a
    pull through it too; a new binding steps as torch does. The SDK binds again by itself."""
    path = socket_path(keyed_server)
    sid = f"stale-{os.getpid()}-{'sync' if sync else 'async'}"
    extra = {"sync": sync} if sync else {}
    ga = torch.randn(8, generator=torch.Generator().manual_seed(4))
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        a.create_session(optimizer="Adam", options={"lr": 1e-2},
                         params={"a": torch.zeros(8), "b": torch.zeros(4)}, id=sid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        assert frames(s, {"op": "hello", "key": KEY_A})["ok"] is True
        old = frames(s, {"op": "bind", "session": sid})["binding"]
        with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
            a.delete_session(sid)
            a.create_session(optimizer="Adam", options={"lr": 1e-2},
                             params={"a": torch.zeros(8), "b": torch.zeros(5)}, id=sid,
                             **extra)
        for message in ({"op": "step", "binding": old, "grads": ["a"], "worker": "w0"},
                        {"op": "pull", "binding": old}):
            answer = frames(s, message)
            problem = answer["problem"]
            assert answer["ok"] is False and isinstance(problem, dict)
            assert (problem["status"], problem["code"]) == (409, "binding_stale"), problem
        with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
            # (made again past the deleted session's version 0: app.engine.last_versions)
            assert a.get_session(sid).version == 1
    with optserve.Client(keyed_server, api_key=KEY_A, transport="local") as c:
        who = {"worker": "w0"} if sync else {}
        c.step(sid, {"a": ga}, **who)  # binds the session as it is now
        with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
            a.delete_session(sid)
            a.create_session(optimizer="Adam", options={"lr": 1e-2},
                             params={"a": torch.zeros(8), "b": torch.zeros(6)}, id=sid,
                             **extra)
        out = c.step(sid, {"a": ga}, **who)  # stale: bound again, the same step sent again
        # (made again at 3: the deleted session was at 2)
        assert out.params is not None and out.version == 4
        assert torch.equal(out.params["a"], local_adam(torch.zeros(8), [ga]))
        assert torch.equal(out.params["b"], torch.zeros(6))


def test_history_only_metrics_over_shared_memory(keyed_server: str) -> None:
    """``"metrics": "history"`` in a socket step (``RemoteOptimizer`` always sends it): the
    answer carries no metrics; the session's history has the norms, equal to those a step
    answer carries for a twin session stepped the same way (over HTTP), and torch's. 1.25 MB
    of parameters: the steps run on the device worker, which takes the norms after
    answering."""
    p0 = torch.randn(600, 520, generator=torch.Generator().manual_seed(3))
    grads = [torch.randn(600, 520, generator=torch.Generator().manual_seed(10 + k))
             for k in range(3)]
    with optserve.Client(keyed_server, api_key=KEY_A) as c, \
            optserve.Client(keyed_server, api_key=KEY_A, transport="http") as h:
        quiet = c.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"w": p0}).id
        loud = h.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"w": p0}).id
        for k, g in enumerate(grads):
            out = c.step(quiet, {"w": g}, metrics="history")
            assert c._local is not None and out.metrics is None
            twin = h.step(loud, {"w": g})
            assert twin.metrics is not None and out.params is not None
            assert torch.equal(out.params["w"], local_adam(p0, grads[:k + 1]))
            row = h.history(quiet, since=k).columns
            for key in ("grad_norm", "update_norm", "param_norm", "update_ratio"):
                assert row[f"{key}.0"] == [twin.metrics["groups"][0][key]], key
        want = local_adam(p0, grads)
        before = local_adam(p0, grads[:2])
        last = h.history(quiet, since=2).columns
        # torch's float32 norm of 312,000 values against a float64 one
        assert math.isclose(last["update_norm.0"][0], float((want - before).double().norm()),
                            rel_tol=1e-4)


@pytest.mark.parametrize("change", [{"metrics": "history"}, {"return": "none"}])
def test_a_retry_that_changes_what_the_step_answers_is_a_reused_key(
        keyed_server: str, change: dict[str, object]) -> None:
    """A socket step's idempotency key covers what it is asked to answer, as an HTTP step's
    query does: the same message again is answered, not applied again; the same key with
    another ``metrics`` or ``return`` is a 422 ``idempotency_key_reused`` and applies
    nothing. The slot holds zeros (the segment's fresh bytes): Adam still steps."""
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        sid = a.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"x": p0}).id
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(socket_path(keyed_server))
        assert frames(s, {"op": "hello", "key": KEY_A})["ok"] is True
        bound = frames(s, {"op": "bind", "session": sid})
        step = {"op": "step", "binding": bound["binding"], "grads": ["x"],
                "idempotency_key": "k-1"}
        first = frames(s, step)
        assert first["ok"] is True and first["version"] == 1, first
        again = frames(s, step)
        assert again["ok"] is True and again["version"] == 1, again
        other = frames(s, {**step, **change})
        problem = other.get("problem")
        assert other["ok"] is False and isinstance(problem, dict), other
        assert (problem["status"], problem["code"]) == (422, "idempotency_key_reused")
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as a:
        assert a.get_session(sid).version == 1
        out = a.step(sid, {"x": torch.zeros(8)})
        assert out.version == 2 and out.params is not None
        assert torch.equal(out.params["x"], local_adam(p0, [torch.zeros(8)] * 2))


def replace_socket(live: LiveServer, offer: bool) -> LocalTransport | None:
    """What a server restart does to the same-host transport: its socket goes (the clients'
    connections break) and, when it is offered again, a new one in a new directory."""
    old = live.app.state.local_transport
    old.stop()
    new = None
    if offer:
        new = LocalTransport(old.engine, {k.decode(): t for k, t in old.keys},
                             old.default_tenant, old.parent)
        assert old._loop is not None
        new.start(old._loop)
    live.app.state.local_transport = new
    return new


@pytest.mark.parametrize("transport", ["auto", "local"])
@pytest.mark.parametrize("offer", [True, False], ids=["new-socket", "none"])
def test_a_restarted_servers_socket_is_asked_for_again(transport: str, offer: bool) -> None:
    """The server's socket goes away under a training client (a restart makes its socket in a
    new directory): the step whose connection broke asks the server for its socket again and
    steps through the new one; a server that offers none gets the step over HTTP with the
    same key (``"auto"``) or says so (``"local"``). Each step applied once, every value
    torch's. The client used to connect to the old path only: ``LocalUnavailable``, in both
    modes."""
    live = LiveServer(_test_settings(api_keys=f"{KEY_A}:alpha", durability="memory"))
    url, new = live.start(), None
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(2))
    grads = [torch.randn(8, generator=torch.Generator().manual_seed(3 + k)) for k in range(3)]
    try:
        with optserve.Client(url, api_key=KEY_A, transport=transport, max_retries=2) as c:
            sid = c.create_session(optimizer="Adam", options={"lr": 1e-2},
                                   params={"x": p0}).id
            c.step(sid, {"x": grads[0]})
            assert c._local is not None
            new = replace_socket(live, offer)
            if transport == "local" and not offer:
                # public, and an OptserveError like every error the SDK raises on purpose
                assert optserve.LocalUnavailable is LocalUnavailable
                with pytest.raises(optserve.OptserveError) as caught:
                    c.step(sid, {"x": grads[1]})
                assert isinstance(caught.value, optserve.LocalUnavailable)
                assert c.get_session(sid).version == 1
                return
            for g in grads[1:]:
                out = c.step(sid, {"x": g})
            assert (c._local is not None) == offer
            assert out.version == 3 and out.params is not None
            assert torch.equal(out.params["x"], local_adam(p0, grads))
    finally:
        if new is not None:
            new.stop()
        live.stop()


@pytest.mark.parametrize("via", ["client", "optimizer"])
def test_a_step_sent_over_http_after_the_socket_went_keeps_its_key(via: str) -> None:
    """The server applied the step, then its socket went with the answer (``"auto"``, none
    offered again): the step goes over HTTP with the key it had, so it is not applied twice,
    and its answer is the first one (``replayed``, torch's values after one step), through
    ``Client.step`` and ``RemoteOptimizer.step`` (which asks for its norms in the history on
    both transports). It used to be a 422 ``idempotency_key_reused`` (the socket's request
    had another fingerprint than the same step over HTTP)."""
    live = LiveServer(_test_settings(api_keys=f"{KEY_A}:alpha", durability="memory"))
    url = live.start()
    try:
        with optserve.Client(url, api_key=KEY_A, max_retries=2) as c:
            x = torch.nn.Parameter(torch.tensor([2.0]))
            opt = None
            if via == "client":
                sid = c.create_session(optimizer="SGD", options={"lr": 1.0},
                                       params={"x": x.detach().clone()}).id
            else:
                opt = optserve.RemoteOptimizer([("x", x)], optimizer="SGD", client=c, lr=1.0)
                sid = opt.session_id
            channel = c._local_channel()
            assert channel is not None
            real = channel._exchange

            def lost(message: dict[str, object]) -> tuple[dict[str, object], list[int]]:
                answer = real(message)
                if message.get("op") == "step":
                    replace_socket(live, offer=False)
                    raise ConnectionResetError("simulated")
                return answer
            channel._exchange = lost  # type: ignore[method-assign]
            if via == "client":
                out = c.step(sid, {"x": torch.tensor([16.0])})
                assert (out.version, out.replayed) == (1, True)
                assert out.params is not None and out.params["x"].tolist() == [-14.0]
                assert c.get_session(sid).version == 1
                assert c.step(sid, {"x": torch.tensor([-112.0])}).params["x"].tolist() == [98.0]
            else:
                assert opt is not None
                x.grad = torch.tensor([16.0])
                opt.step()
                assert x.tolist() == [-14.0] and c.get_session(sid).version == 1
                x.grad = torch.tensor([-112.0])
                opt.step()
                assert x.tolist() == [98.0] and c.get_session(sid).version == 2
    finally:
        live.stop()


def test_a_socket_step_of_some_slots_retried_over_http_is_answered() -> None:
    """A socket step of some of the slots (a frozen or unused parameter has no gradient: its
    fingerprint is taken tensor by tensor, not by the binding's plan) sent again over HTTP is
    the same request: the first answer, not applied again."""
    live = LiveServer(_test_settings(api_keys=f"{KEY_A}:alpha", durability="memory"))
    url = live.start()
    gen = torch.Generator().manual_seed(12)
    p0 = {f"p{i}": torch.randn(300, generator=gen) for i in range(1200)}  # past the windows
    g = {n: torch.randn(300, generator=gen) for n in list(p0)[::2]}
    try:
        with optserve.Client(url, api_key=KEY_A) as c, \
                optserve.Client(url, api_key=KEY_A, transport="http") as h:
            sid = c.create_session(optimizer="SGD", options={"lr": 0.5}, params=p0).id
            first = c.step(sid, g, idempotency_key="k-some")
            assert c._local is not None and first.version == 1
            again = h.step(sid, g, idempotency_key="k-some")
            assert (again.version, again.replayed) == (1, True)
            assert again.params is not None
            for n, t in p0.items():
                want = t - 0.5 * g[n] if n in g else t
                assert torch.equal(again.params[n], want), n
            with pytest.raises(optserve.ValidationError) as caught:
                h.step(sid, {**g, "p0": g["p0"] * 2}, idempotency_key="k-some")
            assert caught.value.problem["code"] == "idempotency_key_reused"
            assert h.get_session(sid).version == 1
    finally:
        live.stop()


@pytest.mark.parametrize("durability", ["memory", "step"])
@pytest.mark.parametrize("binary", [True, False], ids=["safetensors", "json"])
def test_a_socket_step_retried_over_http_is_answered(durability: str, binary: bool) -> None:
    """A step applied through shared memory, sent again over HTTP with its key (as a client
    whose socket broke after the apply does): the same gradients in a safetensors or a JSON
    body are the same request, answered with the first answer (version 1, torch's values
    after one step, not applied again); other gradients under that key are a 422
    ``idempotency_key_reused``. The HTTP retry used to be that 422 too."""
    live = LiveServer(_test_settings(api_keys=f"{KEY_A}:alpha", durability=durability))
    url = live.start()
    gen = torch.Generator().manual_seed(11)
    p0 = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(2, generator=gen).double()}
    g = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(2, generator=gen).double()}
    try:
        with optserve.Client(url, api_key=KEY_A) as c, \
                optserve.Client(url, api_key=KEY_A, transport="http") as h:
            sid = c.create_session(optimizer="Adam", options={"lr": 1e-2}, params=p0,
                                   durability=durability).id
            first = c.step(sid, g, idempotency_key="k-socket", scalars={"loss": 0.5})
            assert c._local is not None and first.version == 1
            ref = {n: t.clone().requires_grad_(True) for n, t in p0.items()}
            opt = torch.optim.Adam(list(ref.values()), lr=1e-2)
            for n, t in ref.items():
                t.grad = g[n].clone()
            opt.step()
            again = h.step(sid, dict(reversed(list(g.items()))), idempotency_key="k-socket",
                           binary=binary, scalars={"loss": 0.5})
            assert (again.version, again.replayed) == (1, True)
            assert again.params is not None
            for n, t in ref.items():
                assert torch.equal(again.params[n], t.detach()), n
            with pytest.raises(optserve.ValidationError) as caught:
                h.step(sid, {**g, "w": g["w"] * 2}, idempotency_key="k-socket", binary=binary,
                       scalars={"loss": 0.5})
            assert caught.value.problem["code"] == "idempotency_key_reused"
            with pytest.raises(optserve.ValidationError) as caught:
                h.step(sid, g, idempotency_key="k-socket", binary=binary)  # no loss
            assert caught.value.problem["code"] == "idempotency_key_reused"
            assert h.get_session(sid).version == 1
    finally:
        live.stop()


def test_close_lets_another_threads_step_in_flight_end_with_its_values(
        keyed_server: str) -> None:
    """``Client.close()`` while another thread's ``RemoteOptimizer`` step is under way on its
    same-host channel: close waits for it, and the step ends with its new values in the
    parameters; no channel is made again after it. close used to empty the
    channel's slot views under the step: the step came back with no parameters (the version
    moved on, the parameters did not), or a ``KeyError`` or a ``RuntimeError`` (a dict that
    changed size) while they were copied out."""
    import threading

    answered, results = threading.Event(), dict[str, Any]()
    c = optserve.Client(keyed_server, api_key=KEY_A, transport="local", max_retries=0)

    def worker() -> None:
        w = torch.zeros(1000, requires_grad=True)
        try:
            opt = optserve.RemoteOptimizer([("w", w)], optimizer="SGD", client=c, lr=1.0)
            results["sid"] = opt.session_id
            w.grad = torch.ones(1000)
            opt.step()
            channel = c._local
            assert channel is not None
            real = channel._exchange

            def slow(message: dict[str, object]) -> tuple[dict[str, object], list[int]]:
                answer = real(message)
                if message.get("op") == "step":
                    answered.set()
                    time.sleep(0.3)  # close() is called meanwhile
                return answer
            channel._exchange = slow  # type: ignore[method-assign]
            opt.step()
            results["w"] = w.detach().clone()
        except BaseException as exc:  # noqa: BLE001 - checked below
            results["error"] = exc
        finally:
            answered.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert answered.wait(60)
    c.close()
    thread.join(60)
    assert "error" not in results, results
    assert torch.equal(results["w"], torch.full((1000,), -2.0))
    assert c._local_channel() is None and not c._channels  # closed: no channel made again
    with optserve.Client(keyed_server, api_key=KEY_A, transport="http") as h:
        assert h.get_session(results["sid"]).version == 2


def test_a_forked_child_steps_on_a_channel_of_its_own(keyed_server: str) -> None:
    """A process forks after its ``Client`` set up its same-host channel (``DataLoader``
    workers, ``multiprocessing``): parent and child step at once, each its own session, and
    each gets its own answers. The child used the parent's connection and segment: their
    frames crossed, each read the other's answers, and both timed out."""
    with optserve.Client(keyed_server, api_key=KEY_A, transport="local", max_retries=0,
                         timeout=20) as c:
        a, b = (c.create_session(optimizer="SGD", options={"lr": 1.0},
                                 params={"w": torch.zeros(1000)}).id for _ in range(2))
        c.step(a, {"w": torch.ones(1000)})
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 when every answer was its own
            ok = False
            try:
                ok = all(c.step(b, {"w": torch.full((1000,), 2.0)}).params["w"][0].item()
                         == -2.0 * (k + 1) for k in range(50))
            finally:
                os._exit(0 if ok else 1)
        steps = [c.step(a, {"w": torch.ones(1000)}).params["w"][0].item() for _ in range(50)]
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert steps == [-float(k + 2) for k in range(50)]
        assert c.get_session(b).version == 50
