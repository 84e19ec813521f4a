"""A server that is not there: the SDK's error names the URL, says the server may not be
running, and comes without httpx's chained traceback (the cause is kept as ``.cause``)."""

from __future__ import annotations

import asyncio
import errno
import socket
import traceback

import httpx
import pytest
import torch

import optserve


def check(exc: optserve.APIConnectionError, url: str) -> None:
    assert not isinstance(exc, optserve.APITimeoutError)
    text = str(exc)
    assert text.startswith(f"cannot connect to {url}: "), text
    assert "\n" not in text
    assert "Is the optserve server running there?" in text
    assert "optserve serve" in text and "OPTSERVE_BASE_URL" in text
    # httpx's sync transport says "Connection refused"; its async one (anyio) does not
    assert exc.url == url and exc.reason is not None and exc.reason in text
    assert "Connection refused" in exc.reason or "connection attempts failed" in exc.reason
    # no chained httpx/httpcore traceback, but the cause is there for whoever wants it
    assert exc.__cause__ is None and exc.__suppress_context__
    assert isinstance(exc.cause, httpx.ConnectError)
    printed = "".join(traceback.format_exception(exc))
    assert "httpcore" not in printed and "During handling" not in printed, printed
    assert "direct cause" not in printed
    assert len(printed.splitlines()) <= 12, printed


def test_client_names_the_url_and_the_likely_reason(refusing_url: str) -> None:
    url = refusing_url
    with optserve.Client(url, max_retries=0) as client, \
            pytest.raises(optserve.APIConnectionError) as info:
        client.list_sessions()
    check(info.value, url)
    assert "(GET /v1/sessions)" in str(info.value)


def test_retries_end_in_the_same_single_error(monkeypatch: pytest.MonkeyPatch,
                                              refusing_url: str) -> None:
    from optserve import _base_client

    monkeypatch.setattr(_base_client, "_sleep", lambda _: None)
    url = refusing_url
    with optserve.Client(url + "/", max_retries=2) as client, \
            pytest.raises(optserve.APIConnectionError) as info:
        client.health()
    check(info.value, url)


def test_async_client_too(refusing_url: str) -> None:
    url = refusing_url

    async def run() -> optserve.APIConnectionError:
        async with optserve.AsyncClient(url, max_retries=0) as client:
            try:
                await client.health()
            except optserve.APIConnectionError as exc:
                return exc
        raise AssertionError("no error")

    check(asyncio.run(run()), url)


def test_remote_optimizer_without_a_server(refusing_url: str) -> None:
    url = refusing_url
    client = optserve.Client(url, max_retries=0)
    with pytest.raises(optserve.APIConnectionError) as info:
        optserve.RemoteOptimizer([torch.zeros(2, requires_grad=True)], "SGD", client, lr=0.1)
    check(info.value, url)
    client.close()


def test_a_timeout_names_the_url_too() -> None:
    request = httpx.Request("POST", "http://10.1.2.3:8000/v1/sessions/s/step?return=none")
    exc = optserve._exceptions.connection_error(request, httpx.ReadTimeout("read timed out"),
                                                never_sent=False)
    assert isinstance(exc, optserve.APITimeoutError)
    assert str(exc) == ("timed out talking to http://10.1.2.3:8000: read timed out "
                        "(POST /v1/sessions/s/step)")


def test_the_refusing_port_is_not_taken_while_a_test_holds_it(refusing_url: str) -> None:
    """``refusing_url``'s port refuses connections, and no server can bind it meanwhile (one
    picked free and released could be: another test process's server answered there)."""
    port = int(refusing_url.rsplit(":", 1)[1])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as uvicorn binds)
        with pytest.raises(OSError) as bind:
            other.bind(("127.0.0.1", port))
    assert bind.value.errno == errno.EADDRINUSE
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))
