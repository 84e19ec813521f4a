"""The lingering close (:mod:`app.api.lingering_close`) against a transport that records what is
done to it: the answer, then the end of the stream, what arrives dropped, the close when the
client closes its side; no linger where the request's body had ended; and the count of
lingering connections back to 0 however the linger ends, also where the transport cannot be
handed to the drain."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from app.api import connection_cap, lingering_close
from app.api.connection_cap import ConnectionSlots


class Transport:
    """A connection's transport: records writes, the end of the stream and the close; closed,
    it tells its protocol of the time (the drain, once handed it) on the loop's next turn."""

    def __init__(self, protocol: Any, loop: asyncio.AbstractEventLoop,
                 can_hand_over: bool = True) -> None:
        self.protocol = protocol
        self.loop = loop
        self.can_hand_over = can_hand_over
        self.events: list[str] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed and "eof" not in self.events
        self.events.append(data.decode())

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.events.append("eof")

    def set_protocol(self, protocol: Any) -> None:
        if not self.can_hand_over:
            raise RuntimeError("this transport keeps its protocol")
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def resume_reading(self) -> None:
        self.events.append("reading")

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.events.append("closed")
            self.loop.call_soon(self.protocol.connection_lost, None)


class Owner:
    """The HTTP protocol: its transport, the app's connection count, and its losses."""

    def __init__(self, slots: ConnectionSlots) -> None:
        self.config = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(
            connections=slots)))
        self.transport: Any = None
        self.lost: list[Exception | None] = []

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def served(loop: asyncio.AbstractEventLoop, can_hand_over: bool = True
           ) -> tuple[Owner, Transport, ConnectionSlots]:
    slots = ConnectionSlots(10)
    owner = Owner(slots)
    owner.transport = transport = Transport(owner, loop, can_hand_over)
    return owner, transport, slots


def settle(loop: asyncio.AbstractEventLoop) -> None:
    loop.run_until_complete(asyncio.sleep(0.01))


def test_the_answer_then_the_end_of_the_stream_then_the_close_when_the_client_closes(
        loop: asyncio.AbstractEventLoop) -> None:
    owner, transport, slots = served(loop)
    cycle = SimpleNamespace(transport=transport, more_body=True, disconnected=False)

    async def answer() -> None:
        lingering_close.arm(owner, cycle)
        cycle.transport.write(b"answer")
        cycle.transport.close()
    loop.run_until_complete(answer())
    assert transport.events == ["answer", "eof", "reading"]
    assert owner.transport.is_closing() and slots.lingering == 1
    drain = transport.protocol
    drain.data_received(b"the rest of the body")  # (dropped)
    settle(loop)
    assert (transport.closed, owner.lost, slots.lingering) == (False, [], 1)
    assert drain.eof_received() is None  # (the client closed its side: the transport closes)
    transport.close()
    settle(loop)
    assert (owner.lost, slots.lingering) == ([None], 0)


def test_no_linger_where_the_body_had_ended(loop: asyncio.AbstractEventLoop) -> None:
    """Armed for a request whose client asked to close, answered once its body had ended:
    nothing more can arrive, and the close is immediate."""
    owner, transport, slots = served(loop)
    cycle = SimpleNamespace(transport=transport, more_body=True, disconnected=False)

    async def answer() -> None:
        lingering_close.arm(owner, cycle)
        cycle.more_body = False  # (the body's end read)
        cycle.transport.write(b"answer")
        cycle.transport.close()
    loop.run_until_complete(answer())
    settle(loop)
    assert transport.events == ["answer", "closed"]
    assert (owner.lost, slots.lingering) == ([None], 0)


def test_a_refusal_lingers_whatever(loop: asyncio.AbstractEventLoop) -> None:
    owner, transport, slots = served(loop)

    async def refuse() -> None:
        owner.transport.write(b"refusal")
        lingering_close.arm(owner)
        owner.transport.close()
    loop.run_until_complete(refuse())
    assert transport.events == ["refusal", "eof", "reading"] and slots.lingering == 1
    transport.close()
    settle(loop)
    assert (owner.lost, slots.lingering) == ([None], 0)


def test_a_linger_ends_after_linger_s(loop: asyncio.AbstractEventLoop,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection_cap, "LINGER_S", 0.05)
    owner, transport, slots = served(loop)

    async def refuse() -> None:
        lingering_close.arm(owner)
        owner.transport.close()
        await asyncio.sleep(0.2)
    loop.run_until_complete(refuse())
    assert transport.events[-1] == "closed"
    assert (owner.lost, slots.lingering) == ([None], 0)


def test_a_transport_that_cannot_be_handed_over_is_closed_and_not_counted(
        loop: asyncio.AbstractEventLoop) -> None:
    """Its loss goes to the HTTP protocol, never to the drain: the drain lets go of its count
    at once (it was counted lingering for good)."""
    owner, transport, slots = served(loop, can_hand_over=False)

    async def refuse() -> None:
        lingering_close.arm(owner)
        owner.transport.close()
    loop.run_until_complete(refuse())
    settle(loop)
    assert transport.events == ["closed"]
    assert (owner.lost, slots.lingering) == ([None], 0)


def test_past_max_lingering_the_close_is_immediate(loop: asyncio.AbstractEventLoop) -> None:
    owner, transport, slots = served(loop)
    for _ in range(connection_cap.MAX_LINGERING):
        assert slots.linger()

    async def refuse() -> None:
        lingering_close.arm(owner)
        owner.transport.close()
    loop.run_until_complete(refuse())
    settle(loop)
    assert transport.events == ["closed"]
    assert (owner.lost, slots.lingering) == ([None], connection_cap.MAX_LINGERING)


class SlowReaderTransport(Transport):
    """A transport with bytes its client has not taken yet: its close waits for them (reading
    no more, as asyncio's does), and tells its protocol once they are written."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.events.append("closed")

    def flushed(self) -> None:
        self.loop.call_soon(self.protocol.connection_lost, None)


def test_a_linger_over_lets_go_of_its_count_while_its_close_waits_for_a_slow_reader(
        loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refusal after an answer the client reads slowly: once :data:`LINGER_S` has passed the
    connection is closed (nothing more is read from it) but is lost only once its client has
    taken the earlier answer, as long as it likes. It no longer lingers meanwhile: it was
    counted lingering until then (a real server's connection reading 4 KiB every 5 s of a
    1,000,000-float answer stayed counted for as long as its client read), and 32 such
    clients held every lingering place."""
    monkeypatch.setattr(connection_cap, "LINGER_S", 0.05)
    slots = ConnectionSlots(10)
    owner = Owner(slots)
    owner.transport = transport = SlowReaderTransport(owner, loop)

    async def refuse() -> None:
        owner.transport.write(b"refusal")
        lingering_close.arm(owner)
        owner.transport.close()
        assert slots.lingering == 1
        await asyncio.sleep(0.2)
    loop.run_until_complete(refuse())
    assert transport.events[-1] == "closed" and owner.lost == []
    assert slots.lingering == 0
    transport.flushed()
    settle(loop)
    assert (owner.lost, slots.lingering) == ([None], 0)  # (let go of once)
