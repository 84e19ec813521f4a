"""Answers whose head is held back to go out with the body (``app.api.held_head``), over raw
sockets to the shared live server (which serves with ``python -m app``'s HTTP protocol): a
step's answer, small and in many pieces, is the one torch gives; a ``HEAD`` answer, a
``100 Continue``, pipelined requests and a second request on the same connection are answered
whole and in order, none waiting for more bytes."""

from __future__ import annotations

import json
import socket
import uuid

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tests.integration.test_malformed_http import Answers, connect

pytestmark = pytest.mark.integration


def create(sock: socket.socket, answers: Answers, n: int) -> tuple[str, torch.Tensor]:
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    body = json.dumps({"optimizer": "Adam", "options": {"lr": 0.01}, "id": uuid.uuid4().hex,
                       "params": {"w": {"dtype": "float32", "shape": [n],
                                        "b64": __import__("base64").b64encode(
                                            w.numpy().tobytes()).decode()}}}).encode()
    sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    status, _, answer = answers.next()
    assert status == 201, answer
    return json.loads(answer)["id"], w


def step_request(sid: str, grad: torch.Tensor, expect_continue: bool = False) -> tuple[bytes,
                                                                                       bytes]:
    body = st_save({"w": grad})
    head = (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: t\r\n"
            "Content-Type: application/octet-stream\r\nAccept: application/octet-stream\r\n"
            + ("Expect: 100-continue\r\n" if expect_continue else "")
            + f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head, body


@pytest.mark.parametrize("n", [3, 1000, 3_000_000])  # (the last answer goes out in pieces)
def test_steps_on_one_connection_answer_what_torch_gives(live_server: str, n: int) -> None:
    with connect(live_server) as sock:
        answers = Answers(sock)
        sid, w = create(sock, answers, n)
        local = w.clone().requires_grad_(True)
        reference = torch.optim.Adam([local], lr=0.01)
        for i in range(3):
            grad = torch.randn(n, generator=torch.Generator().manual_seed(100 + i))
            head, body = step_request(sid, grad)
            sock.sendall(head + body)
            status, headers, answer = answers.next()
            assert status == 200, answer
            assert headers["content-type"] == "application/octet-stream"
            local.grad = grad
            reference.step()
            assert torch.equal(st_load(answer)["w"], local.detach())


def test_a_head_request_gets_its_head_alone_and_the_connection_goes_on(live_server: str
                                                                       ) -> None:
    with connect(live_server) as sock:
        sock.sendall(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"\r\ncontent-length: 15\r\n" in head.lower()  # GET's body: {"status":"ok"}
        assert rest == b""  # no body
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = Answers(sock).next()
        assert (status, json.loads(body)) == (200, {"status": "ok"})


def test_a_100_continue_comes_before_the_body_is_sent(live_server: str) -> None:
    """The client waits for ``100 Continue`` before sending its body: the interim answer
    cannot wait for a body write of its own."""
    with connect(live_server) as sock:
        answers = Answers(sock)
        sid, w = create(sock, answers, 5)
        grad = torch.ones(5)
        head, body = step_request(sid, grad, expect_continue=True)
        sock.sendall(head)
        sock.settimeout(10)
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(65536)
            assert chunk, interim
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        answers.data = interim.partition(b"\r\n\r\n")[2]
        sock.sendall(body)
        status, _, answer = answers.next()
        assert status == 200, answer
        local = w.clone().requires_grad_(True)
        local.grad = grad
        torch.optim.Adam([local], lr=0.01).step()
        assert torch.equal(st_load(answer)["w"], local.detach())


def test_pipelined_requests_are_answered_in_order(live_server: str) -> None:
    with connect(live_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" * 3
                     + b"GET /v1/sessions/nope HTTP/1.1\r\nHost: t\r\n\r\n"
                     + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        answers = Answers(sock)
        statuses = [answers.next()[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 404, 200]


def test_head_is_get_without_the_body(live_server: str) -> None:
    """Every GET route answers HEAD with GET's status and headers and no body (RFC 9110
    9.3.2); a route without GET answers 405 naming what it allows."""
    import httpx

    with httpx.Client(base_url=live_server, timeout=30) as http:
        sid = http.post("/v1/sessions", json={
            "optimizer": "SGD", "options": {"lr": 0.1},
            "params": {"w": {"dtype": "float32", "shape": [3], "data": [1, 2, 3]}}}).json()["id"]
        http.post(f"/v1/sessions/{sid}/step",
                  json={"grads": {"w": {"dtype": "float32", "shape": [3], "data": [1, 1, 1]}}})
        for path in ("/healthz", f"/v1/sessions/{sid}", f"/v1/sessions/{sid}/params",
                     f"/v1/sessions/{sid}/state_dict", "/v1/sessions/nope"):
            got, head = http.get(path), http.head(path)
            assert head.status_code == got.status_code, path
            assert head.content == b"", path
            assert head.headers["content-length"] == got.headers["content-length"], path
            assert head.headers["content-type"] == got.headers["content-type"], path
            assert head.headers.get("etag") == got.headers.get("etag"), path
        refused = http.head(f"/v1/sessions/{sid}/step")
        assert (refused.status_code, refused.headers["allow"]) == (405, "POST")
        # where GET is allowed, so is HEAD
        refused = http.request("TRACE", "/v1/sessions")
        assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD, POST")
        assert refused.json()["detail"] == "TRACE is not allowed here; allowed: GET, HEAD, POST"
