"""What :class:`optserve.Client` and :class:`optserve.AsyncClient` share: configuration
(base URL and API key with environment fallbacks, timeout, retries), request building, the retry
policy and the mapping of responses to results or typed errors. Only sending differs.

Exactly once: every mutating call (anything but GET) carries an ``Idempotency-Key`` made
fresh for that call and kept for its retries, so the server answers a retry of an operation it
already applied with the original answer instead of applying it again (also after a restart).

Retry policy: when no HTTP response came back (connection refused or dropped, timeouts), and
when the server answers 503 (it could not take the operation now and applied nothing: a storage
error, a session host restarting), while less than the client's ``retry_budget`` seconds (default
``DEFAULT_RETRY_BUDGET``, 60 s: a server restart on a loaded machine) have passed since the call's
first failure, or ``max_retries`` times when that is an int (then no budget unless one is
given). Never on other statuses, nor on a 503 ``session_damaged`` without ``Retry-After`` (a
session nothing restores: delete it). The delay grows exponentially from
``INITIAL_RETRY_DELAY``, is capped at ``MAX_RETRY_DELAY`` and carries random jitter; a 503's
``Retry-After`` is waited in full when longer, up to the client's ``max_retry_after`` (default
``DEFAULT_MAX_RETRY_AFTER``, 60 s): a 503 asking for longer is raised at once, not retried
early (the server said that retry would fail).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

import httpx
import numpy as np

from . import _constants
from ._api import IDEMPOTENCY_HEADER, APICall, answer_tensors, with_key
from ._constants import (
    API_KEY_ENV,
    BASE_URL_ENV,
    DEFAULT_BASE_URL,
    DEFAULT_TIMEOUT,
)
from ._exceptions import (
    APIResponseValidationError,
    connection_error,
    make_status_error,
)
from ._gc import gc_paused
from ._safetensors import Body
from ._version import __version__

R = TypeVar("R")
HttpxClientT = TypeVar("HttpxClientT", httpx.Client, httpx.AsyncClient)

# Transport errors raised before any byte of the request could reach the server.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _has_key(call: APICall[Any]) -> bool:
    return any(k.lower() == IDEMPOTENCY_HEADER.lower() for k in call.headers)


# module-level hooks, so tests can make retries instant and exact. The jitter draws from a
# generator of the SDK's own (seeded from the OS): a retry never moves the process's global
# ``random`` stream, which seeded training code draws from
_jitter = random.Random().random


def _now() -> float:
    return time.monotonic()


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


async def _async_sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def _checked_base_url(url: str, where: str) -> str:
    """The base URL without its trailing slashes; a ValueError naming it unless it is an
    absolute http(s) URL with a host (``"127.0.0.1:8000"`` without a scheme would fail only at
    the first request)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{where} must be an absolute http:// or https:// URL "
                         f"(e.g. {DEFAULT_BASE_URL!r}), got {url!r}")
    return url.rstrip("/")


class BaseClient(Generic[HttpxClientT]):
    """Configuration and the I/O-free half of every request."""

    base_url: str
    api_key: str | None
    timeout: httpx.Timeout
    max_retries: int | None
    retry_budget: float | None
    max_retry_after: float
    _client: HttpxClientT
    _owns_client: bool

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int | None,
        max_retry_after: float = _constants.DEFAULT_MAX_RETRY_AFTER,
        retry_budget: float | None = None,
    ) -> None:
        url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        self.base_url = _checked_base_url(str(url), "base_url" if base_url else BASE_URL_ENV)
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        if isinstance(timeout, httpx.Timeout):
            self.timeout = timeout
        else:
            self.timeout = httpx.Timeout(DEFAULT_TIMEOUT if timeout is None else timeout)
        if max_retries is not None and (isinstance(max_retries, bool)
                                        or not isinstance(max_retries, int) or max_retries < 0):
            raise ValueError("max_retries must be a non-negative int or None, got "
                             f"{max_retries!r}")
        self.max_retries = max_retries
        if retry_budget is not None and (isinstance(retry_budget, bool)
                                         or not isinstance(retry_budget, (int, float))
                                         or not 0 <= retry_budget < float("inf")):
            raise ValueError("retry_budget must be a non-negative number of seconds or None, "
                             f"got {retry_budget!r}")
        if retry_budget is None and max_retries is None:
            retry_budget = _constants.DEFAULT_RETRY_BUDGET
        #: seconds after a call's first failure during which it is retried (None: no bound
        #: in time, only ``max_retries``)
        self.retry_budget = None if retry_budget is None else float(retry_budget)
        if (isinstance(max_retry_after, bool) or not isinstance(max_retry_after, (int, float))
                or not max_retry_after >= 0):
            raise ValueError("max_retry_after must be a non-negative number of seconds, got "
                             f"{max_retry_after!r}")
        self.max_retry_after = float(max_retry_after)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @property
    def default_headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"optserve-python/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _build_request(self, call: APICall[Any]) -> httpx.Request:
        headers = dict(self.default_headers)
        headers["Accept"] = call.accept
        if call.content_type is not None:
            headers["Content-Type"] = call.content_type
        headers.update(call.headers)
        timeout = self.timeout
        if call.wait_s != 0.0 and timeout.read is not None:
            read = None if call.wait_s is None else timeout.read + call.wait_s
            timeout = httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write,
                                    pool=timeout.pool)
        content: bytes | Iterator[bytes] | None
        if isinstance(call.content, Body):  # (only the sync client's: the async one joins)
            if call.content.size > _LARGE:
                # piece by piece from the tensors' own memory (a fresh pass for every attempt)
                headers["Content-Length"] = str(call.content.size)
                content = cast(Iterator[bytes], call.content.pieces())
            else:
                content = bytes(call.content)
        else:
            content = call.content
        return self._client.build_request(
            call.method,
            self.base_url + call.path,
            params=tuple(call.params),
            content=content,
            headers=headers,
            timeout=timeout,
        )

    @staticmethod
    def _keyed(call: APICall[R]) -> APICall[R]:
        """The call with an ``Idempotency-Key`` of its own when it changes anything (the same
        key for all its retries)."""
        if call.method == "GET" or _has_key(call):
            return call
        return with_key(call, uuid.uuid4().hex)

    def _may_retry(self, attempt: int, first_failure: float) -> bool:
        """Whether retry number ``attempt + 1`` is within ``max_retries`` and the retry
        budget (seconds since the call's first failure, at ``first_failure``)."""
        if self.max_retries is not None and attempt >= self.max_retries:
            return False
        return self.retry_budget is None or _now() - first_failure < self.retry_budget

    def _should_retry(self, call: APICall[Any], exc: httpx.TransportError, attempt: int,
                      first_failure: float) -> bool:
        if not self._may_retry(attempt, first_failure):
            return False
        return isinstance(exc, _NEVER_SENT) or call.idempotent or _has_key(call)

    def _retry_status(self, call: APICall[Any], response: httpx.Response,
                      attempt: int, first_failure: float | None) -> float | None:
        """Seconds to wait before retrying this answer, or None: only a 503 (nothing was
        applied) of a call that is safe to send again."""
        if response.status_code != 503:
            return None
        if not self._may_retry(attempt, _now() if first_failure is None else first_failure):
            return None
        if not (call.idempotent or _has_key(call)):
            return None
        after = response.headers.get("retry-after", "")
        # (an ASCII number only: "²" is a digit to str.isdigit, not to float)
        seconds = float(after) if after.isascii() and after.isdigit() else None
        return self._wait_503(attempt, seconds, _problem_code(response))

    def _wait_503(self, attempt: int, retry_after: float | None,
                  code: object = None) -> float | None:
        """Seconds to wait before retrying a 503: the backoff, or the server's Retry-After
        when longer; None (raise it now) when Retry-After is past ``max_retry_after``, or
        for a session out of service that no retry brings back (``session_damaged`` without
        a Retry-After: nothing on disk restores it; one with a Retry-After is restored from its
        store once its disk works)."""
        if code == "session_damaged" and retry_after is None:
            return None
        delay = self._retry_delay(attempt)
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                return None
            delay = max(delay, retry_after)
        return delay

    @staticmethod
    def _retry_delay(attempt: int) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (capped, with jitter)."""
        delay = min(_constants.INITIAL_RETRY_DELAY * 2.0**attempt, _constants.MAX_RETRY_DELAY)
        return float(delay * (1.0 - _constants.RETRY_JITTER * _jitter()))

    @staticmethod
    def _connection_error(request: httpx.Request, exc: httpx.TransportError) -> Exception:
        """One line naming the URL; raise it ``from None`` (the cause stays in ``.cause``)."""
        return connection_error(request, exc, never_sent=isinstance(exc, _NEVER_SENT))

    @staticmethod
    def _process_response(call: APICall[R], response: httpx.Response) -> R:
        if response.is_error:
            raise make_status_error(response)
        try:
            tensors = answer_tensors(response) if call.gc_tensors is None else call.gc_tensors
            with gc_paused(tensors):  # (a many-tensor answer's decoding: optserve._gc)
                return call.parse(response)
        except (ValueError, KeyError) as exc:
            raise APIResponseValidationError(
                f"cannot read the response to {call.method} {call.path}: {exc}",
                response=response,
            ) from exc


class SyncAPIClient(BaseClient[httpx.Client]):
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int | None,
        http_client: httpx.Client | None,
        max_retry_after: float = _constants.DEFAULT_MAX_RETRY_AFTER,
        retry_budget: float | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_after, retry_budget)
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else httpx.Client(
            timeout=self.timeout, follow_redirects=False
        )

    def _request(self, call: APICall[R]) -> R:
        call = self._keyed(call)
        attempt = 0
        first_failure: float | None = None
        while True:
            request = self._build_request(call)
            try:
                response = self._client.send(request, stream=True)
                try:
                    target = _large_binary_target(response, call.into)
                    if target is None:
                        response.read()
                    else:
                        _fill(target, response.iter_raw())
                        response._content = target  # type: ignore[assignment]
                finally:
                    response.close()
            except httpx.TransportError as exc:
                first_failure = _now() if first_failure is None else first_failure
                if self._should_retry(call, exc, attempt, first_failure):
                    _sleep(self._retry_delay(attempt))
                    attempt += 1
                    continue
                raise self._connection_error(request, exc) from None
            delay = self._retry_status(call, response, attempt, first_failure)
            if delay is not None:
                first_failure = _now() if first_failure is None else first_failure
                _sleep(delay)
                attempt += 1
                continue
            return self._process_response(call, response)

    def close(self) -> None:
        """Close the underlying HTTP connections (not a client passed in as ``http_client``)."""
        if self._owns_client:
            self._client.close()

    @property
    def is_closed(self) -> bool:
        return self._client.is_closed


_LARGE = 256 * 1024


class ReceiveBuffer:
    """One kept buffer for large binary answers, grown when an answer is larger: a caller that
    copies each answer's tensors out before the next call (``RemoteOptimizer``) reads every
    answer into the same memory, not into a fresh 40 MB block per 1e7-parameter step (whose
    pages the kernel zeroes and maps anew each time: glibc serves blocks that large with
    ``mmap`` and unmaps them on free)."""

    def __init__(self) -> None:
        self._buffer: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        #: how many answers were read into it (one may have been read part way)
        self.taken = 0

    def __call__(self, size: int) -> memoryview:
        self.taken += 1
        if self._buffer is None or len(self._buffer) < size:
            self._buffer = None  # the old block goes before the larger one is taken
            # room to spare: an answer's JSON header differs by a few bytes from step to step
            self._buffer = np.empty(size + max(1 << 16, size >> 6), dtype=np.uint8)
        return self._buffer.data[:size]


def _large_binary_target(response: httpx.Response,
                         into: Callable[[int], memoryview] | None = None) -> memoryview | None:
    """For a large uncompressed safetensors body: an uninitialized, writable buffer of its
    announced size to read it into, so the tensors decoded from it need no copy of their own
    (about one 40 MB copy less per 1e7-parameter step): ``into(size)``, else a fresh one. Else
    None: read as usual."""
    ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
    length = response.headers.get("content-length", "")
    if (ctype != "application/octet-stream" or response.headers.get("content-encoding")
            or not length.isdigit() or int(length) <= _LARGE):
        return None
    size = int(length)
    if into is None:
        return np.empty(size, dtype=np.uint8).data
    target = memoryview(into(size))
    if target.readonly or target.nbytes != size or not target.contiguous:
        raise ValueError(f"into({size}) must give a writable, contiguous buffer of {size} "
                         f"bytes, got {target.nbytes} bytes"
                         f"{' (read-only)' if target.readonly else ''}")
    return target.cast("B")


def _put(target: memoryview, pos: int, chunk: bytes) -> int:
    end = pos + len(chunk)
    if end > len(target):
        raise httpx.RemoteProtocolError("response body longer than its Content-Length")
    target[pos:end] = chunk
    return end


def _check_full(target: memoryview, pos: int) -> None:
    if pos != len(target):
        raise httpx.RemoteProtocolError("response body shorter than its Content-Length")


def _fill(target: memoryview, chunks: Any) -> None:
    pos = 0
    for chunk in chunks:
        pos = _put(target, pos, chunk)
    _check_full(target, pos)


class AsyncAPIClient(BaseClient[httpx.AsyncClient]):
    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int | None,
        http_client: httpx.AsyncClient | None,
        max_retry_after: float = _constants.DEFAULT_MAX_RETRY_AFTER,
        retry_budget: float | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, max_retry_after, retry_budget)
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else httpx.AsyncClient(
            timeout=self.timeout, follow_redirects=False
        )

    async def _request(self, call: APICall[R]) -> R:
        call = self._keyed(call)
        if isinstance(call.content, Body):
            # joined now: other tasks run while this one awaits, and a tensor they change must
            # not change a body already asked for (nor differ between its retries)
            call = dataclasses.replace(call, content=bytes(call.content))
        attempt = 0
        first_failure: float | None = None
        while True:
            request = self._build_request(call)
            try:
                response = await self._client.send(request, stream=True)
                try:
                    target = _large_binary_target(response, call.into)
                    if target is None:
                        await response.aread()
                    else:
                        pos = 0
                        async for chunk in response.aiter_raw():
                            pos = _put(target, pos, chunk)
                        _check_full(target, pos)
                        response._content = target  # type: ignore[assignment]
                finally:
                    await response.aclose()
            except httpx.TransportError as exc:
                first_failure = _now() if first_failure is None else first_failure
                if self._should_retry(call, exc, attempt, first_failure):
                    await _async_sleep(self._retry_delay(attempt))
                    attempt += 1
                    continue
                raise self._connection_error(request, exc) from None
            delay = self._retry_status(call, response, attempt, first_failure)
            if delay is not None:
                first_failure = _now() if first_failure is None else first_failure
                await _async_sleep(delay)
                attempt += 1
                continue
            return self._process_response(call, response)

    async def close(self) -> None:
        """Close the underlying HTTP connections (not a client passed in as ``http_client``)."""
        if self._owns_client:
            await self._client.aclose()

    @property
    def is_closed(self) -> bool:
        return self._client.is_closed


def _problem_code(response: httpx.Response) -> object:
    """The ``code`` of a problem+json answer, or None."""
    if "json" not in response.headers.get("content-type", ""):
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


__all__ = ["BaseClient", "SyncAPIClient", "AsyncAPIClient"]

