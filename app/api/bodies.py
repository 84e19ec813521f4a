"""Request bodies in (JSON or safetensors, size-limited) and responses out (per ``Accept``)."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
import orjson
import torch
from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api import body_memory, body_sink
from app.api.conditions import one_header, one_query
from app.api.openapi_docs import OPERATIONS
from app.errors import (
    BadHeader,
    BadRequest,
    Invalid,
    MalformedHttp,
    NotAcceptable,
    OptserveError,
    PayloadTooLarge,
    UnsupportedMedia,
)
from app.observability import SUNK_BYTES
from app.wire import sparse as wire_sparse
from app.wire.dtypes import TORCH_DTYPES
from app.wire.json_tensor import all_decode, decode_json_tensor
from app.wire.safetensors_body import (
    BodyTensors,
    PackedTensors,
    header_end,
    packed_header_parts,
    read_safetensors,
    write_safetensors,
)
from app.wire.safetensors_header import HeaderLayout
from app.wire.unique_keys import refuse_duplicate_keys

JSON = "application/json"
BINARY = "application/octet-stream"
OFFLOAD_BYTES = 256 * 1024  # bodies larger than this are decoded/encoded off the event loop
T = TypeVar("T")


async def offload(fn: Callable[[], T], size: int) -> T:
    if size > OFFLOAD_BYTES:
        return await anyio.to_thread.run_sync(fn)
    return fn()


class BodyTimeout(OptserveError):
    status = 408
    code = "body_timeout"
    title = "Request body timeout"


async def _receive(request: Request, take: Callable[[bytes], None]) -> None:
    """Hand the body's chunks to ``take`` as they arrive; 408 when none arrives for
    ``OPTSERVE_BODY_TIMEOUT_S`` (a stalled or trickling client must not hold a connection and
    a buffer forever). One timeout for the whole body, moved on at every chunk (a timeout per
    chunk cost as much as the rest of a small step's decoding); ``take`` runs inside it and
    may raise (the timeout then ends with it)."""
    timeout = _body_timeout(request)
    rate = _min_rate(request)
    loop = asyncio.get_running_loop()
    start, received = loop.time(), 0
    # (the first deadline, start + timeout, is both: no byte yet, and no body whole)
    too_slow = False
    read = getattr(request, "_body", None)
    if isinstance(read, bytes):  # (read before, kept by Starlette: as request.stream() gives it)
        if read:
            take(read)
        return
    receive = request.receive
    try:
        async with asyncio.timeout(timeout) as deadline:
            # as Starlette's ``request.stream()``, reading ``more_body`` too: the last chunk
            # (a small body's only one) moves no timer on
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                if message["type"] != "http.request":
                    continue
                chunk = message.get("body", b"")
                if chunk:
                    take(chunk)
                    received += len(chunk)
                if not message.get("more_body", False):
                    break
                if chunk and timeout is not None:
                    # the next byte within the timeout, and the whole body within the
                    # timeout plus its bytes at the minimum rate (a trickle of a byte every
                    # few seconds moves the first on, never the second)
                    gap = loop.time() + timeout
                    whole = start + timeout + received / rate if rate else gap
                    too_slow = whole < gap
                    deadline.reschedule(min(gap, whole))
    except TimeoutError:
        # the answer closes the connection (as for a body read through a sink), so that a
        # client that never sends the rest does not hold it open midway through a body
        close_after = request.scope.get("extensions", {}).get(body_sink.CLOSE_AFTER)
        if close_after is not None:
            close_after()
        raise (_too_slow(timeout, rate, received, loop.time() - start) if too_slow
               else _stalled(timeout)) from None


def _body_timeout(request: Request) -> float | None:
    """``OPTSERVE_BODY_TIMEOUT_S`` (None: no timeout, as for an app without settings)."""
    settings = getattr(request.app.state, "settings", None)
    timeout: float | None = getattr(settings, "body_timeout_s", None)
    return timeout


def _min_rate(request: Request) -> float | None:
    """``OPTSERVE_BODY_MIN_KIB_S`` in bytes a second (None: no whole-body deadline)."""
    settings = getattr(request.app.state, "settings", None)
    kib: float | None = getattr(settings, "body_min_kib_s", None)
    return kib * 1024.0 if kib else None


def _too_slow(timeout: float | None, rate: float | None, received: int,
              elapsed: float) -> BodyTimeout:
    kib = (rate or 0.0) / 1024.0
    return BodyTimeout(
        f"the request body was not whole within OPTSERVE_BODY_TIMEOUT_S ({timeout:g} s) plus "
        f"its bytes at OPTSERVE_BODY_MIN_KIB_S ({kib:g} KiB/s): {received} bytes in "
        f"{elapsed:.1f} s", field="body", limit=timeout)


def _stalled(timeout: float | None) -> BodyTimeout:
    return BodyTimeout(f"no request body bytes for {timeout:g} s (OPTSERVE_BODY_TIMEOUT_S)",
                       field="body", limit=timeout)


async def _receive_into(request: Request, take: Callable[[bytes], None],
                        target: memoryview) -> int | None:
    """As :func:`_receive`, through the server protocol's sink where it offers one
    (:mod:`app.api.body_sink`): what has arrived goes to ``take``, and the rest is read from
    the socket into ``target`` after it, the whole body's buffer. Returns the bytes the sink
    took in all (None: read through ``receive()``, all of it given to ``take``)."""
    attach = request.scope.get("extensions", {}).get(body_sink.EXTENSION)
    sink = (attach(take, target) if attach is not None
            and getattr(request, "_body", None) is None else None)
    if sink is None:
        await _receive(request, take)
        return None
    timeout = _body_timeout(request)
    rate = _min_rate(request)
    state = request.scope.setdefault("state", {})
    try:
        received: int = await sink.wait(timeout, rate)
    except BaseException as exc:
        sink.abandon()
        if isinstance(exc, body_sink.SinkTimeout):
            if sink.too_slow:
                raise _too_slow(timeout, rate, sink.received,
                                asyncio.get_running_loop().time() - sink.started_at) from None
            raise _stalled(timeout) from None
        raise
    finally:
        state[SUNK_BYTES] = state.get(SUNK_BYTES, 0) + sink.received
    return received


async def read_body(request: Request, max_bytes: int, *, as_json: bool | None = None
                    ) -> bytearray:
    """The whole body in a fresh ``bytearray``; 413 past ``max_bytes``; 408 when it stalls.
    ``as_json``: whether it will be decoded as JSON, which is what it counts against
    ``OPTSERVE_MAX_BODIES_MB`` as (None: as its Content-Type says; ``PUT
    .../state_dict?format=json`` decodes a JSON text whatever its Content-Type reads)."""
    out = await _read_body(request, max_bytes, raw=False, as_json=as_json)
    assert isinstance(out, bytearray)
    return out


async def _read_body(
    request: Request, max_bytes: int, raw: bool = False, as_json: bool | None = None
) -> bytearray | memoryview:
    """The whole body in a fresh writable buffer; 413 as soon as it passes ``max_bytes``;
    408 when it stalls (see ``_receive``). With ``raw`` a large body lands in an uninitialized
    buffer (a writable memoryview: no zero-filling 40 MB before overwriting it)."""
    _check_encoding(request)
    _check_transfer_coding(request)
    expansion = _expansion(request, as_json)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise BadRequest("Content-Length is not a number",
                             field="Content-Length") from None
        if size > max_bytes:
            raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {max_bytes}",
                                  field="body", limit=max_bytes)
        if size > OFFLOAD_BYTES:  # one copy into a buffer of the announced size
            await body_memory.hold(request.scope, size * expansion,
                                   _body_timeout(request))
            out: bytearray | memoryview = (_raw_buffer(request, size) if raw
                                           else bytearray(size))
            view, pos = memoryview(out), 0

            def into(chunk: bytes) -> None:
                nonlocal pos
                end = pos + len(chunk)
                if end > size:
                    raise BadRequest("body is longer than its Content-Length",
                                     field="Content-Length")
                view[pos:end] = chunk
                pos = end
            received = await _receive_into(request, into, view)
            if (pos if received is None else received) != size:
                raise BadRequest("body is shorter than its Content-Length",
                                 field="Content-Length")
            if expansion != 1:
                await _hold_structure(request, out)
            return out
    buf = bytearray()
    # (a body of no announced size counts against OPTSERVE_MAX_BODIES_MB once it is large)
    counted = OFFLOAD_BYTES if declared is None else max_bytes

    def grow(chunk: bytes) -> None:
        nonlocal counted
        buf.extend(chunk)
        if len(buf) > max_bytes:
            raise PayloadTooLarge(f"body exceeds the limit of {max_bytes} bytes", field="body",
                                  limit=max_bytes)
        if len(buf) > counted:
            more = max(len(buf) - counted, body_memory.CHUNKED_STEP)
            body_memory.hold_now(request.scope, more * expansion)
            counted += more
    await _receive(request, grow)
    if len(buf) > OFFLOAD_BYTES and expansion != 1:
        await _hold_structure(request, buf)
    return buf


def _structure_bytes(buf: bytearray | memoryview) -> int:
    """What ``buf``'s ``{``, ``[`` and ``"`` count on top of its expansion
    (:data:`~app.api.body_memory.JSON_STRUCTURE_BYTES`), a piece at a time (each piece's
    counts hold the interpreter lock; between pieces the event loop may run)."""
    view, piece, total = memoryview(buf), 1 << 20, 0
    for i in range(0, len(view), piece):
        text = view[i:i + piece].tobytes()
        total += sum(text.count(byte) * cost for byte, cost in body_memory.JSON_STRUCTURE_BYTES)
    return total


async def _hold_structure(request: Request, buf: bytearray | memoryview) -> None:
    """A large body read as JSON counts, on top of
    :data:`~app.api.body_memory.JSON_EXPANSION` times its size,
    :data:`~app.api.body_memory.JSON_OBJECT_BYTES` for each ``{`` it holds,
    :data:`~app.api.body_memory.JSON_LIST_BYTES` for each ``[`` and
    :data:`~app.api.body_memory.JSON_STRING_BYTES` for each ``"`` (upper bounds on its objects,
    lists and strings, which no escape can hide): each of them costs more than its text times
    the expansion (a body of one-element tensors: 33 times its size; of empty lists, 38).
    Counted once read, without waiting, as a safetensors header's parse is."""
    more = await anyio.to_thread.run_sync(_structure_bytes, buf)
    if more:
        body_memory.hold_now(request.scope, more)


def _json_type(ctype: str) -> bool:
    """A media type (lower case, no parameters) read as JSON."""
    return ctype in (JSON, "application/problem+json", "text/json") or ctype.endswith("+json")


def _expansion(request: Request, as_json: bool | None = None) -> int:
    """What the body counts against ``OPTSERVE_MAX_BODIES_MB`` per byte:
    :data:`~app.api.body_memory.JSON_EXPANSION` for a body read as JSON (``as_json``; None:
    no Content-Type, or a JSON one), else one."""
    if as_json is None:
        ctype = (request.headers.get("content-type") or JSON).split(";")[0].strip().lower()
        as_json = _json_type(ctype)
    return body_memory.JSON_EXPANSION if as_json else 1


def _check_encoding(request: Request) -> None:
    """415 for a compressed body (``Content-Encoding: gzip``, ...): its bytes are not JSON or
    safetensors, and were refused as such ("not valid UTF-8") without saying why."""
    encoding = (one_header(request, "content-encoding", "content-encoding") or "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMedia(f"Content-Encoding {encoding!r:.40} is not supported; send the "
                               "body uncompressed", field="content-encoding")


def _check_transfer_coding(request: Request) -> None:
    """400 ``malformed_http`` naming ``Transfer-Encoding`` for a body framed with any transfer
    coding besides one ``chunked`` (``gzip, chunked``, ``x, chunked``, a ``gzip`` line and a
    ``chunked`` one): the parser takes the chunks, but the bytes in them are coded, and were
    read as the body itself (a gzip-coded step refused as "not valid UTF-8", an unknown
    coding's body applied as if it were not there)."""
    lines = request.headers.getlist("transfer-encoding")
    if not lines:
        return
    codings = [c.strip().lower() for line in lines for c in line.split(",")]
    if codings != ["chunked"]:
        shown = ", ".join(lines)
        raise MalformedHttp(f"Transfer-Encoding {shown!r:.60} is not taken: the only transfer "
                            "coding taken is chunked, never with Content-Length (send the body "
                            "uncoded)", field="Transfer-Encoding")


def _raw_buffer(request: Request, size: int) -> memoryview:
    """An uninitialized buffer for a tensor body: pinned (page-locked) host memory when the
    engine's device is a GPU, so the host-to-device copy of its tensors is one DMA."""
    if getattr(request.app.state, "pin_bodies", False):
        return torch.empty(size, dtype=torch.uint8, pin_memory=True).numpy().data
    return np.empty(size, dtype=np.uint8).data


def body_kind(request: Request) -> str:
    ctype = (one_header(request, "content-type", "content-type") or JSON).split(";")[0]
    ctype = ctype.strip().lower()
    if _json_type(ctype):
        return "json"
    if ctype in (BINARY, "application/safetensors", "application/x-safetensors"):
        return "binary"
    raise UnsupportedMedia(f"Content-Type {ctype!r:.60} is not supported; send {JSON} or "
                           f"{BINARY} (safetensors)", field="content-type")


def require_json(request: Request) -> None:
    """415 unless the body is JSON (for endpoints that take no safetensors body): its detail
    names JSON only, not the safetensors type the other endpoints also take."""
    ctype = (one_header(request, "content-type", "content-type") or JSON).split(";")[0]
    ctype = ctype.strip().lower()
    if not _json_type(ctype):
        raise UnsupportedMedia(f"Content-Type {ctype!r:.60} is not supported here: this "
                               f"endpoint takes an {JSON} body", field="content-type")


_ALIASES = {"application/safetensors": BINARY, "application/problem+json": JSON}


#: an RFC 9110 qvalue (12.4.2): 0 to 1, at most three decimals
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _accepted(accept: str) -> tuple[tuple[str, float], ...]:
    """The media ranges of an ``Accept`` header with their weights, in the header's order,
    q=0 included (it excludes what it names). A weight that is not a qvalue (``q=2``,
    ``q=inf``, ``q=nan``, ``q=0.0001``, ``q=high``) is a 400 naming ``accept``: taken, it
    would outweigh the ranges the client ranked by the rules (``q=2`` over ``q=1``), and
    dropped, it would leave a range the client meant to weigh."""
    ranges: list[tuple[str, float]] = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        q = 1.0
        for p in pieces[1:]:
            if p[:2].lower() == "q=":
                if not _QVALUE.fullmatch(p[2:]):
                    raise BadHeader(f"Accept: {p!r:.40} in {pieces[0]!r:.60} is not a weight: "
                                    "q is 0 to 1 with at most three decimals (RFC 9110, "
                                    "12.4.2)", field="accept")
                q = float(p[2:])
        if pieces[0]:
            media = pieces[0].lower()
            ranges.append((_ALIASES.get(media, media), q))
    return tuple(ranges)


def _weight(media: str, ranges: tuple[tuple[str, float], ...]) -> tuple[float, int]:
    """``media``'s weight under the header's ranges and the position of the range that sets
    it: the most specific range that matches (``type/sub`` over ``type/*`` over ``*/*``, RFC
    9110 12.5.1), so ``application/json;q=0, */*`` excludes JSON; weight 0 when none does."""
    kind = media.split("/", 1)[0]
    best = (-1, 0.0, 0)  # (specificity, q, position)
    for position, (wanted, q) in enumerate(ranges):
        if wanted == media:
            specificity = 2
        elif wanted == f"{kind}/*":
            specificity = 1
        elif wanted == "*/*":
            specificity = 0
        else:
            continue
        if specificity > best[0]:
            best = (specificity, q, position)
    return best[1], best[2]


@functools.lru_cache(maxsize=256)
def _chosen(accept: str, offered: tuple[str, ...]) -> str | None:
    """What :func:`negotiate` answers for this header and these types (None: 406), kept for
    the pairs seen most: a client sends the same header with every request."""
    ranges = _accepted(accept)
    choice, best = None, (0.0, 0)
    for media in offered:
        q, position = _weight(media, ranges)
        if q > best[0] or (q == best[0] > 0 and position < best[1]):
            choice, best = media, (q, position)
    return choice


def negotiate(request: Request, offered: tuple[str, ...]) -> str:
    """The one of ``offered`` the client's ``Accept`` weighs most (no header: the first
    offered; equal weights: the one named first in the header, then the first offered); 406
    when it takes none. Two ``Accept`` lines are one list (RFC 9110 5.3), in their order.
    ``application/safetensors`` stands for octet-stream and ``application/problem+json`` for
    JSON."""
    accept = ", ".join(request.headers.getlist("accept"))
    if not accept:
        return offered[0]
    choice = _chosen(accept, offered)
    if choice is not None:
        return choice
    names = " and ".join(offered)
    raise NotAcceptable(f"cannot answer with {accept!r:.80}; this endpoint answers {names}",
                        field="accept")


async def check_accept(request: Request) -> None:
    """A router dependency: 406 before any work when ``Accept`` takes none of the media types
    the matched operation answers with (``app.api.openapi_docs.OPERATIONS``: JSON, or JSON and
    safetensors, ...). Problem+json errors go out whatever ``Accept`` says. ``async`` so that
    FastAPI does not hop to its thread pool for it on every request."""
    route = request.scope.get("route")
    op = OPERATIONS.get((request.method.lower(), getattr(route, "path", "")))
    if op is not None and op.produces:
        negotiate(request, op.produces)


def wants_binary(request: Request) -> bool:
    """True for safetensors, False for JSON; 406 when neither is acceptable."""
    return negotiate(request, (JSON, BINARY)) == BINARY


def parse_json(buf: bytes | bytearray | memoryview, field: str = "body", *,
               within: str = "", what: str = "request body") -> Any:
    """A JSON text (a request body, a JSON text in safetensors ``__metadata__``, a same-host
    message: ``what``) to its value; 400 ``invalid_json`` naming ``field`` when it is not
    JSON, 400 ``duplicate_key`` naming the key's dotted path (after ``within``) when an
    object in it names a key twice (which one would count is the parser's choice)."""
    if not buf:
        raise BadRequest(f"the {what} is empty; expected a JSON object", field=field,
                         code="invalid_json")
    try:
        value = orjson.loads(buf)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}", code="invalid_json",
                         field=field) from None
    unique_json(buf, value, within, what, field)
    return value


def unique_json(buf: bytes | bytearray | memoryview, value: Any, within: str = "",
                what: str = "request body", field: str = "body") -> None:
    """400 ``duplicate_key`` when an object of the JSON text ``buf`` (parsed into ``value``)
    names a key twice, naming the key's dotted path after ``within``
    (:func:`app.wire.unique_keys.refuse_duplicate_keys`)."""
    refuse_duplicate_keys(buf, value, what, within, field)


def json_object(buf: bytes | bytearray | memoryview) -> dict[str, Any]:
    obj = parse_json(buf)
    if not isinstance(obj, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_json", field="body")
    return obj


def tensor_map(obj: object, field: str, sparse: bool = False) -> dict[str, torch.Tensor]:
    """``{name: JSON tensor}`` to ``{name: tensor}`` (row-sparse ones too where ``sparse``)."""
    if not isinstance(obj, dict):
        raise Invalid(f"{field} must be an object mapping parameter names to tensors",
                      code="invalid_body", field=field)
    if sparse:
        return {name: wire_sparse.decode_sparse_json(t, f"{field}.{name}")
                if wire_sparse.is_sparse_json(t) else decode_json_tensor(t, f"{field}.{name}")
                for name, t in obj.items()}
    return {name: decode_json_tensor(t, f"{field}.{name}") for name, t in obj.items()}


#: ``__metadata__`` entries other safetensors writers add (Hugging Face's ``save_pretrained``:
#: ``{"format": "pt"}``), taken and ignored
FOREIGN_METADATA = frozenset({"format"})


def only_keys(obj: dict[str, Any], allowed: set[str], where: str = "") -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        path = f"{where}.{unknown[0]}" if where else unknown[0]
        raise Invalid(f"unknown field {unknown[0]!r:.60}; expected {sorted(allowed)}",
                      code="unknown_field", field=path)


async def read_tensors(
    request: Request, max_bytes: int, key: str, extra: frozenset[str] = frozenset(),
    sparse: bool = False,
    before_tensors: Callable[[Entries, dict[str, Any]], None] | None = None,
    before_ready: Callable[[], Awaitable[None]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any], bytearray | memoryview]:
    """A body of named tensors: ``{key: {name: tensor}, ...extra}`` as JSON, or a safetensors
    file (``extra`` fields as JSON texts in its ``__metadata__``); the ``extra`` fields given;
    and the body itself (its tensors may be views into it). With ``sparse``, tensors may be
    row-sparse (:mod:`app.wire.sparse`). Any other field is a 422 ``unknown_field``, in
    ``__metadata__`` as in JSON (a misspelt ``param_group`` would otherwise step without the
    change), but for :data:`FOREIGN_METADATA` that other writers add. ``before_tensors``
    sees a body's tensor entries (dtype, shape, numel by name, in order) and its ``extra``
    fields before its tensors are made (and may refuse it then): a safetensors body's checked
    header, where its tensors are its entries as they are (none of them can pair into a
    row-sparse tensor: :func:`sparse_pairs`); a JSON body's tensors read from their ``dtype``
    and ``shape`` alone (:func:`json_entries`), where each is a dense tensor of a known dtype
    and a well-formed shape. A JSON body refused then is refused as its full decode would
    have been (that entry and those before it are decoded first, so that a malformed one
    among them is named as before; those after it are checked without being made,
    :func:`_decode_after`, and decoded only where one may be malformed, for its problem): a
    7.6 MB step naming 100,000 unknown tensors made every one of them first.
    ``before_ready``: awaited where ``before_tensors`` raises :class:`AskFirst` (it needs
    what ``before_ready`` asks for: a Ray host's answer), then the entries are looked at
    again (a JSON body is not parsed again)."""
    kind = body_kind(request)  # (a 415 before the body is read)
    buf = await _read_body(request, max_bytes, raw=True)
    if kind == "binary":
        if len(buf) >= 8:  # (what parsing its header may take, on top: counted now)
            header = min(int.from_bytes(buf[:8], "little"), len(buf))
            if header > OFFLOAD_BYTES // body_memory.HEADER_EXPANSION:
                body_memory.hold_now(request.scope, header * body_memory.HEADER_EXPANSION)
        def metadata_fields(metadata: dict[str, str]) -> dict[str, Any]:
            fields = {}
            for name in sorted(set(metadata) & extra):
                where = f"__metadata__.{name}"
                fields[name] = parse_json(metadata[name].encode(), where, within=where)
            return fields

        early: list[dict[str, Any]] = []  # (the fields, when read before the tensors)

        def known_fields(metadata: dict[str, str]) -> None:
            only_keys({k: None for k in metadata if k not in FOREIGN_METADATA}, set(extra),
                      "__metadata__")

        def header_read(layout: HeaderLayout, metadata: dict[str, str]) -> None:
            known_fields(metadata)
            if before_tensors is not None and not (sparse and sparse_pairs(layout)):
                early.append(metadata_fields(metadata))
                try:
                    before_tensors(layout.entries, early[0])
                except RefusedAfter as exc:  # (every entry of a header is checked already)
                    raise exc.problem from None

        def decode_binary() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            tensors, metadata = read_safetensors(
                buf, before_tensors=None if before_tensors is None else header_read)
            if before_tensors is None:
                known_fields(metadata)
            if sparse:
                tensors = wire_sparse.pair_safetensors(tensors, key)
            return tensors, early[0] if early else metadata_fields(metadata)
        tensors, fields = await _decoded(decode_binary, header_end(buf), before_ready,
                                         early.clear)
        return tensors, fields, buf

    parsed: list[dict[str, Any]] = []  # (kept for a second look: AskFirst)

    def decode_json() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        if not parsed:
            parsed.append(json_object(buf))
        obj = parsed[0]
        only_keys(obj, {key, *extra})
        named, fields = obj.get(key, {}), {k: obj[k] for k in extra if k in obj}
        if before_tensors is not None and isinstance(named, dict):
            entries = json_entries(named)
            if entries is not None:
                try:
                    before_tensors(entries, fields)
                except RefusedAfter as exc:
                    _decode_up_to(named, key, sparse, exc.entry)
                    _decode_after(named, key, sparse, exc.entry)
                    raise exc.problem from None
                except Invalid as exc:
                    _decode_up_to(named, key, sparse, exc.field)
                    _decode_after(named, key, sparse, exc.field)
                    raise
        return tensor_map(named, key, sparse), fields
    tensors, fields = await _decoded(decode_json, len(buf), before_ready)
    return tensors, fields, buf


async def _decoded(decode: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]],
                   cost: int, before_ready: Callable[[], Awaitable[None]] | None,
                   again: Callable[[], None] = lambda: None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``decode()`` (off the event loop by its ``cost``, :func:`offload`); where its
    ``before_tensors`` could not say yet (:class:`AskFirst`), once more after
    ``before_ready`` (and ``again``: what the first try kept that the second must not)."""
    try:
        return await offload(decode, cost)
    except AskFirst:
        if before_ready is None:
            raise
        await before_ready()
        again()
        return await offload(decode, cost)


class AskFirst(Exception):
    """What a ``before_tensors`` of :func:`read_tensors` raises where it cannot say yet: the
    ``before_ready`` it came with is awaited, and it is asked again."""


class RefusedAfter(Exception):
    """What a ``before_tensors`` of :func:`read_tensors` raises for a body's ``problem`` that
    its full decode gives only after decoding its tensors up to and including ``entry`` (a
    field, ``<key>.<name>``; None: none of them): a malformed one among those is the answer
    instead, as it was when every tensor was decoded first."""

    def __init__(self, problem: OptserveError, entry: str | None) -> None:
        super().__init__(problem)
        self.problem, self.entry = problem, entry


#: a body's tensor entries: (dtype, shape, numel) by name, in the body's order
Entries = Mapping[str, tuple[torch.dtype, tuple[int, ...], int]]


def json_entries(named: dict[str, Any]) -> Entries | None:
    """The entries of a JSON map of tensors read from each one's ``dtype`` and ``shape``
    alone (its values not decoded; numel 0: not read), in order; None when any entry is not a
    dense JSON tensor with a known dtype and a shape of non-negative integers (its full decode
    names the problem)."""
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
    for name, t in named.items():
        if not isinstance(t, dict) or wire_sparse.is_sparse_json(t):
            return None
        dtype, shape = t.get("dtype"), t.get("shape")
        if not isinstance(dtype, str) or dtype not in TORCH_DTYPES or \
                not isinstance(shape, list) or \
                not all(type(d) is int and d >= 0 for d in shape):
            return None
        entries[name] = (TORCH_DTYPES[dtype], tuple(shape), 0)
    return entries


def _decode_up_to(named: dict[str, Any], key: str, sparse: bool, refused: str | None) -> None:
    """Decode the JSON tensors of ``named`` up to and including the one a refusal from the
    entries names (``refused``: ``<key>.<name>``), for the first decode error among them; none
    for a refusal of something else."""
    name = refused[len(key) + 1:] if refused is not None and refused.startswith(f"{key}.") \
        else None
    if name is None or name not in named:
        return
    upto: dict[str, Any] = {}
    for n, t in named.items():
        upto[n] = t
        if n == name:
            break
    tensor_map(upto, key, sparse)


def _decode_after(named: dict[str, Any], key: str, sparse: bool, refused: str | None) -> None:
    """The first decode error among the JSON tensors of ``named`` after the one a refusal
    from the entries names (``refused``: ``<key>.<name>``, its name's own refusal: unknown,
    or its dtype or shape the session's own), as a full decode answers: every tensor is
    decoded before the operation looks at a name, so a malformed tensor anywhere in the body
    is the answer. Found without making them where they all decode
    (:func:`~app.wire.json_tensor.all_decode`: a 7.6 MB step naming 100,000 unknown tensors
    is not made whole for it); decoded in order for the first one's problem only where one
    may not."""
    name = refused[len(key) + 1:] if refused is not None and refused.startswith(f"{key}.") \
        else None
    if name is None or name not in named:
        return
    names = list(named)
    after = {n: named[n] for n in names[names.index(name) + 1:]}
    if after and not all_decode(after, key):
        tensor_map(after, key, sparse)


def sparse_pairs(layout: HeaderLayout) -> bool:
    """Whether any entry of a safetensors header may be the indices of a row-sparse pair
    (:func:`app.wire.sparse.pair_safetensors`: ``<name>.indices``, an integer dtype)."""
    return any(name.endswith(wire_sparse.INDICES) and not dtype.is_floating_point
               and dtype != torch.bool for name, (dtype, _, _) in layout.entries.items())


def answer_in_place(tensors: dict[str, torch.Tensor],
                    buf: bytearray | memoryview) -> PackedTensors | None:
    """The gradients of a safetensors body as the buffer its answer can be written into: when
    every tensor is a view into the body and together they tile its data section, the new
    parameters (same names, dtypes, shapes) are copied over the spent gradients and the same
    bytes go back with a new header: no 40 MB allocation and no page faults per 1e7 step."""
    if not tensors or len(buf) < 8:
        return None
    data = memoryview(buf)[header_end(buf):]
    if len(data) < SMALL_PART:  # sent as a copy anyway (PartsResponse)
        return None
    tiling = tensors.tiling() if isinstance(tensors, BodyTensors) else None
    if tiling is not None:  # as decoding found them: no per-tensor checks, a kept header
        names, entries = tiling
        out = PackedTensors((name, tensors[name]) for name in names)
        out.buffer, out.entries = data, entries
        return out
    start = np.frombuffer(data, dtype=np.uint8).ctypes.data
    spans = []
    for name, t in tensors.items():
        if t.layout != torch.strided or not t.is_cpu or not t.is_contiguous():
            return None
        spans.append((t.data_ptr() - start, name, t.nbytes))
    spans.sort()
    pos = 0
    for offset, _, nbytes in spans:
        if offset != pos:
            return None
        pos += nbytes
    if pos != len(data):
        return None
    out = PackedTensors((name, tensors[name]) for _, name, _ in spans)
    out.buffer = data
    return out


#: a part of an answer smaller than this goes out as a copy (``bytes``): the server's write
#: of a small buffer copies it anyway, and a copy cannot change under the write
SMALL_PART = 65536


class PartsResponse(Response):
    """A body sent as several buffers (a header and a large payload) without joining them."""

    def __init__(self, parts: list[bytes | bytearray | memoryview], media_type: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(b"", media_type=media_type, headers=headers)
        self.parts = parts
        self.headers["content-length"] = str(sum(map(len, parts)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        if scope.get("method") == "HEAD":
            await send({"type": "http.response.body", "body": b""})
            return
        parts = self.parts
        if len(parts) > 1 and sum(map(len, parts)) < SMALL_PART:
            # one write (one TCP segment, one wake-up of the reader) for a small answer
            parts = [b"".join(parts)]
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": bytes(part) if
                        not isinstance(part, bytes) and len(part) < SMALL_PART else part,
                        "more_body": i < len(parts) - 1})


def version_headers(version: int, step: int, tag: int | None = None) -> dict[str, str]:
    """``ETag`` (the parameters' version: ``tag`` where the answer's parameters are of
    another version than the answer's, as a replayed step's current ones),
    ``X-Optserve-Version``, ``X-Optserve-Step``."""
    return {"ETag": f'"{version if tag is None else tag}"', "X-Optserve-Version": str(version),
            "X-Optserve-Step": str(step)}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status_code=status, media_type=JSON, headers=headers)


def tensor_encoding(request: Request) -> bool:
    """True when the client asks for base64 tensors in JSON (``?encoding=b64``)."""
    if not request.scope.get("query_string"):
        return False
    one_query(request, "encoding")
    value = request.query_params.get("encoding", "data")
    if value not in ("data", "b64"):
        raise Invalid("encoding must be data or b64", code="invalid_query", field="encoding")
    return value == "b64"


def _reads_as_json(text: str) -> bool:
    """Whether a client would read ``text`` as JSON: Python's ``json`` (the SDK's reader, the
    most lenient: ``NaN``, ``Infinity``, a number past float's range) or JavaScript's
    ``JSON.parse``, which takes no more."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def text_metadata(scalars: dict[str, Any]) -> dict[str, str]:
    """Scalars as safetensors ``__metadata__``: anything but a string as JSON; a string as it
    is (a bare word), unless it would read as JSON (``"123"``, ``"true"``, ``"1.5"``: a
    client reads a value that parses as JSON, so such a string would come back a number),
    then as a JSON string."""
    return {k: (v if not _reads_as_json(v) else orjson.dumps(v).decode())
            if isinstance(v, str) else orjson.dumps(v).decode() for k, v in scalars.items()}


async def tensors_response(
    binary: bool,
    b64: bool,
    scalars: dict[str, Any],
    tensors: dict[str, torch.Tensor] | None,
    headers: dict[str, str],
) -> Response:
    """Scalars plus named tensors, as JSON (``params`` key) or safetensors.

    Callers decide ``binary``/``b64`` before doing any work, so a 406 changes nothing."""
    if binary and isinstance(tensors, PackedTensors):  # dense: a header, then its buffer as is
        return PartsResponse([*packed_header_parts(tensors, text_metadata(scalars)),
                              tensors.buffer], media_type=BINARY, headers=headers)
    if wire_sparse.has_sparse(tensors):  # some rows of some parameters
        assert tensors is not None
        if binary:  # their parts, and in __metadata__.sparse their parameters' shapes
            scalars = {**scalars, "sparse": {n: list(t.shape) for n, t in tensors.items()
                                             if t.layout != torch.strided}}
            tensors = wire_sparse.split_for_safetensors(tensors)
    size = sum(t.numel() * t.element_size() for t in (tensors or {}).values()
               if t.layout == torch.strided)
    if binary:
        meta = text_metadata(scalars)
        content = await offload(lambda: write_safetensors(tensors or {}, meta), size)
        return Response(content, media_type=BINARY, headers=headers)

    def params_json() -> dict[str, Any]:
        assert tensors is not None
        return {n: wire_sparse.encode_json(t, b64=b64) for n, t in tensors.items()}

    def encode() -> bytes:
        body = dict(scalars)
        if isinstance(tensors, PackedTensors) and tensors.shared:
            # the same parameters answer several requests (a sync round's workers): their
            # JSON is made once, and each answer embeds it
            body["params"] = tensors.encoded(("json", b64), lambda: orjson.Fragment(
                orjson.dumps(params_json(), option=orjson.OPT_SERIALIZE_NUMPY)))
        elif tensors is not None:
            body["params"] = params_json()
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    content = await offload(encode, size)
    return Response(content, media_type=JSON, headers=headers)
