"""The same-host transport's messages against a real server: a step through a binding whose
session was made again with other shapes is refused as a pull through it is (409
``binding_stale``, nothing applied) and the SDK binds again by itself; every refused frame or
message is a problem as an HTTP route's is (its ``field`` names what the message got wrong, in
the message's own words), and the session is unchanged."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
        # (made again at 1: past the deleted session's 0, app.engine.last_versions)
        assert out["ok"] is True and out["version"] == 2, out
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
                    # (made again at 2: the deleted session was at 1)
                    assert out.version == 3 and out.params is not None
                    assert torch.equal(out.params["a"], torch_adam(torch.zeros(8), [ga]))
                    assert torch.equal(out.params["b"], torch_adam(b0, [gb]))
                    continue
                before = state_of(h, sid)
                with pytest.raises(optserve.ValidationError) as refused:
                    c.step(sid, {"a": ga, "b": torch.ones(4)}, **who)
                assert refused.value.problem["code"] == "shape_mismatch"
                assert refused.value.problem["field"] == "grads.b"
                assert same_state(state_of(h, sid), before)


def hello(sock: socket.socket, url: str) -> None:
    sock.connect(socket_path(url))
    assert frames(sock, {"op": "hello", "key": KEY})["ok"] is True


def adam_session(h: optserve.Client, p0: torch.Tensor, **extra: Any) -> str:
    return h.create_session(optimizer="Adam", options={"lr": 1e-2}, params={"x": p0},
                            **extra).id


@pytest.mark.parametrize(("body", "code", "field"), [
    (b"", "invalid_json", "message"),
    (b"\xff{", "invalid_json", "message"),
    (b'{"op": "pull", "binding": 1, "x": NaN}', "invalid_json", "message"),
    (b"[1, 2]", "invalid_json", "message"),
    (b'"pull"', "invalid_json", "message"),
    (b"7", "invalid_json", "message"),
    # a key twice: which one counts would be the parser's choice (it was the last)
    (b'{"op": "pull", "binding": 9, "binding": 1}', "duplicate_key", "binding"),
    (b'{"op": "step", "binding": 1, "grads": ["x"], "param_groups": {"0": {"lr": 0.5, '
     b'"lr": 0.01}}}', "duplicate_key", "param_groups.0.lr"),
    # a gradient named twice, as a body's object naming a tensor twice (it was stepped as if
    # named once)
    (b'{"op": "step", "binding": 1, "grads": ["x", "x"], "idempotency_key": "twice"}',
     "duplicate_key", "grads.x"),
])
def test_a_frame_that_is_not_one_json_object_is_a_problem_naming_the_message(
        server: str, body: bytes, code: str, field: str) -> None:
    """A frame that is empty, not JSON, not a JSON object, or repeats a key: 400 naming
    ``message`` (an HTTP body's is named ``body``), or the repeated key's path; the problem
    had no ``field`` (and a repeated key was taken, the last one winning). The connection and
    its binding go on; the session is unchanged, and its next step is torch's first."""
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sid = adam_session(h, p0)
        hello(s, server)
        assert frames(s, {"op": "bind", "session": sid})["binding"] == 1
        before = state_of(h, sid)
        problem = problem_of(send_frame(s, body))
        assert (problem["status"], problem["code"], problem.get("field")) == (400, code, field)
        assert problem["type"] == f"urn:optserve:problem:{code}"
        assert problem["title"] == "Malformed request body"
        assert same_state(state_of(h, sid), before)
        assert frames(s, {"op": "pull", "binding": 1})["version"] == 0  # the connection goes on
        out = h.step(sid, {"x": g})
        assert out.params is not None and torch.equal(out.params["x"], torch_adam(p0, [g]))


@pytest.mark.parametrize(("message", "field"), [
    ({"op": "hello", "key": KEY, "protocl": 1}, "protocl"),
    ({"op": "bind", "session": "{sid}", "sesion": "x"}, "sesion"),
    ({"op": "pull", "binding": 1, "names": ["x"]}, "names"),
    ({"op": "unbind", "binding": 1, "session": "{sid}"}, "session"),
    # a misspelt param_groups: the step went on without the change
    ({"op": "step", "binding": 1, "grads": ["x"], "param_group": {"0": {"lr": 10.0}}},
     "param_group"),
    ({"op": "step", "binding": 1, "grads": ["x"], "retrun": "none"}, "retrun"),
])
def test_a_field_a_message_does_not_take_is_refused_naming_it(
        server: str, message: dict[str, Any], field: str) -> None:
    """A message field the operation does not take: 422 ``unknown_field`` naming it, as an
    unknown field of an HTTP body is (it was ignored: a misspelt ``param_group`` stepped
    without the change). Nothing is done: the session and the binding are as they were."""
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sid = adam_session(h, p0)
        hello(s, server)
        assert frames(s, {"op": "bind", "session": sid})["binding"] == 1
        before = state_of(h, sid)
        sent = {k: v.replace("{sid}", sid) if isinstance(v, str) else v
                for k, v in message.items()}
        problem = problem_of(frames(s, sent))
        assert (problem["status"], problem["code"], problem["field"]) == (
            422, "unknown_field", field)
        assert same_state(state_of(h, sid), before)
        assert frames(s, {"op": "pull", "binding": 1})["version"] == 0  # still bound
        out = h.step(sid, {"x": g})
        assert out.params is not None and torch.equal(out.params["x"], torch_adam(p0, [g]))


def test_engine_problems_name_the_messages_fields_not_http_headers(server: str) -> None:
    """The engine names what a step carries by its HTTP header or path parameter; over the
    socket the problem names the message's field: ``idempotency_key`` (was
    ``Idempotency-Key``), ``worker`` (was ``X-Optserve-Worker``), ``binding`` for a session
    deleted since it was bound (was ``session_id``). Nothing is applied."""
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        hello(s, server)
        plain = adam_session(h, p0)
        b = frames(s, {"op": "bind", "session": plain})["binding"]
        step = {"op": "step", "binding": b, "grads": ["x"], "idempotency_key": "k-1"}
        assert frames(s, step)["version"] == 1
        after_one = state_of(h, plain)
        problem = problem_of(frames(s, {**step, "scalars": {"loss": 1.0}}))
        assert (problem["status"], problem["code"], problem["field"]) == (
            422, "idempotency_key_reused", "idempotency_key")
        assert same_state(state_of(h, plain), after_one)

        rounds = adam_session(h, p0, sync={"workers": 2})
        r = frames(s, {"op": "bind", "session": rounds})["binding"]
        problem = problem_of(frames(s, {"op": "step", "binding": r, "grads": ["x"]}))
        assert (problem["status"], problem["code"], problem["field"]) == (
            422, "missing_worker", "worker")
        assert h.get_session(rounds).version == 0

        h.delete_session(plain)
        for message in ({"op": "step", "binding": b, "grads": ["x"]},
                        {"op": "pull", "binding": b}):
            problem = problem_of(frames(s, message))
            assert (problem["status"], problem["code"], problem["field"]) == (
                404, "session_not_found", "binding")
        problem = problem_of(frames(s, {"op": "bind", "session": plain}))
        assert (problem["code"], problem["field"]) == ("session_not_found", "session")


def stray_push_in_a_round(server: str, worker: str) -> tuple[dict[str, Any], Any, list[Any]]:
    """A sync round of two (Adam) whose worker w0 waits in it; a raw same-host step frame
    naming ``worker`` then: its problem, the round's pending workers just after it, and the
    answers of w0 and of w1, whose push then closes the round (each checked here: torch's
    step on the mean of their gradients, at version 1)."""
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g0, g1 = (torch.randn(8, generator=torch.Generator().manual_seed(k)) for k in (2, 3))
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            optserve.Client(server, api_key=KEY, transport="local") as c0, \
            optserve.Client(server, api_key=KEY, transport="local") as c1, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sid = adam_session(h, p0, sync={"workers": 2, "timeout_s": 60})
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c0.step, sid, {"x": g0}, worker="w0")
            deadline = time.monotonic() + 30
            while (h.get_session(sid).sync or {}).get("pending") != ["w0"]:
                assert time.monotonic() < deadline and not first.done()
                time.sleep(0.01)
            hello(s, server)
            b = frames(s, {"op": "bind", "session": sid})["binding"]
            problem = problem_of(frames(s, {"op": "step", "binding": b, "grads": ["x"],
                                            "worker": worker}))
            pending = (h.get_session(sid).sync or {}).get("pending")
            second = c1.step(sid, {"x": g1}, worker="w1")
            answers = [first.result(timeout=30), second]
    want = torch_adam(p0, [(g0 + g1) / 2])
    for out in answers:
        assert out.version == 1 and out.params is not None
        assert torch.equal(out.params["x"], want)
    return problem, pending, answers


def test_a_second_push_of_a_worker_names_the_worker_field(server: str) -> None:
    """A sync round: worker w0's second push while its first waits in the round is a 409
    ``duplicate_push`` naming ``worker`` (was ``X-Optserve-Worker``) and leaves the round
    alone: w1's push then closes it, and both answers are torch's step on the mean."""
    problem, _, _ = stray_push_in_a_round(server, "w0")
    assert (problem["status"], problem["code"], problem["field"]) == (
        409, "duplicate_push", "worker")
    assert problem["worker"] == "w0"


@pytest.mark.parametrize("worker", ["w0\n", "w" * 128 + "\n"])
def test_a_worker_id_with_a_trailing_newline_is_refused(server: str, worker: str) -> None:
    """A worker id is 1-128 of letters, digits and ``._:@-``: ``"w0\n"`` is a 422
    ``invalid_worker`` naming ``worker``, not another worker than ``w0`` (it joined w0's round
    as a second worker, so one worker's gradients counted twice); the round is left alone and
    w1's push closes it with torch's step on the mean."""
    problem, pending, answers = stray_push_in_a_round(server, worker)
    assert (problem["status"], problem["code"], problem["field"]) == (
        422, "invalid_worker", "worker")
    assert pending == ["w0"]
    for out in answers:
        assert out.sync == {"workers": ["w0", "w1"], "expected": 2, "partial": False}


def test_problem_extras_without_a_value_are_left_out_as_over_http() -> None:
    """An extra problem field whose value is None is left out, as the HTTP routes leave it
    out (``app.api.problems.problem``); it went out as ``null``."""
    from app.errors import Conflict
    from app.transport.local import problem_of as socket_problem

    out = socket_problem(Conflict("no", code="stale_gradient", field="base_version",
                                  base_version=None, current_version=3))
    assert out == {"type": "urn:optserve:problem:stale_gradient", "title": "Conflict",
                   "status": 409, "detail": "no", "code": "stale_gradient",
                   "field": "base_version", "current_version": 3}


def test_a_step_messages_options_are_read_as_an_http_steps(server: str) -> None:
    """A step message's ``param_groups`` are refused as an HTTP step's are: a tensor ``lr``
    whose base64 is not canonical (422 ``invalid_tensor`` naming its ``b64``). Nothing is
    applied; with the canonical text the step is torch's with that lr."""
    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    lr = torch.tensor(0.05)
    good = base64.b64encode(lr.reshape(1).view(torch.uint8).numpy().tobytes()).decode()
    body = good.rstrip("=")  # its last character carries unused bits: set one (same bytes)
    loose = body[:-1] + chr(ord(body[-1]) + 1) + good[len(body):]
    assert base64.b64decode(loose) == base64.b64decode(good) and loose != good
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sid = adam_session(h, p0)
        hello(s, server)
        b = frames(s, {"op": "bind", "session": sid})["binding"]
        before = state_of(h, sid)
        step: dict[str, Any] = {"op": "step", "binding": b, "grads": ["x"]}
        tensor_lr = {"dtype": "float32", "shape": [], "b64": loose}
        problem = problem_of(frames(s, {**step, "param_groups": {"0": {"lr": tensor_lr}}}))
        assert (problem["status"], problem["code"], problem["field"]) == (
            422, "invalid_tensor", "param_groups.0.lr.b64")
        assert same_state(state_of(h, sid), before)
        tensor_lr["b64"] = good
        assert frames(s, {**step, "param_groups": {"0": {"lr": tensor_lr}}})["version"] == 1
        p = p0.clone().requires_grad_(True)
        opt = torch.optim.Adam([p], lr=1e-2)
        opt.param_groups[0]["lr"] = lr.clone()
        p.grad = torch.zeros(8)  # (the slot's fresh bytes)
        opt.step()
        assert torch.equal(h.get_params(sid).params["x"], p.detach())


def test_a_client_cannot_resize_the_segment_it_was_handed(server: str) -> None:
    """The segment's size is sealed: a client that truncated the descriptor it got made the
    server's next read of a gradient slot past the new end a SIGBUS, which ended the whole
    server (every tenant's sessions with it). Now its ``ftruncate`` fails (EPERM), growing too,
    and the session steps on as torch does."""
    import mmap

    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sid = adam_session(h, p0)
        hello(s, server)
        body = json.dumps({"op": "bind", "session": sid}).encode()
        s.sendall(struct.pack("<I", len(body)) + body)
        data, fds, _, _ = socket.recv_fds(s, 1 << 20, 4)
        assert len(fds) == 1
        fd = fds[0]
        try:
            (n,) = struct.unpack("<I", data[:4])
            while len(data) < 4 + n:
                data += s.recv(4 + n - len(data))
            bound = json.loads(data[4:4 + n])
            for size in (0, bound["size"] // 2, bound["size"] * 2):
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, size)
            assert os.fstat(fd).st_size == bound["size"]
            slot = bound["params"][0]
            with mmap.mmap(fd, bound["size"]) as m:
                m[slot["grad"]:slot["grad"] + slot["nbytes"]] = g.numpy().tobytes()
            assert frames(s, {"op": "step", "binding": bound["binding"], "grads": ["x"],
                              "return": "none"})["version"] == 1
        finally:
            os.close(fd)
        assert torch.equal(h.get_params(sid).params["x"], torch_adam(p0, [g]))


def test_a_frame_over_the_limit_is_answered_before_the_connection_closes(server: str) -> None:
    """A length prefix past the frame limit: a 413 ``payload_too_large`` naming ``message``
    with the limit, then the connection closes (the frames after it cannot be found); it
    closed without an answer. The session is unchanged, and steps as torch does over a new
    connection."""
    from app.transport.local import MAX_FRAME

    p0 = torch.randn(8, generator=torch.Generator().manual_seed(1))
    g = torch.randn(8, generator=torch.Generator().manual_seed(2))
    with optserve.Client(server, api_key=KEY, transport="http") as h:
        sid = adam_session(h, p0)
        before = state_of(h, sid)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            hello(s, server)
            s.sendall(struct.pack("<I", MAX_FRAME + 1) + b'{"op": "pull"')
            data = b""
            try:
                while chunk := s.recv(1 << 16):
                    data += chunk
            except ConnectionResetError:  # (closed with the frame's bytes unread: a reset)
                pass
            assert len(data) >= 4, "closed without an answer"
            (n,) = struct.unpack("<I", data[:4])
            answer = json.loads(data[4:4 + n])
            problem = problem_of(answer)
            assert (problem["status"], problem["code"], problem["field"], problem["limit"]) == (
                413, "payload_too_large", "message", MAX_FRAME)
            assert len(data) == 4 + n  # nothing after it: closed
        assert same_state(state_of(h, sid), before)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            hello(s, server)
            b = frames(s, {"op": "bind", "session": sid})["binding"]
            assert frames(s, {"op": "pull", "binding": b})["version"] == 0
        out = h.step(sid, {"x": g})
        assert out.params is not None and torch.equal(out.params["x"], torch_adam(p0, [g]))


def test_a_sharded_session_steps_through_the_segment_as_torch(server: str) -> None:
    """A sharded session binds and steps through the shared segment (its parameters written
    into their slots once acknowledged), bitwise as torch's Adam; what only plain sessions
    offer (client scalars) is a 422 ``not_supported_here`` naming it, nothing applied."""
    import mmap

    gen = torch.Generator().manual_seed(5)
    p0 = {"a": torch.randn(6, generator=gen), "b": torch.randn(3, 2, generator=gen)}
    grads = [{n: torch.randn(t.shape, generator=gen) for n, t in p0.items()} for _ in range(3)]
    with optserve.Client(server, api_key=KEY, transport="http") as h, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sid = h.create_session(optimizer="Adam", options={"lr": 1e-2}, params=p0, shards=2).id
        hello(s, server)
        body = json.dumps({"op": "bind", "session": sid}).encode()
        s.sendall(struct.pack("<I", len(body)) + body)
        data, fds, _, _ = socket.recv_fds(s, 1 << 20, 4)
        (n,) = struct.unpack("<I", data[:4])
        while len(data) < 4 + n:
            data += s.recv(4 + n - len(data))
        bound = json.loads(data[4:4 + n])
        slots = {slot["name"]: slot for slot in bound["params"]}
        try:
            with mmap.mmap(fds[0], bound["size"]) as m:
                def view(name: str, key: str) -> torch.Tensor:
                    slot = slots[name]
                    raw = torch.frombuffer(m, dtype=torch.uint8, count=slot["nbytes"],
                                           offset=slot[key])
                    return raw.view(torch.float32).view(slot["shape"])
                step = {"op": "step", "binding": bound["binding"], "grads": ["a", "b"]}
                for k, g in enumerate(grads):
                    for name, t in g.items():
                        view(name, "grad").copy_(t)
                    if k == 1:
                        before = state_of(h, sid)
                        problem = problem_of(frames(s, {**step, "scalars": {"loss": 1.0}}))
                        assert (problem["code"], problem["field"]) == ("not_supported_here",
                                                                       "scalars")
                        assert same_state(state_of(h, sid), before)
                    assert frames(s, step)["version"] == k + 1
                got = {name: view(name, "param").clone() for name in slots}
                del view
        finally:
            os.close(fds[0])
    local = {n: t.clone().requires_grad_(True) for n, t in p0.items()}
    opt = torch.optim.Adam(list(local.values()), lr=1e-2)
    for g in grads:
        for name, t in g.items():
            local[name].grad = t.clone()
        opt.step()
    for name, t in local.items():
        assert torch.equal(got[name], t.detach()), name

