"""Requests pipelined behind a request asking to upgrade, on a real server with each of
uvicorn's HTTP protocols (httptools, and h11: uvicorn's choice where httptools is not
installed), as ``python -m app`` serves them (``app.api.malformed_http``, ``ws="none"``).

The server takes no Upgrade (``curl --http2``'s h2c, a WebSocket handshake) and serves such a
request as plain HTTP/1.1; every request pipelined behind it on the same connection, in the
same packet or in later ones, must be answered in order, and the connection stay usable. An
HTTP/1.0 request (no keep-alive in h11) is answered with ``Connection: close`` and the
connection closed, so the client knows to send the next one on a new connection. Steps are
compared with in-process torch.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvicorn

from app.api.malformed_http import PROBLEM_H11, PROBLEM_HTTPTOOLS
from app.config import Settings
from app.main import create_app
from tests.integration.test_malformed_http import H2C, WEBSOCKET, Answers

pytestmark = pytest.mark.integration
PROTOCOLS = {"httptools": PROBLEM_HTTPTOOLS, "h11": PROBLEM_H11}


@pytest.fixture(scope="module", params=sorted(PROTOCOLS))
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    protocol = PROTOCOLS[request.param]
    assert protocol is not None, f"no problem+json {request.param} protocol"
    settings = Settings(device="cpu", data_dir=Path(tempfile.mkdtemp(prefix="optserve-upg-")))
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on", http=protocol, ws="none")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield srv.servers[0].sockets[0].getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def post(path: str, body: bytes, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)


def get(path: str, extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n".encode() + extra + b"\r\n"


@pytest.mark.parametrize("upgrade", [H2C, WEBSOCKET], ids=["h2c", "websocket"])
def test_requests_pipelined_behind_an_upgrade_are_answered(server: int, upgrade: bytes
                                                           ) -> None:
    sid = f"pipe-{uuid.uuid4().hex[:12]}"
    x0 = torch.tensor([2.0, -1.0, 0.5])
    grads = [torch.tensor([0.25, 4.0, -2.0]), torch.tensor([-1.0, 0.5, 3.0])]
    create = json.dumps({"id": sid, "optimizer": "Adam", "options": {"lr": 0.1},
                         "params": {"x": {"dtype": "float32", "shape": [3],
                                          "data": x0.tolist()}}}).encode()
    steps = [json.dumps({"grads": {"x": {"dtype": "float32", "shape": [3],
                                         "data": g.tolist()}}}).encode() for g in grads]
    with connect(server) as sock:
        answers = Answers(sock)
        # an upgrade, then two requests, in one packet
        sock.sendall(post("/v1/sessions", create, upgrade) + get("/healthz")
                     + post(f"/v1/sessions/{sid}/step", steps[0]))
        status, _, body = answers.next()
        assert status == 201, body
        status, _, body = answers.next()
        assert status == 200 and json.loads(body)["status"] == "ok", body
        status, _, body = answers.next()
        assert status == 200 and json.loads(body)["version"] == 1, body
        # an upgrade whose body comes later, a request behind it in the same packet as its
        # body's end, and one sent after the answers began
        head = post(f"/v1/sessions/{sid}/step", steps[1], upgrade)
        sock.sendall(head[:-5])
        time.sleep(0.05)
        sock.sendall(head[-5:] + get(f"/v1/sessions/{sid}", upgrade))
        status, _, body = answers.next()
        assert status == 200 and json.loads(body)["version"] == 2, body
        status, _, body = answers.next()
        assert status == 200 and json.loads(body)["step"] == 2, body
        sock.sendall(get(f"/v1/sessions/{sid}/params"))
        status, headers, body = answers.next()
        assert status == 200 and "close" not in headers.get("connection", ""), body
    x = x0.clone().requires_grad_()
    local = torch.optim.Adam([x], lr=0.1)
    for g in grads:
        x.grad = g.clone()
        local.step()
    got = torch.tensor(json.loads(body)["params"]["x"]["data"], dtype=torch.float32)
    assert torch.equal(got, x.detach()), (got, x)


def test_an_http10_upgrade_is_answered_and_closed(server: int) -> None:
    """HTTP/1.0 (keep-alive not kept): the answer says ``Connection: close`` and the connection
    closes, so a request pipelined behind it is sent again on a new connection."""
    with connect(server) as sock:
        answers = Answers(sock)
        sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: t\r\nConnection: keep-alive, Upgrade\r\n"
                     b"Upgrade: h2c\r\n\r\n" + get("/readyz"))
        status, headers, body = answers.next()
        assert status == 200 and json.loads(body)["status"] == "ok", body
        assert headers["connection"].lower() == "close"
        answers.assert_closed()
