"""``app.api.bodies.read_body`` reads a request body from its ASGI messages (with their
``more_body``, as Starlette's ``request.stream()`` reads them): in chunks, to the end; a body
something read before (Starlette keeps it) as it was; a disconnect as Starlette's
``ClientDisconnect``; and a 408 ``body_timeout`` when the next chunk does not come."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import Request
from starlette.requests import ClientDisconnect

from app.api.bodies import BodyTimeout, read_body


def _request(messages: list[dict[str, Any]], *, hang: bool = False,
             timeout: float | None = 5.0, length: int | None = None) -> Request:
    """A request whose receive hands out ``messages`` in turn (then waits for good with
    ``hang``)."""
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if not queue:
            assert hang, "read past the body's last message"
            await asyncio.sleep(3600)
        return queue.pop(0)
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    app = SimpleNamespace(state=SimpleNamespace(settings=SimpleNamespace(body_timeout_s=timeout)))
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "app": app,
             "query_string": b""}
    return Request(scope, receive)


def _chunk(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


@pytest.mark.parametrize("length", [None, 11])
def test_a_body_in_chunks_is_read_to_its_last(length: int | None) -> None:
    req = _request([_chunk(b"hello", True), _chunk(b"", True), _chunk(b" world", False)],
                   length=length)
    assert bytes(asyncio.run(read_body(req, 1 << 20))) == b"hello world"


def test_a_body_read_before_is_given_as_it_was() -> None:
    async def main() -> bytes:
        req = _request([_chunk(b"seen", True), _chunk(b" once", False)])
        assert await req.body() == b"seen once"  # (Starlette keeps it)
        return bytes(await read_body(req, 1 << 20))
    assert asyncio.run(main()) == b"seen once"


def test_a_disconnect_is_starlettes() -> None:
    req = _request([_chunk(b"half", True), {"type": "http.disconnect"}])
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(req, 1 << 20))


def test_a_stalled_body_times_out() -> None:
    req = _request([_chunk(b"first", True)], hang=True, timeout=0.2)
    with pytest.raises(BodyTimeout) as caught:
        asyncio.run(read_body(req, 1 << 20))
    assert (caught.value.status, caught.value.code, caught.value.field) == (
        408, "body_timeout", "body")


def test_a_sink_raises_what_its_take_raised_and_drops_what_follows() -> None:
    """``app.api.body_sink.Sink``: a part ``take`` refuses ends the wait with that error;
    parts after it are dropped, not taken; a disconnect is ``ClientDisconnect``; a sink given
    no part for its timeout times out, one given parts in time does not."""
    from app.api.body_sink import Sink, SinkTimeout

    async def main() -> None:
        taken: list[bytes] = []

        def take(part: bytes) -> None:
            if part == b"bad":
                raise ValueError("refused")
            taken.append(part)
        sink = Sink(take)
        sink.part(b"one")
        sink.part(b"bad")
        sink.part(b"two")
        with pytest.raises(ValueError, match="refused"):
            await sink.wait(5.0)
        assert taken == [b"one"] and sink.received == 3

        gone = Sink(taken.append)
        gone.finish(whole=False)
        with pytest.raises(ClientDisconnect):
            await gone.wait(5.0)

        stalled = Sink(taken.append)
        with pytest.raises(SinkTimeout):
            await stalled.wait(0.1)

        steady = Sink(taken.append)

        async def feed() -> None:
            for _ in range(4):
                await asyncio.sleep(0.06)
                steady.part(b"x")
            steady.finish()
        feeding = asyncio.create_task(feed())
        assert await steady.wait(0.1) == 4  # 0.24 s in all, never 0.1 s without a part
        await feeding
    asyncio.run(main())
