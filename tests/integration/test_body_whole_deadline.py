"""A request body trickled a byte at a time never stalled long enough for
``OPTSERVE_BODY_TIMEOUT_S`` (the gap between bytes) and held its connection, and its body's
memory, for as long as the client liked. The whole body must now arrive within
``OPTSERVE_BODY_TIMEOUT_S`` plus its bytes at ``OPTSERVE_BODY_MIN_KIB_S``: a trickle gets the
408 ``body_timeout`` problem after about the timeout, the connection is closed, and nothing was
applied (the session's parameters are still torch's values after no step, and the next whole
step equals torch's first). Over raw sockets against real uvicorn servers on 127.0.0.1 with
each HTTP protocol ``python -m app`` may use, for a small body (read through ``receive()``)
and a large one (read through the protocol's sink under httptools)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

from app.api import connection_cap
from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol
from tests.integration import test_lingering_refusals as lingering_refusals

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
MIN_KIB_S = 1024.0  # a 1 MiB body: 1 s more
LR = 0.1
LINGER_S = 3.0


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    protocol = problem_protocol(request.param)
    settings = _test_settings(body_timeout_s=TIMEOUT_S, body_min_kib_s=MIN_KIB_S)
    # a linger well past the 0.4 s the client goes on sending after its answer: a loaded
    # machine's client thread may be late by more than the default's 0.6 s to spare
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_cap, "LINGER_S", LINGER_S)
        with LiveServer(settings, http=protocol).serving() as url:
            yield url


def step_body(n: int) -> bytes:
    grads = {"w": {"dtype": "float32", "shape": [n], "data": [0.5] * n}}
    return json.dumps({"grads": grads}).encode()


@pytest.mark.parametrize("n", [4, 120_000], ids=["small", "large"])
def test_a_trickled_body_gets_408_and_nothing_is_applied(server: str, n: int) -> None:
    p0 = torch.linspace(-1.0, 1.0, n)
    sid = f"trickle-{n}"
    with httpx.Client(base_url=server, timeout=30) as c:
        made = c.post("/v1/sessions", json={
            "id": sid, "optimizer": "SGD", "options": {"lr": LR},
            "params": {"w": {"dtype": "float32", "shape": [n], "data": p0.tolist()}}})
        assert made.status_code == 201, made.text
        body = step_body(n)
        host, port = server.removeprefix("http://").split(":")
        head = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        whole_s = TIMEOUT_S + len(body) / (MIN_KIB_S * 1024)
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(head.encode() + body[:len(body) // 2])
            sock.setblocking(False)
            answer, sent, closed = b"", len(body) // 2, False
            # a byte every 0.2 s (never a gap of TIMEOUT_S) until an answer, or 4 times the
            # whole body's deadline
            while time.monotonic() - started < 4 * whole_s + 2:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    chunk = None
                if chunk == b"":
                    closed = True
                    break
                if chunk:
                    answer += chunk
                    continue
                if sent < len(body) - 1:
                    try:
                        sock.send(body[sent:sent + 1])
                        sent += 1
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        pass
                time.sleep(0.2)
            took = time.monotonic() - started
        status_line, _, rest = answer.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 408"), (took, answer[:300])
        problem = json.loads(rest.partition(b"\r\n\r\n")[2])
        assert problem["code"] == "body_timeout" and problem["field"] == "body", problem
        assert "OPTSERVE_BODY_MIN_KIB_S" in problem["detail"], problem
        assert closed, "the connection was left open"
        # (the deadline counts the bytes that came: half of them, then one every 0.2 s)
        assert TIMEOUT_S * 0.9 < took < whole_s + 3, took
        # nothing applied: the parameters are torch's after no step; the next step is the first
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 0
        got = c.post(f"/v1/sessions/{sid}/step", content=body,
                     headers={"Content-Type": "application/json"})
        assert got.status_code == 200, got.text
        w = torch.nn.Parameter(p0.clone())
        w.grad = torch.full((n,), 0.5)
        torch.optim.SGD([w], lr=LR).step()
        data = got.json()["params"]["w"]["data"]
        assert torch.equal(torch.tensor(data, dtype=torch.float32), w.detach())


@pytest.mark.parametrize("n", [4096, 120_000], ids=["small", "large"])
def test_a_client_still_sending_after_the_408_reads_it_and_no_reset(server: str, n: int) -> None:
    """The 408 closes the connection while its client is still sending: the server writes its
    end of the stream after the answer and goes on reading (and dropping) for a moment, so
    the client's sends after the answer do not meet a reset, and it reads the whole answer
    and then the end of the stream (RFC 9112 9.6). A server that closed at once answered the
    next byte with a reset: ``EPIPE``/``ECONNRESET`` on the client's next send or read."""
    sid = f"linger-{n}"
    head, body = _session_and_step(server, sid, n)
    half = len(body) // 2
    answer = lingering_refusals.answer_while_sending(server, head + body[:half], body[half:])
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    with httpx.Client(base_url=server, timeout=30) as c:
        assert c.get(f"/v1/sessions/{sid}").json()["version"] == 0


def _session_and_step(server: str, sid: str, n: int) -> tuple[bytes, bytes]:
    """A session ``sid`` of SGD over ``n`` zeros, and the head and body of a JSON step of it."""
    with httpx.Client(base_url=server, timeout=30) as c:
        made = c.post("/v1/sessions", json={
            "id": sid, "optimizer": "SGD", "options": {"lr": LR},
            "params": {"w": {"dtype": "float32", "shape": [n], "data": [0.0] * n}}})
        assert made.status_code == 201, made.text
    body = step_body(n)
    authority = server.removeprefix("http://")
    head = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: {authority}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode(), body


def test_a_client_that_never_stops_sending_is_closed_after_the_linger(server: str) -> None:
    """The lingering is bounded: a client that goes on sending after its 408 (and never closes
    its side) has its connection closed for good about ``connection_cap.LINGER_S`` (the
    module's :data:`LINGER_S` here) after the answer: its sends then meet the reset."""
    head, body = _session_and_step(server, "linger-forever", 4096)
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body[:len(body) // 2])
        sent = len(body) // 2
        sock.setblocking(False)
        answer, answered_at, refused_at = b"", None, None
        started = time.monotonic()
        while time.monotonic() - started < 30:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                chunk = None
            except ConnectionResetError:
                refused_at = time.monotonic()
                break
            if chunk:
                answer += chunk
                if answered_at is None and lingering_refusals.whole(answer):
                    answered_at = time.monotonic()
                continue
            assert sent < len(body) - 1, "the body ran out before the server closed"
            try:
                sock.send(body[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                refused_at = time.monotonic()
                break
            sent += 1
            time.sleep(0.05)
        assert answer.startswith(b"HTTP/1.1 408") and answered_at is not None, answer[:300]
        assert refused_at is not None, "the connection was never closed"
        # (answered_at is when the client read the answer, after the linger began: a loaded
        # machine's client reads it late)
        assert LINGER_S / 2 < refused_at - answered_at < LINGER_S + 5, refused_at - answered_at
