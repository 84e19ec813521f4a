"""``PartsResponse``: a binary answer sent as its parts (a header and the data) without joining
a large payload, and as one write when it is small."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from app.api.bodies import SMALL_PART, PartsResponse


def sent(parts: list[Any], method: str = "POST") -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(dict(message))

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    response = PartsResponse(parts, media_type="application/octet-stream")
    asyncio.run(response({"type": "http", "method": method}, receive, send))
    return messages


def test_a_small_answer_goes_as_one_body() -> None:
    data = np.arange(1000, dtype=np.float32)
    messages = sent([b"head", data.data.cast("B")])
    start, *bodies = messages
    assert start["type"] == "http.response.start"
    assert dict(start["headers"])[b"content-length"] == str(4 + 4000).encode()
    assert len(bodies) == 1 and not bodies[0]["more_body"]
    assert bodies[0]["body"] == b"head" + data.tobytes()


def test_a_large_payload_goes_as_itself_after_the_header() -> None:
    data = np.arange(SMALL_PART, dtype=np.float32)
    payload = data.data.cast("B")
    _, head, body = sent([b"head", payload])
    assert head == {"type": "http.response.body", "body": b"head", "more_body": True}
    assert body["body"] is payload and not body["more_body"]  # not copied
    assert bytes(body["body"]) == data.tobytes()


def test_head_sends_no_body() -> None:
    _, body = sent([b"head", b"data"], method="HEAD")
    assert body["body"] == b""
