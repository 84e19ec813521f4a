"""Four request heads of RFC 9110/9112, over raw sockets against real uvicorn servers with
both HTTP protocols ``python -m app`` may use (httptools, and h11), with API keys on:

- ``OPTIONS *`` (RFC 9110 9.3.7) asks about the server as a whole: 200 with ``Allow`` naming
  every method the server serves (openapi.json's, HEAD and OPTIONS) and no content, with no
  key (it was a 404 "no route at '/*'"); the asterisk-form with another method (``GET *``,
  RFC 9112 3.2.4) is a 400 ``malformed_http`` naming the request target;
- an ``Expect`` other than ``100-continue`` (RFC 9110 10.1.1) gets a 417
  ``expectation_failed`` problem naming ``Expect``, the connection closed and nothing applied
  (it was ignored and the step applied); ``100-continue`` is still met;
- an absolute-form target without userinfo (``GET http://host/healthz``, RFC 9112 3.2.2: a
  server MUST accept it) is served as its origin form (under h11 the whole target was taken
  for the path: a 404); a step sent so equals torch's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol
from tests.integration import test_host_header_and_connect as host_header

pytestmark = pytest.mark.integration

KEY = "h40-head-edges-key-0123456789"
AUTH = f"Authorization: Bearer {KEY}\r\n"
LR = 0.1
P0 = [1.0, -2.0, 3.5]
GRAD = [0.5, 0.25, -1.0]


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    protocol = problem_protocol(request.param)
    with LiveServer(_test_settings(api_keys=f"{KEY}:t"), http=protocol).serving() as url:
        yield url


def exchange(url: str, raw: bytes, until: int | None = None
             ) -> tuple[list[tuple[int, dict[str, str], bytes]], bool]:
    """:func:`test_host_header_and_connect.exchange`, waiting 3 s for an answer."""
    return host_header.exchange(url, raw, timeout=3, until=until)


@contextmanager
def session(url: str, sid: str) -> Iterator[httpx.Client]:
    """A client with the key, and an SGD session ``sid`` made with it."""
    with httpx.Client(base_url=url, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as c:
        made = c.post("/v1/sessions", json={"id": sid, "optimizer": "SGD",
                                            "options": {"lr": LR},
                                            "params": {"w": {"dtype": "float32",
                                                             "shape": [3], "data": P0}}})
        assert made.status_code == 201, made.text
        yield c


def step_raw(target: str, sid: str, extra: str = "") -> bytes:
    body = json.dumps({"grads": {"w": {"dtype": "float32", "shape": [3], "data": GRAD}}})
    return (f"POST {target.format(sid=sid)} HTTP/1.1\r\nHost: x\r\n{AUTH}{extra}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
            ).encode()


def torch_sgd_step() -> torch.Tensor:
    w = torch.nn.Parameter(torch.tensor(P0))
    w.grad = torch.tensor(GRAD)
    torch.optim.SGD([w], lr=LR).step()
    return w.detach()


def test_options_star_names_the_servers_methods_without_a_key(server: str) -> None:
    answers, _ = exchange(server, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", until=2)
    (status, headers, body), health = answers
    assert status == 200 and body == b"" and headers["content-length"] == "0", answers
    allowed = [m.strip() for m in headers["allow"].split(",")]
    spec = json.loads((Path(__file__).parents[2] / "openapi.json").read_text())
    served = {m.upper() for item in spec["paths"].values() for m in item
              if m in ("get", "post", "put", "patch", "delete")}
    assert set(allowed) == served | {"HEAD", "OPTIONS"}, allowed
    assert health[0] == 200  # (the connection stays open)
    # another OPTIONS still needs the key
    answers, _ = exchange(server, b"OPTIONS /v1/sessions HTTP/1.1\r\nHost: x\r\n\r\n",
                          until=1)
    assert answers[0][0] == 401


@pytest.mark.parametrize("method", ["GET", "DELETE", "POST", "PUT"])
def test_the_asterisk_form_is_only_for_options(server: str, method: str) -> None:
    """``GET *`` (RFC 9112 3.2.4: the asterisk-form is only for OPTIONS) is a 400
    ``malformed_http`` naming the request target, the connection closed (it was a 404 "no
    route at '/*'")."""
    answers, closed = exchange(server, f"{method} * HTTP/1.1\r\nHost: x\r\n{AUTH}"
                                       "Content-Length: 0\r\n\r\n".encode())
    ((status, headers, body),) = answers
    assert status == 400 and closed, answers
    problem = json.loads(body)
    assert (problem["code"], problem["field"]) == ("malformed_http", "request-target")
    assert "only for OPTIONS" in problem["detail"]


@pytest.mark.parametrize("expect", ["foo", "100-continue, bar=1", "x-custom"])
def test_an_unmet_expectation_is_a_417_and_nothing_is_applied(server: str, expect: str
                                                              ) -> None:
    sid = f"expect-{abs(hash((server, expect)))}"
    with session(server, sid) as c:
        answers, closed = exchange(server, step_raw("/v1/sessions/{sid}/step", sid,
                                                    f"Expect: {expect}\r\n"))
        assert len(answers) == 1 and closed, answers
        status, headers, body = answers[0]
        problem = json.loads(body)
        assert status == 417 and headers["content-type"] == "application/problem+json"
        assert problem["code"] == "expectation_failed" and problem["field"] == "Expect"
        info = c.get(f"/v1/sessions/{sid}").json()
        assert info["version"] == 0, info
        got = c.get(f"/v1/sessions/{sid}/params").json()["params"]["w"]["data"]
        assert torch.equal(torch.tensor(got, dtype=torch.float32), torch.tensor(P0))


def test_expect_100_continue_is_still_met(server: str) -> None:
    with session(server, "expect-ok") as c:
        answers, _ = exchange(server, step_raw("/v1/sessions/{sid}/step", "expect-ok",
                                               "Expect: 100-Continue\r\n"))
        final = [a for a in answers if a[0] != 100]
        assert final and final[0][0] == 200, answers
        got = c.get("/v1/sessions/expect-ok/params").json()["params"]["w"]["data"]
        assert torch.equal(torch.tensor(got, dtype=torch.float32), torch_sgd_step())


def test_an_absolute_form_target_is_served(server: str) -> None:
    answers, _ = exchange(server, b"GET http://x/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                          until=1)
    assert answers[0][0] == 200 and json.loads(answers[0][2]) == {"status": "ok"}, answers
    with session(server, "absolute") as c:
        answers, _ = exchange(server, step_raw("http://x:1/v1/sessions/{sid}/step?return=params",
                                               "absolute"), until=1)
        assert answers[0][0] == 200, answers
        got = json.loads(answers[0][2])["params"]["w"]["data"]
        assert torch.equal(torch.tensor(got, dtype=torch.float32), torch_sgd_step())
        assert c.get("/v1/sessions/absolute").json()["version"] == 1
