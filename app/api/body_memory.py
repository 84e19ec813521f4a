"""The bound on the memory request bodies hold at once, all connections together
(``OPTSERVE_MAX_BODIES_MB``).

``OPTSERVE_MAX_BODY_MB`` bounds one body; nothing bounded them together. A body with a
``Content-Length`` is read into a buffer of that size, held until its answer has gone out (a
step decodes its gradients in place and writes its answer into the same buffer; a push waits
in its round with it). So clients sending many large bodies at once (or sending most of each
and then a byte every little while, inside the body timeout) made the server hold all of them,
and past the machine's memory the kernel ended it: every session's connections with it.

:class:`BodyMemory` counts the bytes of the bodies being read or held (on ``app.state``),
against a limit: by default half of the memory the server may use (its cgroup's limit where it
has one below the machine's, else the machine's), and never less than one body of the largest
size allowed. A body with a ``Content-Length`` takes its size before any of it is read; when
that does not fit it waits, first come first served (the connection is not read meanwhile, so
the client's sending waits too), until enough is given back, for at most the body timeout
(``OPTSERVE_BODY_TIMEOUT_S``); then it is answered 503 ``server_bodies_full`` with
``Retry-After`` and nothing applied (the SDKs retry it). A body without a ``Content-Length``
(chunked) takes its bytes as they arrive, without waiting: past the limit it is answered the
same way. What a request took is given back when its answer has gone out (or it ended
otherwise): :class:`BodyMemoryRelease`, a middleware around the endpoints.

What a body counts is what reading and decoding it may take: its size, eighteen times its
size for a JSON body (:data:`JSON_EXPANSION`: its numbers become Python objects before they
become a tensor) and, for a large one, on top: 2 KB for each ``{`` (:data:`JSON_OBJECT_BYTES`),
64 bytes for each ``[`` (:data:`JSON_LIST_BYTES`) and 24 for each ``"``
(:data:`JSON_STRING_BYTES`), counted once the body is read, without waiting; and for a
safetensors body 32 times its
header's size on top
(:data:`HEADER_EXPANSION`, counted once the body is read, without waiting), and for a
``torch.save`` import what its zip entries expand to on top (their declared sizes: torch's
reader inflates deflated entries, a file of zeros a thousand times; and its pickle 32 times
its size, what unpickling its small objects may take; counted the same way,
``app.api.requests.torch_file``). A body that could
never fit is a 413 ``payload_too_large`` at once, not a wait (``benchmarks.hostile_memory``
measures a step whose 89 MB header names 1.5 million tensors).

A sync round's pushes hold their bodies until the round steps: a round of K workers needs K of
them to fit at once (the default, half the memory, holds K * body as long as they fit in
memory at all).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.connection_cap import Bounded
from app.engine.idle import default_memory_bound
from app.errors import Overloaded, PayloadTooLarge

#: where a request's taken bytes are counted in its ASGI scope
TAKEN = "optserve.body_bytes"
#: a body without a Content-Length takes at least this much more at a time
CHUNKED_STEP = 1 << 20
#: the Retry-After of a refused body, in seconds
RETRY_AFTER_S = 1.0
#: what decoding a JSON body may make of each of its bytes: a list of numbers becomes a Python
#: float (24 bytes) and its list slot (8) for as little as 4 bytes of text ("0.5,"), the
#: parser's list grows by copies, then the array: a tensor of 1e7 "0.5"s peaked at 15 times
#: its body, of 1e7 "NaN"s at 15.7 (``python -m benchmarks.json_decode_peak``); with a margin
#: for other allocators and Pythons
JSON_EXPANSION = 18
#: and on top, for each ``{`` of a large JSON body (each object: a tensor's dict, its
#: strings and lists, the tensor itself): a body of a million one-element tensors peaked at
#: 32.8 times its size, about 1.7 KB a tensor (the same benchmark)
JSON_OBJECT_BYTES = 2048
#: and for each ``[`` (a list object and its slot in its parent): a body of a million ``[[]],``
#: peaked at 37.9 times its size, of ``[0],`` at 31.1, of ``[0.5]`` rows at 26.4 (the same
#: benchmark), past what 18 times their size covers
JSON_LIST_BYTES = 64
#: and for each ``"`` (half a string: a short string object and its slot): a million ``"ab",``
#: peaked at 18.6 times their size (strings of one character are the interpreter's own)
JSON_STRING_BYTES = 24
#: what each of those bytes counts on top of the expansion, in the order counted
JSON_STRUCTURE_BYTES = ((b"{", JSON_OBJECT_BYTES), (b"[", JSON_LIST_BYTES),
                        (b'"', JSON_STRING_BYTES))
#: the same for a safetensors header: an object per tensor, about 1.7 KB for a 60-byte entry
HEADER_EXPANSION = 32


def bound(setting_mb: int, max_body: int, root: Path = Path("/")) -> int:
    """The bytes bodies may hold at once: ``setting_mb`` MiB, or (0) half of the memory the
    server may use (:func:`app.engine.idle.default_memory_bound`), never less than
    ``max_body`` (one body of the largest size allowed always fits)."""
    return max((setting_mb << 20) or default_memory_bound(root), max_body)


class BodyMemory(Bounded):
    """Bytes of request bodies held, against ``limit``, and the bodies waiting for theirs (on
    the event loop's thread)."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        #: bodies waiting for bytes, in the order they asked: (bytes, woken when taken)
        self._waiting: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Bodies waiting for bytes now."""
        return len(self._waiting)

    def try_take(self, n: int, *, first: bool = False) -> bool:
        """Take ``n`` bytes now, if they fit and no body waits before them (``first``: ahead
        of those waiting: more for a body already being read)."""
        return (first or not self._waiting) and self.take(n)

    async def wait_take(self, n: int, timeout: float | None) -> bool:
        """Take ``n`` bytes, waiting behind the bodies that asked first for at most
        ``timeout`` seconds (None: as long as it takes). False: not taken in time."""
        if self.try_take(n):
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, waiter)
        self._waiting.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():  # (taken as the wait ended)
                if isinstance(exc, TimeoutError):
                    return True
                self.give(n)
                raise
            with contextlib.suppress(ValueError):  # (unless a wake dropped it already)
                self._waiting.remove(entry)
            self._wake()  # (a body behind it may fit now)
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def give(self, n: int = 1) -> None:
        """``n`` bytes taken before let go; the bodies waiting that now fit take theirs."""
        super().give(n)
        self._wake()

    def _wake(self) -> None:
        while self._waiting:
            n, waiter = self._waiting[0]
            if not waiter.done():
                if not self.take(n):
                    return
                waiter.set_result(None)
            self._waiting.popleft()


def memory_of(scope: Scope) -> BodyMemory | None:
    """The served app's :class:`BodyMemory` (``app.state.body_memory``), None without one (an
    app built without it)."""
    app = scope.get("app")
    memory = getattr(getattr(app, "state", None), "body_memory", None)
    return memory if isinstance(memory, BodyMemory) else None


def _refused(memory: BodyMemory, n: int) -> Overloaded:
    return Overloaded(
        f"the request bodies the server holds now ({memory.held} bytes, of at most "
        f"{memory.limit}: OPTSERVE_MAX_BODIES_MB) leave no room for this one ({n} bytes); "
        f"nothing was applied, retry after {RETRY_AFTER_S:g} s",
        retry_after=RETRY_AFTER_S, code="server_bodies_full", field="body",
        limit_bytes=memory.limit, held_bytes=memory.held, needed_bytes=n)


def _never_fits(memory: BodyMemory, n: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"reading and decoding this body may take {n} bytes (a JSON text up to "
        f"{JSON_EXPANSION} times its size, and {JSON_OBJECT_BYTES}, {JSON_LIST_BYTES} and "
        f"{JSON_STRING_BYTES} bytes for each '{{', '[' and '\"' in it; a "
        f"safetensors header {HEADER_EXPANSION} times); the "
        f"server holds at most {memory.limit} for request bodies (OPTSERVE_MAX_BODIES_MB): send "
        "the tensors as safetensors, or in a smaller body", field="body",
        limit=memory.limit, needed_bytes=n)


def _counting(scope: Scope, n: int) -> BodyMemory | None:
    """The bound ``n`` bytes more of the request of ``scope`` count against (None: no bound,
    or nothing to count); 413 ``payload_too_large`` when they could never fit with what the
    request holds already (a JSON body's structure bytes on top of its expansion, a
    safetensors header's parse on top of its body, a chunked body's later pieces: each
    within the bound alone, past it together, was a 503 ``server_bodies_full`` that no
    retry could pass)."""
    memory = memory_of(scope)
    if memory is None or n <= 0:
        return None
    total = scope.get(TAKEN, 0) + n
    if total > memory.limit:
        raise _never_fits(memory, total)
    return memory


async def hold(scope: Scope, n: int, timeout: float | None) -> None:
    """Count ``n`` bytes of a body against the bound for the request of ``scope``, waiting
    for at most ``timeout`` seconds; 503 ``server_bodies_full`` when they do not fit by then,
    413 ``payload_too_large`` when they never would. Given back by
    :class:`BodyMemoryRelease`."""
    memory = _counting(scope, n)
    if memory is not None:
        if not await memory.wait_take(n, timeout):
            raise _refused(memory, n)
        scope[TAKEN] = scope.get(TAKEN, 0) + n


def hold_now(scope: Scope, n: int) -> None:
    """As :func:`hold`, without waiting, ahead of the bodies waiting: more for a body already
    being read (one of no announced size, as it arrives; a safetensors header's parse)."""
    memory = _counting(scope, n)
    if memory is not None:
        if not memory.try_take(n, first=True):
            raise _refused(memory, n)
        scope[TAKEN] = scope.get(TAKEN, 0) + n


class BodyMemoryRelease:
    """Gives back what a request's body took (:func:`hold`) once its answer has gone out, or
    the request ended otherwise."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        finally:
            taken = scope.pop(TAKEN, 0)
            if taken:
                memory = memory_of(scope)
                if memory is not None:
                    memory.give(taken)
