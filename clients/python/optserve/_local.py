"""The same-host transport's client side: gradients and parameters through shared memory.

When the server runs on this machine (a loopback base URL), ``GET /v1/transport`` names a Unix
socket. The client connects, authenticates with its API key, and binds a session: the server
hands over an anonymous shared-memory segment holding a gradient slot and a parameter slot per
parameter. A step writes the gradients into their slots (one copy), sends a small message, and
finds the new parameters in their slots (written there by the server: no socket transfer, no
serialization), which ``RemoteOptimizer``'s parameters may live in (``optserve._zero_copy``).
Only the connection that bound a segment holds it; a crashed client's segments go with its
connection. The server's own docs: ``app/transport/local.py``.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from . import _tensors
from ._exceptions import APIStatusError, OptserveError, make_status_error
from ._gc import gc_paused
from ._tensors import TensorLike

_HEAD = struct.Struct("<I")
PROTOCOL = 1
_NUMPY = {"float16": np.float16, "float32": np.float32, "float64": np.float64,
          "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
          "uint8": np.uint8, "bool": np.bool_}


class LocalUnavailable(OptserveError):
    """The same-host transport cannot be used: with ``transport="auto"`` the client falls
    back to HTTP; with ``transport="local"`` it is raised (``optserve.LocalUnavailable``)."""


class _SlotMismatch(LocalUnavailable):
    """A gradient's dtype or shape is not its slot's: the binding may be stale (the session
    made again with other shapes since it was bound), or the gradient wrong (the server says
    which over HTTP)."""


@dataclass
class Binding:
    number: int
    map: mmap.mmap
    layout: list[dict[str, Any]]
    grads: dict[str, Any] = field(default_factory=dict)  # writable views (torch or numpy)
    params: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        self.grads.clear()
        self.params.clear()
        try:
            self.map.close()
        except BufferError:
            pass


def _views(buf: mmap.mmap, layout: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Tensors (torch when the SDK returns torch tensors, else numpy) over one kind of slot."""
    torch = _tensors.torch if _tensors.USE_TORCH else None
    out: dict[str, Any] = {}
    base = np.frombuffer(buf, dtype=np.uint8)
    for slot in layout:
        start, n = int(slot[key]), int(slot["nbytes"])
        raw = base[start:start + n]
        shape = tuple(slot["shape"])
        if torch is not None:
            dtype = getattr(torch, slot["dtype"])
            out[slot["name"]] = torch.from_numpy(raw).view(dtype).view(shape)
        elif slot["dtype"] in _NUMPY:
            out[slot["name"]] = raw.view(_NUMPY[slot["dtype"]]).reshape(shape)
        else:
            raise LocalUnavailable(f"{slot['dtype']} needs torch on the client")
    return out


class LocalChannel:
    """One connection to the server's same-host socket, and the sessions bound on it."""

    def __init__(self, path: str, api_key: str | None, timeout: float | None) -> None:
        self.path = path
        self.api_key = api_key
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._bindings: dict[str, Binding] = {}
        #: sessions the server would not bind (its limit of bindings per connection): over
        #: HTTP until a binding of this connection is let go
        self._refused: set[str] = set()
        #: sessions the server would not bind for its bound on all connections together
        #: (``server_bindings_full``): over HTTP until this time (``time.monotonic``; its
        #: ``Retry-After``), then asked again
        self._refused_until: dict[str, float] = {}
        #: sessions whose slots this process cannot view (a bfloat16 parameter without torch):
        #: over HTTP for as long as this connection lasts, not bound again at every step
        self._unviewable: dict[str, str] = {}
        self._lock = threading.Lock()
        #: closed for good (its client was closed): no connecting again
        self._ended = False
        #: sessions whose ``RemoteOptimizer`` was garbage collected, unbound at this channel's
        #: next step (:meth:`release_later`)
        self._dropped: list[str] = []

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        if self._ended:
            raise LocalUnavailable("the client was closed")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise LocalUnavailable(f"cannot connect to {self.path}: {exc}") from None
        self._sock = sock
        try:
            answer, _ = self._exchange({"op": "hello", "key": self.api_key,
                                        "protocol": PROTOCOL})
        except OSError as exc:
            # taken, then dropped before the hello was answered (a server killed just then:
            # its socket still took connections): no more usable than a refused one, and the
            # caller looks for the socket the server names now (_exchange closed this one)
            raise LocalUnavailable(f"{self.path} dropped the connection: {exc}") from None
        if not answer.get("ok"):
            self.close()
            raise LocalUnavailable(f"the server refused the connection: {answer}")

    def close(self) -> None:
        for binding in self._bindings.values():
            binding.close()
        self._bindings.clear()
        self._refused.clear()
        self._refused_until.clear()
        self._unviewable.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def connected(self) -> bool:
        """Whether it holds a connection (not closed after a failure)."""
        return self._sock is not None

    def close_when_free(self) -> None:
        """:meth:`close` for good, once no call of another thread is in flight on it (a step
        under way ends with its values)."""
        with self._lock:
            self._ended = True
            self.close()

    def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        assert self._sock is not None
        chunks, got = [], 0
        while got < n:
            data, new_fds, _, _ = socket.recv_fds(self._sock, n - got, 4)
            fds.extend(new_fds)
            if not data:
                raise ConnectionError("the server closed the connection")
            chunks.append(data)
            got += len(data)
        return b"".join(chunks)

    def _exchange(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        import json

        if self._sock is None:
            raise ConnectionError("not connected")
        body = json.dumps(message, allow_nan=False).encode()
        fds: list[int] = []
        try:
            self._sock.sendall(_HEAD.pack(len(body)) + body)
            (length,) = _HEAD.unpack(self._recv_exact(_HEAD.size, fds))
            answer = json.loads(self._recv_exact(length, fds))
        except BaseException:
            # the frames on the connection are past knowing (a request sent in part, an answer
            # left unread: a KeyboardInterrupt, a timeout): the next exchange would read this
            # one's answer as its own. It is closed (the next step connects again); so are
            # the descriptors of an answer read in part
            for fd in fds:
                os.close(fd)
            self.close()
            raise
        return answer, fds

    def call(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """One request; the typed SDK error for a problem answer."""
        answer, fds = self._exchange(message)
        if not answer.get("ok"):
            for fd in fds:
                os.close(fd)
            problem = dict(answer.get("problem") or {})
            status = int(problem.get("status", 500))
            response = httpx.Response(status, json=problem,
                                      request=httpx.Request("POST", f"local:{self.path}"))
            raise make_status_error(response)
        return answer, fds

    # ------------------------------------------------------------------ sessions
    def binding(self, session_id: str, tensors: int = 0) -> Binding:
        """The session's binding, made on first use. ``tensors``: about how many parameters the
        session has: from 1,000 on, the collector is paused while the binding is made (its
        layout, a dict per parameter, and two views per parameter; a local exchange the server
        answers at once, made once per session: see optserve._gc)."""
        found = self._bindings.get(session_id)
        if found is not None:
            return found
        if session_id in self._refused:
            raise LocalUnavailable("the server holds as many bindings as it allows")
        if session_id in self._unviewable:
            raise LocalUnavailable(self._unviewable[session_id])
        until = self._refused_until.get(session_id)
        if until is not None:
            if time.monotonic() < until:
                raise LocalUnavailable("the server holds as many bindings as it allows")
            del self._refused_until[session_id]
        try:
            with gc_paused(tensors):
                answer, fds = self.call({"op": "bind", "session": session_id})
        except APIStatusError as exc:
            if exc.problem.get("code") == "too_many_bindings":
                # this session goes over HTTP (without asking again each step) until a
                # binding of this connection is let go
                self._refused.add(session_id)
                raise LocalUnavailable(str(exc.problem.get("detail"))) from None
            if exc.problem.get("code") == "server_bindings_full":
                # the server's bound on all its connections: this session goes over HTTP,
                # asking again once its Retry-After has passed (others may have let go)
                wait = exc.problem.get("retry_after")
                wait = float(wait) if isinstance(wait, (int, float)) and wait > 0 else 1.0
                self._refused_until[session_id] = time.monotonic() + min(wait, 60.0)
                raise LocalUnavailable(str(exc.problem.get("detail"))) from None
            raise
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise LocalUnavailable("the server sent no shared segment")
        try:
            buf = mmap.mmap(fds[0], int(answer["size"]), mmap.MAP_SHARED,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fds[0])
        layout = list(answer["params"])
        try:
            with gc_paused(len(layout)):  # (two views per parameter: see optserve._gc)
                binding = Binding(int(answer["binding"]), buf, layout,
                                  _views(buf, layout, "grad"), _views(buf, layout, "param"))
        except LocalUnavailable as exc:
            # let the server's segment go now (it would hold it until the connection closed,
            # one more at every step), and do not ask again for this session
            self._unviewable[session_id] = str(exc)
            try:
                buf.close()
            except BufferError:  # (a view made before the failure: freed with it)
                pass
            try:
                self.call({"op": "unbind", "binding": int(answer["binding"])})
            except Exception:  # noqa: BLE001 - the connection may be gone; nothing to free
                pass
            raise
        self._bindings[session_id] = binding
        return binding

    def release(self, session_id: str) -> None:
        """Unbind a session (deleted, or no longer stepped here): the server and this
        process let go of its segment now, not when the connection closes."""
        with self._lock:
            self._unviewable.pop(session_id, None)
            self.forget(session_id)

    def release_later(self, session_id: str) -> None:
        """:meth:`release` at this channel's next step: what a garbage collector's finalizer
        may do (it runs at any allocation, in any thread, maybe while this thread holds the
        lock or is mid-exchange), a list's append only."""
        self._dropped.append(session_id)

    def forget(self, session_id: str) -> None:
        binding = self._bindings.pop(session_id, None)
        if binding is not None:
            self._refused.clear()
            try:
                self.call({"op": "unbind", "binding": binding.number})
            except Exception:  # noqa: BLE001 - the connection may be gone; nothing to free
                pass
            binding.close()

    def step(self, session_id: str, grads: Mapping[str, TensorLike], *, return_params: bool,
             base_version: int | None, worker: str | None,
             param_groups: dict[str, Any] | None, key: str,
             scalars: dict[str, float] | None = None, history_only: bool = False
             ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Write the gradients into their slots, step, and return (the answer's scalars, the
        parameter slots' views or None). The views hold the new values until the next call.
        ``history_only``: the answer need not carry the step's metrics (``metrics:
        "history"``)."""
        with self._lock:
            if self._ended:
                raise LocalUnavailable("the client was closed")
            while self._dropped:
                dropped = self._dropped.pop()
                if dropped != session_id:  # (stepped again here: still in use)
                    self._unviewable.pop(dropped, None)
                    self.forget(dropped)
            binding = self.binding(session_id, len(grads))
            # the collector paused while the gradients are copied into their slots, not while
            # the answer is awaited (a sync round waits for the other workers): optserve._gc
            with gc_paused(len(grads)):
                try:
                    if any(name not in binding.grads for name in grads):
                        raise _SlotMismatch("a gradient has no slot")
                    _copy_all(binding.grads, grads)
                except _SlotMismatch:
                    # parameters added since binding (add_param_group), or the session made
                    # again with other shapes: bind again, once
                    self.forget(session_id)
                    binding = self.binding(session_id, len(grads))
                    missing = [name for name in grads if name not in binding.grads]
                    if missing:
                        raise LocalUnavailable(f"no slot for {missing[0]!r}") from None
                    _copy_all(binding.grads, grads)
            message: dict[str, Any] = {
                "op": "step", "binding": binding.number, "grads": list(grads),
                "return": "params" if return_params else "none", "idempotency_key": key}
            if base_version is not None:
                message["base_version"] = base_version
            if worker is not None:
                message["worker"] = worker
            if param_groups:
                message["param_groups"] = param_groups
            if scalars:
                message["scalars"] = scalars
            if history_only:
                message["metrics"] = "history"
            try:
                answer, _ = self.call(message)
            except APIStatusError as exc:
                if exc.problem.get("code") != "binding_stale":
                    raise
                # the session was made again since it was bound (nothing was applied): bind
                # it again and send the same step (the same idempotency key) once more
                self.forget(session_id)
                binding = self.binding(session_id, len(grads))
                with gc_paused(len(grads)):
                    _copy_all(binding.grads, grads)
                message["binding"] = binding.number
                answer, _ = self.call(message)
            # (a dict of its own: the views stay readable after a close() of another thread)
            return answer, dict(binding.params) if return_params else None


def _copy_all(slots: Mapping[str, Any], grads: Mapping[str, TensorLike]) -> None:
    """Copy each gradient into its slot (:func:`_copy`), the torch tensors that fit theirs
    exactly with one ``torch._foreach_copy_`` (1,000 small tensors: one call, not 1,000)."""
    # torch itself, not the lazy proxy (whose every attribute is an import: once per tensor)
    torch = _tensors._torch_loaded() or _tensors.torch
    tensor = torch.Tensor if torch is not None else ()
    strided = torch.strided if torch is not None else None
    dests: list[Any] = []
    srcs: list[Any] = []
    for name, grad in grads.items():
        dest = slots[name]
        if (isinstance(grad, tensor) and isinstance(dest, tensor) and grad.layout is strided
                and grad.dtype == dest.dtype and grad.shape == dest.shape):
            dests.append(dest)
            srcs.append(grad)  # (any device: copy_ brings it over)
        else:
            _copy(dest, grad)
    if dests:
        with torch.no_grad():
            torch._foreach_copy_(dests, srcs)


def _copy(dest: Any, src: Any) -> None:
    """Copy a gradient (torch tensor, numpy array or nested list) into its slot, checking
    dtype and shape as the server would (no silent casts)."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(dest, torch.Tensor):
        value = src if isinstance(src, torch.Tensor) else torch.as_tensor(np.asarray(src))
        if value.layout != torch.strided:
            raise LocalUnavailable("row-sparse gradients travel over HTTP")
        if value.dtype != dest.dtype or tuple(value.shape) != tuple(dest.shape):
            raise _SlotMismatch("dtype or shape differ: let the server say which")
        with torch.no_grad():
            dest.copy_(value.detach())
        return
    arr = np.asarray(src)
    if arr.dtype != dest.dtype or arr.shape != dest.shape:
        raise _SlotMismatch("dtype or shape differ: let the server say which")
    np.copyto(dest, arr)
