"""What an operator sees: Prometheus metrics, request ids and structured JSON logs.

- ``Metrics``: one registry per app (so several apps can live in one process), fed by the
  routes (decode/encode time, outcomes, bytes) and by the device worker through a plain
  callback (queue wait and device time), so the engine knows nothing of Prometheus.
- ``RequestContextMiddleware``: a request id per request (the client's ``X-Request-Id`` when
  it is sane, else a new one), echoed in the response header and in every problem+json body,
  and one structured access-log line per request.
- ``JsonFormatter``: log records as one JSON object per line, carrying the request id.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "optserve_request_id", default=None)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("optserve.access")
#: where, in ``scope["state"]``, a request counts the body bytes it read without ``receive()``
#: (``app.api.body_sink``): the access log and ``bytes_in`` add them
SUNK_BYTES = "optserve.body_sink_bytes"
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, per_session: bool = True) -> None:
        # With API keys (several tenants) every key can read /metrics: then no series names a
        # session, so one tenant cannot learn another's session ids.
        self.per_session = per_session
        self.registry = CollectorRegistry()
        r = self.registry
        # The request path's series (requests, bytes, outcomes, step phases, worker times) are
        # counted here, under one lock, and set into their prometheus_client series whenever
        # the registry is read (_Fold, its first collector): prometheus_client's inc() and
        # observe() were a few calls, checks and a lock per value, ten a step. The values are
        # the same sums, added in the same order.
        self._lock = threading.Lock()
        #: (metric, *labels) -> [series, total]
        self._counted: dict[tuple[Any, ...], list[Any]] = {}
        #: (metric, *labels) -> [series, sum, counts per bucket, the buckets' upper bounds]
        self._observed: dict[tuple[Any, ...], list[Any]] = {}
        r.register(_Fold(self))
        self.steps = Counter("optserve_steps", "Optimizer step requests by session and outcome",
                             ["session", "outcome"], registry=r)
        self.pushes = Counter("optserve_pushes", "Gradient pushes (/grads) by session and outcome",
                              ["session", "outcome"], registry=r)
        self.step_phase = Histogram("optserve_step_phase_seconds",
                                    "Step latency split: decode, queue, device, encode",
                                    ["phase"], buckets=_LATENCY_BUCKETS, registry=r)
        self.worker = Histogram("optserve_worker_seconds",
                                "Device worker time per operation: queue wait and run",
                                ["op", "phase"], buckets=_LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("optserve_request_bytes", "Request body bytes received",
                                registry=r)
        self.bytes_out = Counter("optserve_response_bytes", "Response body bytes sent",
                                 registry=r)
        self.requests = Counter("optserve_http_requests", "HTTP requests by method and status",
                                ["method", "status"], registry=r)
        self.sessions = Gauge("optserve_sessions", "Sessions held", registry=r)
        self.device_memory = Gauge("optserve_device_memory_bytes",
                                   "Bytes of tensors the sessions hold on the device "
                                   "(CUDA: torch.cuda.memory_allocated)", registry=r)

        def bounded(name: str, what: str, setting: str) -> tuple[Gauge, Gauge]:
            return (Gauge(f"optserve_{name}", f"{what} now ({setting} bounds them)",
                          registry=r),
                    Gauge(f"optserve_{name}_limit", f"{setting}: the most at once",
                          registry=r))
        self.connections, self.connections_limit = bounded(
            "connections", "Connections open, HTTP and same-host together",
            "OPTSERVE_MAX_CONNECTIONS")
        self.bindings, self.bindings_limit = bounded(
            "local_bindings", "Same-host bindings held (a session's segment mapped for a "
            "same-host connection)", "OPTSERVE_MAX_BINDINGS")
        self.binding_bytes, self.binding_bytes_limit = bounded(
            "local_binding_bytes", "Bytes of memory the same-host bindings hold (their "
            "segments, and logged sessions' private copies of the gradients)",
            "OPTSERVE_MAX_BINDING_MB")
        self.body_bytes, self.body_bytes_limit = bounded(
            "request_body_bytes", "Bytes of request bodies above 256 KiB being read or held "
            "until their answers", "OPTSERVE_MAX_BODIES_MB")
        self.connections_lingering = Gauge(
            "optserve_connections_lingering", "Connections kept a moment after an answer that "
            "closed them while their client was still sending (drained, then closed)",
            registry=r)
        self.gc_frozen = Gauge("optserve_gc_frozen_objects", "Objects out of the cyclic "
                               "garbage collector's walks (gc.freeze: the server's modules, and "
                               "sessions' tensors under OPTSERVE_GC_FREEZE_SESSIONS)", registry=r)
        # (a count that only grows: a counter, exposed as optserve_gc_sweeps_total; it follows
        # the process's settler, read at each scrape: sweeps_seen)
        self.gc_sweeps = Counter("optserve_gc_sweeps", "Full collections run to free what "
                                 "freezing sessions trapped (after an idle minute, or ten "
                                 "busy minutes, that followed a freeze)", registry=r)
        self.gc_sweeps_seen = 0
        self.bodies_waiting = Gauge("optserve_request_bodies_waiting",
                                    "Request bodies waiting for room under "
                                    "OPTSERVE_MAX_BODIES_MB before they are read", registry=r)

        # the (counter, outcome) series each session has, so a deleted session's go with it
        self._series: dict[str, set[tuple[Counter, str]]] = {}
        # labelled series by (metric, labels): prometheus_client's labels() locks, checks and
        # builds a key on every call, a few per request
        self._children: dict[tuple[Any, ...], Any] = {}

    def series(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _counter(self, key: tuple[Any, ...]) -> list[Any]:
        """``key``'s counted total (under ``_lock``), from its series' value when new."""
        tally = self._counted.get(key)
        if tally is None:
            series = self.series(*key) if len(key) > 1 else key[0]
            tally = self._counted[key] = [series, series._value.get()]
        return tally

    def _histogram(self, key: tuple[Any, ...]) -> list[Any]:
        """``key``'s observed sum and bucket counts (under ``_lock``)."""
        tally = self._observed.get(key)
        if tally is None:
            series = self.series(*key)
            tally = self._observed[key] = [series, series._sum.get(),
                                           [b.get() for b in series._buckets],
                                           tuple(series._upper_bounds)]
        return tally

    @staticmethod
    def _observe(tally: list[Any], amount: float) -> None:
        """``Histogram.observe``: the sum, and the first bucket whose bound is at least
        ``amount`` (none for NaN)."""
        tally[1] += amount
        if amount == amount:
            tally[2][bisect_left(tally[3], amount)] += 1

    def request(self, method: str, status: str, bytes_in: int, bytes_out: int) -> None:
        """One HTTP request answered ``status``, its body bytes in and out."""
        with self._lock:
            self._counter((self.requests, method, status))[1] += 1
            self._counter((self.bytes_in,))[1] += bytes_in
            self._counter((self.bytes_out,))[1] += bytes_out

    def count(self, counter: Counter, session: str, outcome: str) -> None:
        """One request of ``session`` (``""``: not named) under ``outcome``."""
        with self._lock:
            self._counter((counter, session, outcome))[1] += 1
        if session:
            self._series.setdefault(session, set()).add((counter, outcome))

    def forget_session(self, session: str) -> None:
        """Remove every series that names a deleted session."""
        for counter, outcome in self._series.pop(session, ()):
            with self._lock:
                self._counted.pop((counter, session, outcome), None)
                self._children.pop((counter, session, outcome), None)
            try:
                counter.remove(session, outcome)
            except KeyError:
                pass

    def observe_phase(self, phase: str, seconds: float) -> None:
        """A step's ``phase`` took ``seconds``."""
        with self._lock:
            self._observe(self._histogram((self.step_phase, phase)), seconds)

    def observe_worker(self, op: str, queue_s: float, run_s: float) -> None:
        """The device worker's callback (runs on the worker thread)."""
        observe, histogram = self._observe, self._histogram
        with self._lock:
            observe(histogram((self.worker, op, "queue")), queue_s)
            observe(histogram((self.worker, op, "run")), run_s)
            if op == "step":
                observe(histogram((self.step_phase, "queue")), queue_s)
                observe(histogram((self.step_phase, "device")), run_s)

    def fold(self) -> None:
        """Set the counted values into their prometheus_client series."""
        with self._lock:
            for series, total in self._counted.values():
                series._value.set(total)
            for series, total, counts, _ in self._observed.values():
                series._sum.set(total)
                for bucket, n in zip(series._buckets, counts, strict=True):
                    bucket.set(n)


class _Fold:
    """The registry's first collector: it yields nothing, and sets the values
    :class:`Metrics` counted into their series before the registry reads them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self.metrics.fold()
        return []


def _json_line(created: float, level: str, logger: str, msg: str,
               fields: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON log line's object: its time, level, logger, message, the request's id (when one
    is set) and the record's fields (:class:`JsonFormatter`'s, and the access line written
    without a record, :func:`_access_line`)."""
    out: dict[str, Any] = {"ts": round(created, 6), "level": level, "logger": logger,
                           "msg": msg}
    rid = request_id_var.get()
    if rid:
        out["request_id"] = rid
    if fields:
        out.update(fields)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, "fields", None)
        out = _json_line(record.created, record.levelname.lower(), record.name,
                         record.getMessage(), extra if isinstance(extra, dict) else None)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def configure_logging(level: str, fmt: str) -> None:
    """The server process's logging: one handler on stderr, JSON lines or plain text. Records
    do not look up their process's multiprocessing name (no format here shows it, and the
    lookup is a good part of making the access log's record per request)."""
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True


def new_request_id() -> str:
    """A request id: ``uuid.uuid4().hex`` (a random version-4 UUID as 32 hex digits), its
    bits set as ``uuid.UUID(bytes=..., version=4)`` sets them, without making the UUID
    object (a third of the cost, on every request that brings no id of its own)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1")
                break
        rid = incoming if incoming and _REQUEST_ID_RE.match(incoming) else new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        started = time.perf_counter()
        sizes = {"in": 0, "out": 0}
        # (ended: 0 once the head went out, 1 once the last body message did: an answer
        # whose head went out and whose last body message never did was cut short)
        status = {"code": 500, "ended": -1}

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                sizes["in"] += len(message.get("body", b""))
            return message

        head = scope["method"] == "HEAD"

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["ended"] = message["status"], 0
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                if not head:
                    sizes["out"] += len(message.get("body", b""))
                await send(message)
                if not message.get("more_body", False):
                    status["ended"] = 1  # (once it went: a send that raised leaves it cut)
                return
            await send(message)

        try:
            # HEAD is GET without the body (RFC 9110 9.3.2; every general-purpose server
            # serves it): the routes see a GET, and the server, whose own scope still says
            # HEAD, sends the head alone
            await self.app({**scope, "method": "GET"} if head else scope, counting_receive,
                           tagging_send)
        finally:
            elapsed = time.perf_counter() - started
            # (a body read through the protocol's sink passed no receive(): app.api.body_sink)
            sizes["in"] += scope.get("state", {}).get(SUNK_BYTES, 0)
            self.metrics.request(scope["method"], str(status["code"]), sizes["in"], sizes["out"])
            if access_log.isEnabledFor(logging.INFO):
                _access(scope["method"], scope["path"], status["code"], elapsed, sizes,
                        cut=status["ended"] == 0)
            request_id_var.reset(token)


def _access(method: str, path: str, status: int, elapsed: float, sizes: dict[str, int],
            cut: bool = False) -> None:
    """One access-log line. The record is made without ``Logger.info``'s search of the stack
    for its caller (it would name this function on every request); where the line would only
    reach the server's own JSON handler (:func:`json_handler`: ``configure_logging``'s, the
    logging untouched since), no record is made: the line the handler would write is written
    under its lock (:func:`_access_line`). ``cut``: the answer's head went out and its end
    never did (a streamed step's answer cut short by the step's failure: the server closed
    the connection), which the line says (``"cut": true``; ``bytes_out`` what was sent)."""
    fields: dict[str, Any] = {"method": method, "path": path, "status": status,
                              "ms": round(elapsed * 1e3, 3), "bytes_in": sizes["in"],
                              "bytes_out": sizes["out"]}
    if cut:
        fields["cut"] = True
    handler = json_handler(access_log)
    if handler is not None:
        _access_line(handler, method, path, status, fields)
        return
    access_log.handle(_access_record(method, path, status, fields))


def _access_record(method: str, path: str, status: int,
                   fields: dict[str, Any]) -> logging.LogRecord:
    return access_log.makeRecord(
        access_log.name, logging.INFO, __file__, 0, _access_format(fields),
        (method, path, status), None, extra={"fields": fields})


def _access_format(fields: dict[str, Any]) -> str:
    """The access line's message: ``POST /v1/sessions/s/step 200``, and what the text format
    shows of a cut answer (``... 200 cut short after 1835028 bytes``)."""
    if fields.get("cut"):
        return "%s %s %d cut short after " + str(fields["bytes_out"]) + " bytes"
    return "%s %s %d"


def json_handler(logger: logging.Logger) -> logging.StreamHandler[Any] | None:
    """The one handler an INFO record of ``logger`` reaches, when it is a plain
    ``StreamHandler`` with a :class:`JsonFormatter` that filters nothing (what
    :func:`configure_logging` sets up), no filter of ``logger`` sees the record and records are
    made by logging's own factory; else None (then the record goes through ``logging``: a
    second handler, pytest's ``caplog`` among them, a filter, another format)."""
    if logger.disabled or logger.filters or logging.getLogRecordFactory() is not logging.LogRecord:
        return None
    found: logging.Handler | None = None
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if found is not None:
                return None
            found = handler
        if not node.propagate:
            break
        node = node.parent
    if (type(found) is not logging.StreamHandler or type(found.formatter) is not JsonFormatter
            or found.filters or found.level > logging.INFO):
        return None
    return found


def _access_line(handler: logging.StreamHandler[Any], method: str, path: str, status: int,
                 fields: dict[str, Any]) -> None:
    """What ``handler`` writes for the access record of these ``fields`` (``JsonFormatter``'s
    object: the record's time, level, logger, message, request id, then the fields; then
    ``StreamHandler.emit``: the line, its terminator, a flush; an error in between is the
    handler's ``handleError``), without the record."""
    out = _json_line(time.time(), "info", access_log.name,
                     _access_format(fields) % (method, path, status),  # noqa: UP031 (the record's)
                     fields)
    handler.acquire()
    try:
        try:
            line = orjson.dumps(out, default=str).decode() + handler.terminator
            stream = handler.stream
            stream.write(line)
            if stream and hasattr(stream, "flush"):
                stream.flush()
        except RecursionError:
            raise
        except Exception:
            handler.handleError(_access_record(method, path, status, fields))
    finally:
        handler.release()


WorkerObserver = Callable[[str, float, float], None]
