"""A client that closes its sending side (``shutdown(SHUT_WR)``) inside a request's body,
before its ``Content-Length`` (or its last chunk) arrived, reads a 400 ``malformed_http``
naming ``Content-Length`` (``body`` for a chunked one), and then the connection's end; nothing
of the request is applied (the session's parameters are torch's before it, and one step
after it is torch's one step). Over raw sockets, on real uvicorn servers serving with both
HTTP protocols ``python -m app`` may use (httptools, and h11 where httptools is missing):
both closed the connection with no answer."""

from __future__ import annotations

import json
import socket
import uuid

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

LR = 0.1


def half_closed(url: str, raw: bytes) -> tuple[bytes, bool]:
    """Send ``raw``, close the sending side; what came back, and whether the server closed
    (the end of the stream, not a reset)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            return data, False
    return data, True


def params(http: httpx.Client, sid: str, n: int) -> torch.Tensor:
    r = http.get(f"/v1/sessions/{sid}/params")
    assert r.status_code == 200, r.text
    w = r.json()["params"]["w"]
    assert w["shape"] == [n]
    return torch.tensor(w["data"], dtype=torch.float32)


@pytest.mark.parametrize("size", [3, 100_000], ids=["small", "large"])
@pytest.mark.parametrize("framing", ["Content-Length", "chunked"])
def test_a_step_cut_by_a_half_close_is_a_400_and_nothing_applied(
        server: str, size: int, framing: str) -> None:
    sid = f"cut-{uuid.uuid4().hex[:12]}"
    gen = torch.Generator().manual_seed(size)
    p0 = torch.randn(size, generator=gen)
    grad = torch.randn(size, generator=gen)
    weight = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([weight], lr=LR, momentum=0.9)
    tensor = {"dtype": "float32", "shape": [size]}
    with httpx.Client(base_url=server, timeout=60) as http:
        r = http.post("/v1/sessions", json={
            "optimizer": "SGD", "options": {"lr": LR, "momentum": 0.9}, "id": sid,
            "params": {"w": {**tensor, "data": p0.tolist()}}})
        assert r.status_code == 201, r.text
        assert torch.equal(params(http, sid, size), weight.detach())
        step = json.dumps({"grads": {"w": {**tensor, "data": grad.tolist()}}}).encode()
        head = (b"POST /v1/sessions/%s/step HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\n" % sid.encode())
        if framing == "chunked":  # every byte of the body but its last chunk
            raw = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(step), step)
        else:  # all but its last byte
            raw = head + b"Content-Length: %d\r\n\r\n%s" % (len(step), step[:-1])
        data, closed = half_closed(server, raw)
        answer, _, body = data.partition(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data[:300]
        headers = dict(line.split(": ", 1) for line in answer.decode().split("\r\n")[1:])
        assert (headers["content-type"], headers["connection"]) == (
            "application/problem+json", "close")
        assert int(headers["content-length"]) == len(body)
        problem = json.loads(body)
        field = "body" if framing == "chunked" else "Content-Length"
        ended = "before its last chunk" if framing == "chunked" else "before its Content-Length"
        assert (problem["status"], problem["code"], problem["field"]) == (
            400, "malformed_http", field), problem
        assert problem["detail"] == (
            f"the request body ended {ended} (the client closed its sending side): nothing was "
            "applied, the connection is closed")
        assert closed
        # nothing applied: the parameters are as made, the session at step 0
        assert torch.equal(params(http, sid, size), weight.detach())
        assert http.get(f"/v1/sessions/{sid}").json()["step"] == 0
        # one whole step then is torch's one step
        r = http.post(f"/v1/sessions/{sid}/step", content=step,
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        weight.grad = grad.clone()
        opt.step()
        assert torch.equal(params(http, sid, size), weight.detach())
        assert http.get(f"/v1/sessions/{sid}").json()["step"] == 1
        assert http.delete(f"/v1/sessions/{sid}").status_code in (200, 204)


def test_a_whole_request_then_a_half_close_is_still_answered(server: str) -> None:
    """(as before: the half-close after a whole body is no cut)"""
    data, closed = half_closed(server, b"POST /healthz HTTP/1.1\r\nHost: t\r\n"
                                       b"Content-Length: 2\r\n\r\n{}")
    assert data.startswith(b"HTTP/1.1 405 "), data[:200]
    assert closed
