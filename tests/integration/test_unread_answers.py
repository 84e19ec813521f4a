"""A client that reads none of its answer is dropped after ``OPTSERVE_BODY_TIMEOUT_S``; one that
reads slowly but steadily gets all of it (``app.api.send_clock``), against a real uvicorn on
127.0.0.1 with each of the server's HTTP protocols (httptools, h11), over raw sockets.

Before, an answer the client never read waited in the connection's buffer, in the server's
memory, for as long as the client kept the connection: a client asking for a large session's
parameters on many connections, and reading nothing, could run the server out of memory.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load as st_load

from app.api.malformed_http import PROBLEM_H11, PROBLEM_HTTPTOOLS
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_malformed_http import Answers, connect
from tests.torch_reference import Reference, assert_tensors_equal, json_tensor

pytestmark = pytest.mark.integration

N = 2_000_000  # an 8 MB answer: more than the kernel's buffers for a connection hold
TIMEOUT_S = 0.5
PROTOCOLS = {"httptools": PROBLEM_HTTPTOOLS, "h11": PROBLEM_H11}


@pytest.fixture(params=sorted(PROTOCOLS))
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    protocol = PROTOCOLS[request.param]
    assert protocol is not None, f"no problem+json {request.param} protocol"
    live = LiveServer(_test_settings(body_timeout_s=TIMEOUT_S), http=protocol)
    # uvicorn closes a kept-alive connection this long after an answer was handed over, and
    # that close waits for the answer to be written: a client that reads nothing must still
    # be dropped (the server's default, 5 s, is longer than the body timeout here)
    live.server.config.timeout_keep_alive = TIMEOUT_S / 5
    with live.serving() as started:
        yield started


def small_window(url: str) -> socket.socket:
    """A connection whose receive buffer is small (set before connecting, so the window the
    server sees is small too)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect((host, int(port)))
    return sock


def get_params(sid: str) -> bytes:
    return (f"GET /v1/sessions/{sid}/params HTTP/1.1\r\nHost: x\r\n"
            "Accept: application/octet-stream\r\n\r\n").encode()


def test_an_unread_answer_drops_its_connection_and_a_slow_reader_gets_all_of_it(url: str
                                                                                  ) -> None:
    init = torch.randn(N, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(N, generator=torch.Generator().manual_seed(1))
    r = httpx.post(f"{url}/v1/sessions", timeout=60, json={
        "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9}, "durability": "memory",
        "params": {"w": json_tensor(init, b64=True)}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    ref = Reference(torch.optim.SGD, [({"w": init}, {})], {"lr": 0.1, "momentum": 0.9})
    r = httpx.post(f"{url}/v1/sessions/{sid}/step?return=none", timeout=60,
                   json={"grads": {"w": json_tensor(grad, b64=True)}})
    assert r.status_code == 200, r.text
    ref.step({"w": grad})

    # asks, reads nothing for more than the timeout: the connection is dropped, the answer
    # not whole
    unread = small_window(url)
    unread.sendall(get_params(sid))
    time.sleep(TIMEOUT_S * 4)
    received, ended = 0, ""
    try:
        while chunk := unread.recv(1 << 16):
            received += len(chunk)
        ended = "closed"
    except ConnectionResetError:
        ended = "reset"
    unread.close()
    assert ended in ("reset", "closed") and received < 4 * N, (ended, received)

    # reads 64 KiB every 20 ms (about 3 MB/s: the answer takes several timeouts): the whole
    # answer, equal to torch's parameters
    slow = connect(url)
    slow.sendall(get_params(sid))
    answers = Answers(slow)
    real_recv = slow.recv

    class Paced:
        def recv(self, n: int) -> bytes:
            time.sleep(0.02)
            return real_recv(min(n, 65536))
    answers.sock = Paced()  # type: ignore[assignment]
    started = time.monotonic()
    status, headers, body = answers.next()
    took = time.monotonic() - started
    slow.close()
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    assert_tensors_equal(st_load(body), ref.params, "the slowly read parameters")
    assert took > 2 * TIMEOUT_S, took  # (it did read for longer than the timeout)

    # and the server serves on
    r = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
    assert r.status_code == 200 and r.json()["version"] == 1
