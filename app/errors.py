"""The project's exception family. The engine and codecs raise these; the HTTP layer maps
them to RFC 9457 problem+json in one place (``app.api.problems``).

    OptserveError
    ├── BadRequest          400  body is not JSON / safetensors / an object
    ├── NotFound            404  unknown session
    ├── Conflict            409  id taken, scheduler exhausted
    ├── PreconditionFailed  412  a conditional import's version or revision is not the session's
    ├── PayloadTooLarge     413  body over the limit
    ├── UnsupportedMedia    415  content type not understood
    ├── NotAcceptable       406  Accept not satisfiable
    ├── TooMany             429  a per-tenant limit is reached
    ├── Invalid             422  anything else the client got wrong
    ├── StorageFull         507  the data directory is full: nothing was applied
    └── Unavailable         503  retry later (``retry_after`` seconds): a storage error, a
        │                        session host restarting, a damaged session being restored
        └── Overloaded      503  the server holds as much as it may of something clients
                                 send (request bodies): logged as a warning, not an error
"""

from __future__ import annotations

import reprlib
from typing import Any

from optserve import _precondition

#: how :func:`shown` writes a list or an object: a few items, a few levels deep
_SHORT = reprlib.Repr()
_SHORT.maxlevel = 4
_SHORT.maxlist = _SHORT.maxtuple = 6
_SHORT.maxdict = 4


def shown(value: object, limit: int) -> str:
    """A client's value as a problem's detail shows it: its ``repr``, cut to ``limit``
    characters; a list or an object written only a few items long and levels deep (``repr``
    of one nested as deep as a JSON text may go, 1,024 levels, overflows Python's stack, and
    of a long one costs its whole length first)."""
    if isinstance(value, (list, tuple, dict)):
        return _SHORT.repr(value)[:limit]
    return repr(value)[:limit]


class OptserveError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(
        self, detail: str, *, code: str | None = None, field: str | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.field = field
        self.extra = extra


class BadRequest(OptserveError):
    status = 400
    code = "bad_request"
    title = "Malformed request body"


class MalformedHttp(BadRequest):
    """A request framed in a way the server does not take, found by the app (a transfer coding
    besides ``chunked``): 400 ``malformed_http``, as the HTTP parser's own refusals are."""

    code = "malformed_http"
    title = "Malformed HTTP request"


class BadHeader(BadRequest):
    """A request header that is malformed (``Accept`` with a weight that is not an RFC 9110
    qvalue) or given on two lines where one counts: 400 ``bad_request`` naming it."""

    title = "Malformed request header"


class Unauthorized(OptserveError):
    """No valid API key (the same-host transport's ``hello``; HTTP answers its 401 in
    ``app.api.auth``)."""

    status = 401
    code = "unauthorized"
    title = "Unauthorized"


class NotFound(OptserveError):
    status = 404
    code = "not_found"
    title = "Not found"


class Conflict(OptserveError):
    status = 409
    code = "conflict"
    title = "Conflict"


class PreconditionFailed(OptserveError):
    """A conditional request (``If-Match``, ``?base_version=``, ``?base_revision=``) names a
    version or revision the session is no longer at: nothing was applied."""

    status = 412
    code = _precondition.CODE  # (the SDK makes this 412 too: optserve._stale)
    title = _precondition.TITLE


class PayloadTooLarge(OptserveError):
    status = 413
    code = "payload_too_large"
    title = "Request body too large"


class UnsupportedMedia(OptserveError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class NotAcceptable(OptserveError):
    status = 406
    code = "not_acceptable"
    title = "Not acceptable"


class TooMany(OptserveError):
    status = 429
    code = "too_many"
    title = "Limit reached"


class Invalid(OptserveError):
    status = 422
    code = "invalid"
    title = "Invalid input"
    #: the ``field`` is a guess (where a key a scheduler keeps may come from): a caller that can
    #: find the option by trial (``app.engine.schedulers.probe``) names it instead
    guessed = False


class StorageFull(OptserveError):
    """The write the operation needed found no space (ENOSPC, EDQUOT): nothing was applied."""

    status = 507
    code = "storage_full"
    title = "Insufficient storage"


class Unavailable(OptserveError):
    """The server cannot take this operation now; nothing was applied. ``retry_after`` (seconds)
    becomes the ``Retry-After`` header (None: none; a retry cannot help, e.g. a session that
    cannot be restored)."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after: float | None = 1.0, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class Overloaded(Unavailable):
    """A bound on what clients make the server hold was reached (``server_bodies_full``):
    nothing is wrong with the server, so it is logged as a warning, not an error."""
