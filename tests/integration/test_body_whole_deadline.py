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

from app.api.malformed_http import PROBLEM_H11, PROBLEM_HTTPTOOLS
from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
MIN_KIB_S = 1024.0  # a 1 MiB body: 1 s more
LR = 0.1


@pytest.fixture(scope="module", params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    protocol = PROBLEM_HTTPTOOLS if request.param == "httptools" else PROBLEM_H11
    if protocol is None:
        pytest.fail(f"the {request.param} protocol could not be made")
    settings = _test_settings(body_timeout_s=TIMEOUT_S, body_min_kib_s=MIN_KIB_S)
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
