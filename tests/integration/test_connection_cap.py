"""The bound on open connections (``OPTSERVE_MAX_CONNECTIONS``, :mod:`app.api.connection_cap`)
against a real uvicorn serving with the HTTP protocol ``python -m app`` does: with the bound's
connections held open (idle, as a client exhausting the server's file descriptors holds them),
one more is answered at once with a 503 ``too_many_connections`` problem+json and closed,
whether it sent a request or not; once they are released, requests are served again and a
step equals in-process torch's. A server of its own, bound at 5."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from tests.conftest import LiveServer, _test_settings
from tests.integration.test_malformed_http import read_answer

pytestmark = pytest.mark.integration

LIMIT = 5


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[LiveServer, str]]:
    server = LiveServer(_test_settings(max_connections=LIMIT, durability="step"))
    url = server.start()
    try:
        yield server, url
    finally:
        server.stop()


def open_count(server: LiveServer) -> int:
    """The connections the server counts as open (-1: it counts none, no bound)."""
    slots = getattr(server.app.state, "connections", None)
    return -1 if slots is None else int(slots.open)


def wait_open(server: LiveServer, count: int) -> None:
    deadline = time.monotonic() + 5
    while open_count(server) not in (count, -1):
        assert time.monotonic() < deadline, (open_count(server), count)
        time.sleep(0.01)
    time.sleep(0.05 if open_count(server) >= 0 else 0.3)


def jt(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.reshape(-1).tolist()}


def assert_refused(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 503, body
    assert headers["content-type"] == "application/problem+json"
    assert (headers["connection"], headers["retry-after"]) == ("close", "1")
    problem = json.loads(body)
    assert (problem["status"], problem["code"]) == (503, "too_many_connections"), problem
    assert f"({LIMIT}, OPTSERVE_MAX_CONNECTIONS)" in problem["detail"], problem
    # every response carries X-Request-Id, echoed in its problem body (protocol.md)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), headers
    assert problem["request_id"] == headers["x-request-id"], problem


def test_a_connection_past_the_bound_gets_a_503_problem_and_is_closed(
        live: tuple[LiveServer, str]) -> None:
    server, url = live
    port = int(url.rsplit(":", 1)[1])
    wait_open(server, 0)
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(LIMIT)]
    try:
        wait_open(server, LIMIT)
        # one that sends nothing: answered at once, then closed (EOF)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as extra:
            status, headers, body = read_answer(extra)
            assert_refused(status, headers, body)
            assert extra.recv(1) == b""
        # one that sends its request as it connects (an HTTP client): the answer arrives
        # whole, not lost to a reset
        r = httpx.get(f"{url}/v1/sessions", timeout=5)
        assert_refused(r.status_code, dict(r.headers), r.content)
        assert open_count(server) == LIMIT
    finally:
        for s in held:
            s.close()
    wait_open(server, 0)
    w = torch.randn(6, generator=torch.Generator().manual_seed(3))
    g = torch.randn(6, generator=torch.Generator().manual_seed(4))
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/sessions", json={"id": "capped", "optimizer": "SGD",
                                         "options": {"lr": 0.1, "momentum": 0.9},
                                         "params": {"w": jt(w)}})
        assert r.status_code == 201, r.text
        r = c.post("/v1/sessions/capped/step", json={"grads": {"w": jt(g)}})
        assert r.status_code == 200, r.text
        got = torch.tensor(r.json()["params"]["w"]["data"], dtype=torch.float32)
    want = w.clone()
    opt = torch.optim.SGD([want], lr=0.1, momentum=0.9)
    want.grad = g
    opt.step()
    assert torch.equal(got, want.detach())
