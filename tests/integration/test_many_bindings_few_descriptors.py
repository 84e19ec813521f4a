"""Many same-host bindings on a server with few file descriptors: ``python -m app`` under
``RLIMIT_NOFILE`` = 200 (as ``prlimit --nofile=200``) with 4 same-host connections binding 64
sessions each (256 bindings, each connection's most). Each binding held its memfd and the
duplicate ``mmap.mmap`` makes of it, 2 descriptors a binding outside
``OPTSERVE_MAX_CONNECTIONS``: past some 70 bindings every bind, create and step was a 503
``out_of_file_descriptors``. Now a binding holds a mapping and no descriptor: the server's
``/proc/<pid>/fd`` stays where it was, creates and steps over HTTP and through shared memory
still answer, equal to an in-process ``torch.optim`` run bitwise, and an unbind or a closed
connection unmaps its segments (``/proc/<pid>/maps``).

Then the server-wide bound on live bindings (``OPTSERVE_MAX_BINDINGS``): ``/metrics`` counts
the bindings held and gives the bound; the bind past it is a 503 ``server_bindings_full``
naming the limit, with ``retry_after``; the SDK steps that session
over HTTP (equal to torch), and binds it once its ``Retry-After`` has passed and a binding was
let go. The same for the bound on the bindings' memory (``OPTSERVE_MAX_BINDING_MB``): a bind
past it is the same 503 naming the bytes, and a closed connection's bindings are counted no
longer.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import optserve
from tests.integration.test_durability import Proc
from tests.integration.test_local_transport import frames, socket_path
from tests.torch_reference import Reference, assert_tensors_equal, json_tensor, tensor_from_json

pytestmark = pytest.mark.integration

NOFILE = 200
CONNECTIONS = 4
PER_CONNECTION = 64  # app.transport.local.MAX_BINDINGS
OPTIONS = {"lr": 1e-2}


def gauge(url: str, name: str) -> float:
    """A gauge's value in the server's ``/metrics``."""
    text = httpx.get(f"{url}/metrics", timeout=60).text
    values = [float(line.split()[-1]) for line in text.splitlines()
              if line.split(" ")[0] == name]
    assert len(values) == 1, (name, text)
    return values[0]


def descriptors(pid: int) -> list[str]:
    """What the process's open descriptors point at."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # (closed meanwhile)
            pass
    return found


def segments_mapped(pid: int) -> int:
    """The same-host segments the process has mapped (one mapping each)."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum("memfd:optserve-" in line for line in maps)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def params_of(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}


def grads_of(seed: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * (k + 1) + seed)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}


def counted_binds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list whose one item counts the bind messages the SDK sends from now on."""
    binds = [0]
    real_exchange = optserve._local.LocalChannel._exchange

    def counting(self: optserve._local.LocalChannel, message: dict[str, Any]) -> Any:
        binds[0] += message.get("op") == "bind"
        return real_exchange(self, message)
    monkeypatch.setattr(optserve._local.LocalChannel, "_exchange", counting)
    return binds


def http_create_and_step(c: httpx.Client, sid: str, seed: int, steps: int) -> None:
    """Create session ``sid`` over HTTP (JSON) and step it ``steps`` times, each answer equal
    to in-process Adam bitwise."""
    ref = Reference(torch.optim.Adam, [(params_of(seed), {})], OPTIONS)
    r = c.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": OPTIONS,
        "params": {n: json_tensor(t) for n, t in params_of(seed).items()}})
    assert r.status_code == 201, r.text
    for k in range(steps):
        grads = grads_of(seed, k)
        r = c.post(f"/v1/sessions/{sid}/step",
                   json={"grads": {n: json_tensor(t) for n, t in grads.items()}})
        assert r.status_code == 200, r.text
        ref.step(grads)
        assert_tensors_equal({n: tensor_from_json(t) for n, t in r.json()["params"].items()},
                             ref.params, f"{sid} step {k} over HTTP")


def local_steps(url: str, seed: int, steps: int, transport: str = "local") -> str:
    """A session created and stepped through the SDK (``transport``), each step's parameters
    equal to in-process Adam bitwise; its id."""
    ref = Reference(torch.optim.Adam, [(params_of(seed), {})], OPTIONS)
    with optserve.Client(url, transport=transport) as c:
        sid = c.create_session("Adam", params_of(seed), options=OPTIONS).id
        for k in range(steps):
            out = c.step(sid, grads_of(seed, k))
            ref.step(grads_of(seed, k))
            assert out.params is not None
            assert_tensors_equal(dict(out.params), ref.params, f"{sid} step {k} ({transport})")
        if transport == "local":
            assert c._local is not None and sid in c._local._bindings
    return sid


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path / "data", nofile=NOFILE)
    try:
        yield p
    finally:
        p.stop()


def test_many_bindings_hold_no_descriptors_and_unbinding_unmaps(proc: Proc) -> None:
    proc.start()
    assert proc.proc is not None
    pid = proc.proc.pid
    path = socket_path(proc.url, None)
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        http_create_and_step(c, "target", 0, 1)
    socks = []
    try:
        for _ in range(CONNECTIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.connect(path)
            assert frames(s, {"op": "hello"})["ok"] is True
        before = len(descriptors(pid))
        numbers: list[list[int]] = []
        for s in socks:
            got = []
            for i in range(PER_CONNECTION):
                answer = frames(s, {"op": "bind", "session": "target"})
                assert answer["ok"] is True, (len(numbers), i, answer)
                got.append(int(answer["binding"]))  # type: ignore[call-overload]
            numbers.append(got)
        # no descriptor per binding (each held 2: 512 here, more than the process may have);
        # the last bind's memfd is closed just after its answer went out
        wait_for(lambda: not [d for d in descriptors(pid) if "memfd:" in d],
                 "the server holds a segment's descriptor")
        held = descriptors(pid)
        assert len(held) <= before + 4, (before, held)
        assert segments_mapped(pid) == CONNECTIONS * PER_CONNECTION
        # the server still creates and steps, over HTTP and through shared memory
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            for i in range(3):
                http_create_and_step(c, f"h{i}", 10 + i, 3)
        for i in range(2):
            local_steps(proc.url, 20 + i, 3)
        assert len(descriptors(pid)) <= before + 8
        # an unbind unmaps its segment; a closed connection unmaps all of its
        for number in numbers[0]:
            assert frames(socks[0], {"op": "unbind", "binding": number})["ok"] is True
        assert segments_mapped(pid) == (CONNECTIONS - 1) * PER_CONNECTION
        socks.pop(1).close()
        wait_for(lambda: segments_mapped(pid) == (CONNECTIONS - 2) * PER_CONNECTION,
                 "a closed connection's segments stay mapped")
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: segments_mapped(pid) == 0, "segments outlived their connections")
    # and the session they bound steps on, equal to torch (over HTTP: its reference)
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        http_create_and_step(c, "after", 30, 2)


def test_the_server_wide_bound_on_bindings_sends_the_sdk_to_http(
        proc: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    proc.env["OPTSERVE_MAX_BINDINGS"] = "3"
    proc.env["OPTSERVE_DURABILITY"] = "memory"
    proc.start()
    assert proc.proc is not None
    path = socket_path(proc.url, None)
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        http_create_and_step(c, "held", 0, 0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as a, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as b:
        for s in (a, b):
            s.connect(path)
            assert frames(s, {"op": "hello"})["ok"] is True
        # a bind refused for another reason takes no place (then 3 are made)
        for _ in range(4):
            missing = frames(a, {"op": "bind", "session": "nope"})
            assert missing["ok"] is False
            assert missing["problem"]["status"] == 404  # type: ignore[index]
        first = frames(a, {"op": "bind", "session": "held"})
        assert first["ok"] is True
        assert frames(a, {"op": "bind", "session": "held"})["ok"] is True
        assert frames(b, {"op": "bind", "session": "held"})["ok"] is True
        # the fourth, on any connection: refused, naming the limit, with a time to retry
        answer = frames(b, {"op": "bind", "session": "held"})
        problem = answer["problem"]
        assert answer["ok"] is False and isinstance(problem, dict), answer
        assert (problem["status"], problem["code"]) == (503, "server_bindings_full")
        assert problem["field"] == "session" and problem["limit"] == 3
        assert problem["retry_after"] == 1 and "OPTSERVE_MAX_BINDINGS" in problem["detail"]
        # /metrics says how many are held, and the bound
        assert gauge(proc.url, "optserve_local_bindings") == 3
        assert gauge(proc.url, "optserve_local_bindings_limit") == 3
        # (a, b and the connection asking: same-host and HTTP counted together)
        assert gauge(proc.url, "optserve_connections") >= 3
        assert gauge(proc.url, "optserve_connections_limit") >= 64
        # the SDK steps over HTTP instead (auto), equal to torch, not asking again each step
        ref = Reference(torch.optim.Adam, [(params_of(5), {})], OPTIONS)
        binds = counted_binds(monkeypatch)
        with optserve.Client(proc.url, transport="auto") as sdk:
            sid = sdk.create_session("Adam", params_of(5), options=OPTIONS).id
            for k in range(3):
                out = sdk.step(sid, grads_of(5, k))
                ref.step(grads_of(5, k))
                assert out.params is not None
                assert_tensors_equal(dict(out.params), ref.params, f"step {k} over HTTP")
            channel = sdk._local
            assert channel is not None and not channel._bindings and binds == [1]
            # a binding let go, and the Retry-After passed: the next step binds
            assert frames(a, {"op": "unbind", "binding": first["binding"]})["ok"] is True
            assert gauge(proc.url, "optserve_local_bindings") == 2
            time.sleep(1.1)
            out = sdk.step(sid, grads_of(5, 3))
            ref.step(grads_of(5, 3))
            assert out.params is not None
            assert_tensors_equal(dict(out.params), ref.params, "step 3 through the segment")
            assert set(channel._bindings) == {sid} and binds == [2]


def big_of(seed: int, k: int | None = None) -> dict[str, torch.Tensor]:
    """100,000 float32 values: a binding of them holds 800,000 bytes (a gradient and a value
    slot), 1,200,000 under durability step (the private copy of the gradient)."""
    g = torch.Generator().manual_seed(seed if k is None else 1000 * (k + 1) + seed)
    return {"w": torch.randn(100_000, generator=g)}


def test_the_server_wide_bound_on_binding_memory_sends_the_sdk_to_http(
        proc: Proc, monkeypatch: pytest.MonkeyPatch) -> None:
    proc.env["OPTSERVE_MAX_BINDING_MB"] = "1"
    proc.env["OPTSERVE_DURABILITY"] = "memory"
    proc.start()
    path = socket_path(proc.url, None)
    with optserve.Client(proc.url, transport="http") as c:
        c.create_session("Adam", big_of(0), options=OPTIONS, id="big")
        c.create_session("Adam", big_of(1), options=OPTIONS, id="logged",
                         durability="step")
    assert gauge(proc.url, "optserve_local_binding_bytes_limit") == 1 << 20
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as a:
        a.connect(path)
        assert frames(a, {"op": "hello"})["ok"] is True
        # a session whose binding can never fit: refused, asked again only after 60 s
        answer = frames(a, {"op": "bind", "session": "logged"})
        problem = answer["problem"]
        assert answer["ok"] is False and isinstance(problem, dict), answer
        assert (problem["status"], problem["code"]) == (503, "server_bindings_full")
        assert problem["field"] == "session" and problem["limit_bytes"] == 1 << 20
        assert problem["needed_bytes"] == 1_200_000 and problem["held_bytes"] == 0
        assert problem["retry_after"] == 60 and "OPTSERVE_MAX_BINDING_MB" in problem["detail"]
        assert gauge(proc.url, "optserve_local_binding_bytes") == 0
        assert gauge(proc.url, "optserve_local_bindings") == 0  # (its place given back)
        # one that fits, then a second of it that does not
        first = frames(a, {"op": "bind", "session": "big"})
        assert first["ok"] is True, first
        assert gauge(proc.url, "optserve_local_binding_bytes") == 800_000
        answer = frames(a, {"op": "bind", "session": "big"})
        problem = answer["problem"]
        assert answer["ok"] is False and isinstance(problem, dict), answer
        assert (problem["code"], problem["held_bytes"], problem["needed_bytes"],
                problem["retry_after"]) == ("server_bindings_full", 800_000, 800_000, 1)
        assert gauge(proc.url, "optserve_local_bindings") == 1
        # the SDK steps over HTTP instead (auto), equal to torch, not asking again each step
        ref = Reference(torch.optim.Adam, [(big_of(0), {})], OPTIONS)
        binds = counted_binds(monkeypatch)
        with optserve.Client(proc.url, transport="auto") as sdk:
            for k in range(3):
                out = sdk.step("big", big_of(0, k))
                ref.step(big_of(0, k))
                assert out.params is not None
                assert_tensors_equal(dict(out.params), ref.params, f"step {k} over HTTP")
            channel = sdk._local
            assert channel is not None and not channel._bindings and binds == [1]
            # the connection holding the first binding is gone (as a killed client's is): its
            # memory is counted no longer, and once the Retry-After passed the next step binds
            a.close()
            wait_for(lambda: gauge(proc.url, "optserve_local_binding_bytes") == 0,
                     "a closed connection's binding memory is still counted")
            time.sleep(1.1)
            out = sdk.step("big", big_of(0, 3))
            ref.step(big_of(0, 3))
            assert out.params is not None
            assert_tensors_equal(dict(out.params), ref.params, "step 3 through the segment")
            assert set(channel._bindings) == {"big"} and binds == [2]
            assert gauge(proc.url, "optserve_local_binding_bytes") == 800_000
            # the logged session steps over HTTP, equal to torch
            logged = Reference(torch.optim.Adam, [(big_of(1), {})], OPTIONS)
            out = sdk.step("logged", big_of(1, 0))
            logged.step(big_of(1, 0))
            assert out.params is not None
            assert_tensors_equal(dict(out.params), logged.params, "the logged session")
            assert set(channel._bindings) == {"big"}
