"""``app.api.held_head``: a response's head goes out with its first body bytes in one write,
and alone (on the loop's next turn, or before a close) when none follows."""

from __future__ import annotations

import asyncio
from typing import Any

from app.api.held_head import HeldHead, hold_head


class Transport:
    """What the connection's transport was asked to do, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, parts: Any) -> None:
        self.calls.append(("writelines", [bytes(p) for p in parts]))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def run(steps: Any) -> list[tuple[str, Any]]:
    """``steps(held, transport)`` on a fresh loop, then one more turn of it."""
    loop = asyncio.new_event_loop()
    try:
        transport = Transport()
        held = HeldHead(transport, loop)  # type: ignore[arg-type]

        async def main() -> None:
            steps(held, transport)
            await asyncio.sleep(0)
            await asyncio.sleep(0)

        loop.run_until_complete(main())
        return transport.calls
    finally:
        loop.close()


def test_the_head_goes_with_the_first_body_bytes_and_the_rest_as_they_come() -> None:
    def steps(held: HeldHead, _: Transport) -> None:
        held.write(b"HEAD")
        held.write(memoryview(b"body1"))
        held.write(b"body2")

    assert run(steps) == [("writelines", [b"HEAD", b"body1"]), ("write", b"body2")]


def test_a_head_with_an_empty_body_goes_alone_at_once() -> None:
    def steps(held: HeldHead, _: Transport) -> None:
        held.write(b"HEAD")
        held.write(b"")

    assert run(steps) == [("write", b"HEAD")]


def test_a_head_with_nothing_behind_it_goes_on_the_next_turn() -> None:
    """A streamed answer whose first piece is not ready yet, a HEAD answer, a 1xx."""
    seen: list[list[tuple[str, Any]]] = []

    def steps(held: HeldHead, transport: Transport) -> None:
        held.write(b"HEAD")
        seen.append(list(transport.calls))  # nothing yet, in the same turn

    assert run(steps) == [("write", b"HEAD")]
    assert seen == [[]]


def test_the_next_turns_flush_leaves_a_head_already_sent_alone() -> None:
    def steps(held: HeldHead, _: Transport) -> None:
        held.write(b"HEAD")
        held.write(b"body")

    calls = run(steps)
    assert calls == [("writelines", [b"HEAD", b"body"])]  # not the head a second time


def test_a_close_sends_the_held_head_first() -> None:
    def steps(held: HeldHead, _: Transport) -> None:
        held.write(b"HEAD")
        held.close()

    assert run(steps) == [("write", b"HEAD"), ("close", None)]


def test_a_closing_connection_gets_no_late_head() -> None:
    def steps(held: HeldHead, transport: Transport) -> None:
        held.write(b"HEAD")
        transport.closing = True  # the client went away

    assert run(steps) == []


def test_everything_else_is_the_connections_transport() -> None:
    class Cycle:
        transport: Any = None

    loop = asyncio.new_event_loop()
    try:
        transport = Transport()
        cycle = Cycle()
        cycle.transport = transport
        hold_head(cycle, loop)
        assert isinstance(cycle.transport, HeldHead)
        assert cycle.transport.get_extra_info("peername") == ("127.0.0.1", 1)
        assert cycle.transport.is_closing() is False
    finally:
        loop.close()
