"""Request heads are bounded (``app.api.malformed_http``): a request line and headers not
complete within ``OPTSERVE_HEAD_TIMEOUT_S`` of the connection's start (or of the previous
answer's end) get a 408 ``request_timeout`` problem and the connection is closed; a connection
that sends nothing is closed; a head past ``OPTSERVE_MAX_HEAD_KB`` or with more than
``OPTSERVE_MAX_HEADERS`` lines gets a 431 ``headers_too_large``. Once a head is read the clock
stops: a body trickling in longer than the head timeout, and a long poll waiting longer, are
answered as before. The server serves the next connection after each.

Raw bytes over sockets to a server of its own with a 1 s head timeout (the shared one keeps
the default, 10 s), which serves with the HTTP protocol ``python -m app`` does.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import LiveServer, _test_settings
from tests.integration.test_malformed_http import Answers, assert_serves, connect, read_answer

pytestmark = pytest.mark.integration

HEAD_TIMEOUT_S = 1.0
PROBLEM = "application/problem+json"
PARTIAL_HEAD = b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    live = LiveServer(_test_settings(head_timeout_s=HEAD_TIMEOUT_S))
    url = live.start()
    try:
        yield url
    finally:
        live.stop()


def jt(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def create(url: str, sid: str) -> torch.Tensor:
    """An SGD session ``sid`` (momentum 0.9); its initial parameter."""
    w = torch.randn(6, generator=torch.Generator().manual_seed(7))
    r = httpx.post(f"{url}/v1/sessions", json={"id": sid, "optimizer": "SGD", "options": {
        "lr": 0.1, "momentum": 0.9}, "params": {"w": jt(w)}}, timeout=60)
    assert r.status_code == 201, r.text
    return w


def torch_sgd(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    w.grad = grad
    opt.step()
    return w


def assert_problem(status: int, headers: dict[str, str], body: bytes, want: int,
                   code: str) -> dict[str, Any]:
    assert status == want, body
    assert (headers["content-type"], headers["connection"]) == (PROBLEM, "close")
    problem: dict[str, Any] = json.loads(body)
    assert (problem["type"], problem["status"], problem["code"], problem["field"]) == (
        f"urn:optserve:problem:{code}", want, code, "headers"), problem
    assert problem["detail"].endswith("; the connection is closed"), problem
    # every response carries X-Request-Id, echoed in its problem body (protocol.md)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), headers
    assert problem["request_id"] == headers["x-request-id"], problem
    return problem


@pytest.mark.parametrize("after_an_answer", [False, True], ids=["fresh", "keep-alive"])
def test_a_head_that_stalls_gets_a_408_and_the_connection_closes(server: str,
                                                                 after_an_answer: bool) -> None:
    with connect(server) as sock:
        if after_an_answer:  # the clock runs from the end of the previous answer
            answers = Answers(sock)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert answers.next()[0] == 200
        started = time.monotonic()
        sock.sendall(PARTIAL_HEAD)
        status, headers, body = read_answer(sock)
        waited = time.monotonic() - started
    problem = assert_problem(status, headers, body, 408, "request_timeout")
    assert problem["title"] == "Request timeout"
    assert problem["detail"] == ("the request line and headers were not complete within 1 s "
                                 "(OPTSERVE_HEAD_TIMEOUT_S); the connection is closed")
    assert HEAD_TIMEOUT_S * 0.9 < waited < HEAD_TIMEOUT_S + 3
    assert_serves(server)


def test_a_connection_that_sends_nothing_is_closed(server: str) -> None:
    """Nothing to answer: closed without a word (a 408 written just as a client sends a
    request would read as its answer)."""
    with connect(server) as sock:
        started = time.monotonic()
        assert sock.recv(65536) == b""
        waited = time.monotonic() - started
    assert HEAD_TIMEOUT_S * 0.9 < waited < HEAD_TIMEOUT_S + 3
    assert_serves(server)


def test_a_body_trickling_in_past_the_head_timeout_steps(server: str) -> None:
    w = create(server, "trickle")
    grad = torch.linspace(-1, 1, 6)
    body = json.dumps({"grads": {"w": jt(grad)}}).encode()
    head = (f"POST /v1/sessions/trickle/step HTTP/1.1\r\nHost: x\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    pieces = [body[i:i + len(body) // 5 + 1] for i in range(0, len(body), len(body) // 5 + 1)]
    with connect(server) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for piece in pieces:
            time.sleep(0.4)  # 2 s in all, never 1 s without bytes
            sock.sendall(piece)
        status, _, answer = Answers(sock).next()
    assert time.monotonic() - started > 2 * HEAD_TIMEOUT_S
    assert status == 200, answer
    got = httpx.get(f"{server}/v1/sessions/trickle/params").json()["params"]["w"]["data"]
    assert torch.equal(torch.tensor(got, dtype=torch.float32), torch_sgd(w, grad))
    assert_serves(server)


def test_a_long_poll_waits_past_the_head_timeout(server: str) -> None:
    w = create(server, "poll")
    grad = torch.arange(6, dtype=torch.float32) - 2.5
    polled: list[httpx.Response] = []
    poll = threading.Thread(target=lambda: polled.append(httpx.get(
        f"{server}/v1/sessions/poll/params?min_version=1&wait_s=20", timeout=30)))
    started = time.monotonic()
    poll.start()
    time.sleep(2 * HEAD_TIMEOUT_S)
    assert polled == []  # still waiting, past the head timeout
    r = httpx.post(f"{server}/v1/sessions/poll/step", json={"grads": {"w": jt(grad)}})
    assert r.status_code == 200, r.text
    poll.join(30)
    assert time.monotonic() - started > 2 * HEAD_TIMEOUT_S
    assert polled and polled[0].status_code == 200, polled
    answer = polled[0].json()
    assert answer["version"] == 1
    got = torch.tensor(answer["params"]["w"]["data"], dtype=torch.float32)
    assert torch.equal(got, torch_sgd(w, grad))
    assert_serves(server)


HEADS = {
    "a 200 KB header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000
                       + b"\r\n\r\n",
    "5,000 header lines": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                          + b"".join(b"X-%d: 1\r\n" % i for i in range(5000)) + b"\r\n",
    "201 header lines": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                        + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    "a 70 KB URL": b"GET /healthz?q=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


def read_refusal(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The one answer on ``sock``, then its end: closed, or reset where the server closed it
    with the rest of the refused head unread."""
    answers = Answers(sock)
    answer = answers.next()
    assert answers.data == b""
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass
    return answer


def refused_head(server: str, raw: bytes) -> dict[str, Any]:
    """``raw`` sent whole (or until the server stops reading it): its one answer, a 431
    ``headers_too_large`` that does not echo the head, then the connection's end; the
    problem."""
    with connect(server) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):  # refused before it was all sent
            pass
        status, headers, body = read_refusal(sock)
    problem = assert_problem(status, headers, body, 431, "headers_too_large")
    assert len(body) < 400  # the head is not echoed
    return problem


@pytest.mark.parametrize("case", list(HEADS))
def test_a_head_past_its_bounds_gets_a_431(server: str, case: str) -> None:
    problem = refused_head(server, HEADS[case])
    lines = case.endswith("lines")
    assert problem["detail"] == (
        "more than 200 header lines (OPTSERVE_MAX_HEADERS); the connection is closed" if lines
        else "the request line and headers take more than 64 KiB (OPTSERVE_MAX_HEAD_KB); the "
        "connection is closed")
    assert_serves(server)


def test_a_header_line_that_never_ends_gets_a_431(server: str) -> None:
    """httptools holds a header line until its end: the bytes read inside the head count."""
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        try:
            for _ in range(8):
                time.sleep(0.05)  # (read one by one)
                sock.sendall(b"a" * 20_000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, headers, body = read_refusal(sock)
    assert_problem(status, headers, body, 431, "headers_too_large")
    assert_serves(server)


def test_a_head_at_its_bounds_is_served(server: str) -> None:
    """200 header lines (Host one of them) and a 60 KB head."""
    heads = [b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-%d: 1\r\n" % i for i in range(199)) + b"\r\n",
             b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 60_000 + b"\r\n\r\n"]
    for head in heads:
        with connect(server) as sock:
            sock.sendall(head)
            status, _, body = Answers(sock).next()
        assert (status, json.loads(body)) == (200, {"status": "ok"})
