"""The same-host transport: gradients and parameters through shared memory, not the socket.

A client on the server's machine connects to a Unix domain socket, authenticates (its API key,
as over HTTP), and *binds* a session: the server creates an anonymous shared-memory segment
(``memfd_create``: no path anywhere) laid out as one gradient slot and one parameter slot per
parameter, and hands its file descriptor over the connection (``SCM_RIGHTS``). Each step is
then a small message: the client has written its gradients into their slots, the server steps
on views of them (no copy) and writes the new parameters into the parameter slots, the answer
carries only version, step and lr. The parameter slots get only acknowledged values (under
durability ``step``, once the step's record is durable: ``into_seen``): the SDK's parameters
may live in them (``RemoteOptimizer(zero_copy=True)``), and a step that fails must leave them
as they were.

Security: the socket lives in a directory only the server's user can enter (0700), every
connection's peer is checked to be that user (``SO_PEERCRED``), and a segment is shared only
with the authenticated connection that bound it, for a session of its tenant: no other local
user and no other tenant can read or write it. A segment's size is sealed (``F_SEAL_SHRINK``,
``F_SEAL_GROW``): a client cannot truncate it under the server's mappings. A client that
crashes closes its connection; its segments go with it at once. The socket's path is told
only to loopback clients (``GET /v1/transport``); remote clients never see it and keep to
HTTP, as do other languages.

Messages are frames: a little-endian u32 length, then a JSON object. Requests: ``hello``
(``key``), ``bind`` (``session``), ``step`` (``binding``, ``grads``: the names whose slots hold
gradients, ``return``: params or none, ``idempotency_key``, ``base_version``, ``worker``,
``param_groups``, ``scalars``, ``metrics``: answer or history, as ``?metrics=`` over HTTP;
a name in ``grads`` twice is a 400 ``duplicate_key``),
``pull`` (``binding``), ``unbind`` (``binding``). Answers:
``{"ok": true, ...}`` or ``{"ok": false, "problem": {problem+json fields}}``, as an HTTP route
answers (extras without a value left out; ``retry_after`` for the ``Retry-After`` header), whose
``field`` names the message's field (the engine's ``Idempotency-Key``, ``X-Optserve-Worker`` and
``session_id`` become ``idempotency_key``, ``worker`` and ``binding`` / ``session``): a frame
that is empty, not JSON or not a JSON object is a 400 ``invalid_json`` naming ``message``, one
over :data:`MAX_FRAME` a 413 ``payload_too_large`` naming ``message`` (then the connection is
closed: its body is not read), one
that repeats a key a 400 ``duplicate_key`` naming its path, a field the operation does not take
a 422 ``unknown_field`` naming it. A connection holds at most :data:`MAX_BINDINGS` bindings (429
``too_many_bindings``), the server at most ``OPTSERVE_MAX_BINDINGS`` on all its connections
together (``LocalTransport.binding_slots``: 503 ``server_bindings_full`` with
``retry_after``), and their memory at most ``OPTSERVE_MAX_BINDING_MB``
(``LocalTransport.binding_memory``, :func:`footprint`: the same 503, with ``limit_bytes``,
``held_bytes`` and ``needed_bytes``); a binding whose slots no longer fit its session's
parameters (the session was deleted and made again under its id) is refused before anything
is applied wherever a step or a pull would use such a slot, a gradient read from it included
(409 ``binding_stale``: bind again).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import hmac
import logging
import mmap
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
import torch

from app.api.bodies import parse_json
from app.api.conditions import body_digest, step_fingerprint
from app.api.connection_cap import Bounded, ConnectionSlots
from app.api.requests import step_options
from app.engine import metrics, ps
from app.engine.idempotency import check_key
from app.engine.idle import default_memory_bound
from app.engine.interface import Engine, IdemKey, SessionInfo, json_floats
from app.engine.session import check_session_id, stale_binding
from app.engine.store import storage_failure
from app.errors import (
    BadRequest,
    Invalid,
    NotFound,
    OptserveError,
    PayloadTooLarge,
    TooMany,
    Unauthorized,
    Unavailable,
)
from app.transport import stale_dirs
from app.wire.dtypes import TORCH_DTYPES
from app.wire.safetensors_body import BodyTensors
from app.wire.safetensors_header import plan_pieces

log = logging.getLogger("optserve.local")
T = TypeVar("T")
PROTOCOL = 1
_HEAD = struct.Struct("<I")
MAX_FRAME = 16 * 1024 * 1024
#: sessions one connection may hold bound at once (each binding holds a segment: its memory and
#: a mapping; the server's bound on all connections together is ``LocalTransport.binding_slots``)
MAX_BINDINGS = 64
ALIGN = 64
#: the ``Retry-After`` of a bind refused for the server-wide bound, in seconds
BINDINGS_RETRY_AFTER_S = 1
#: ... and of one whose memory alone is past the bound on the bindings' memory (the SDK waits
#: at most 60 s before it asks again)
NEVER_FITS_RETRY_AFTER_S = 60
#: the kernel's bound on a process's mappings when /proc does not say (vm.max_map_count)
MAP_COUNT_DEFAULT = 65530
#: the share of the process's mappings the bindings may take by default (the rest: libraries,
#: thread stacks, the allocator's large blocks: a mapping torch cannot get fails its step)
MAP_SHARE = 8
#: the fewest bindings a default allows
BINDINGS_FLOOR = 64


def default_bindings(max_map_count: int | None = None) -> int:
    """The live bindings allowed on the whole server by default (``OPTSERVE_MAX_BINDINGS`` 0):
    an eighth of the process's mappings (``vm.max_map_count``: 65530 -> 8191), at least
    :data:`BINDINGS_FLOOR`. A binding holds no descriptor once its segment is handed over (the
    server maps it without one: :func:`_map_segment`), but it holds a mapping and its memory."""
    if max_map_count is None:
        try:
            max_map_count = int(Path("/proc/sys/vm/max_map_count").read_text())
        except (OSError, ValueError):
            max_map_count = MAP_COUNT_DEFAULT
    return max(BINDINGS_FLOOR, max_map_count // MAP_SHARE)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_segment(fd: int, size: int) -> ctypes.Array[ctypes.c_uint8]:
    """The segment behind ``fd`` mapped shared, read and write, as a buffer of ``size`` bytes
    that holds no descriptor (``mmap.mmap`` keeps a duplicate of ``fd`` for as long as it is
    open: a descriptor per binding; Python 3.11 has no ``trackfd=False``): ``fd`` may be closed
    at once. The mapping is let go (``munmap``) when the buffer is no longer referenced: the
    tensors viewing it (``torch.frombuffer``) hold it, so no view ever outlives the memory."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a shared segment: {os.strerror(err)}")
    buf = (ctypes.c_uint8 * size).from_address(addr)
    # (not at exit: a thread may still read a view while the interpreter ends; the process's
    # end unmaps it)
    weakref.finalize(buf, _libc.munmap, addr, size).atexit = False
    return buf


def _aligned(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


def _placed(sizes: list[tuple[str, str, list[int]]], start: int) -> tuple[list[int], int]:
    """Offsets for tensors of these (name, dtype, shape) laid end to end from ``start``,
    widest dtypes first (each aligned to its item size with no padding between), in the
    given order; and where they end."""
    offsets = [0] * len(sizes)
    pos = start
    for i in sorted(range(len(sizes)), key=lambda i: -TORCH_DTYPES[sizes[i][1]].itemsize):
        _, dtype, shape = sizes[i]
        pos = _aligned(pos, TORCH_DTYPES[dtype].itemsize)
        offsets[i] = pos
        pos += _nbytes(dtype, shape)
    return offsets, pos


@dataclass
class Slot:
    name: str
    dtype: str
    shape: list[int]
    grad: int  # byte offset of the gradient slot
    param: int  # byte offset of the parameter slot
    nbytes: int


def _sizes(info: SessionInfo) -> list[tuple[str, str, list[int]]]:
    return [(n, p["dtype"], list(p["shape"])) for n, p in info.params.items()]


def _laid_out(sizes: list[tuple[str, str, list[int]]]) -> tuple[list[int], int, list[int], int]:
    """A segment's layout: the gradient slots' offsets and where they end, the parameter
    slots' offsets, and the segment's size."""
    grad_at, grads_end = _placed(sizes, 0)
    param_at, end = _placed(sizes, _aligned(grads_end))
    return grad_at, grads_end, param_at, max(_aligned(end), ALIGN)


def footprint(info: SessionInfo) -> int:
    """The bytes of memory a binding of the session holds at most: its segment (a slot for each
    parameter's gradient and one for its values), and for a logged session (durability
    ``interval`` or ``step``) the private copy of the gradients its steps read
    (:meth:`Binding.gradients`)."""
    _, grads_end, _, size = _laid_out(_sizes(info))
    return size + (grads_end if info.durability != "memory" else 0)


class Binding:
    """One session's shared segment on one connection."""

    #: the bytes counted against the server's bound for this binding (:func:`footprint`)
    counted = 0

    def __init__(self, session_id: str, info: SessionInfo) -> None:
        self.session_id = session_id
        self.slots: list[Slot] = []
        sizes = _sizes(info)
        # the gradient slots laid end to end, widest dtypes first (each then aligned to its
        # item size with no padding), so that the tensors of one dtype tile one span: the
        # non-finite check and the gradient norms take one reduction for all of them, not
        # one per tensor; then the parameter slots likewise. The slots stay in the session's
        # order (their offsets say where each lies).
        grad_at, grads_end, param_at, self.size = _laid_out(sizes)
        for (name, wire, shape), grad, param in zip(sizes, grad_at, param_at, strict=True):
            self.slots.append(Slot(name, wire, shape, grad, param, _nbytes(wire, shape)))
        #: the segment's descriptor until it is handed to the client (:meth:`hand_over`; -1
        #: after): the server's mapping holds none, so a binding holds no descriptor
        self.fd = os.memfd_create(f"optserve-{session_id}"[:200],
                                  os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            # its size sealed: the client gets the descriptor, and one that shrank the
            # segment (ftruncate) made the server's next read or write of a slot past the new
            # end a SIGBUS, which ended the whole server, every tenant's sessions with it
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            buf: ctypes.Array[ctypes.c_uint8] | None = _map_segment(self.fd, self.size)
        except BaseException:  # (no segment: its descriptor is not left open)
            os.close(self.fd)
            raise
        base = torch.frombuffer(buf, dtype=torch.uint8)
        # (the views hold the mapping; the last one gone unmaps it)
        buf = None
        self.grads: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.Tensor] = {}
        for s in self.slots:
            dtype = TORCH_DTYPES[s.dtype]
            self.grads[s.name] = base[s.grad:s.grad + s.nbytes].view(dtype).view(s.shape)
            self.params[s.name] = base[s.param:s.param + s.nbytes].view(dtype).view(s.shape)
        #: the session logs its steps: the gradients are copied out of the segment (the client
        #: can write it at any time) into these, so the record, the checks and the step all
        #: see the same bytes
        self.logged = info.durability != "memory"
        self.private: dict[str, torch.Tensor] = {}
        #: every gradient slot, in order, and the bytes they lie in (the segment's first
        #: part), with the private copy of those bytes a logged session's steps use
        self.names = [s.name for s in self.slots]
        self.grad_bytes = base[:grads_end]
        self.private_bytes: torch.Tensor | None = None
        #: the gradient slots as a body's tensors are planned (runs of one dtype laid end to
        #: end: app.wire.safetensors_header.plan_pieces), and their views over the bytes a
        #: step reads (:meth:`runs`)
        self.pieces = plan_pieces(
            sorted((s.grad, s.grad + s.nbytes, s.name) for s in self.slots),
            {s.name: (TORCH_DTYPES[s.dtype], tuple(s.shape), s.nbytes // TORCH_DTYPES[
                s.dtype].itemsize) for s in self.slots})
        self._runs: tuple[tuple[torch.Tensor, tuple[str, ...]], ...] | None = None
        #: the slots' names, dtypes and shapes (BodyTensors.header of every slot's gradients)
        self.key = b"local:" + orjson.dumps([[s.name, s.dtype, s.shape] for s in self.slots])
        self.layout = {"size": self.size, "params": [
            {"name": s.name, "dtype": s.dtype, "shape": s.shape, "grad": s.grad,
             "param": s.param, "nbytes": s.nbytes} for s in self.slots]}

    def gradients(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named gradient slots: views of the segment, or (a logged session) views of a
        copy of the slots' bytes that this binding keeps from step to step (one copy for all
        of them). Every slot, in order: as :class:`BodyTensors` with the binding's layout and
        its runs of slots laid end to end, so that a session passes them without per-tensor
        checks once it has checked them (:meth:`app.engine.session.Session.known_body`)."""
        if self.logged:
            if self.private_bytes is None:
                self.private_bytes = torch.empty_like(self.grad_bytes)
                for s in self.slots:
                    self.private[s.name] = self.private_bytes[s.grad:s.grad + s.nbytes].view(
                        TORCH_DTYPES[s.dtype]).view(s.shape)
            self.private_bytes.copy_(self.grad_bytes)
        held = self.private if self.logged else self.grads
        if names != self.names:
            return {n: held[n] for n in names}
        out = BodyTensors(held)
        out.header = self.key
        out.runs = self.runs()
        return out

    def held_bytes(self) -> torch.Tensor:
        """The bytes a step's gradients are read from: the segment's, or a logged session's
        copy of them (made by :meth:`gradients`)."""
        held = self.private_bytes if self.logged else self.grad_bytes
        assert held is not None
        return held

    def runs(self) -> tuple[tuple[torch.Tensor, tuple[str, ...]], ...]:
        """The runs of :attr:`pieces` as views of :meth:`held_bytes` (always the same
        buffer), made once."""
        if self._runs is None:
            raw = self.held_bytes()
            self._runs = tuple((raw[begin:end].view(dtype), names)
                               for begin, end, dtype, names, numels, _ in self.pieces
                               if numels is not None)
        return self._runs

    def digest(self, names: list[str], grads: dict[str, torch.Tensor]) -> str:
        """A fingerprint of the gradients a step takes (:func:`body_digest`): of the slots'
        bytes at once when it takes every slot, in order (the bytes between slots are never
        written by a client that follows the layout), else of each gradient."""
        if names == self.names:
            return f"all={body_digest(self.held_bytes().numpy().data)}"
        return ";".join(f"{n}={body_digest(grads[n].view(-1).view(torch.uint8).numpy().data)}"
                        for n in names)

    def hand_over(self) -> int:
        """The segment's descriptor, to send to the client; the caller closes it once sent
        (the binding no longer holds it)."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        """Let go of the segment: its views here are dropped, and the mapping goes with the
        last view (one an operation in flight still holds goes when that ends)."""
        self.private.clear()
        self.private_bytes = None
        self._runs = None
        self.grad_bytes = torch.empty(0, dtype=torch.uint8)
        self.grads.clear()
        self.params.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _close_all(fds: list[int]) -> None:
    """Close the descriptors of ``fds`` (a segment's, once handed to the client) and empty it."""
    for fd in fds:
        os.close(fd)
    fds.clear()


def _text(m: dict[str, Any], name: str, check: Callable[[str], str]) -> str | None:
    """A message's optional string field, checked as its HTTP header is (the problem names
    the message's field)."""
    value = m.get(name)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            check("")  # (the header's own problem: what the value must be)
        return check(value)
    except Invalid as exc:
        exc.field = name
        raise


#: a session's refusals of a gradient that, for a gradient read from a binding's slot (the
#: slot's own dtype and shape, under a name the binding was made with), mean the slot no longer
#: fits its parameter: the session was made again since it was bound
_SLOT_MISFITS = frozenset({"shape_mismatch", "dtype_mismatch", "unknown_parameter"})


def _misfit_slot(exc: Invalid, names: list[str]) -> str | None:
    """The slot of ``names`` whose gradient ``exc`` refuses for not fitting its parameter (a
    stale binding: 409 ``binding_stale``, as a pull through it is); None for other refusals."""
    field = exc.field or ""
    if exc.code in _SLOT_MISFITS and field.startswith("grads."):
        name = field.removeprefix("grads.")
        if name in names:
            return name
    return None


def _only_fields(m: dict[str, Any], op: str) -> None:
    unknown = sorted(set(m) - FIELDS[op])
    if unknown:
        raise Invalid(f"unknown field {unknown[0]!r:.60} in a {op} message; expected "
                      f"{sorted(FIELDS[op])}", code="unknown_field", field=unknown[0][:200])


def _nbytes(dtype: str, shape: list[int]) -> int:
    n = torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    for d in shape:
        n *= d
    return n


def _message(body: bytes) -> dict[str, Any]:
    """A frame's message: a frame that is empty, not JSON, not a JSON object, or whose objects
    name a key twice is a 400 answer naming ``message`` (the key's path for a repeated key),
    as an HTTP body is answered naming ``body`` (the frame was read whole: the connection and
    its bindings go on)."""
    message = parse_json(body, "message", what="message")
    if not isinstance(message, dict):
        raise BadRequest("a message must be a JSON object", code="invalid_json",
                         field="message")
    return message


#: the fields each message may carry: any other is a 422 ``unknown_field`` naming it, as an
#: unknown field of an HTTP body is (a misspelt ``param_group`` would step without the change)
FIELDS = {
    "hello": frozenset({"op", "key", "protocol"}),
    "bind": frozenset({"op", "session"}),
    "unbind": frozenset({"op", "binding"}),
    "pull": frozenset({"op", "binding"}),
    "step": frozenset({"op", "binding", "grads", "return", "idempotency_key", "base_version",
                       "worker", "param_groups", "scalars", "metrics"}),
}
#: the engine's names for what a message carries in its own fields: the HTTP headers (and the
#: path's session id, which a message names by ``session`` to bind and by ``binding`` after)
_MESSAGE_FIELDS = {"Idempotency-Key": "idempotency_key", "X-Optserve-Worker": "worker"}


def _field_in(message: dict[str, Any] | None, field: str) -> str:
    """``field`` (as the engine or an HTTP route names it) as the message names it."""
    if field == "session_id":
        return "session" if message is not None and message.get("op") == "bind" else "binding"
    return _MESSAGE_FIELDS.get(field, field)


def problem_of(exc: Exception, message: dict[str, Any] | None = None) -> dict[str, Any]:
    """The problem+json fields an HTTP route would answer ``exc`` with (extras left out when
    ``None``, as there), its ``field`` named as ``message`` names it; ``retry_after`` stands
    for the ``Retry-After`` header a frame does not have."""
    if isinstance(exc, OptserveError):
        out: dict[str, Any] = {"type": f"urn:optserve:problem:{exc.code}", "title": exc.title,
                               "status": exc.status, "detail": exc.detail, "code": exc.code}
        if exc.field is not None:
            out["field"] = _field_in(message, exc.field)
        out.update({k: v for k, v in exc.extra.items() if v is not None})
        retry = getattr(exc, "retry_after", None)
        if retry is not None:
            out["retry_after"] = retry
        return out
    if isinstance(exc, OSError):  # (a segment or a file that could not be made: EMFILE, ...)
        log.error("local transport: file operation error", exc_info=exc)
        return problem_of(storage_failure(exc, "a file operation failed",
                                          outcome="the request could not be completed"))
    log.exception("local transport: unexpected error", exc_info=exc)
    return {"type": "urn:optserve:problem:internal_error", "title": "Internal error",
            "status": 500, "detail": "the server failed to handle this request; it has been "
            "logged", "code": "internal_error"}


#: accept errors tried again: short of descriptors or memory (after a pause), and a
#: connection reset or aborted before it was taken
_ACCEPT_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_AGAIN = (*_ACCEPT_SHORT, errno.ECONNABORTED, errno.EINTR, errno.EPROTO)
_ACCEPT_RETRY_S = 0.1


class LocalTransport:
    """The Unix-socket listener and its connections (a thread each; the engine runs on the
    event loop, called with ``run_coroutine_threadsafe``)."""

    def __init__(self, engine: Engine, keys: dict[str, str], default_tenant: str,
                 parent: Path | None = None, slots: ConnectionSlots | None = None,
                 max_bindings: int = 0, max_binding_bytes: int = 0) -> None:
        self.engine = engine
        #: the live bindings of all connections together (``OPTSERVE_MAX_BINDINGS``; 0: the
        #: default, :func:`default_bindings`)
        self.binding_slots = Bounded(max_bindings or default_bindings())
        #: the bytes of memory they hold (``OPTSERVE_MAX_BINDING_MB``; 0: the default,
        #: :func:`~app.engine.idle.default_memory_bound`)
        self.binding_memory = Bounded(max_binding_bytes or default_memory_bound())
        #: the count of open connections this transport shares with HTTP's (a connection past
        #: its limit is closed at once), None: unbounded
        self.slots = slots
        self._stopping = False
        self.keys = [(k.encode(), t) for k, t in keys.items()]
        self.default_tenant = default_tenant
        self.parent = parent
        self.dir: Path | None = None
        self.path: Path | None = None
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self.parent is not None:
            self.parent.mkdir(parents=True, exist_ok=True)
        parent = self.parent if self.parent is not None else stale_dirs.default_parent()
        gone = stale_dirs.sweep(parent)
        if gone:
            log.info("same-host transport: removed %d socket directories of servers gone "
                     "for good from %s", len(gone), parent)
        self.dir = Path(tempfile.mkdtemp(prefix=stale_dirs.prefix(), dir=parent))
        os.chmod(self.dir, 0o700)
        self.path = self.dir / stale_dirs.SOCKET_NAME
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="optserve-local",
                                        daemon=True)
        self._thread.start()
        log.info("same-host transport on %s", self.path)

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _accept(self) -> None:
        """Accept connections until :meth:`stop`. An accept that fails for want of
        descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) or for a connection gone
        before it was taken is tried again (after :data:`_ACCEPT_RETRY_S` for the first), not
        the end of the transport; a connection past the shared bound (``slots``) is closed
        at once."""
        assert self._listener is not None
        last_warned = 0.0
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as exc:
                if self._stopping or exc.errno not in _ACCEPT_AGAIN:
                    if not self._stopping:
                        log.error("same-host transport: accept failed, no longer serving: %s",
                                  exc)
                    return
                if exc.errno in _ACCEPT_SHORT and time.monotonic() - last_warned > 60:
                    last_warned = time.monotonic()
                    log.warning("same-host transport: cannot accept a connection: %s; "
                                "retrying every %g s", exc, _ACCEPT_RETRY_S)
                if exc.errno in _ACCEPT_SHORT:
                    time.sleep(_ACCEPT_RETRY_S)
                continue
            try:
                self._serve(sock)
            except Exception as exc:  # noqa: BLE001 - (a thread that cannot start) never the end
                log.warning("same-host transport: connection dropped: %s", exc)

    def _serve(self, sock: socket.socket) -> None:
        """Serve an accepted connection on a thread of its own, or close it: a peer of
        another user (unreachable: the directory's mode; belt and braces), or one past the
        shared bound on connections."""
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  struct.calcsize("3i")))[1]
        if uid != os.getuid():
            sock.close()
            return
        if self.slots is not None and not self.slots.take():
            self.slots.refused("same-host")
            sock.close()
            return
        conn = _Connection(self, sock)
        with self._lock:
            self._conns.add(conn)
        try:
            conn.start()
        except BaseException:
            sock.close()
            self.forget(conn)
            raise

    def forget(self, conn: _Connection) -> None:
        with self._lock:
            if conn not in self._conns:
                return
            self._conns.discard(conn)
        if self.slots is not None:
            self.slots.give()

    def tenant_for(self, key: object) -> str | None:
        if not self.keys:
            return self.default_tenant
        if not isinstance(key, str):
            return None
        found = None
        for k, tenant in self.keys:  # no early exit: constant time
            if hmac.compare_digest(k, key.encode()):
                found = tenant
        return found

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()


class _Connection(threading.Thread):
    def __init__(self, transport: LocalTransport, sock: socket.socket) -> None:
        super().__init__(name="optserve-local-conn", daemon=True)
        self.transport = transport
        self.sock = sock
        self.tenant: str | None = None
        self.bindings: dict[int, Binding] = {}
        self.next_binding = 1

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def run(self) -> None:
        try:
            while True:
                body = self._read()
                if body is None:
                    return
                # descriptors to send with the answer, closed here once sent (or not)
                fds: list[int] = []
                message = None
                try:
                    try:
                        message = _message(body)
                        answer = self._handle(message, fds)
                    except Exception as exc:  # every failure is an answer, never a dead thread
                        answer = {"ok": False, "problem": problem_of(exc, message)}
                        _close_all(fds)
                    self._send(answer, fds)
                finally:
                    _close_all(fds)
        except OSError:
            return
        finally:
            for binding in self.bindings.values():
                self._let_go(binding)
            self.bindings.clear()
            self.sock.close()
            self.transport.forget(self)

    # ------------------------------------------------------------------ framing
    def _recv_exact(self, n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = self.sock.recv(n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _read(self) -> bytes | None:
        """The next frame's body; None when the client has closed the connection."""
        head = self._recv_exact(_HEAD.size)
        if head is None:
            return None
        (length,) = _HEAD.unpack(head)
        if length > MAX_FRAME:
            # answered, then the connection closed (its body is not read: the frames after it
            # cannot be found); it was closed without a word
            exc = PayloadTooLarge(f"a frame of {length} bytes is over the limit of "
                                  f"{MAX_FRAME}", field="message", limit=MAX_FRAME)
            self._send({"ok": False, "problem": problem_of(exc)}, [])
            return None
        return self._recv_exact(length)

    def _send(self, answer: dict[str, Any], fds: list[int]) -> None:
        body = orjson.dumps(answer)
        frame = _HEAD.pack(len(body)) + body
        if fds:
            socket.send_fds(self.sock, [frame], fds)
        else:
            self.sock.sendall(frame)

    # ------------------------------------------------------------------ operations
    def _handle(self, m: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = m.get("op")
        if op == "hello":
            _only_fields(m, "hello")
            tenant = self.transport.tenant_for(m.get("key"))
            if tenant is None:
                raise Unauthorized("the API key is not valid", field="key")
            self.tenant = tenant
            return {"ok": True, "protocol": PROTOCOL}
        if self.tenant is None:
            raise Unauthorized("say hello (with the API key) first", field="op")
        engine, tenant = self.transport.engine, self.tenant
        if not isinstance(op, str) or op not in FIELDS:
            raise BadRequest(f"unknown operation {op!r:.40}", code="invalid_message",
                             field="op")
        _only_fields(m, op)
        if op == "bind":
            session_id = _text(m, "session", check_session_id)
            if session_id is None:
                raise Invalid("bind names a session", code="missing_field", field="session")
            if len(self.bindings) >= MAX_BINDINGS:
                raise TooMany(f"at most {MAX_BINDINGS} sessions may be bound on one "
                              "connection; unbind one first", code="too_many_bindings",
                              field="session", limit=MAX_BINDINGS)
            slots = self.transport.binding_slots
            if not slots.take():
                raise Unavailable(
                    f"the server holds its most bindings ({slots.limit}, "
                    "OPTSERVE_MAX_BINDINGS, all connections together); step over HTTP, or "
                    f"bind again after {BINDINGS_RETRY_AFTER_S} s",
                    code="server_bindings_full", field="session", limit=slots.limit,
                    retry_after=BINDINGS_RETRY_AFTER_S)
            try:
                info = self.transport.call(engine.describe(session_id, tenant=tenant))
                binding = self._bound(session_id, info)
            except BaseException:
                slots.give()
                raise
            number = self.next_binding
            self.next_binding += 1
            self.bindings[number] = binding
            fds.append(binding.hand_over())
            return {"ok": True, "binding": number, **binding.layout}
        binding = self._binding(m.get("binding"))
        if op == "unbind":
            self._let_go(self.bindings.pop(int(m["binding"])))
            return {"ok": True}
        if op == "step":
            return self._step(binding, m)
        result = self.transport.call(engine.pull(binding.session_id, None, tenant=tenant,
                                                 params_into=binding.params))
        return {"ok": True, **result.scalars()}

    def _bound(self, session_id: str, info: SessionInfo) -> Binding:
        """A new binding of the session, its memory counted against the server's bound."""
        memory = self.transport.binding_memory
        need = footprint(info)
        if not memory.take(need):
            limit = memory.limit
            # (one that can never fit is asked for again rarely: the SDK waits at most 60 s)
            wait = BINDINGS_RETRY_AFTER_S if need <= limit else NEVER_FITS_RETRY_AFTER_S
            raise Unavailable(
                f"a binding of this session holds {need} bytes of shared memory, and the "
                f"bindings of all connections together may hold {limit} "
                f"(OPTSERVE_MAX_BINDING_MB; {memory.held} held now); step over HTTP, or "
                f"bind again after {wait} s",
                code="server_bindings_full", field="session", limit_bytes=limit,
                held_bytes=memory.held, needed_bytes=need, retry_after=wait)
        try:
            binding = Binding(session_id, info)
        except BaseException:
            memory.give(need)
            raise
        binding.counted = need
        return binding

    def _let_go(self, binding: Binding) -> None:
        """Close a binding of this connection and count it no longer live."""
        binding.close()
        self.transport.binding_slots.give()
        self.transport.binding_memory.give(binding.counted)
        binding.counted = 0

    @staticmethod
    def _legacy_fingerprint(binding: Binding, m: dict[str, Any], names: list[str],
                            grads: dict[str, torch.Tensor]) -> str:
        """The fingerprint servers before :func:`step_fingerprint` kept for this step (its
        records and snapshots hold it: a retry after an upgrade is still answered)."""
        asked = {k: m.get(k) for k in ("base_version", "worker", "param_groups", "scalars")}
        returned, shown = m.get("return", "params"), m.get("metrics", "answer")
        if returned != "params" or shown != "answer":
            asked.update({"return": returned, "metrics": shown})
        meta = orjson.dumps(asked).decode()
        return f"local step {binding.session_id} {meta} {binding.digest(names, grads)}"

    def _binding(self, number: object) -> Binding:
        binding = self.bindings.get(number) if type(number) is int else None
        if binding is None:
            raise NotFound("no such binding on this connection", code="unknown_binding",
                           field="binding")
        return binding

    def _step(self, binding: Binding, m: dict[str, Any]) -> dict[str, Any]:
        names = m.get("grads", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise Invalid("grads must list the names whose slots hold gradients",
                          code="invalid_message", field="grads")
        if len(set(names)) != len(names):  # (a body's object names each tensor once too)
            twice = next(n for i, n in enumerate(names) if n in names[:i])
            raise BadRequest(f"grads names {twice!r:.80} twice (each gradient's slot once)",
                             code="duplicate_key", field=f"grads.{twice[:200]}")
        unknown = [n for n in names if n not in binding.grads]
        if unknown:
            raise Invalid(f"{unknown[0]!r:.80} has no slot in this binding (bind again after "
                          "add_param_group)", code="unknown_parameter",
                          field=f"grads.{unknown[0][:200]}")
        returned = m.get("return", "params")
        if returned not in ("params", "none"):
            raise Invalid("return must be \"params\" or \"none\"", code="invalid_message",
                          field="return")
        want = returned == "params"
        shown = m.get("metrics", "answer")
        if shown not in metrics.SHOWN:
            raise Invalid("metrics must be \"answer\" or \"history\"", code="invalid_message",
                          field="metrics")
        key = _text(m, "idempotency_key", check_key)
        worker = _text(m, "worker", ps.check_worker)
        base = m.get("base_version")
        if base is not None and type(base) is not int:
            raise Invalid("base_version must be an integer (the version the gradients were "
                          "computed from)", code="invalid_base_version", field="base_version")
        grads = binding.gradients(names)
        idem = None
        if key is not None:
            # the step's content and what it asks, as an HTTP step's fingerprint takes them
            # (its retry over HTTP, after the socket went, is the same request)
            content = step_fingerprint(
                binding.session_id, grads, returned=returned, metrics=shown,
                base_version=base, worker=worker, param_groups=m.get("param_groups"),
                scalars=m.get("scalars"))
            idem = IdemKey(key, content, legacy=(self._legacy_fingerprint(binding, m, names,
                                                                         grads),))
        options = step_options(m.get("param_groups"))
        try:
            result = self.transport.call(self.transport.engine.step(
                binding.session_id, grads, return_params=want, tenant=self.tenant or "",
                worker=worker, base_version=base, idem=idem, options=options,
                params_into=binding.params if want else None, scalars=m.get("scalars"),
                answer_metrics=shown == "answer", into_seen=True))
        except Invalid as exc:
            slot = _misfit_slot(exc, names)
            if slot is None:
                raise
            raise stale_binding(slot) from None
        if want and result.params is not None and result.params is not binding.params:
            with torch.no_grad():  # a sync round's parameters come back packed
                for name, view in binding.params.items():
                    view.copy_(result.params[name])
        answer = {"ok": True, **result.scalars()}
        answer["lr"] = json_floats(result.lr)
        return answer
