"""A binary step answer sent while the step runs: the head, then each chunk's new values as
the worker steps it (:mod:`app.engine.answer_stream`), the last byte only once the step is
done (applied, logged where its durability logs before the answer, remembered under its
idempotency key).

Offered where the answer carries nothing the step has yet to compute (``?metrics=history``)
and is written over the request's spent gradients (a safetensors body, ``Accept:
application/octet-stream``, every parameter returned); the engine decides
the rest (:meth:`app.engine.ops.gradients.Step._streamed`) and answers as ever where it does
not begin the stream. A step that fails after the head went out never completes its answer:
the response ends short of its ``Content-Length``, so the server closes the connection (every
HTTP client reads that as no answer), and the session is restored as for any failed step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.instrument import outcome_of
from app.engine.answer_stream import AnswerStream
from app.engine.interface import StepResult
from app.wire.safetensors_body import packed_header_parts
from app.wire.tensor_maps import PackedTensors

BINARY = "application/octet-stream"
log = logging.getLogger("optserve.api")


class StreamedStep:
    """The event loop's side of an :class:`AnswerStream`: when its head may go, how much of
    its buffer is written."""

    def __init__(self, packed: PackedTensors, dtype: torch.dtype | None) -> None:
        self._loop = asyncio.get_running_loop()
        self.began = asyncio.Event()
        self.scalars: dict[str, Any] = {}
        self.ready = 0
        self._wake = asyncio.Event()
        self.packed = packed
        self.dtype = dtype

    def stream(self) -> AnswerStream:
        """The engine's side (it refers to this object; this one not to it: no cycle that would
        keep the answer's buffer, the request's body, until the cyclic collector runs)."""
        return AnswerStream(self.packed, self.dtype, self._on_begin, self._on_ready)

    def _on_begin(self, scalars: dict[str, Any]) -> None:  # (the worker thread)
        self._loop.call_soon_threadsafe(self._begun, scalars)

    def _on_ready(self, upto: int) -> None:  # (the worker thread)
        self._loop.call_soon_threadsafe(self._advance, upto)

    def _begun(self, scalars: dict[str, Any]) -> None:
        self.scalars = scalars
        self.began.set()

    def _advance(self, upto: int) -> None:
        self.ready = max(self.ready, upto)
        self._wake.set()

    def wake(self, _: object = None) -> None:
        self._wake.set()

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake.clear()


async def begun(streamed: StreamedStep, step: Awaitable[StepResult]
                ) -> tuple[asyncio.Future[StepResult], bool]:
    """Run ``step`` until its answer begins streaming or it ends: the step's future, and
    whether it began."""
    task: asyncio.Future[StepResult] = asyncio.ensure_future(step)
    task.add_done_callback(streamed.wake)
    began = asyncio.ensure_future(streamed.began.wait())
    either: set[asyncio.Future[Any]] = {task, began}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        began.cancel()
    return task, streamed.began.is_set()


class StreamedResponse(Response):
    """The head and the safetensors header at once, the buffer as it is written, its last
    byte once the step's future holds its result."""

    def __init__(self, streamed: StreamedStep, task: asyncio.Future[StepResult],
                 metadata: dict[str, str], headers: dict[str, str],
                 count: Callable[[str], None]) -> None:
        super().__init__(b"", media_type=BINARY, headers=headers)
        self.streamed = streamed
        self.task = task
        #: counts the request once its outcome is known: ``ok``, or the failed step's code
        self.count = count
        self.head = b"".join(packed_header_parts(streamed.packed, metadata))
        buffer = streamed.packed.buffer
        assert buffer is not None
        self.buffer = buffer
        self.headers["content-length"] = str(len(self.head) + len(buffer))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        result = "error"  # (what a send that raised leaves)
        try:
            result = await self._send(send)
        finally:
            self.count(result)

    async def _send(self, send: Send) -> str:
        """Send the answer; the outcome it is counted under."""
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.head, "more_body": True})
        streamed, task, size = self.streamed, self.task, len(self.buffer)
        sent = 0
        while True:
            done = task.done()
            failed = done and (task.exception() is not None or streamed.ready < size)
            if failed:
                # returned short of the Content-Length: the server closes the connection
                # (uvicorn: "ASGI callable returned without completing response"; the access
                # line says it was cut, app.observability)
                exc = task.exception()
                log.warning("a step's streamed answer was cut after %d of its %d bytes: %s",
                            sent, size, exc or "its step ended without them")
                return outcome_of(exc) if exc is not None else "error"
            upto = min(streamed.ready, size if done else size - 1)
            if upto > sent:
                part = self.buffer[sent:upto]
                sent = upto
                await send({"type": "http.response.body", "body": part,
                            "more_body": sent < size})
                if sent == size:
                    return "ok"
                continue
            await streamed.wait()
