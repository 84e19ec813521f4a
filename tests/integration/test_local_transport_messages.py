"""The same-host transport's messages against a real server: a step through a binding whose
session was made again with other shapes is refused as a pull through it is (409
``binding_stale``, nothing applied) and the SDK binds again by itself; every refused frame or
message is a problem as an HTTP route's is (its ``field`` names what the message got wrong, in
the message's own words), and the session is unchanged."""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import LiveServer, _test_settings

import optserve

pytestmark = pytest.mark.integration
KEY = "k" * 24


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    live = LiveServer(_test_settings(api_keys=f"{KEY}:alpha", durability="memory"))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


def socket_path(url: str) -> str:
    with optserve.Client(url, api_key=KEY, transport="http") as c:
        local = c._request(optserve._api.transport())["local"]
    assert local is not None
    return str(local["socket"])


def send_frame(sock: socket.socket, body: bytes) -> dict[str, Any]:
    """One frame out (its bytes as given), its answer back (the descriptors it carries
    closed)."""
    sock.sendall(struct.pack("<I", len(body)) + body)
    data, fds, _, _ = socket.recv_fds(sock, 1 << 20, 4)
    for fd in fds:
        os.close(fd)
    (n,) = struct.unpack("<I", data[:4])
    while len(data) < 4 + n:
        data += sock.recv(4 + n - len(data))
    return dict(json.loads(data[4:4 + n]))


def frames(sock: socket.socket, message: dict[str, Any]) -> dict[str, Any]:
    return send_frame(sock, json.dumps(message).encode())


def problem_of(answer: dict[str, Any]) -> dict[str, Any]:
    problem = answer.get("problem")
    assert answer["ok"] is False and isinstance(problem, dict), answer
    return problem


def torch_adam(p0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = p0.clone().requires_grad_(True)
    opt = torch.optim.Adam([p], lr=1e-2)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def state_of(c: optserve.Client, sid: str) -> tuple[int, int, dict[str, torch.Tensor], Any]:
    """What a refusal must leave as it was: version, step, parameters, optimizer state."""
    info = c.get_session(sid)
    return info.version, info.step, c.get_params(sid).params, c.export_state(sid)["state"]


def same_tree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(same_tree, a, b))
    return bool(a == b)


def same_state(a: tuple[int, int, dict[str, torch.Tensor], Any],
               b: tuple[int, int, dict[str, torch.Tensor], Any]) -> bool:
    return a[:2] == b[:2] and same_tree(a[2], b[2]) and same_tree(a[3], b[3])


#: how the session is made again: its parameter ``b`` (float32 [4] when bound) with another
#: shape, another dtype, or gone (another name in its place)
REMADE = {
    "shape": {"a": torch.zeros(8), "b": torch.full((5,), 0.5)},
    "dtype": {"a": torch.zeros(8), "b": torch.full((4,), 0.5, dtype=torch.float64)},
    "gone": {"a": torch.zeros(8), "c": torch.full((4,), 0.5)},
}


@pytest.mark.parametrize("returned", ["params", "none"])
@pytest.mark.parametrize("sync", [None, {"workers": 1}], ids=["async", "sync"])
@pytest.mark.parametrize("remade", sorted(REMADE))
def test_a_gradient_from_a_slot_that_no_longer_fits_is_a_stale_binding(
        server: str, remade: str, sync: dict[str, int] | None, returned: str) -> None:
    """A step through a binding made before its session was deleted and made again, sending
    the gradient of the parameter that changed (its slot's dtype or shape no longer the
    parameter's, or its name gone): 409 ``binding_stale`` naming ``binding``, as a pull
    through it (it was a 422 ``shape_mismatch`` / ``dtype_mismatch`` / ``unknown_parameter``,
    which told the client its gradient was wrong, not its binding). Nothing is applied; a
    new binding steps as torch does."""
    sid = f"remade-{os.getpid()}-{remade}-{returned}-{'sync' if sync else 'async'}"
    extra: dict[str, Any] = {"sync": sync} if sync else {}
    worker = {"worker": "w0"} if sync else {}
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        h.create_session(optimizer="Adam", options={"lr": 1e-2},
                         params={"a": torch.zeros(8), "b": torch.zeros(4)}, id=sid)
        s.connect(socket_path(server))
        assert frames(s, {"op": "hello", "key": KEY})["ok"] is True
        old = frames(s, {"op": "bind", "session": sid})["binding"]
        h.delete_session(sid)
        h.create_session(optimizer="Adam", options={"lr": 1e-2}, params=REMADE[remade],
                         id=sid, **extra)
        before = state_of(h, sid)
        problem = problem_of(frames(s, {"op": "step", "binding": old, "grads": ["a", "b"],
                                        "return": returned, **worker}))
        assert (problem["status"], problem["code"], problem["field"]) == (
            409, "binding_stale", "binding"), problem
        assert "'b'" in problem["detail"]
        assert same_state(state_of(h, sid), before)
        # bound again: the slots fit, and the step is torch's
        new = frames(s, {"op": "bind", "session": sid})
        assert new["ok"] is True
        out = frames(s, {"op": "step", "binding": new["binding"], "grads": ["a"], **worker})
        assert out["ok"] is True and out["version"] == 1, out
        got = h.get_params(sid).params
        assert torch.equal(got["a"], torch_adam(torch.zeros(8), [torch.zeros(8)]))
        for name, t in REMADE[remade].items():
            if name != "a":
                assert torch.equal(got[name], t)


@pytest.mark.parametrize("sync", [None, {"workers": 1}], ids=["async", "sync"])
def test_the_sdk_binds_again_when_the_session_was_made_again_with_other_shapes(
        server: str, sync: dict[str, int] | None) -> None:
    """``transport="local"``: a session made again with another shape for a parameter, and a
    gradient of its new shape: the SDK binds again and steps through the new slots, as
    torch does (it gave up: ``LocalUnavailable``, the gradient not fitting the old slot). A
    gradient of the old shape (``transport="auto"``) is the server's 422
    ``shape_mismatch``, the session unchanged."""
    extra: dict[str, Any] = {"sync": sync} if sync else {}
    who: dict[str, Any] = {"worker": "w0"} if sync else {}
    gen = torch.Generator().manual_seed(5)
    ga, gb = torch.randn(8, generator=gen), torch.randn(5, generator=gen)
    b0 = torch.randn(5, generator=gen)
    with optserve.Client(server, api_key=KEY, transport="http") as h:
        for transport in ("local", "auto"):
            sid = f"sdk-remade-{os.getpid()}-{'sync' if sync else 'async'}-{transport}"
            h.create_session(optimizer="Adam", options={"lr": 1e-2},
                             params={"a": torch.zeros(8), "b": torch.zeros(4)}, id=sid)
            with optserve.Client(server, api_key=KEY, transport=transport) as c:
                c.step(sid, {"a": ga, "b": torch.ones(4)}, **who)  # bound with b as [4]
                assert c._local is not None
                h.delete_session(sid)
                h.create_session(optimizer="Adam", options={"lr": 1e-2},
                                 params={"a": torch.zeros(8), "b": b0}, id=sid, **extra)
                if transport == "local":
                    out = c.step(sid, {"a": ga, "b": gb}, **who)
                    assert out.version == 1 and out.params is not None
                    assert torch.equal(out.params["a"], torch_adam(torch.zeros(8), [ga]))
                    assert torch.equal(out.params["b"], torch_adam(b0, [gb]))
                    continue
                before = state_of(h, sid)
                with pytest.raises(optserve.ValidationError) as refused:
                    c.step(sid, {"a": ga, "b": torch.ones(4)}, **who)
                assert refused.value.problem["code"] == "shape_mismatch"
                assert refused.value.problem["field"] == "grads.b"
                assert same_state(state_of(h, sid), before)
