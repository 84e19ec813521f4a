"""RFC 9112 3.2 and RFC 9110 9.3.6 over raw sockets, on real uvicorn servers serving with both
HTTP protocols ``python -m app`` may use (httptools, and h11 where httptools is missing):

- an HTTP/1.1 request without ``Host``, any request with two ``Host`` lines or with a ``Host``
  that is not ``host[:port]`` gets a 400 ``malformed_http`` problem naming ``Host``, the
  connection closed, and nothing was done (a create made no session, a step changed nothing:
  the parameters match torch.optim's run of the steps that were taken); an HTTP/1.0 request
  without ``Host`` and one with an empty ``Host`` are served;
- an absolute-form request target with userinfo (``GET http://user@host/path``, RFC 9110
  4.2.4) gets a 400 ``malformed_http`` problem naming ``request-target``, the connection
  closed, nothing done;
- every refusal carries a request id (``X-Request-Id`` and the body's ``request_id``), under
  h11 as under httptools;
- a ``CONNECT`` (to an authority or to a path, bytes after its head or not) gets a 405
  ``method_not_allowed`` problem with ``Allow`` and the connection closed (httptools took it
  as an upgrade and the server closed the connection without an answer).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import uuid
from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

LR = 0.1
P0 = torch.tensor([1.0, -2.0, 3.5])
GRAD = torch.tensor([0.5, 0.25, -1.0])


def exchange(url: str, raw: bytes, timeout: float = 10, until: int | None = None
             ) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """Send ``raw``; every answer that came back and whether the server then closed (no
    answer for ``timeout`` seconds: it kept the connection open). With ``until``, the answers
    as soon as that many came, without waiting to see whether more come or the server closes
    (``closed`` is then False)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(raw)
        data, answers = b"", []
        while True:
            while b"\r\n\r\n" not in data:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return answers, False
                if not chunk:
                    assert data == b"", f"a partial answer: {data!r}"
                    return answers, True
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers[name.lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            while len(data) < length:
                chunk = sock.recv(65536)
                assert chunk, "closed mid-body"
                data += chunk
            answers.append((int(status_line.split(" ")[1]), headers, data[:length]))
            data = data[length:]
            if len(answers) == until:
                return answers, False
            if headers.get("connection", "").lower() == "close":
                sock.settimeout(2)


def only_answer(url: str, raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    answers, closed = exchange(url, raw)
    assert len(answers) == 1, answers
    assert closed, "the server kept the connection after refusing"
    status, headers, body = answers[0]
    assert headers["content-type"] == "application/problem+json", (headers, body)
    assert headers["connection"].lower() == "close"
    return status, headers, json.loads(body)


def assert_host_refused(status: int, problem: dict[str, Any], reason: str) -> None:
    assert status == 400, problem
    assert problem["type"] == "urn:optserve:problem:malformed_http"
    assert (problem["status"], problem["code"], problem["field"]) == (
        400, "malformed_http", "Host"), problem
    assert reason.lower() in problem["detail"].lower(), problem["detail"]


@pytest.mark.parametrize(("head", "reason"), [
    (b"GET /healthz HTTP/1.1\r\n\r\n", "Host"),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", "Host"),
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nhost: b:80\r\n\r\n", "Host"),
    (b"GET /healthz HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", "Host"),
    (b"GET /healthz HTTP/1.1\r\nHost: a b\r\n\r\n", "'a b' is not host[:port]"),
    (b"GET /healthz HTTP/1.1\r\nHost: user@a\r\n\r\n", "'user@a' is not host[:port]"),
    (b"GET /healthz HTTP/1.1\r\nHost: a:http\r\n\r\n", "'a:http' is not host[:port]"),
    (b"GET /healthz HTTP/1.1\r\nHost: [::1\r\n\r\n", "'[::1' is not host[:port]"),
    (b"GET /healthz HTTP/1.0\r\nHost: a/b\r\n\r\n", "'a/b' is not host[:port]"),
])
def test_bad_host_is_a_400_naming_it(server: str, head: bytes, reason: str) -> None:
    status, headers, problem = only_answer(server, head)
    assert_host_refused(status, problem, reason)
    # a request id of its own, as every answer has (h11's refusal of a missing or repeated
    # Host, answered by the protocol, had none)
    assert re.fullmatch(r"[0-9a-f]{32}", headers.get("x-request-id", "")), headers
    assert problem["request_id"] == headers["x-request-id"]
    # the server serves the next connection as before
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.0\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: \r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: [::1]:8000\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: xn--bcher-kva.example\r\nConnection: close\r\n\r\n",
    # whitespace around a field value is no part of it (RFC 9110 5.5): httptools kept the
    # trailing one in the value, and the Host check refused it
    b"GET /healthz HTTP/1.1\r\nHost: localhost \r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:8000\t \r\n\r\n",
])
def test_good_host_is_served(server: str, head: bytes) -> None:
    answers, _ = exchange(server, head, until=1)
    assert [(status, json.loads(body)) for status, _, body in answers] == [
        (200, {"status": "ok"})]


def _params(http: httpx.Client, sid: str) -> torch.Tensor:
    r = http.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"})
    assert r.status_code == 200, r.text
    w = r.json()["params"]["w"]
    return torch.frombuffer(bytearray(base64.b64decode(w["b64"])),
                            dtype=torch.float32).reshape(w["shape"]).clone()


def _post(path: str, body: dict[str, Any], host_lines: bytes) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), host_lines, len(data)) + data)


def test_refused_for_its_host_nothing_is_done(server: str) -> None:
    sid = f"host-{uuid.uuid4().hex[:12]}"
    create = {"optimizer": "SGD", "options": {"lr": LR}, "id": sid,
              "params": {"w": {"dtype": "float32", "shape": [3], "data": P0.tolist()}}}
    status, _, problem = only_answer(server, _post("/v1/sessions", create, b""))
    assert_host_refused(status, problem, "Host")
    with httpx.Client(base_url=server) as http:
        assert http.get(f"/v1/sessions/{sid}").status_code == 404  # no session was made
        assert http.post("/v1/sessions", json=create).status_code == 201
        step = {"grads": {"w": {"dtype": "float32", "shape": [3], "data": GRAD.tolist()}}}
        for hosts in (b"", b"Host: a\r\nHost: a\r\n", b"Host: a\tb\r\n"):
            status, _, problem = only_answer(server,
                                             _post(f"/v1/sessions/{sid}/step", step, hosts))
            assert_host_refused(status, problem, "Host")
        _steps_once_as_torch(http, sid, step)


@pytest.mark.parametrize("target", [
    b"http://u@x/healthz", b"http://user:secret@127.0.0.1/healthz", b"HTTPS://@x/healthz?a=b",
    b"http://u@x", b"http://a%40b@x/v1/sessions"])
def test_a_target_with_userinfo_is_a_400_naming_it(server: str, target: bytes) -> None:
    """RFC 9110 4.2.4: an absolute-form target whose authority has userinfo is an error (it
    was served as its path): 400 ``malformed_http`` naming ``request-target``, the connection
    closed, the userinfo not repeated; after a request answered on the same connection, too.
    A target whose path (not its authority) has an ``@`` is served."""
    head = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target
    status, headers, problem = only_answer(server, head)
    assert status == 400, problem
    assert (problem["type"], problem["status"], problem["code"], problem["field"]) == (
        "urn:optserve:problem:malformed_http", 400, "malformed_http", "request-target")
    assert "userinfo" in problem["detail"] and "secret" not in problem["detail"], problem
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), headers
    assert problem["request_id"] == headers["x-request-id"]
    answers, closed = exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + head)
    assert [status for status, _, _ in answers] == [200, 400] and closed, answers
    assert json.loads(answers[1][2])["field"] == "request-target"
    answers, _ = exchange(server, b"GET /healthz?who=u@x HTTP/1.1\r\nHost: x\r\n"
                          b"Connection: close\r\n\r\n")
    assert [(status, json.loads(body)) for status, _, body in answers] == [
        (200, {"status": "ok"})]


def test_refused_for_its_target_nothing_is_done(server: str) -> None:
    """A step whose absolute-form target has userinfo is refused before it runs: the
    session then steps once as torch.optim does."""
    sid = f"target-{uuid.uuid4().hex[:12]}"
    create = {"optimizer": "SGD", "options": {"lr": LR}, "id": sid,
              "params": {"w": {"dtype": "float32", "shape": [3], "data": P0.tolist()}}}
    with httpx.Client(base_url=server) as http:
        assert http.post("/v1/sessions", json=create).status_code == 201
        step = {"grads": {"w": {"dtype": "float32", "shape": [3], "data": GRAD.tolist()}}}
        authority = server.removeprefix("http://")
        status, _, problem = only_answer(server, _post(
            f"http://me@{authority}/v1/sessions/{sid}/step", step, b"Host: t\r\n"))
        assert (status, problem["field"]) == (400, "request-target"), problem
        _steps_once_as_torch(http, sid, step)


@pytest.mark.parametrize(("head", "allow"), [
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", ""),
    (b"CONNECT /healthz HTTP/1.1\r\nHost: t\r\n\r\n", "GET, HEAD"),
    (b"CONNECT /v1/sessions HTTP/1.1\r\nHost: t\r\n\r\n", "GET, HEAD, POST"),
    # bytes after a CONNECT's head would be the tunnel's: never read as a request
    (b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n"
     b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", ""),
    (b"CONNECT /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
     "GET, HEAD"),
])
def test_connect_is_a_405(server: str, head: bytes, allow: str) -> None:
    status, headers, problem = only_answer(server, head)
    assert status == 405, problem
    assert headers["allow"] == allow
    assert (problem["type"], problem["status"], problem["code"], problem["field"]) == (
        "urn:optserve:problem:method_not_allowed", 405, "method_not_allowed", "method")
    assert problem["detail"] == ("CONNECT is not served: this server is no proxy and opens no "
                                 f"tunnel; allowed here: {allow or 'none'}")
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"]), headers
    assert problem["request_id"] == headers["x-request-id"]
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}


def test_the_whitespace_after_a_header_value_is_no_part_of_it(server: str) -> None:
    """RFC 9110 5.5: a field value excludes the spaces and tabs around it. httptools left the
    trailing ones in every value (h11 strips them): ``If-None-Match: * `` on a create and
    ``Idempotency-Key: k `` were 422s, and ``Host: a `` a 400. Now the create is taken, its
    retry with the key written plainly is answered from the key (one session, one step's
    worth of changes), and the step's parameters are torch.optim's."""
    sid = f"ows-{uuid.uuid4().hex[:12]}"
    key = uuid.uuid4().hex
    create = {"optimizer": "SGD", "options": {"lr": LR}, "id": sid,
              "params": {"w": {"dtype": "float32", "shape": [3], "data": P0.tolist()}}}
    for lines, replayed in ((b"Host: t \r\nIf-None-Match: * \r\nIdempotency-Key: %s\t \r\n", None),
                            (b"Host: t\r\nIdempotency-Key: %s\r\n", "true")):
        answers, _ = exchange(server, _post("/v1/sessions", create, lines % key.encode()),
                              until=1)
        assert [status for status, _, _ in answers] == [201], answers
        assert answers[0][1].get("idempotent-replayed") == replayed, answers[0][1]
    with httpx.Client(base_url=server) as http:
        step = {"grads": {"w": {"dtype": "float32", "shape": [3], "data": GRAD.tolist()}}}
        _steps_once_as_torch(http, sid, step)


def _steps_once_as_torch(http: httpx.Client, sid: str, step: dict[str, object]) -> None:
    """``step`` steps the SGD session ``sid`` (made from ``P0``): its parameters are then
    torch.optim's after exactly one step (nothing refused before it was applied); deleted."""
    r = http.post(f"/v1/sessions/{sid}/step", json=step)
    assert r.status_code == 200, r.text
    w = P0.clone().requires_grad_(True)
    opt = torch.optim.SGD([w], lr=LR)
    w.grad = GRAD.clone()
    opt.step()
    assert torch.equal(_params(http, sid), w.detach())
    assert http.get(f"/v1/sessions/{sid}").json()["step"] == 1
    assert http.delete(f"/v1/sessions/{sid}").status_code in (200, 204)
