"""Requests that uvicorn's HTTP parser refuses before the app sees them (a bad
``Content-Length``, a chunk size that is not hex, a header name with a space, a request line
that is not one) are answered 400 ``malformed_http`` in problem+json naming the part refused,
with ``Connection: close``, as every other bad input is, not in uvicorn's ``text/plain``; the
server then serves the next request as before, and a step refused this way changed nothing.

Raw bytes over a socket to the shared live server, which serves with the HTTP protocol
``python -m app`` does (``app.api.malformed_http.http_protocol``).
"""

from __future__ import annotations

import gzip
import json
import re
import socket
import uuid
from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

#: (request bytes, field, the parser's reason, the start of the detail's hint)
CASES = {
    "negative-content-length": (
        b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Length: -5\r\n\r\n",
        "Content-Length", "Invalid character in Content-Length",
        "Content-Length is the body's length in bytes"),
    "content-length-not-a-number": (
        b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
        "Content-Length", "Invalid character in Content-Length",
        "Content-Length is the body's length in bytes"),
    "two-content-lengths": (
        b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{} ",
        "Content-Length", "Duplicate Content-Length",
        "Content-Length is the body's length in bytes"),
    "chunk-size-not-hex": (
        b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        "body", "Invalid character in chunk size", "a chunked body is chunks of a hex size"),
    "space-in-header-name": (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nBad Name: 1\r\n\r\n",
        "headers", "Invalid header token", "each header line is name: value"),
    "garbage-request-line": (
        b"\x16\x03\x01 NOT HTTP AT ALL\r\n\r\n",
        "request-line", "Invalid method encountered", "the first line is METHOD /path HTTP/1.1"),
}


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


class Answers:
    """The responses coming back on ``sock``, one at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _more(self, what: str) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"the server closed the connection mid-{what}: {self.data!r}"
        self.data += chunk

    def next(self) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names; a repeated one is an error here) and exactly
        Content-Length bytes of body."""
        while b"\r\n\r\n" not in self.data:
            self._more("head")
        head, _, self.data = self.data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} given twice: {head!r}"
            headers[name.lower()] = value.strip()
        status = int(status_line.split(" ")[1])
        if status < 200:  # (an interim answer, 100 Continue: no body)
            return status, headers, b""
        length = int(headers["content-length"])
        while len(self.data) < length:
            self._more("body")
        body, self.data = self.data[:length], self.data[length:]
        return status, headers, body

    def assert_closed(self) -> None:
        assert self.data == b"", f"more than Content-Length came: {self.data!r}"
        assert self.sock.recv(65536) == b"", "the server kept the connection after refusing"


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The one answer on ``sock``, after which the server closed it."""
    answers = Answers(sock)
    answer = answers.next()
    answers.assert_closed()
    return answer


def assert_refused(status: int, headers: dict[str, str], body: bytes, field: str, reason: str,
                   hint: str) -> None:
    assert status == 400, body
    assert headers["content-type"] == "application/problem+json", (headers, body)
    assert headers["connection"] == "close"
    problem: dict[str, Any] = json.loads(body)
    assert problem["type"] == "urn:optserve:problem:malformed_http"
    assert (problem["status"], problem["code"], problem["field"]) == (400, "malformed_http",
                                                                      field), problem
    assert problem["title"] == "Malformed HTTP request"
    assert problem["detail"].startswith(f"{reason}: {hint}"), problem["detail"]
    assert problem["detail"].endswith("the connection is closed"), problem["detail"]
    # every response carries X-Request-Id, echoed in its problem body (protocol.md)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), headers
    assert problem["request_id"] == headers["x-request-id"], problem


def assert_serves(url: str) -> None:
    """A well-formed request right after is served normally (new connection)."""
    with connect(url) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, body = Answers(sock).next()
    assert (status, headers["content-type"], json.loads(body)) == (
        200, "application/json", {"status": "ok"})


@pytest.mark.parametrize("case", list(CASES))
def test_a_request_the_parser_refuses_gets_a_problem(live_server: str, case: str) -> None:
    raw, field, reason, hint = CASES[case]
    with connect(live_server) as sock:
        sock.sendall(raw)
        status, headers, body = read_answer(sock)
    assert_refused(status, headers, body, field, reason, hint)
    assert_serves(live_server)


def test_garbage_after_a_served_request_on_the_same_connection(live_server: str) -> None:
    """Keep-alive: the first request is answered as usual, the garbage after it is refused in
    problem+json on the same connection, which then closes."""
    raw, field, reason, hint = CASES["space-in-header-name"]
    with connect(live_server) as sock:
        answers = Answers(sock)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = answers.next()
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        sock.sendall(raw)
        status, headers, body = answers.next()
        answers.assert_closed()
    assert_refused(status, headers, body, field, reason, hint)


def test_garbage_pipelined_after_requests_waits_for_their_answers(live_server: str) -> None:
    """Pipelined in one write, two requests and garbage: both are answered, in order, then the
    refusal (uvicorn wrote its 400 at once, in place of the first answer, and closed)."""
    raw, field, reason, hint = CASES["garbage-request-line"]
    with connect(live_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
                     b"GET /v1/sessions/no-such-session HTTP/1.1\r\nHost: t\r\n\r\n" + raw)
        answers = Answers(sock)
        first, second, refused = answers.next(), answers.next(), answers.next()
        answers.assert_closed()
    assert (first[0], json.loads(first[2])) == (200, {"status": "ok"})
    assert (second[0], second[1]["content-type"], json.loads(second[2])["code"]) == (
        404, "application/problem+json", "session_not_found")
    assert_refused(*refused, field, reason, hint)


def test_a_step_with_a_broken_chunk_changes_nothing(live_server: str) -> None:
    """A step whose chunked body the parser refuses mid-way (the app already had its headers)
    is answered the problem, applies nothing, and the session's next step is torch's first."""
    sid = f"malformed-{uuid.uuid4().hex[:12]}"
    x0 = torch.tensor([2.0, -1.0, 0.5])
    grad = torch.tensor([0.25, 4.0, -2.0])
    with httpx.Client(base_url=live_server, timeout=60) as http:
        r = http.post("/v1/sessions", json={
            "id": sid, "optimizer": "SGD", "options": {"lr": 0.5, "momentum": 0.9},
            "params": {"x": {"dtype": "float32", "shape": [3], "data": x0.tolist()}}})
        assert r.status_code == 201, r.text
        step = json.dumps({"grads": {"x": {"dtype": "float32", "shape": [3],
                                           "data": grad.tolist()}}}).encode()
        with connect(live_server) as sock:
            sock.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: t\r\n"
                         "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                         "\r\n".encode() + f"{len(step):x}\r\n".encode() + step[:10])
            sock.sendall(step[10:] + b"X\r\n0\r\n\r\n")  # the chunk's data runs past its size
            status, headers, body = read_answer(sock)
        assert_refused(status, headers, body, "body", "Expected LF after chunk data",
                       "a chunked body is chunks of a hex size")
        r = http.get(f"/v1/sessions/{sid}")
        assert r.status_code == 200 and (r.json()["version"], r.json()["step"]) == (0, 0), r.text
        r = http.post(f"/v1/sessions/{sid}/step", content=step,
                      headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        x = x0.clone().requires_grad_()
        local = torch.optim.SGD([x], lr=0.5, momentum=0.9)
        x.grad = grad.clone()
        local.step()
        assert r.json()["version"] == 1
        assert r.json()["params"]["x"]["data"] == x.detach().tolist()


@pytest.mark.parametrize("codings", [["gzip, chunked"], ["compress, chunked"], ["x, chunked"],
                                     ["identity, chunked"], ["gzip", "chunked"]],
                         ids=["gzip", "compress", "unknown", "identity", "two-lines"])
def test_a_transfer_coding_besides_chunked_is_refused(live_server: str,
                                                      codings: list[str]) -> None:
    """``Transfer-Encoding: gzip, chunked`` (or any coding besides one ``chunked``) frames the
    body with chunks the parser takes, but the bytes inside are coded: they were read as the
    body itself, a gzip-coded step answered "request body is not valid JSON: str is not valid
    UTF-8" and an unknown coding's (``x, chunked``) plain body applied as if the coding were
    not there. It is a 400 ``malformed_http`` naming ``Transfer-Encoding`` (the only transfer
    coding taken is chunked), nothing is applied, and a plain chunked step after it is torch's
    first."""
    sid = f"coding-{uuid.uuid4().hex[:12]}"
    x0 = torch.tensor([1.5, -0.5])
    grad = torch.tensor([0.5, 2.0])
    step = json.dumps({"grads": {"x": {"dtype": "float32", "shape": [2],
                                       "data": grad.tolist()}}}).encode()
    coded = "gzip" in codings[0] or "compress" in codings[0]
    payload = gzip.compress(step) if coded else step

    def chunked(body: bytes, lines: list[str]) -> bytes:
        head = "".join(f"Transfer-Encoding: {line}\r\n" for line in lines)
        return (f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: t\r\n"
                f"Content-Type: application/json\r\n{head}\r\n".encode()
                + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")

    with httpx.Client(base_url=live_server, timeout=60) as http:
        r = http.post("/v1/sessions", json={
            "id": sid, "optimizer": "SGD", "options": {"lr": 0.5},
            "params": {"x": {"dtype": "float32", "shape": [2], "data": x0.tolist()}}})
        assert r.status_code == 201, r.text
        with connect(live_server) as sock:
            sock.sendall(chunked(payload, codings))
            status, headers, body = Answers(sock).next()
        assert status == 400, body
        assert headers["content-type"] == "application/problem+json"
        problem = json.loads(body)
        assert (problem["code"], problem["field"]) == ("malformed_http", "Transfer-Encoding")
        assert problem["title"] == "Malformed HTTP request"
        assert "the only transfer coding taken is chunked" in problem["detail"], problem
        r = http.get(f"/v1/sessions/{sid}")
        assert (r.json()["version"], r.json()["step"]) == (0, 0), r.text
        with connect(live_server) as sock:
            sock.sendall(chunked(step, ["Chunked"]))
            status, _, body = Answers(sock).next()
        assert status == 200, body
        x = x0.clone().requires_grad_()
        local = torch.optim.SGD([x], lr=0.5)
        x.grad = grad.clone()
        local.step()
        assert json.loads(body)["params"]["x"]["data"] == x.detach().tolist()


H2C = (b"Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
       b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n")
WEBSOCKET = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n")


def test_a_request_asking_to_upgrade_is_served_as_plain_http(live_server: str) -> None:
    """``curl --http2`` on an ``http://`` URL asks to upgrade to h2c; a WebSocket handshake asks
    for WebSocket. The server takes neither, and serves the request as HTTP/1.1 (RFC 9110 7.8).
    Before, httptools stopped at such a head: its body was never read (a create answered
    "the request body is empty", a step lost its gradients) and a WebSocket handshake got 403
    ``text/plain``. Here: a create and a pipelined request in one packet, a step whose body
    comes in later packets, a handshake; the step equals torch's, the connection serves on."""
    sid = f"upgrade-{uuid.uuid4().hex[:12]}"
    x0 = torch.tensor([2.0, -1.0, 0.5])
    grad = torch.tensor([0.25, 4.0, -2.0])
    create = json.dumps({
        "id": sid, "optimizer": "SGD", "options": {"lr": 0.5, "momentum": 0.9},
        "params": {"x": {"dtype": "float32", "shape": [3], "data": x0.tolist()}}}).encode()
    step = json.dumps({"grads": {"x": {"dtype": "float32", "shape": [3],
                                       "data": grad.tolist()}}}).encode()
    with connect(live_server) as sock:
        answers = Answers(sock)
        sock.sendall(b"POST /v1/sessions HTTP/1.1\r\nHost: t\r\n" + H2C
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(create) + create + b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = answers.next()
        assert status == 201, body
        assert json.loads(body)["id"] == sid
        status, _, body = answers.next()
        assert status == 200, body
        sock.sendall(f"POST /v1/sessions/{sid}/step HTTP/1.1\r\nHost: t\r\n".encode() + H2C
                     + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(step))
        sock.sendall(step[:7])
        sock.sendall(step[7:])
        status, _, body = answers.next()
        assert status == 200, body
        sock.sendall(f"GET /v1/sessions/{sid} HTTP/1.1\r\nHost: t\r\n".encode() + WEBSOCKET
                     + b"\r\n")
        status, headers, body = answers.next()
        assert status == 200 and headers["content-type"] == "application/json", body
        assert (json.loads(body)["version"], json.loads(body)["step"]) == (1, 1)
    x = x0.clone().requires_grad_()
    local = torch.optim.SGD([x], lr=0.5, momentum=0.9)
    x.grad = grad.clone()
    local.step()
    with httpx.Client(base_url=live_server, timeout=60) as http:
        r = http.get(f"/v1/sessions/{sid}/params")
        assert r.status_code == 200, r.text
        assert r.json()["params"]["x"]["data"] == x.detach().tolist()
