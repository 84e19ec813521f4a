"""What :func:`app.api.lingering_close.guard_early_answers` makes of an answer's start, against
a request cycle of uvicorn's shape: ``Connection: close`` and a lingering close as long as an
upload's where the answer comes before the end of a body whose unread rest is past
``KEEP_ALIVE_REST`` or unknown (chunked); the answer as it was (the connection kept) for a rest
within it, a body that has ended, a client gone, or one waiting for ``100 Continue`` that sent
none of its body; and ``Connection: close`` alone where the server chose to close already."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from app.api import lingering_close

REST = lingering_close.KEEP_ALIVE_REST
START = {"type": "http.response.start", "status": 401,
         "headers": [(b"content-type", b"application/problem+json")]}
BODY = {"type": "http.response.body", "body": b"{}"}


class Cycle:
    """A request's cycle: what its app sends is recorded."""

    def __init__(self, headers: list[tuple[bytes, bytes]], *, more_body: bool = True,
                 keep_alive: bool = True, waiting: bool = False) -> None:
        self.scope: dict[str, Any] = {"type": "http", "http_version": "1.1",
                                      "headers": headers}
        self.transport = SimpleNamespace()
        self.more_body = more_body
        self.disconnected = False
        self.keep_alive = keep_alive
        self.waiting_for_100_continue = waiting
        self.response_started = False
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.response_started = True
        self.sent.append(message)


def answered(cycle: Cycle, read: int) -> tuple[Any, dict[str, Any]]:
    """Guard ``cycle`` (``read`` bytes of its body read), send an answer through it: the
    protocol and the answer's start as sent."""
    protocol = SimpleNamespace(transport=cycle.transport)
    lingering_close.guard_early_answers(protocol, cycle, lambda: read)
    asyncio.run(_answer(cycle))
    assert cycle.sent[1] is BODY
    return protocol, cycle.sent[0]


async def _answer(cycle: Cycle) -> None:
    await cycle.send(START)
    await cycle.send(BODY)


def closes(start: dict[str, Any]) -> bool:
    return (b"connection", b"close") in start["headers"]


def lingers_as_upload(protocol: Any, cycle: Cycle) -> bool:
    closing = protocol.transport
    return (isinstance(closing, lingering_close._ClosingTransport) and closing.upload
            and closing.cycle is cycle and cycle.transport is closing)


def length(n: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(n).encode())]


CHUNKED = [(b"transfer-encoding", b"chunked")]


@pytest.mark.parametrize("headers,read", [(length(REST + 1), 0), (length(10 * REST), REST),
                                          (CHUNKED, 0), (CHUNKED, 10 * REST)],
                         ids=["just-past", "large", "chunked", "chunked-read"])
def test_a_large_or_unknown_rest_closes_and_lingers_as_an_upload(
        headers: list[tuple[bytes, bytes]], read: int) -> None:
    cycle = Cycle(headers)
    protocol, start = answered(cycle, read)
    assert closes(start) and not cycle.keep_alive
    assert lingers_as_upload(protocol, cycle)
    assert start["status"] == 401 and START["headers"] == [
        (b"content-type", b"application/problem+json")]  # (the app's message untouched)


@pytest.mark.parametrize("cycle,read", [
    (Cycle(length(REST)), 0),
    (Cycle(length(REST + 1000)), 1000),
    (Cycle(length(10 * REST), more_body=False), 0),
    (Cycle(length(10 * REST), waiting=True), 0),
], ids=["rest-within", "rest-within-after-some", "body-ended", "waiting-for-100"])
def test_the_connection_is_kept(cycle: Cycle, read: int) -> None:
    protocol, start = answered(cycle, read)
    assert start is START and cycle.keep_alive
    assert not isinstance(protocol.transport, lingering_close._ClosingTransport)


def test_a_client_that_sent_its_body_without_waiting_for_100_continue_is_an_upload() -> None:
    cycle = Cycle(length(10 * REST), waiting=True)
    protocol, start = answered(cycle, 1000)
    assert closes(start) and lingers_as_upload(protocol, cycle)


def test_a_gone_client_is_left_alone() -> None:
    cycle = Cycle(CHUNKED)
    cycle.disconnected = True
    protocol, start = answered(cycle, 0)
    assert start is START and cycle.keep_alive


def test_a_close_the_server_chose_is_said_and_not_made_an_upload() -> None:
    """A body timeout's 408 (its close armed, ``keep_alive`` off, before the answer): the
    answer says ``Connection: close`` (h11 added none), its linger left as armed."""
    cycle = Cycle(length(10 * REST), keep_alive=False)
    protocol, start = answered(cycle, 1000)
    assert closes(start)
    assert not isinstance(protocol.transport, lingering_close._ClosingTransport)


def test_a_client_that_asked_to_close_lingers_as_an_upload() -> None:
    """``Connection: close`` (uvicorn's httptools cycle then starts with ``keep_alive``
    off): a large rest still lingers as an upload's, not a second."""
    cycle = Cycle([*length(10 * REST), (b"connection", b"close")], keep_alive=False)
    protocol, start = answered(cycle, 0)
    assert lingers_as_upload(protocol, cycle)
    assert [name for name, _ in start["headers"]].count(b"connection") == 1


@pytest.mark.parametrize("headers", [[], length(0)], ids=["none", "zero"])
def test_a_request_without_a_body_is_not_guarded(headers: list[tuple[bytes, bytes]]) -> None:
    """Nothing can still be arriving: its answers go straight to the cycle's own send."""
    cycle = Cycle(headers)
    send = cycle.send
    lingering_close.guard_early_answers(SimpleNamespace(transport=cycle.transport), cycle,
                                        lambda: 0)
    assert cycle.send == send
