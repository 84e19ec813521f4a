"""A step's answer written as its chunks are stepped, for a caller that sends it meanwhile.

A large parameter stepped in chunks (:mod:`app.engine.chunked`) has each chunk's new values
ready while the next chunk steps. A caller that answers with the parameters' bytes (a binary
step answer written over the spent gradients, ``params_into``) hands the step an
:class:`AnswerStream`: the step tells it, on the worker thread, the answer's scalars once they
are known (:meth:`AnswerStream.begin`, before the first chunk steps; the head goes out
once the first chunk has stepped, past torch's own checks of the step), then copies each
chunk's values into the answer's view of that chunk while it is still in the cache and says
which bytes of the answer's buffer are final (:meth:`AnswerStream.copy_chunk`, through
:class:`ChunksInto`, which :func:`app.engine.chunked.step` calls). The caller's
``on_begin``/``on_ready`` run on the worker thread and must only hand over (e.g.
``loop.call_soon_threadsafe``).

A step whose log record is written from the very request body its answer is written over
(durability ``step``: written beside the step, :meth:`EmbeddedHost._apply_while_syncing
<app.engine.host.EmbeddedHost._apply_while_syncing>`) is held (:meth:`AnswerStream.hold`):
its head may go out once the first chunk has stepped and its chunks step on, but no value is
copied into the answer before the record's write has returned; the copies asked meanwhile
are made at the next copy after that, the rest at the step's end
(:meth:`AnswerStream.release`, which waits for it).

The stream only says which bytes are written: whether the step is done (applied, logged,
remembered) is the operation's result, which the caller waits for before it lets the last
byte go (all or nothing: a step that fails after the first bytes went out leaves the session
as it was, and its answer is never complete).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from app.engine.interface import json_floats
from app.wire.tensor_maps import PackedTensors


class RecordWritten(threading.Event):
    """Set once a step's log record's write (durability ``step``, written beside the step
    from the body the answer is written over) has returned; ``ok`` then says whether it
    succeeded. A streamed answer held for it (:meth:`AnswerStream.hold`) copies nothing and
    lets no head out before it is set with ``ok``: a failed write, a full disk, is answered
    whole, as its 507, not as an answer cut short."""

    ok = False


class AnswerStream:
    """An answer buffer (``tensors``: one view per parameter, in the parameters' dtypes or
    narrowed to ``dtype``, tiling ``tensors.buffer``) filled as the step goes."""

    def __init__(self, tensors: PackedTensors, dtype: torch.dtype | None,
                 on_begin: Callable[[dict[str, Any]], None],
                 on_ready: Callable[[int], None]) -> None:
        self.tensors = tensors
        self.dtype = dtype
        self._on_begin = on_begin
        self._on_ready = on_ready
        self.began = False
        #: the scalars the answer was begun with (checked against the step's own result)
        self.scalars: dict[str, Any] | None = None
        buffer = tensors.buffer
        assert buffer is not None
        self._start = int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data)
        #: byte ranges written but not yet part of the ready prefix
        self._pending: dict[int, int] = {}
        self._ready = 0
        #: set: copies may be made (:meth:`hold`); None: at once
        self._until: RecordWritten | None = None
        #: copies asked while held: (the answer's view, the stepped values)
        self._waiting: list[tuple[torch.Tensor, torch.Tensor]] = []
        #: a chunk has stepped (torch's first call for the chunked parameters returned)
        self._chunk_stepped = False
        #: ``on_begin`` called: the head may go out
        self._announced = False

    def hold(self, until: RecordWritten) -> None:
        """Copy nothing into the answer before ``until`` is set (its buffer is what the
        step's log record is being written from): copies asked before are kept (the stepped
        values are the parameters' own, unchanged until the next step) and made at the next
        copy after it, or at :meth:`release`. Nor let the head go out before it is set with
        its ``ok`` true: a step whose write failed (a full disk) is
        answered whole, as its refusal, not as an answer cut short."""
        self._until = until

    @property
    def held(self) -> bool:
        """Whether the caller arranged for the copies to wait (:meth:`hold`)."""
        return self._until is not None

    def release(self) -> None:
        """The step is done: wait until the answer may be written (:meth:`hold`), then make
        the copies still waiting."""
        if self._until is not None:
            self._until.wait()
        if not self._written():
            return  # (the write failed: the step fails, answered whole)
        self._chunk_stepped = True
        self._announce()
        self._copy([])

    def begin(self, scalars: dict[str, Any]) -> None:
        """The answer's scalars are known: its head goes out once the first chunk has stepped
        (:meth:`copy_chunk`), not before: torch checks a step's parameters and options in its
        first ``optimizer.step()`` call, and a step it refuses there must get its 4xx, not a
        cut 200 that a client would retry as a lost answer."""
        self.began = True
        self.scalars = scalars

    def _announce(self) -> None:
        """The head may go out once a chunk has stepped and the held-for write, if any, has
        returned well."""
        if (self._announced or self.scalars is None or not self._chunk_stepped
                or not self._written()):
            return
        self._announced = True
        self._on_begin(self.scalars)

    def _written(self) -> bool:
        """No hold, or the held-for write has returned well (:meth:`hold`)."""
        until = self._until
        return until is None or (until.is_set() and until.ok)

    def mismatch(self, version: int, step: int, lr: list[float]) -> str | None:
        """What differs between the scalars the step ended at and those its answer began with
        (its head is out: such an answer must not be completed), or None."""
        began = self.scalars or {}
        if (began.get("version"), began.get("step")) == (version, step) \
                and began.get("lr") == json_floats(lr):
            return None
        return (f"the step's answer began with version {began.get('version')}, step "
                f"{began.get('step')}, lr {began.get('lr')}; it ended at {version}, {step}, "
                f"{json_floats(lr)}")

    def copy_whole(self, names: list[str], params: dict[str, torch.Tensor]) -> None:
        """Copy whole parameters (those not stepped in chunks) into the answer."""
        if not names:
            return
        self._copy([(self.tensors[n], params[n]) for n in names])

    def copy_chunk(self, name: str, a: int, b: int, values: torch.Tensor) -> None:
        """Copy elements ``a:b`` of parameter ``name`` (``values``, just stepped) into the
        answer (narrowed where the answer is)."""
        self._chunk_stepped = True
        self._announce()
        self._copy([(self.tensors[name].view(-1)[a:b], values)])

    def _copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy each pair's values into its view of the answer, after those waiting, or keep
        them all waiting while the answer is held."""
        if self._until is not None and not self._until.is_set():
            self._waiting.extend(pairs)
            return
        if not self._written():
            return  # (the write failed: nothing goes out, the step fails)
        self._announce()  # (held: the head waited for the write)
        if self._waiting:
            pairs, self._waiting = [*self._waiting, *pairs], []
        if not pairs:
            return
        dest = [d for d, _ in pairs]
        with torch.no_grad():
            torch._foreach_copy_(dest, [v for _, v in pairs])
        for t in dest:
            self._mark(t.data_ptr() - self._start, t.nbytes)

    def _mark(self, offset: int, nbytes: int) -> None:
        if nbytes == 0:
            return
        self._pending[offset] = offset + nbytes
        ready = self._ready
        while ready in self._pending:
            ready = self._pending.pop(ready)
        if ready != self._ready:
            self._ready = ready
            self._on_ready(ready)


class ChunksInto:
    """The chunked step's :class:`~app.engine.chunked.ChunkAnswer` for one step: parameters
    not stepped in chunks copied whole once they are stepped, each chunk as it is."""

    def __init__(self, stream: AnswerStream, params: dict[str, torch.Tensor],
                 chunked: list[torch.Tensor]) -> None:
        self._stream = stream
        self._params = params
        ids = {id(p) for p in chunked}
        self._names = {id(p): n for n, p in params.items() if id(p) in ids}
        self._whole = [n for n, p in params.items() if id(p) not in ids]

    def whole_stepped(self) -> None:
        self._stream.copy_whole(self._whole, self._params)

    def chunk_stepped(self, param: torch.Tensor, a: int, b: int, view: torch.Tensor) -> None:
        self._stream.copy_chunk(self._names[id(param)], a, b, view)

    def finish(self) -> None:
        """Every chunk has stepped: the copies still held back are made
        (:meth:`AnswerStream.release`)."""
        self._stream.release()
