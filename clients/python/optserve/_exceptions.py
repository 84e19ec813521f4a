"""Every error the SDK raises on purpose derives from :class:`OptserveError`.

Our exception hierarchy::

    OptserveError
    ├── APIConnectionError             the request did not get an HTTP response
    │   └── APITimeoutError            ... because it timed out
    ├── APIResponseValidationError     the server answered something the SDK cannot decode
    └── APIStatusError                 the server answered 4xx/5xx (an RFC 9457 problem)
        ├── BadRequestError            400  body is not JSON / safetensors / an object
        ├── AuthenticationError        401
        ├── PermissionDeniedError      403
        ├── NotFoundError              404  unknown session (or route)
        ├── ConflictError              409  session id taken, scheduler exhausted
        ├── PreconditionFailedError    412  a conditional change's or read's session changed
        ├── PayloadTooLargeError       413  body over the server's limit
        ├── ValidationError            422  bad option, shape/dtype mismatch, unknown name, ...
        │   │                               (also a ValueError, as torch raises for these)
        │   ├── UnknownOptionError         422  ``unknown_option``: no such option (also a
        │   │                               TypeError, as torch's constructor raises for it)
        │   └── GradientLayoutError        422  ``sparse_unsupported``/``dense_gradient``: a
        │                                   sparse (dense) gradient the optimizer refuses
        │                                   (also a RuntimeError, as torch's step raises)
        ├── RateLimitError             429
        └── InternalServerError        5xx

Statuses without a class of their own (405, 406, 415, ...) raise :class:`APIStatusError`.
Bad arguments caught before anything is sent raise the built-in ``TypeError``/``ValueError``.
"""

from __future__ import annotations

from typing import Any

import httpx

from ._constants import (
    REQUEST_ID_HEADER,
    REVISION_HEADER,
    STATE_TAG_HEADER,
    STEP_HEADER,
    VERSION_HEADER,
)

__all__ = [
    "OptserveError",
    "APIConnectionError",
    "APITimeoutError",
    "APIResponseValidationError",
    "APIStatusError",
    "BadRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "PreconditionFailedError",
    "PayloadTooLargeError",
    "ValidationError",
    "UnknownOptionError",
    "GradientLayoutError",
    "RateLimitError",
    "InternalServerError",
]


class OptserveError(Exception):
    """Base class of every error the SDK raises on purpose."""

    message: str

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIConnectionError(OptserveError):
    """No HTTP response came back (connection refused or reset, DNS failure, ...).

    The message names the URL and, when nothing could be sent, says the server may not be
    running. It is raised without the transport's chained traceback; the transport's own
    exception is kept in :attr:`cause`.

    Attributes:
        request: the :class:`httpx.Request` that failed.
        url: the server's URL (scheme, host and port) the request went to.
        reason: the transport's one-line reason (``"[Errno 111] Connection refused"``).
        cause: the transport exception itself (an :class:`httpx.TransportError`), if any.
    """

    request: httpx.Request
    url: str
    reason: str | None
    cause: BaseException | None

    def __init__(
        self,
        *,
        request: httpx.Request,
        message: str = "Connection error.",
        reason: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(message)
        self.request = request
        self.url = server_url(request)
        self.reason = reason
        self.cause = cause


class APITimeoutError(APIConnectionError):
    """The request timed out (connect, write, read or waiting for a pooled connection)."""

    def __init__(
        self,
        *,
        request: httpx.Request,
        message: str = "Request timed out.",
        reason: str | None = None,
        cause: BaseException | None = None,
    ) -> None:
        super().__init__(request=request, message=message, reason=reason, cause=cause)


def server_url(request: httpx.Request) -> str:
    """``scheme://host:port`` of a request: the server it was meant for."""
    return str(request.url.copy_with(path="/", query=None, fragment=None)).rstrip("/")


#: what a connection that never got through most often means, and what to do about it
NOT_RUNNING_HINT = ("Is the optserve server running there? Start one with `optserve serve` (or "
                    "scripts/serve in the repository), or point the client at yours with "
                    "base_url= or OPTSERVE_BASE_URL.")


def connection_error(request: httpx.Request, exc: httpx.TransportError,
                     never_sent: bool) -> APIConnectionError:
    """The SDK's error for a transport failure: one line naming the URL (raise it ``from
    None``: the transport's chain stays in ``.cause``)."""
    url = server_url(request)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"({request.method} {request.url.path})"
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(request=request, reason=reason, cause=exc,
                               message=f"timed out talking to {url}: {reason} {where}")
    if never_sent:
        return APIConnectionError(request=request, reason=reason, cause=exc,
                                  message=f"cannot connect to {url}: {reason} {where}. "
                                          + NOT_RUNNING_HINT)
    return APIConnectionError(request=request, reason=reason, cause=exc,
                              message=f"connection to {url} failed: {reason} {where}")


class APIResponseValidationError(OptserveError):
    """A 2xx response whose body the SDK could not decode (not the documented shape)."""

    response: httpx.Response
    request_id: str | None

    def __init__(self, message: str, *, response: httpx.Response) -> None:
        super().__init__(message)
        self.response = response
        self.request_id = response.headers.get(REQUEST_ID_HEADER)


class APIStatusError(OptserveError):
    """The server answered with a 4xx/5xx status and (usually) a problem+json body.

    Attributes:
        status_code: the HTTP status.
        code: the problem's machine-readable ``code`` (``"shape_mismatch"``, ...), if any.
        detail: the problem's human-readable ``detail`` (or the body text).
        field: the offending input as a dotted path (``"grads.w"``, ``"options.lr"``), if any.
        problem: the whole problem object (``{}`` when the body was not JSON).
        request_id: the ``X-Request-Id`` response header, if present.
        response: the :class:`httpx.Response` itself.
    """

    status_code: int
    code: str | None
    detail: str | None
    field: str | None
    problem: dict[str, Any]
    request_id: str | None
    response: httpx.Response

    def __init__(
        self, message: str, *, response: httpx.Response, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.response = response
        self.status_code = response.status_code
        self.problem = dict(problem or {})
        code = self.problem.get("code")
        detail = self.problem.get("detail")
        field = self.problem.get("field")
        self.code = code if isinstance(code, str) else None
        self.detail = detail if isinstance(detail, str) else None
        self.field = field if isinstance(field, str) else None
        self.request_id = response.headers.get(REQUEST_ID_HEADER)


class BadRequestError(APIStatusError):
    """400: the body is not JSON, not safetensors, or not an object."""


class AuthenticationError(APIStatusError):
    """401: missing or wrong API key."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this."""


class NotFoundError(APIStatusError):
    """404: unknown session (or route)."""


class ConflictError(APIStatusError):
    """409: the session id already exists, or the scheduler is exhausted."""


class PreconditionFailedError(APIStatusError):
    """412: a conditional change (``base_version=``, ``base_revision=`` on ``import_state``,
    ``put_params``, ``update_param_group``, ...) or read (``at_version=`` on ``get_session``,
    ``get_params``, ``export_state``) named a session version or revision the session is no
    longer at; nothing was applied, nothing read.

    Where the session is now, as the server's 412 tells it (its problem's fields, else its
    headers; ``None`` where the answer gives none):

    Attributes:
        current_version: the session's version (``current_version``, the ``ETag``).
        current_step: its step count (``current_step``, ``X-Optserve-Step``).
        current_revision: its revision (``current_revision``, ``X-Optserve-Revision``).
        current_state_tag: a state dict read's refusal only (``export_state(at_version=)``):
            the state tag a read of the state dict now would carry (``current_state_tag``,
            ``X-Optserve-State-Tag``), quoted as :attr:`StateExport.tag
            <optserve.StateExport.tag>` holds it: equal to the ``tag`` of a
            :class:`~optserve.StateExport` you hold, that export *is* the session's state
            now (nothing changed since it was read: no need to read it again); else pass the
            export to ``export_state_if_changed``, or read again at ``current_version``.
    """

    current_version: int | None
    current_step: int | None
    current_revision: int | None
    current_state_tag: str | None

    def __init__(
        self, message: str, *, response: httpx.Response, problem: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message, response=response, problem=problem)
        self.current_version = self._int("current_version", VERSION_HEADER)
        self.current_step = self._int("current_step", STEP_HEADER)
        self.current_revision = self._int("current_revision", REVISION_HEADER)
        tag = self.problem.get("current_state_tag")
        if not isinstance(tag, str) or not tag:
            tag = self.response.headers.get(STATE_TAG_HEADER) or None
        self.current_state_tag = tag

    def _int(self, name: str, header: str) -> int | None:
        """The problem's ``name``, else the answer's ``header``, as an int (None: neither
        gives a non-negative integer)."""
        value = self.problem.get(name)
        if type(value) is int and value >= 0:
            return value
        text = self.response.headers.get(header, "")
        return int(text) if text.isascii() and text.isdigit() else None


class PayloadTooLargeError(APIStatusError):
    """413: the body is larger than the server accepts."""


class ValidationError(APIStatusError, ValueError):
    """422: anything else the client got wrong; :attr:`field` names the input.

    Also a ``ValueError``, as what torch raises for the same mistakes (an invalid lr, betas
    out of range, a state_dict that does not fit): code written for ``torch.optim`` that
    catches ``ValueError`` catches it from ``RemoteOptimizer`` too."""


class UnknownOptionError(ValidationError, TypeError):
    """422 ``unknown_option``: the optimizer or scheduler has no option of that name
    (``RemoteOptimizer(params, "Adam", client, lrr=0.1)``).

    Also a ``TypeError``, as torch's own constructor raises for an unexpected keyword
    argument (``torch.optim.Adam(params, lrr=0.1)``), and a ``ValueError`` as every
    :class:`ValidationError` is."""


class GradientLayoutError(ValidationError, RuntimeError):
    """422 ``sparse_unsupported`` or ``dense_gradient``: the session's optimizer (or a group's
    options) does not step gradients of that layout: a sparse gradient
    (``nn.Embedding(sparse=True)``) for Adam, AdamW, RMSprop, ..., or Adagrad with a
    ``weight_decay``; a dense one for SparseAdam. Nothing was stepped.

    Also a ``RuntimeError``, as torch's own step raises for it (``"Adam does not support
    sparse gradients, please consider SparseAdam instead"``), so code written for
    ``torch.optim`` that catches ``RuntimeError`` catches it from ``RemoteOptimizer`` too;
    and a ``ValueError`` as every :class:`ValidationError` is, with the server's problem in
    :attr:`problem` (its ``field`` names the group or option)."""

    #: the problem codes raised as this class
    CODES = frozenset({"sparse_unsupported", "dense_gradient"})


class RateLimitError(APIStatusError):
    """429: too many requests."""


class InternalServerError(APIStatusError):
    """5xx: the server failed (503 from ``/readyz`` when it is not ready)."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
}


def status_error_class(status_code: int) -> type[APIStatusError]:
    """The exception class for an HTTP error status."""
    if status_code >= 500:
        return InternalServerError
    return _BY_STATUS.get(status_code, APIStatusError)


def make_status_error(response: httpx.Response) -> APIStatusError:
    """Build the typed exception for an error response (problem+json or anything else)."""
    problem: dict[str, Any] = {}
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        problem = body
    detail = problem.get("detail")
    title = problem.get("title")
    if isinstance(detail, str) and detail:
        text = detail
    elif isinstance(title, str) and title:
        text = title
    else:
        text = response.text[:500] or response.reason_phrase
    message = f"{response.status_code} {text}"
    field = problem.get("field")
    if isinstance(field, str) and field:
        message += f" (field: {field})"
    cls = status_error_class(response.status_code)
    if cls is ValidationError and problem.get("code") == "unknown_option":
        cls = UnknownOptionError
    elif cls is ValidationError and problem.get("code") in GradientLayoutError.CODES:
        cls = GradientLayoutError
    return cls(message, response=response, problem=problem)
