"""Conditions in request headers and query parameters: ``If-Match`` / ``?base_version=`` on a
push (the version its gradients were computed from), ``If-None-Match`` on a pull (versions the
client already holds), ``X-Optserve-Worker`` (which worker of a sync round is pushing), and
``Idempotency-Key`` on any mutation (a retry with the same key is answered, not re-applied)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import crc32c
import orjson
import torch
from fastapi import Request

from app.engine.idempotency import check_key
from app.engine.interface import EVERY_VERSION, EveryVersion, IdemKey
from app.engine.ops import Expected
from app.errors import BadHeader, Invalid, OptserveError, PreconditionFailed
from app.wire.content_digest import tensors_digest
from app.wire.integers import int_text

WORKER_HEADER = "x-optserve-worker"
IDEMPOTENCY_HEADER = "idempotency-key"
#: request headers that change what a mutation does (part of its fingerprint)
_MEANINGFUL = ("content-type", "if-match", "x-optserve-worker")


class _BaseNamedAsSent:
    """:func:`base_named_as_sent`'s context (a class: a generator's context manager cost
    twice as much, on every step)."""

    __slots__ = ("_from_header",)

    def __init__(self, from_header: bool) -> None:
        self._from_header = from_header

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if (self._from_header and isinstance(exc, OptserveError)
                and exc.field == "base_version"):
            exc.field = "If-Match"


def base_named_as_sent(base: int | None, query_version: int | None) -> _BaseNamedAsSent:
    """A refusal of the base version (the engine names it ``base_version``) names
    ``If-Match`` when that header gave it (``base`` given, ``?base_version=`` not): not a
    field the request had."""
    return _BaseNamedAsSent(base is not None and query_version is None)


def one_header(request: Request, name: str, shown: str) -> str | None:
    """The value of a header that may be given once (``Content-Type``, ``Idempotency-Key``,
    ...), or None without it; given on two lines, a 400 ``bad_request`` naming it (``shown``):
    which one counts would be ours to guess, and a proxy's too."""
    values = request.headers.getlist(name)
    if len(values) > 1:
        raise BadHeader(f"{name_of(shown)} is given {len(values)} times; send it once",
                        field=shown)
    return values[0] if values else None


def name_of(field: str) -> str:
    """A header's name as a detail writes it (``content-type``: ``Content-Type``)."""
    return "-".join(part[:1].upper() + part[1:] for part in field.split("-"))


def one_query(request: Request, *names: str) -> None:
    """422 ``invalid_query`` naming the first of ``names`` the query string gives more than
    once (FastAPI takes the last, ``query_params.get`` the first: either would drop one
    unsaid)."""
    if not request.scope.get("query_string"):
        return
    for name in names:
        if len(request.query_params.getlist(name)) > 1:
            raise Invalid(f"{name} is given more than once", code="invalid_query", field=name)


async def idempotency(request: Request, body: bytes | bytearray | memoryview = b""
                      ) -> IdemKey | None:
    """The request's ``Idempotency-Key`` with the fingerprint of what it asks (method, path,
    query, the headers that matter, the body), or None without the header."""
    key = one_header(request, IDEMPOTENCY_HEADER, "Idempotency-Key")
    if key is None:
        return None
    check_key(key)
    return IdemKey(key, legacy_fingerprint(request, body))


def step_fingerprint(session_id: str, grads: Mapping[str, torch.Tensor], *, returned: str,
                     metrics: str = "answer", base_version: int | None = None,
                     worker: str | None = None, upcast: bool = False,
                     params_dtype: torch.dtype | None = None, param_groups: Any = None,
                     scalars: Any = None) -> str:
    """The fingerprint of a step, the same over HTTP (JSON or safetensors) and the same-host
    transport: what it applies (the gradients' content, :func:`tensors_digest`; the options
    and scalars that ride along, as parsed; the base version, from the query or ``If-Match``;
    the worker; ``upcast``) and what it is asked to answer (``return``: params, none or
    touched; ``metrics``; ``params_dtype``). Not the body's format, its layout or its header
    bytes: a retry of a step over another transport is the same request."""
    asked = {"return": returned, "metrics": metrics, "base_version": base_version,
             "worker": worker, "upcast": upcast,
             "params_dtype": None if params_dtype is None else str(params_dtype).split(".")[-1],
             "param_groups": param_groups, "scalars": scalars}
    meta = orjson.dumps(asked, option=orjson.OPT_SORT_KEYS).decode()
    return f"step {session_id} {meta} {tensors_digest(grads)}"


def legacy_fingerprint(request: Request, body: bytes | bytearray | memoryview = b"") -> str:
    """The fingerprint servers before :func:`step_fingerprint` kept for an HTTP step (method,
    path, query, the headers that matter, :func:`body_digest`): the one its records and
    snapshots hold, so that its retry after an upgrade is still answered."""
    # (a header on several lines counts whole, as its lines combine: If-Match "4" and "5" on
    # two lines is If-Match: "4", "5"; one line reads as it did)
    headers = ";".join(f"{h}={', '.join(request.headers.getlist(h))}" for h in _MEANINGFUL)
    return (f"{request.method} {request.url.path}?{request.url.query} {headers} "
            f"{body_digest(body)}")


_WINDOW = 256 * 1024


def body_digest(body: bytes | bytearray | memoryview) -> str:
    """A cheap fingerprint of a request body: its length and the crc32c of its head, middle
    and tail (256 KiB each). It tells a retry from a different request that reuses a key (a
    client bug) without reading 40 MB per step; two bodies of equal length that differ only
    outside the windows pass for the same, which no real gradient push does."""
    view = memoryview(body).cast("B")
    n = len(view)
    if n <= 3 * _WINDOW:
        return f"{n}:{crc32c.crc32c(view):08x}"
    mid = n // 2 - _WINDOW // 2
    checksum = crc32c.crc32c(view[:_WINDOW])
    checksum = crc32c.crc32c(view[mid:mid + _WINDOW], checksum)
    checksum = crc32c.crc32c(view[n - _WINDOW:], checksum)
    return f"{n}:{checksum:08x}"


#: the whitespace around a list member (RFC 9110 OWS: SP and HTAB; not ``str.strip``'s, which
#: took a no-break space, ``\xa0`` as a header's latin-1 text reads it, around ``*`` or a tag)
_OWS = " \t"


def _tag_version(tag: str) -> int | None:
    """``"5"``, ``W/"5"`` or a bare ``5`` to 5; anything else (``"05"`` too) to None."""
    tag = tag.strip(_OWS)
    if tag.startswith("W/"):
        tag = tag[2:]
    if len(tag) >= 2 and tag[0] == tag[-1] == '"':
        tag = tag[1:-1]
    return _etag_version(tag)


def _etag_version(text: str | None) -> int | None:
    """The version an entity tag's opaque text names, as this server writes it (``5``), or
    None: ``05`` is no tag it gives (entity tags compare character by character, RFC 9110
    8.8.3.2), nor is anything but digits."""
    version = int_text(text, 18)
    return version if version is not None and str(version) == text else None


#: one member of an ``If-None-Match`` list (RFC 9110 8.8.3: ``[ "W/" ] DQUOTE *etagc DQUOTE``,
#: etagc ``%x21 / %x23-7E / obs-text``, the weak indicator case-sensitive) or, as servers before
#: took it, a bare version (``5``, ``W/5``); then a comma or the end
_NONE_MATCH_MEMBER = re.compile(
    r'[ \t]*(?:(?:W/)?"([\x21\x23-\x7e\x80-\xff]*)"|(?:W/)?([0-9]+))[ \t]*(?:,|$)')


def none_match_versions(request: Request) -> frozenset[int]:
    """The versions named by ``If-None-Match``: see :func:`none_match_tags`."""
    tags = none_match_tags(request)
    if isinstance(tags, EveryVersion):
        return tags
    return frozenset(v for v in (_etag_version(t) for t in tags) if v is not None)


def state_tag(revision: int, token: str) -> str:
    """A state dict's tag as ``X-Optserve-State-Tag`` gives it, quoted, to be echoed in
    ``If-None-Match``: ``"r<revision>.<token>"``, the session's revision and its creation token
    (:mod:`app.engine.creation_tokens`), so that a tag read from a session deleted and made again
    under the same id, or before a restart, names no session there is now."""
    return f'"r{revision}.{token}"'


#: a state tag's opaque text: ``r<revision>.<token>`` (:func:`state_tag`)
_STATE_TAG = re.compile(r"r([0-9]+)\.([0-9a-f]+)")


def none_match_state_tags(request: Request) -> frozenset[tuple[int, str]]:
    """The session revisions and creation tokens named by ``If-None-Match`` as state tags,
    ``"r<revision>.<token>"`` (``W/"r12.<token>"`` too: compared weakly), written as the
    ``X-Optserve-State-Tag`` header gives them (``"r012.<token>"`` names none, nor does a bare
    ``"r12"``, the revision alone: it could name another session made under the same id);
    ``*`` names none here (:func:`none_match_any` says it). A read of the state dict evaluates
    them: its ``ETag`` names the parameters' version, which an option change or a scheduler
    step does not move, the revision every change to the session."""
    tags = none_match_tags(request)
    if isinstance(tags, EveryVersion):
        return frozenset()
    found: set[tuple[int, str]] = set()
    for tag in tags:
        match = _STATE_TAG.fullmatch(tag)
        if match is not None and (revision := _etag_version(match.group(1))) is not None:
            found.add((revision, match.group(2)))
    return frozenset(found)


def none_match_tags(request: Request) -> frozenset[str] | EveryVersion:
    """The entity tags' opaque texts named by ``If-None-Match`` (weak comparison: ``W/"5"``
    names ``5``; a bare version, ``5``, its text; :func:`none_match_versions` takes the
    versions among them, ``"abc"`` or ``"02"`` ignored; empty list elements and an empty
    header name none); ``*``: :data:`EVERY_VERSION` (RFC 9110 13.1.2: false
    whenever the session exists, a 304 on a read). A header outside RFC 9110's grammar
    (``*`` in a list, ``w/"5"``: the weak indicator is ``W/``, an unclosed quote, a bare
    word) is a 422 ``invalid_precondition`` naming ``If-None-Match``, as a malformed
    ``If-Match`` is a 422: read as no version, it was silently a full answer."""
    header = ", ".join(request.headers.getlist("if-none-match"))  # (a list: lines combine)
    if header.strip(_OWS) == "*":
        return EVERY_VERSION
    found: set[str] = set()
    pos, end = 0, len(header)
    while pos < end:
        if (empty := _EMPTY_MEMBER.match(header, pos)) is not None:
            pos = empty.end()
            continue
        if _BLANK.fullmatch(header, pos) is not None:
            break
        member = _NONE_MATCH_MEMBER.match(header, pos)
        if member is None:
            raise Invalid("If-None-Match must be * alone or a list of entity tags as the ETag "
                          "gives them (\"5\", W/\"5\"; \"4\", \"5\"); got "
                          f"{header!r:.60}", code="invalid_precondition",
                          field="If-None-Match")
        found.add(member.group(1) if member.group(2) is None else member.group(2))
        pos = member.end()
    return frozenset(found)


def none_match_any(request: Request) -> bool:
    """``If-None-Match: *`` (the reads that evaluate no version tag take it: 304 whenever the
    session exists)."""
    return none_match_versions(request) is EVERY_VERSION


def base_version(request: Request, query: int | None) -> int | None:
    """``?base_version=`` or ``If-Match: "<version>"`` (both: they must agree)."""
    header = one_header(request, "if-match", "If-Match")
    from_header = None
    if header is not None:
        from_header = _tag_version(header)
        if from_header is None:
            raise Invalid("If-Match must carry one version, as the ETag gives it (\"5\")",
                          code="invalid_base_version", field="If-Match")
    if query is not None and from_header is not None and query != from_header:
        raise Invalid(f"?base_version={query} and If-Match {header!r:.40} disagree",
                      code="invalid_base_version", field="base_version")
    return query if query is not None else from_header


#: one member of an ``If-Match`` / ``If-None-Match`` list: an entity-tag (``"5"``, ``W/"5"``;
#: its opaque part may hold commas) or, as servers before RFC 9110's strict reading took, a bare
#: version (``5``); then a comma or the end
_MEMBER = re.compile(r'[ \t]*(?:(W/)?"([^"]*)"|([^\s",]+))[ \t]*(?:,|$)')


def strict_match(request: Request, query_version: int | None = None) -> Expected | None:
    """A strict precondition's ``If-Match`` (a change's, or a read's), RFC 9110 13.1.1, with
    ``?base_version=`` (a change's); None without either. ``*``: true whenever the session
    exists, as every operation requires anyway (no version condition); a list (``"4", "5"``,
    or lines that combine into one): true at any of its versions; compared strongly, so a
    weak tag (``W/"5"``) matches no version (:class:`Expected` holds at none when the header
    has no other). A bare ``5`` is taken as ``"5"``. A member that is no version (``"a"``,
    ``""``, ``*`` in a list) is a 422 ``invalid_base_version`` naming ``If-Match`` (our ETags
    are versions: such a tag is a client's mistake, not a condition that is merely false);
    ``?base_version=`` with a header that does not name that one version, a 422 naming
    ``base_version``."""
    lines = request.headers.getlist("if-match")
    field = "base_version" if query_version is not None else "If-Match"
    if not lines:
        return None if query_version is None else Expected(query_version,
                                                           version_field=field)
    header = ", ".join(lines)
    if header.strip(_OWS) == "*":
        if query_version is not None:
            raise Invalid(f"?base_version={query_version} and If-Match: * disagree (send one)",
                          code="invalid_base_version", field="base_version")
        return None
    strong, weak = _match_list(header)
    if query_version is not None:
        if weak or set(strong) != {query_version}:  # ("5", "5" names 5 alone too)
            raise Invalid(f"?base_version={query_version} and If-Match {header!r:.40} disagree",
                          code="invalid_base_version", field="base_version")
        return Expected(query_version, version_field=field)
    distinct = tuple(dict.fromkeys(strong))
    return Expected(distinct[0] if distinct else None, version_field=field,
                    others=distinct[1:], weak=weak)


#: an empty list element (RFC 9110 5.6.1.2: ``"4",,"5"``, a leading or trailing comma, a
#: header line left empty beside another), which a recipient ignores
_EMPTY_MEMBER = re.compile(r"[ \t]*,")
_BLANK = re.compile(r"[ \t]*")


def _match_list(header: str) -> tuple[list[int], bool]:
    """An ``If-Match`` list's strong versions (in order) and whether it had a weak tag; empty
    elements ignored (RFC 9110 5.6.1.2: ``"4",,"5"``, ``"4", ``; ``If-None-Match`` ignored
    them already); a 422 ``invalid_base_version`` naming ``If-Match`` when a member is no
    version (``"05"`` too: no ETag this server gives, and tags compare character by
    character), or when the list has no member at all (``,``)."""
    strong: list[int] = []
    weak = False
    pos, end = 0, len(header)
    while True:
        while (empty := _EMPTY_MEMBER.match(header, pos)) is not None:
            pos = empty.end()
        if (strong or weak) and _BLANK.fullmatch(header, pos) is not None:
            return strong, weak  # (only empty elements, or whitespace, after the last one)
        found = _MEMBER.match(header, pos)
        text = None if found is None else (found.group(2) if found.group(3) is None
                                           else found.group(3))
        version = _etag_version(text)
        if found is None or version is None or found.end() == pos:
            raise Invalid("If-Match must carry versions as the ETag gives them (\"5\", or a "
                          "list: \"4\", \"5\"), or be *; got "
                          f"{header!r:.60}", code="invalid_base_version", field="If-Match")
        if found.group(1):
            weak = True
        else:
            strong.append(version)
        pos = found.end()
        if pos >= end:
            return strong, weak


def check_read(expected: Expected | None, version: int, step: int,
               revision: int | None = None, *, tag: str | None = None) -> None:
    """412 ``precondition_failed`` naming ``If-Match`` when a read's answer is not of the
    version it named (checked on the answer itself: what was read, at one version; its
    ``step`` and ``revision`` go in the refusal's headers, as a 200's; a state dict read's
    ``tag``, :func:`state_tag`, too: ``current_state_tag`` and ``X-Optserve-State-Tag``, so a
    client learns the tag a 200 or a 304 would give without another read)."""
    if expected is None:
        return
    try:
        expected.check_at(version, revision, "nothing is answered", step=step)
    except PreconditionFailed as exc:
        if tag is not None:
            exc.extra["current_state_tag"] = tag
        raise


def worker_id(request: Request) -> str | None:
    value = one_header(request, WORKER_HEADER, "X-Optserve-Worker")
    # (only SP/HTAB surround a header value, RFC 9110 5.5: str.strip() also took a no-break
    # space, so "w\xa0" pushed as worker "w")
    return value.strip(_OWS) if value is not None else None
