"""Which ``Host`` headers :func:`host_problem` refuses (RFC 9112 3.2: ``uri-host [":" port]``
of RFC 3986, once; HTTP/1.1 must send it). Over a real server: tests/integration/
test_host_header_and_connect.py."""

from __future__ import annotations

import pytest

from app.api.request_head_checks import host_problem


def scope(version: str, *hosts: bytes) -> dict[str, object]:
    return {"http_version": version,
            "headers": [(b"accept", b"*/*"), *((b"host", h) for h in hosts)]}


@pytest.mark.parametrize("host", [
    b"localhost", b"localhost:8000", b"127.0.0.1", b"127.0.0.1:80", b"[::1]", b"[::1]:8000",
    b"[v1.fe80::a+en1]", b"optserve.example.com", b"a-b_c~d.example",
    b"xn--bcher-kva.example:443", b"%41", b"a,b", b"", b"host:",
    # (the whitespace around a field value is no part of it: httptools leaves a trailing one)
    b"localhost ", b"[::1]:8000\t", b" \t127.0.0.1 \t",
])
def test_valid_hosts(host: bytes) -> None:
    assert host_problem(scope("1.1", host)) is None
    assert host_problem(scope("1.0", host)) is None


@pytest.mark.parametrize("host", [
    b"a b", b"a\tb", b"user@host", b"host:port", b"a:1:2", b"[::1", b"::1", b"a/b", b"a?b",
    b"a#b", b"%4", b"%zz", b"h\xc3\xa9", b"[::1]x", b"\"a\"",
])
def test_invalid_hosts(host: bytes) -> None:
    for version in ("1.1", "1.0"):
        assert host_problem(scope(version, host)) == (
            f"the Host header {host.decode('latin-1')!r} is not host[:port]")


def test_one_host_line() -> None:
    assert host_problem(scope("1.1", b"a", b"a")) == "2 Host header lines"
    assert host_problem(scope("1.0", b"a", b"b", b"c")) == "3 Host header lines"


def test_missing_host() -> None:
    assert host_problem(scope("1.1")) == "no Host header"
    assert host_problem({"headers": []}) == "no Host header"  # (ASGI's default: 1.1)
    assert host_problem(scope("1.0")) is None
    # an ASGI server of HTTP/2 or 3 makes Host of :authority: without one, nothing to check
    assert host_problem(scope("2")) is None
