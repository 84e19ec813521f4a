"""``RequestHeadChecks`` lets a plain head (one known-good ``Host``, no ``Expect``, not both
framings; ``plain_head``) through after one walk of its headers: every head gets the answer the
full checks give it, the first time its ``Host`` is seen and after."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI

from app.api import request_head_checks
from app.api.request_head_checks import GOOD_HOSTS_KEPT, RequestHeadChecks, plain_head

HEADS: list[tuple[str, bytes, list[tuple[bytes, bytes]], str]] = [
    ("POST", b"/v1/sessions/s/step", [(b"host", b"127.0.0.1:8000"),
                                      (b"content-length", b"10")], "1.1"),
    ("GET", b"/healthz", [(b"host", b"example.com ")], "1.1"),
    ("GET", b"/healthz", [(b"host", b"")], "1.1"),
    ("GET", b"/healthz", [(b"host", b"[::1]:80")], "1.1"),
    ("GET", b"/healthz", [(b"host", b"bad host")], "1.1"),
    ("GET", b"/healthz", [(b"host", b"a"), (b"host", b"a")], "1.1"),
    ("GET", b"/healthz", [], "1.1"),
    ("GET", b"/healthz", [], "1.0"),
    ("GET", b"/healthz", [(b"host", b"a")], "1.2"),
    ("POST", b"/x", [(b"host", b"a"), (b"content-length", b"3"),
                     (b"transfer-encoding", b"chunked")], "1.1"),
    ("POST", b"/x", [(b"host", b"a"), (b"transfer-encoding", b"chunked")], "1.1"),
    ("POST", b"/x", [(b"host", b"a"), (b"expect", b"100-continue")], "1.1"),
    ("POST", b"/x", [(b"host", b"a"), (b"expect", b"100-continue, magic")], "1.1"),
    ("CONNECT", b"example.com:443", [(b"host", b"a")], "1.1"),
    ("OPTIONS", b"*", [(b"host", b"a")], "1.1"),
    ("GET", b"*", [(b"host", b"a")], "1.1"),
]


_APP = FastAPI()  # (a CONNECT's Allow names its target's route's methods: none here)


def _answer(method: str, target: bytes, headers: list[tuple[bytes, bytes]],
            version: str) -> tuple[Any, ...]:
    """What the middleware does with the head: the inner app's call (with the scope's HTTP
    version it saw), or the status, headers and body it answers."""
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["http_version"])

    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "http_version": version, "method": method, "path": target.decode(),
             "raw_path": target, "query_string": b"", "headers": headers, "extensions": {},
             "root_path": "", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 5000), "app": _APP}
    asyncio.run(RequestHeadChecks(inner)(scope, receive, send))
    if seen:
        return ("app", seen[0])
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    headers_out = sorted((k, v) for k, v in start["headers"] if k != b"x-request-id")
    return (start["status"], headers_out, body)


@pytest.mark.parametrize(("method", "target", "headers", "version"), HEADS)
def test_every_head_gets_the_full_checks_answer(
        monkeypatch: pytest.MonkeyPatch, method: str, target: bytes,
        headers: list[tuple[bytes, bytes]], version: str) -> None:
    with monkeypatch.context() as m:  # the checks alone, as before
        m.setattr(request_head_checks, "plain_head", lambda scope: False)
        m.setattr(request_head_checks, "_GOOD_HOSTS", set())
        expected = _answer(method, target, headers, version)
    request_head_checks._GOOD_HOSTS.clear()
    assert _answer(method, target, headers, version) == expected  # (its Host new)
    assert _answer(method, target, headers, version) == expected  # (its Host seen)


def test_a_plain_head_is_one_whose_host_was_found_good() -> None:
    head = {"headers": [(b"host", b"127.0.0.1:8000"), (b"accept", b"*/*")]}
    request_head_checks._GOOD_HOSTS.clear()
    assert not plain_head(head)
    assert request_head_checks.host_problem(head) is None
    assert plain_head(head)
    assert not plain_head({"headers": [*head["headers"], (b"expect", b"100-continue")]})
    assert not plain_head({"headers": [(b"host", b"bad host")]})
    assert request_head_checks.host_problem({"headers": [(b"host", b"bad host")]}) is not None
    assert not plain_head({"headers": [(b"host", b"bad host")]})


def test_the_good_hosts_kept_are_bounded() -> None:
    request_head_checks._GOOD_HOSTS.clear()
    for i in range(GOOD_HOSTS_KEPT * 3):
        assert request_head_checks.host_problem({"headers": [(b"host", b"h%d" % i)]}) is None
        assert len(request_head_checks._GOOD_HOSTS) <= GOOD_HOSTS_KEPT
