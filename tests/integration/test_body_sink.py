"""Large bodies read through the protocol's sink (``app.api.body_sink``), against a real
uvicorn on 127.0.0.1 with the server's own HTTP protocol, over raw sockets: every step's
parameters equal an in-process torch run's, bit for bit.

- a large body goes through the sink (not ``receive()``), in one piece or trickling in, and
  the access log counts its bytes;
- a stall mid-body is a 408 that closes the connection, and a client gone mid-body changes
  nothing;
- ``Expect: 100-continue`` is answered; keep-alive and a request pipelined behind a large
  body are read right;
- a large body that is not valid safetensors is a 4xx, and the connection serves on;
- a client that half-closes after its body still reads its answer.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from app.api import body_sink
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_malformed_http import Answers, connect
from tests.torch_reference import json_tensor

pytestmark = pytest.mark.integration

N = 300_000  # 1.2 MB of float32: past bodies.OFFLOAD_BYTES, so read into a buffer


@pytest.fixture(params=["uvloop", "asyncio"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A server on uvloop (what ``python -m app`` runs on) or asyncio's own loop (whose
    transports switch protocols, and read into a buffered protocol's buffer, their own way)."""
    live = LiveServer(_test_settings(body_timeout_s=0.5), loop=request.param)
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


class Parts(list[int]):
    mode = ""
    #: the DirectBody protocols made (direct mode)
    directs: list[body_sink.DirectBody]

    def released(self) -> bool:
        """Every DirectBody let go of its buffer (uvloop keeps the last one; a buffer it held
        would be a body's size, kept per connection: 1.28x the 1e7 Adam session's memory)."""
        return all(d.target.nbytes == 0 and d.sink is None for d in self.directs)


@pytest.fixture(params=["direct", "parts"])
def parts(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Parts:
    """The sizes of the body parts every sink took (the server runs in this process): handed
    over by httptools (``part``) and read into the buffer straight from the socket (``read``,
    as a negative size). ``parts``: the server never reads directly."""
    seen = Parts()
    seen.mode = request.param
    seen.directs = []
    init = body_sink.DirectBody.__init__

    def spy_init(self: body_sink.DirectBody, *args: Any) -> None:
        init(self, *args)
        seen.directs.append(self)
    monkeypatch.setattr(body_sink.DirectBody, "__init__", spy_init)
    part, read = body_sink.Sink.part, body_sink.Sink.read

    def spy_part(self: body_sink.Sink, body: bytes) -> None:
        seen.append(len(body))
        part(self, body)

    def spy_read(self: body_sink.Sink, n: int) -> None:
        seen.append(-n)
        read(self, n)
    monkeypatch.setattr(body_sink.Sink, "part", spy_part)
    monkeypatch.setattr(body_sink.Sink, "read", spy_read)
    if request.param == "parts":
        monkeypatch.setattr(body_sink, "_direct_fits", lambda scope, size: False)
    else:
        # the transport hands the HTTP protocol back after each body (a stale DirectBody
        # would swallow the next request)
        done = body_sink.SinkingProtocol._direct_done

        def spy_done(self: body_sink.SinkingProtocol) -> None:
            done(self)
            protocol: Any = self
            assert protocol.transport.get_protocol() is self
        monkeypatch.setattr(body_sink.SinkingProtocol, "_direct_done", spy_done)
    return seen


def taken(parts: list[int]) -> int:
    return sum(map(abs, parts))


def request(method: str, path: str, body: bytes = b"", *, binary: bool = False,
            extra: str = "") -> tuple[bytes, bytes]:
    kind = "application/octet-stream" if binary else "application/json"
    head = (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {kind}\r\n"
            f"Accept: {kind}\r\nContent-Length: {len(body)}\r\n{extra}\r\n").encode()
    return head, body


def create(url: str, sid: str, init: torch.Tensor) -> None:
    spec = {"id": sid, "optimizer": "Adam", "options": {"lr": 1e-3},
            "params": {"w": json_tensor(init, b64=True)}}
    with connect(url) as sock:
        head, body = request("POST", "/v1/sessions", orjson.dumps(spec))
        sock.sendall(head + body)
        status, _, answer = Answers(sock).next()
    assert status == 201, answer


class Local:
    """The same steps in process."""

    def __init__(self, init: torch.Tensor) -> None:
        self.w = init.clone()
        self.opt = torch.optim.Adam([self.w], lr=1e-3)

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        self.w.grad = grad.clone()
        self.opt.step()
        return self.w


def setup(url: str, sid: str) -> tuple[Local, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    init = torch.randn(N, generator=g)
    create(url, sid, init)
    return Local(init), [torch.randn(N, generator=g) for _ in range(3)]


def answered(body: bytes) -> torch.Tensor:
    return st_load(body)["w"]


def test_a_large_body_goes_through_the_sink_whole_or_trickling(
        server: str, parts: Parts, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="optserve.access")
    local, grads = setup(server, "s")
    parts.clear()  # (the session\'s creation, a large JSON body, went through one too)
    with connect(server) as sock:
        answers = Answers(sock)
        # whole, then in pieces with pauses shorter than the body timeout (0.5 s) and a
        # whole upload longer than it, on one kept-alive connection
        head, body = request("POST", "/v1/sessions/s/step", st_save({"w": grads[0]}),
                             binary=True)
        sock.sendall(head + body)
        status, _, answer = answers.next()
        assert status == 200, answer
        assert torch.equal(answered(answer), local.step(grads[0]))
        assert taken(parts) == len(body), "the body did not go through the sink"
        assert (min(parts) < 0) == (parts.mode == "direct"), parts
        assert bool(parts.directs) == (parts.mode == "direct") and parts.released()

        parts.clear()
        head, body = request("POST", "/v1/sessions/s/step", st_save({"w": grads[1]}),
                             binary=True)
        sock.sendall(head)
        started = time.monotonic()
        pieces = [body[i:i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
        for piece in pieces:
            time.sleep(0.3)
            sock.sendall(piece)
        status, _, answer = answers.next()
        assert time.monotonic() - started > 0.5 * 2
        assert status == 200, answer
        assert torch.equal(answered(answer), local.step(grads[1]))
        # what arrived before the sink was attached is handed over with the first part
        assert taken(parts) == len(body) and len(parts) > 1
    # the access line is written once the answer has gone out: the client may read the second
    # answer before its line is logged
    deadline = time.monotonic() + 10
    while True:
        access: list[Any] = [r for r in caplog.records if r.name == "optserve.access"]
        logged = [r.fields for r in access if r.fields["path"] == "/v1/sessions/s/step"]
        if len(logged) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert [f["bytes_in"] for f in logged] == [len(body)] * 2


def test_a_stalled_or_abandoned_large_body_changes_nothing(server: str, parts: Parts
                                                           ) -> None:
    local, grads = setup(server, "t")
    parts.clear()  # (the session\'s creation, a large JSON body, went through one too)
    head, body = request("POST", "/v1/sessions/t/step", st_save({"w": grads[0]}), binary=True)
    # stalls halfway: 408 body_timeout after about the timeout
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(head + body[:len(body) // 2])
        answers = Answers(sock)
        status, _, answer = answers.next()
        assert status == 408 and b'"body_timeout"' in answer, answer
        assert 0.4 < time.monotonic() - started < 5
        # and closes the connection (its parser is in the middle of the body; nothing of it
        # is kept for a client that never sends the rest)
        sock.settimeout(5)
        answers.assert_closed()
    assert parts.released()
    assert taken(parts) > 0
    # goes away halfway
    with connect(server) as sock:
        sock.sendall(head + body[:len(body) // 2])
        time.sleep(0.1)
    time.sleep(0.2)
    # the session is as it was: the next step equals torch's first
    with connect(server) as sock:
        sock.sendall(head + body)
        status, _, answer = Answers(sock).next()
    assert status == 200, answer
    assert torch.equal(answered(answer), local.step(grads[0]))


def test_expect_100_continue_keep_alive_and_pipelining(server: str, parts: Parts) -> None:
    local, grads = setup(server, "u")
    parts.clear()  # (the session\'s creation, a large JSON body, went through one too)
    with connect(server) as sock:
        answers = Answers(sock)
        # the client waits for 100 Continue before it sends the body
        head, body = request("POST", "/v1/sessions/u/step", st_save({"w": grads[0]}),
                             binary=True, extra="Expect: 100-continue\r\n")
        sock.sendall(head)
        sock.settimeout(5)
        status, _, _ = answers.next()
        assert status == 100
        sock.sendall(body)
        status, _, answer = answers.next()
        assert status == 200, answer
        assert torch.equal(answered(answer), local.step(grads[0]))
        # a large step and a small request pipelined behind it, in one send
        head, body = request("POST", "/v1/sessions/u/step", st_save({"w": grads[1]}),
                             binary=True)
        after = b"GET /v1/sessions/u HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(head + body + after)
        status, _, answer = answers.next()
        assert status == 200, answer
        assert torch.equal(answered(answer), local.step(grads[1]))
        status, _, answer = answers.next()
        assert status == 200 and b'"step":2' in answer.replace(b" ", b""), answer
    assert taken(parts) > 0


def test_a_large_body_that_is_not_safetensors_is_refused_and_the_connection_serves_on(
        server: str, parts: Parts) -> None:
    local, grads = setup(server, "v")
    parts.clear()  # (the session\'s creation, a large JSON body, went through one too)
    good = st_save({"w": grads[0]})
    bad: list[tuple[bytes, str]] = [
        (b"\xff" * len(good), "a header length past the body"),
        (good[:8] + b"[" + good[9:], "a header that is not a JSON object"),
    ]
    with connect(server) as sock:
        answers = Answers(sock)
        for body, why in bad:
            head, _ = request("POST", "/v1/sessions/v/step", body, binary=True)
            sock.sendall(head + body)
            status, _, answer = answers.next()
            assert 400 <= status < 500, (why, status, answer)
            problem: Any = orjson.loads(answer)
            assert problem["code"] and problem["detail"], why
        head, body = request("POST", "/v1/sessions/v/step", good, binary=True)
        sock.sendall(head + body)
        status, _, answer = answers.next()
    assert status == 200, answer
    assert torch.equal(answered(answer), local.step(grads[0]))
    assert taken(parts) == 3 * len(good) and parts.released()


@contextlib.contextmanager
def half_closed(server: str, data: bytes) -> Iterator[Answers]:
    """A connection that sends ``data`` and then closes its sending side; its answers."""
    with connect(server) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        yield Answers(sock)


def test_a_client_that_half_closes_after_its_body_reads_its_answer(server: str,
                                                                  parts: Parts) -> None:
    """``shutdown(SHUT_WR)`` right after the body (``nc -N`` at the end of its input): the
    step's answer comes back whole, then the connection closes. With the body read straight
    from the socket the end of the input was read at once and the connection closed before
    the answer: the step was applied and never acknowledged. One half-closed inside its body
    is a 400 naming ``Content-Length`` and changes nothing."""
    local, grads = setup(server, "w")
    parts.clear()  # (the session's creation, a large JSON body, went through one too)
    head, body = request("POST", "/v1/sessions/w/step", st_save({"w": grads[0]}), binary=True)
    with connect(server) as sock:
        sock.sendall(head + body[:len(body) // 2])
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        # (a 400 naming Content-Length, nothing applied, then closed: it was gone, unanswered)
        cut = Answers(sock)
        status, headers, answer = cut.next()
        assert (status, headers.get("connection")) == (400, "close"), answer
        assert (orjson.loads(answer)["code"], orjson.loads(answer)["field"]) == (
            "malformed_http", "Content-Length"), answer
        cut.assert_closed()
    for grad in grads[:2]:
        head, body = request("POST", "/v1/sessions/w/step", st_save({"w": grad}), binary=True)
        with half_closed(server, head + body) as answers:
            status, headers, answer = answers.next()
            assert status == 200, answer
            assert headers.get("connection") == "close"
            assert torch.equal(answered(answer), local.step(grad))
            answers.assert_closed()
    assert taken(parts) == len(body) * 2 + len(body) // 2
    assert parts.released()
    # a small request too (no sink): a create answered, then closed
    spec = orjson.dumps({"id": "w2", "optimizer": "SGD", "options": {"lr": 0.1},
                         "params": {"w": json_tensor(torch.ones(2))}})
    head, body = request("POST", "/v1/sessions", spec)
    with half_closed(server, head + body) as answers:
        status, _, answer = answers.next()
        assert status == 201, answer
        answers.assert_closed()
    # and requests pipelined before the end of the input: each answered in order, then closed
    head, body = request("POST", "/v1/sessions/w/step", st_save({"w": grads[2]}), binary=True)
    with half_closed(server, head + body + b"GET /v1/sessions/w HTTP/1.1\r\nHost: x\r\n\r\n"
                     + b"GET /v1/sessions/w2 HTTP/1.1\r\nHost: x\r\n\r\n") as answers:
        status, _, answer = answers.next()
        assert status == 200 and torch.equal(answered(answer), local.step(grads[2])), answer
        status, _, answer = answers.next()
        assert status == 200 and b'"step":3' in answer.replace(b" ", b""), answer
        status, _, answer = answers.next()
        assert status == 200 and b'"w2"' in answer, answer
        answers.assert_closed()
