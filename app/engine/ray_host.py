"""The Ray engine: session hosts as named, detached Ray actors behind the same front.

**Hosts.** A host is a detached Ray actor named ``h-<hex>`` in the namespace
``OPTSERVE_RAY_NAMESPACE`` running the embedded host's code (:class:`HostActor` wraps an
:class:`app.engine.host.EmbeddedHost`): the sessions of one device (the GPU, or GPU share, Ray
gave it; else its CPUs), its worker thread and its store, rooted at
``<OPTSERVE_DATA_DIR>/hosts/<name>/`` on storage every node reaches (the same snapshot + log
format as the embedded engine's). It asks Ray for a resource shape (``num_cpus``, ``num_gpus``,
``memory``, custom resources) fixed at its start and written to ``hosts/<name>/host.json``.

**Placement.** A create names the resources its session needs (``"resources"``, default
``OPTSERVE_RAY_RESOURCES``); only hosts of exactly that shape hold it. ``"placement"`` (default
``OPTSERVE_RAY_PLACEMENT``) chooses among them:

- ``spread``: a new host while the cluster has room for one of this shape (Ray's ``SPREAD``
  strategy puts it on the least loaded node) beside every host of the data directory (one
  restarting, or killed for good, keeps its room), else the host of this shape with the fewest
  sessions;
- ``pack``: the host of this shape with the most sessions that still has room
  (``OPTSERVE_RAY_SESSIONS_PER_HOST``, 0 = no limit), else a new host (Ray's default strategy,
  which fills a node before the next).

A sharded session's shards go to distinct hosts (new ones as needed). Where a new host is
needed and the cluster has no room for it beside every host, the room Ray has free may be that
of a host that holds sessions and is not placed (of any shape): those hosts are asked first,
and while the room is still theirs the create is a 503 ``no_capacity`` that starts nothing
(:meth:`RayRouter._room_not_theirs`); where Ray has no room at all, the new host is started and
waits for room, as before (an autoscaler's cue). A new host, or a host of the shape that does
not answer picked for want of room (:meth:`RayRouter._placed_again`), is waited for up to
``host_start_timeout_s``, then the create is a 503 ``no_capacity``; the hosts a failed
placement started for a sharded session's other shards are given up with it
(:meth:`RayRouter._retire`).

**Finding sessions.** The directory (:mod:`app.engine.directory`, files under
``<data dir>/directory``) maps each session key to its host's name; a front finds the actor by
name (``ray.get_actor``), so any number of fronts serve the same sessions. A host actor that is
gone (a cluster restart, a kill without restart) is started again from ``host.json`` by the
first front that needs it, and restores its sessions from storage.

**Creates cut short.** A create's entry carries its creation's ``made``; a host makes a
session only for the creation its entry names, under a per-key lock that a front takes too
(:meth:`HostActor.forget`) before it drops the entry of a create whose front died: so a host
still making the session then is waited for (its entry kept), and one asked later makes
nothing (:meth:`RayRouter._drop_unheld`). No host holds a session no entry names.

**Deletes.** A delete marks the session's create key deleted in the directory before any host
deletes the session (a retried create is answered with the session while its hosts all hold
it, else 409 ``session_deleted``), and a keyed delete is kept there before its hosts are
asked (with the creation it deletes) and again once they deleted it, so its retry is answered
through any front, and spares a session made again with the id since
(:meth:`RayRouter.delete`).

**Failures.** Hosts have ``max_restarts=-1``: Ray restarts a host whose process dies or whose
node goes away, on any node with room; its start restores every session it holds (snapshot,
then the log replayed through the same operations). A request in flight when its host dies,
or sent while it restarts, gets 503 ``host_restarting`` with ``Retry-After`` (the operation may
or may not have been applied: a retry with the same ``Idempotency-Key`` is answered, not applied
twice, since the key is in the operation's log record). Reads are retried by the front itself
for a few seconds first.

**One commit.** Host actors are detached and run the code installed on their node, so a front
of one optserve commit may meet a host of another. Before its first call to a host actor (each
handle: again once :meth:`RayHost._dead` took a new one) a front asks its code version
(:func:`app.code_version.code_version`); a host of another commit, or one from before the
method (its handle has no such method), answers that call and every later one 503
``host_version_mismatch`` without being asked anything, and the front logs it once. The check
is made again every :data:`VERSION_RECHECK_S` while it fails, so hosts an operator replaced
are served.

**Tensors** cross the process boundary as numpy arrays (Ray's object store hands them to the
other side without a copy); parameters come back as one buffer the front re-views as the
packed safetensors body it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import ray
import torch
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

from app.code_version import code_version
from app.engine.chunked import DEFAULT_CHUNK
from app.engine.deleted_creates import (
    indexed_session,
    refused_at_start,
    session_refused,
)
from app.engine.directory import CreateMark, Directory, entry_at
from app.engine.free_space import FreeSpace
from app.engine.front import Front, Limits
from app.engine.held_entries import HeldEntries
from app.engine.history import HistoryQuery, HistoryResult
from app.engine.host import EmbeddedHost, HostConfig
from app.engine.idempotency import key_reused
from app.engine.interface import (
    CreateSpec,
    EngineStatus,
    EntriesOp,
    EntriesRefusal,
    EntriesUnknown,
    GroupSpec,
    HeaderEntries,
    IdemKey,
    ParamsResult,
    ReturnParams,
    SessionInfo,
    StateExport,
    StepResult,
    Tensors,
    no_session,
    split_key,
)
from app.engine.kept_entries import HOST_JSON, KeptEntries
from app.engine.last_versions import first_after
from app.engine.ops import CreateSession, Expected, Operation, decode, wire_tree
from app.engine.placement import check_resources, shape_key
from app.engine.router import Admit, Checked, Host, InProcessHost, SessionHost, parent_key
from app.engine.shards import (
    RevisionTip,
    ShardedSession,
    ShardLayout,
    Tip,
    check_shardable,
    history_refused,
    layout_refusal,
    plan_layout,
    scalars_refused,
    shard_key,
)
from app.engine.store import Files, storage_failure, write_atomic
from app.errors import Conflict, Invalid, NotFound, OptserveError, Unavailable
from app.wire.dtypes import DTYPE_NAMES, TORCH_DTYPES
from app.wire.safetensors_body import PackedTensors

log = logging.getLogger("optserve.ray")
#: how long the front retries a read while the session's host restarts
READ_RETRY_S = 10.0
#: how long the front holds a failed operation's 503 while its host restarts, so that the
#: client's retry (after Retry-After) finds the host back
RESTART_WAIT_S = 60.0
#: how long a front answers a host of another commit 503 before it asks the host's code
#: version again (the host replaced by an operator meanwhile), and that 503's Retry-After
VERSION_RECHECK_S = 10.0


# ============================================================================ the wire
@dataclass
class WireTensor:
    """A tensor as a numpy array Ray moves without a copy (bfloat16 travels as its bits)."""

    dtype: str
    array: np.ndarray[Any, Any]


@dataclass
class PackedWire:
    """Packed parameters: the buffer and where each tensor lies in it."""

    buffer: np.ndarray[Any, Any]
    entries: list[tuple[str, str, list[int], int]]


@dataclass
class SparseWire:
    """A row-sparse tensor (a sparse COO gradient): its indices and values as sent (duplicates
    and order kept, so the optimizer sums them as torch would), its dense shape."""

    indices: np.ndarray[Any, Any]
    values: WireTensor
    shape: list[int]
    coalesced: bool


def tensor_to_wire(t: torch.Tensor) -> WireTensor | SparseWire:
    t = t.detach()
    if t.layout == torch.sparse_coo:
        values = tensor_to_wire(t._values())
        assert isinstance(values, WireTensor)
        return SparseWire(t._indices().cpu().contiguous().numpy(), values, list(t.shape),
                          t.is_coalesced())
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return WireTensor("bfloat16", t.view(torch.int16).numpy())
    return WireTensor(DTYPE_NAMES[t.dtype], t.numpy())


def tensor_from_wire(w: WireTensor | SparseWire) -> torch.Tensor:
    if isinstance(w, SparseWire):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            indices = torch.from_numpy(w.indices)
        return torch.sparse_coo_tensor(indices, tensor_from_wire(w.values), tuple(w.shape),
                                       is_coalesced=w.coalesced, check_invariants=False)
    with warnings.catch_warnings():
        # arrays from Ray's object store are read-only views; nothing here writes into them
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(w.array)
    return t.view(torch.bfloat16) if w.dtype == "bfloat16" else t


def tree_to_wire(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensor_to_wire(obj)
    if isinstance(obj, dict):
        return {k: tree_to_wire(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_to_wire(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(tree_to_wire(v) for v in obj)
    return obj


def tree_from_wire(obj: Any) -> Any:
    if isinstance(obj, (WireTensor, SparseWire)):
        return tensor_from_wire(obj)
    if isinstance(obj, dict):
        return {k: tree_from_wire(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tree_from_wire(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(tree_from_wire(v) for v in obj)
    return obj


def packed_to_wire(p: Tensors) -> PackedWire:
    if not isinstance(p, PackedTensors):
        from app.wire.safetensors_body import pack
        p = pack(p)
    base = np.frombuffer(p.buffer, dtype=np.uint8)
    start = base.ctypes.data
    entries = [(n, DTYPE_NAMES[t.dtype], list(t.shape), t.data_ptr() - start if t.numel() else 0)
               for n, t in p.items()]
    return PackedWire(base, entries)


def packed_from_wire(w: PackedWire) -> PackedTensors:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = torch.from_numpy(w.buffer)
    out = PackedTensors()
    for name, dtype_name, shape, offset in w.entries:
        dtype = TORCH_DTYPES[dtype_name]
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out[name] = base[offset:offset + n].view(dtype).view(shape)
    out.buffer = w.buffer.data.cast("B")
    return out


def result_to_wire(result: Any) -> Any:
    if isinstance(result, (StepResult, ParamsResult)) and result.params is not None:
        params = result.params
        if not isinstance(params, PackedTensors) and any(  # (rows: a row pull's, a step's
                t.layout == torch.sparse_coo for t in params.values()):  # touched ones)
            rows = {n: tensor_to_wire(t) for n, t in params.items()}
            return dataclasses.replace(result, params=rows)  # type: ignore[arg-type]
        return dataclasses.replace(result, params=packed_to_wire(params))  # type: ignore[arg-type]
    if isinstance(result, StateExport):
        return dataclasses.replace(result, state_dict=tree_to_wire(result.state_dict))
    return result


def result_from_wire(result: Any) -> Any:
    if isinstance(result, (StepResult, ParamsResult)) and isinstance(result.params, PackedWire):
        return dataclasses.replace(result, params=packed_from_wire(result.params))
    if isinstance(result, (StepResult, ParamsResult)) and isinstance(result.params, dict):
        return dataclasses.replace(result, params={
            n: tensor_from_wire(w) for n, w in result.params.items()})  # type: ignore[arg-type]
    if isinstance(result, StateExport):
        return dataclasses.replace(result, state_dict=tree_from_wire(result.state_dict))
    return result


def op_to_wire(op: Operation) -> tuple[str, Any]:
    return op.kind, tree_to_wire(wire_tree(op))


def op_from_wire(wire: tuple[str, Any]) -> Operation:
    kind, tree = wire
    return decode(kind, tree_from_wire(tree))


def spec_to_wire(spec: CreateSpec) -> CreateSpec:
    groups = [GroupSpec(tree_to_wire(g.params), g.options) for g in spec.groups]
    return dataclasses.replace(spec, groups=groups)


def spec_from_wire(spec: CreateSpec) -> CreateSpec:
    groups = [GroupSpec(tree_from_wire(g.params), g.options) for g in spec.groups]
    return dataclasses.replace(spec, groups=groups)


def check_create(spec: CreateSpec, default_nonfinite: Any) -> None:
    """Every check a create makes (names, dtypes, options with torch's own validation, the
    scheduler, parameter-server options), on one-element stand-ins of its parameters: a bad
    create is refused before a host is chosen or started."""
    groups = [GroupSpec({n: torch.zeros([1] * t.dim(), dtype=t.dtype) if t.is_floating_point()
                         else t for n, t in g.params.items()}, g.options) for g in spec.groups]
    check_shardable(spec)
    if spec.optimizer == "LBFGS":  # its steps are evaluations, which only the embedded host runs
        raise Invalid("LBFGS: offered only by the embedded engine (its steps ask the client "
                      "for evaluations, which a Ray host does not run)",
                      code="not_supported_here", field="optimizer")
    standin = dataclasses.replace(spec, groups=groups, id=None)
    CreateSession.from_spec(standin, "check", spec.nonfinite or default_nonfinite,
                            "memory").build(torch.device("cpu"))


def _hosts_of(key: str, entry: dict[str, Any]) -> list[tuple[str, str]]:
    """Where a directory entry's session lies: (host name, the key there) for its host, or for
    each shard's host."""
    if "host" in entry:
        return [(str(entry["host"]), key)]
    return [(str(name), shard_key(key, i, len(entry["shards"])))
            for i, name in enumerate(entry["shards"])]


# ============================================================================ the actor
#: how many dropped creations a host keeps (:meth:`HostActor.forget`)
_DROPPED_KEPT = 4096


def _dropped_as(key: str, made: str | None) -> str:
    """What :attr:`HostActor._dropped` keeps of a creation dropped on a host: its ``made``;
    the host key of an entry of an older version, which has none (no ``~`` in a ``made``)."""
    return made if made is not None else key


def create_dropped(key: str) -> Unavailable:
    """503 ``create_dropped``: a host asked to make a session whose create a front dropped
    (its front died while the host was asked; another front dropped its directory entry);
    nothing was made. A keyed create's retry makes it again."""
    return Unavailable(f"the create of session {split_key(parent_key(key))[1]!r:.140} was cut "
                       "short and dropped; nothing was made: retry it (with the same "
                       "Idempotency-Key)", code="create_dropped", retry_after=1.0)


class HostActor:
    """A session host in a Ray actor: the embedded host's code, its store under
    ``<data dir>/hosts/<name>``. Its start restores the sessions stored there (after Ray
    restarts it too). Methods take and return the wire forms above."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        self.name = name
        self.config = config
        self._host: InProcessHost | None = None
        self._starting: asyncio.Task[InProcessHost] | None = None
        #: sharded sessions' coordinators by key, with the creation each is of (its entry's
        #: "made"): one made again with a deleted one's id never gets the deleted one's
        self._coordinators: dict[str, tuple[str | None, ShardedSession]] = {}
        #: the directory (``<data dir>/directory``), which says which creation is current
        self._directory = Path(config["root"]).parent.parent / "directory"
        #: the entries of the sessions held here, written again after the data directory was
        #: removed while the server ran
        self._kept = KeptEntries(self._directory, Path(config["root"]), config.get("host_json"))
        self._peers: dict[str, RayHost] = {}
        #: per host key: held by a create from its check of the directory until the session
        #: is made (or refused), and by a front's :meth:`forget` (see :meth:`create`)
        self._making: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        #: the creations (entries' ``made``; an older entry's: its key, :func:`_dropped_as`) a
        #: front dropped: never made here (the last :data:`_DROPPED_KEPT`, in memory: a create
        #: in flight does not outlive its actor)
        self._dropped: OrderedDict[str, None] = OrderedDict()
        #: set by :meth:`retire`: this host makes no session any more (a front kills it)
        self._retired = False

    async def _ready(self) -> InProcessHost:
        if self._host is not None:
            return self._host
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._start())
        return await asyncio.shield(self._starting)

    async def _start(self) -> InProcessHost:
        c = self.config
        root = Path(c["root"])
        host = EmbeddedHost(HostConfig(
            device=c["device"], torch_threads=c["torch_threads"],
            step_chunk=c.get("step_chunk", DEFAULT_CHUNK),
            default_nonfinite=c["default_nonfinite"], data_dir=root,
            durability=c["durability"], snapshot_every_steps=c["snapshot_every_steps"],
            snapshot_every_s=c["snapshot_every_s"],
            snapshot_every_mb=c.get("snapshot_every_mb", 1024.0),
            max_open_logs=c.get("max_open_logs", 0),
            fsync_interval_s=c["fsync_interval_s"],
            idempotency_window=c["idempotency_window"], warm_up=c["warm_up"],
            data_dir_wait_s=c.get("data_dir_wait_s", 30.0),
            ready_min_free_bytes=c.get("ready_min_free_bytes", 0),
            # (its own last versions are not used: a sharded session's shards are on several
            # hosts, and a session made again may land on another host. Its deletes write
            # theirs into the directory, and a front passes each create its first version,
            # CreateSpec.first_version: app.engine.last_versions)
            continue_versions=False))
        started = time.perf_counter()
        wrapped = InProcessHost(host, self.name)
        await wrapped.start()
        for key in {parent_key(k) for k in host.keys()}:
            self._kept.keep(key)
        host.written_again.append(self._kept.write_again)
        host.directory_again.append(self._kept.directory_again)
        host.deleting.append(self._kept.deleting)
        log.info("host %s ready on %s with %d sessions in %.2f s", self.name, host.device,
                 len(host.keys()), time.perf_counter() - started)
        self._host = wrapped
        return wrapped

    # ------------------------------------------------------------------ about the host
    async def ping(self) -> dict[str, Any]:
        host = await self._ready()
        return {"name": self.name, "device": host.device, "pid": os.getpid(),
                "node": ray.get_runtime_context().get_node_id(),
                "sessions": len(await host.keys())}

    async def code_version(self) -> str:
        """The code this host runs (:func:`app.code_version.code_version`): a front checks it
        before its first call here (:meth:`RayHost.call`)."""
        return code_version()

    async def status(self, memory: bool) -> EngineStatus:
        return await (await self._ready()).status(memory=memory)

    async def keys(self, prefix: str) -> list[str]:
        return await (await self._ready()).keys(prefix)

    async def refused(self) -> dict[str, str]:
        return await (await self._ready()).refused()

    async def find_create(self, tenant: str, idem: IdemKey) -> str | None:
        return await (await self._ready()).find_create(tenant, idem)

    async def snapshot_and_stop(self) -> None:
        """Snapshot every session and stop (a local cluster shutting down with its front)."""
        if self._host is not None:
            await self._host.stop(snapshot=True)
            self._host = None

    # ------------------------------------------------------------------ sessions
    @contextlib.asynccontextmanager
    async def _making_lock(self, key: str) -> AsyncIterator[None]:
        lock, users = self._making.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._making[key]

    async def create(self, key: str, spec: CreateSpec, idem: IdemKey | None,
                     made: str | None = None) -> SessionInfo:
        """Make the session (a shard) of the creation ``made`` (its directory entry's), only
        while that entry is the directory's and no front dropped it: else 503
        ``create_dropped``, nothing made. The order that leaves no session without its entry
        (a front that asked for it died, kill -9, and another front drops the entry: a
        :meth:`RayRouter._drop_unheld <RayRouter._drop_unheld>`): the check and the whole
        create (its files and its place in the host's table) run under the key's lock here,
        and a front drops an entry only once every host of it answered :meth:`forget`, which
        takes that lock, with nothing held; so a create either is done before the forget,
        which then finds it held (the entry stays), or checks after it, and finds its
        creation dropped (or its entry gone). A create of an entry of an older version, which
        has no ``made`` (``made`` None: a keyed create's retry finishing it), runs so too, its
        creation named by its key: before, it took no lock, so a :meth:`retire` while it ran
        found the host empty and stopped it under it, and a :meth:`forget` found nothing held,
        and its front dropped the entry of a session then made (one without its entry)."""
        host = await self._ready()
        if self._retired:
            raise create_dropped(key)
        # (a session made on this host after the data directory was removed while the server
        # ran must find the host again at a restart: its host.json first)
        self._kept.host_json_again()
        async with self._making_lock(key):
            entry = entry_at(self._directory, parent_key(key))
            if (self._retired or _dropped_as(key, made) in self._dropped or entry is None
                    or entry.get("made") != made):
                raise create_dropped(key)
            info = await host.create(key, spec_from_wire(spec), idem=idem)
        self._kept.keep(parent_key(key), entry)
        return info

    async def forget(self, key: str, made: str | None) -> bool:
        """A front is about to drop the entry of the creation ``made``: True when this host
        holds ``key`` (or refused it at start), and the entry is to stay; else the creation
        is never made here (:meth:`create`), and False."""
        host = await self._ready()
        async with self._making_lock(key):
            if key in await host.keys(key) or key in await host.refused():
                return True
            self._dropped[_dropped_as(key, made)] = None
            while len(self._dropped) > _DROPPED_KEPT:
                self._dropped.popitem(last=False)
            return False

    async def retire(self) -> bool:
        """A front gives this host up (one it started for a create that failed: :meth:`RayRouter.
        _retire`): True when it holds no session, refused none at start and makes none, and
        then it makes none from now on (a create is 503 ``create_dropped``, nothing made: one
        through another front that picked it meanwhile) and its store stops, so the front may
        kill it and remove its folder; False, and nothing changes, where it holds or makes one
        (the front leaves it up). The check and the mark run with nothing awaited between them,
        and a create checks the mark under its key's lock (:meth:`create`): a create either
        holds that lock before the check (and is seen) or finds the mark."""
        host = await self._ready()
        embedded = host.embedded
        if self._making or embedded.keys() or embedded.refused():
            return False
        self._retired = True
        await host.stop(snapshot=False)
        return True

    async def unforget(self, key: str, made: str | None) -> None:
        """Another host of the creation ``made`` holds some of it: its entry stays, so this
        host may make its part again (a keyed create's retry finishing it)."""
        async with self._making_lock(key):
            self._dropped.pop(_dropped_as(key, made), None)

    async def execute(self, key: str, op: tuple[str, Any], idem: IdemKey | None,
                      want_params: ReturnParams) -> Any:
        host = await self._ready()
        return result_to_wire(await host.execute(key, op_from_wire(op), idem=idem,
                                                 want_params=want_params))

    async def step(self, key: str, grads: dict[str, WireTensor | SparseWire],
                   want_params: ReturnParams, worker: str | None, base_version: int | None,
                   idem: IdemKey | None,
                   options: dict[int, dict[str, Any]] | None, front: str | None = None,
                   upcast: bool = False, scalars: dict[str, float] | None = None) -> Any:
        """``front``: the identity of the front the step came through (a sync push is
        withdrawn only by that front's drain, :meth:`withdraw`)."""
        host = await self._ready()
        return result_to_wire(await host.step(
            key, {n: tensor_from_wire(w) for n, w in grads.items()}, want_params=want_params,
            worker=worker, base_version=base_version, idem=idem, options=options,
            upcast=upcast, scalars=scalars, front=front))

    async def withdraw(self, key: str, worker: str, idem: IdemKey | None,
                       front: str | None = None) -> bool:
        """Take a push that came through ``front`` and waits in the session's open sync round
        out of it (409 ``round_aborted``): that front drains (:meth:`RayRouter.drain`)."""
        return (await self._ready()).embedded.withdraw_push(key, worker, idem, front)

    async def describe(self, key: str) -> SessionInfo:
        return await (await self._ready()).describe(key)

    async def held_entries(self, key: str, idem_key: str | None, worker: str | None,
                           op: EntriesOp, expected: Expected | None) -> HeldEntries | None:
        """:meth:`EmbeddedHost.held_entries <app.engine.host.EmbeddedHost.held_entries>`: a
        front refuses a body naming more tensors than the session holds from its entries."""
        host = await self._ready()
        return host.embedded.held_entries(key, idem_key, worker, op, expected)

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        return await (await self._ready()).list_sessions(prefix)

    async def pull(self, key: str, names: list[str] | None, min_version: int | None,
                   wait_s: float, unless_versions: frozenset[int],
                   params_dtype: torch.dtype | None = None) -> Any:
        host = await self._ready()
        return result_to_wire(await host.pull(key, names, min_version=min_version,
                                              wait_s=wait_s, unless_versions=unless_versions,
                                              params_dtype=params_dtype))

    async def pull_rows(self, key: str, rows: dict[str, WireTensor | SparseWire],
                        min_version: int | None, wait_s: float,
                        unless_versions: frozenset[int], params_dtype: torch.dtype | None
                        ) -> Any:
        host = await self._ready()
        return result_to_wire(await host.pull_rows(
            key, {n: tensor_from_wire(w) for n, w in rows.items()}, min_version=min_version,
            wait_s=wait_s, unless_versions=unless_versions, params_dtype=params_dtype))

    async def export_state(self, key: str) -> Any:
        return result_to_wire(await (await self._ready()).export_state(key))

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        return await (await self._ready()).history(key, query)

    async def delete(self, key: str, idem: IdemKey | None, expected: Expected | None = None
                     ) -> bool:
        host = await self._ready()
        replayed = bool(await host.delete(key, idem=idem, expected=expected))
        session = parent_key(key)
        # (a shard's key, <tenant>#<id>~shard<i>of<S>: this host may hold other shards of it)
        if session == key or not await host.keys(key.partition("~")[0] + "~"):
            self._kept.deleted(session, idem)
        return replayed

    async def deleted_with(self, tenant: str, idem: IdemKey) -> bool:
        """Whether a delete sent with this key deleted a session of ``tenant`` (a shard 0 of
        it) here (:meth:`EmbeddedHost.deleted_with <app.engine.host.EmbeddedHost.
        deleted_with>`; 422 for another request under the key)."""
        host = await self._ready()
        assert isinstance(host, InProcessHost)
        return host.embedded.deleted_with(tenant, idem)

    async def prepare(self, key: str, op: tuple[str, Any], idem: IdemKey) -> Checked:
        return await (await self._ready()).prepare(key, op_from_wire(op), idem)

    async def commit(self, key: str, idem: IdemKey, op: tuple[str, Any] | None,
                     want_params: ReturnParams) -> Any:
        host = await self._ready()
        return result_to_wire(await host.commit(
            key, idem, op_from_wire(op) if op is not None else None, want_params=want_params))

    async def abort(self, key: str, idem: IdemKey) -> None:
        await (await self._ready()).abort(key, idem)

    async def cut_tip(self, key: str) -> Tip:
        return await (await self._ready()).cut_tip(key)

    async def revision_tip(self, key: str) -> RevisionTip:
        return await (await self._ready()).revision_tip(key)

    async def put_at_revision(self, key: str, revision: int) -> bool:
        return await (await self._ready()).put_at_revision(key, revision)

    async def holds_key(self, key: str, idem_key: str) -> bool:
        return await (await self._ready()).holds_key(key, idem_key)

    async def undo_last(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        return await (await self._ready()).undo_last(key, idem_key, want)

    # ------------------------------------------------------------------ sharded sessions
    async def coordinate(self, key: str, entry: dict[str, Any], method: str,
                         args: tuple[Any, ...]) -> Any:
        """Run a sharded session's operation on its coordinator, which lives in the host of
        its first shard (one place orders the session's operations, whichever front calls)."""
        session = await self._coordinator(key, entry)
        if method == "execute":
            op, idem, want_params = args
            return result_to_wire(await session.execute(key, op_from_wire(op), idem=idem,
                                                        want_params=want_params))
        if method == "step":
            grads, want_params, worker, base_version, idem, options, upcast = args
            return result_to_wire(await session.step(
                key, {n: tensor_from_wire(w) for n, w in grads.items()},
                want_params=want_params, worker=worker, base_version=base_version, idem=idem,
                options=options, upcast=upcast))
        if method == "describe":
            return await session.describe(key)
        if method == "pull":
            names, min_version, wait_s, unless, params_dtype = args
            return result_to_wire(await session.pull(key, names, min_version=min_version,
                                                     wait_s=wait_s, unless_versions=unless,
                                                     params_dtype=params_dtype))
        if method == "pull_rows":
            rows, min_version, wait_s, unless, params_dtype = args
            return result_to_wire(await session.pull_rows(
                key, {n: tensor_from_wire(w) for n, w in rows.items()},
                min_version=min_version, wait_s=wait_s, unless_versions=unless,
                params_dtype=params_dtype))
        if method == "export_state":
            return result_to_wire(await session.export_state(key))
        if method == "delete":
            idem, expected = args
            replayed = await session.delete(key, idem=idem, expected=expected)
            if self._coordinators.get(key, (None, None))[1] is session:
                del self._coordinators[key]
            return replayed  # (a retry every shard answered from its tombstone: True)
        raise ValueError(f"unknown method {method!r}")

    async def _coordinator(self, key: str, entry: dict[str, Any]) -> ShardedSession:
        """The coordinator of the session ``entry`` names (its ``made``: one creation of the
        key). Another one's cached (a session deleted since, made again with its id) is
        not used; an entry the directory no longer holds (a front's of a session deleted
        since) is a 404, so that its front reads the directory again (``_Placed``)."""
        made = entry.get("made")
        cached = self._coordinators.get(key)
        if cached is not None and cached[0] == made:
            return cached[1]
        current = entry_at(self._directory, key)
        if current is None or current.get("made") != made:
            raise no_session(key)
        local = await self._ready()
        layout = ShardLayout.from_json(entry["layout"])
        hosts: list[tuple[Host, str]] = []
        for i, name in enumerate(entry["shards"]):
            host: Host = local if name == self.name else self._peer(name)
            hosts.append((host, shard_key(key, i, layout.shards)))
        session = ShardedSession(key, layout, hosts,
                                 commit_timeout_s=float(self.config["commit_timeout_s"]))
        self._coordinators[key] = (made, session)
        # (made anew: the commits of the one before, if any, went with its host. Shards
        # restored from snapshots older than revisions are put at one revision, and an
        # operation that reached some shards only is undone, as the embedded engine's start
        # does; taken before any other operation can take the session's lock, and tried
        # again by its next call where a shard's host could not be reached)
        await session.settle()
        return session

    def _peer(self, name: str) -> RayHost:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._peers[name] = RayHost(self._peer_handle(name), name,
                                               revive=lambda: self._peer_handle(name))
        return peer

    def _peer_handle(self, name: str) -> Any:
        """A shard's host actor, started again from its ``host.json`` when Ray has none by
        this name (killed for good, its cluster restarted), as a front does
        (:meth:`RayRouter._handle`): a front calls a sharded session's coordinator only, so
        nothing else would start it, and the session answered a 500 ``host_failed`` (the
        lookup's error) until an operator did."""
        namespace = self.config["namespace"]
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            pass
        hosts_dir = Path(self.config["root"]).parent
        try:
            saved = orjson.loads((hosts_dir / name / HOST_JSON).read_bytes())
        except FileNotFoundError:
            raise NotFound(f"host {name} is gone", code="session_not_found") from None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise Unavailable(f"a shard's host {name} cannot be started: its {HOST_JSON} "
                              f"cannot be read ({exc})", code="storage_error",
                              retry_after=30.0) from None
        options = self.config.get("host_options")
        if options is None:  # (a host started before the key: its own options, as given)
            options = {k: v for k, v in self.config.items()
                       if k not in ("root", "namespace", "commit_timeout_s", "host_json")}
        log.warning("shard host %s has no actor: starting it again (it restores its "
                    "sessions)", name)
        return spawn_host(_actor_class(), name, saved, options, hosts_dir, namespace,
                          float(self.config["commit_timeout_s"]))


# ============================================================================ the client
def _unwrap(exc: BaseException, name: str) -> BaseException:
    """An actor's exception as the front raises it: its own error, or 503 for an outage."""
    if isinstance(exc, RayTaskError):
        cause = exc.cause
        if isinstance(cause, OptserveError):
            return cause
        if isinstance(cause, RayActorError):
            return _unwrap(cause, name)
        return OptserveError(f"host {name} failed: {type(cause).__name__}: {cause}",
                             code="host_failed")
    if isinstance(exc, RayActorError):
        return Unavailable(f"the session's host ({name}) is restarting; the operation may or "
                           "may not have been applied: retry it with the same Idempotency-Key",
                           code="host_restarting", retry_after=1.0)
    return exc


def _arg_at(args: tuple[Any, ...], at: tuple[int, ...]) -> Any:
    """``args[at[0]][at[1]]...``."""
    for i in at:
        args = args[i]
    return args


def _arg_replaced(args: tuple[Any, ...], at: tuple[int, ...], value: Any) -> tuple[Any, ...]:
    """``args`` with the argument at ``at`` (as :func:`_arg_at`) replaced by ``value``."""
    i, rest = at[0], at[1:]
    return (*args[:i], _arg_replaced(args[i], rest, value) if rest else value, *args[i + 1:])


class _VersionCheck:
    """Whether a host actor runs this process's code (:meth:`RayHost._check_version`); one per
    host, shared by its :meth:`RayHost.making` copies."""

    def __init__(self) -> None:
        #: the handle whose actor answered this process's code version: calls through it go
        self.matched: Any = None
        #: the handle whose actor runs another commit, until when that is not asked again, and
        #: its code version (None: an actor from before the check)
        self.mismatched: tuple[Any, float, str | None] | None = None
        #: the hosts' code versions logged as not this front's (each once)
        self.logged: set[str | None] = set()


def version_mismatch(name: str, theirs: str | None) -> Unavailable:
    """503 ``host_version_mismatch``: the host ``name`` runs another optserve commit than this
    process; it was asked nothing."""
    there = f"code version {theirs}" if theirs is not None else "a commit from before versions"
    return Unavailable(f"the session's host {name} runs another optserve commit than this front "
                       f"({there}, here {code_version()}): fronts and host actors must run one "
                       "commit; nothing was applied (upgrading: docs/cluster.md, Several "
                       "fronts)", code="host_version_mismatch", retry_after=VERSION_RECHECK_S)


class RayHost:
    """:class:`app.engine.router.Host` over a host actor's handle (wire forms both ways; actor
    outages as 503 ``host_restarting``; a host of another commit as 503
    ``host_version_mismatch``)."""

    def __init__(self, handle: Any, name: str, device: str = "remote",
                 revive: Callable[[], Any] | None = None, front: str | None = None) -> None:
        self.handle = handle
        self.name = name
        self.device = device
        #: the identity of the front this handle is of (:attr:`RayRouter.front`): its sync
        #: pushes carry it, and its drain withdraws only those (:meth:`withdraw`)
        self.front = front
        #: the actor again by its name (started again if gone) when this handle's actor is
        #: dead for good (killed without restart, its cluster restarted)
        self.revive = revive
        #: the creation (its directory entry's ``made``) this host's creates are of
        #: (:meth:`making`; :meth:`HostActor.create`)
        self.made: str | None = None
        self._version = _VersionCheck()

    def making(self, made: str | None) -> RayHost:
        """This host, asked to make parts of the creation ``made`` only (a sharded session's
        creates its shards through it)."""
        host = copy.copy(self)
        host.made = made
        return host

    def _dead(self, exc: BaseException) -> None:
        """Take the actor again by its name when this handle's is dead for good (NotFound:
        the host is gone, its host.json too: given up, :meth:`RayRouter._handle`)."""
        if isinstance(exc, ActorDiedError) and self.revive is not None:
            try:
                self.handle = self.revive()
            except NotFound:
                raise
            except (OptserveError, ValueError):  # not there (yet): keep trying the old one
                pass

    async def call(self, method: str, *args: Any, read: bool = False,
                   wait_at: tuple[int, ...] | None = None) -> Any:
        """One actor method. A read (nothing changes) is retried while the host restarts; any
        other call that meets a restarting host answers 503 once the host is back (or after
        RESTART_WAIT_S), so the client's retry finds it. The first call through a handle
        checks that its actor runs this process's code (:meth:`_check_version`).

        ``wait_at``: where in ``args`` a long poll's wait (seconds) is (an index, then indexes
        into the tuples there): a retry waits what is left of it, not all of it again (a
        ``wait_s=6`` poll whose host was killed at 4 s answered at 13 s)."""
        deadline = time.monotonic() + READ_RETRY_S
        waited_until = (None if wait_at is None
                        else time.monotonic() + float(_arg_at(args, wait_at)))
        delay = 0.1
        while True:
            try:
                if self._version.matched is not self.handle:
                    await self._check_version()
                return await getattr(self.handle, method).remote(*args)
            except (RayTaskError, RayActorError) as exc:
                self._dead(exc)
                err = _unwrap(exc, self.name)
                restarting = isinstance(err, Unavailable) and err.code == "host_restarting"
                if restarting and read and time.monotonic() + delay < deadline:
                    pass
                elif restarting and method != "ping":
                    await self.wait_back(RESTART_WAIT_S)
                    raise err from None
                else:
                    raise err from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            if waited_until is not None and wait_at is not None:
                args = _arg_replaced(args, wait_at, max(0.0, waited_until - time.monotonic()))

    async def same_commit(self) -> None:
        """Refuse, as any call through this handle would be refused, when its actor runs another
        commit (503 ``host_version_mismatch``): for an answer the front gives without calling
        the host (a sharded session's refusals of ``history`` and ``scalars``), which must not
        be that answer of this front's commit. Asks the actor only while its commit is not
        known to be this one (its ``ping``, after the check, as :meth:`call` makes them)."""
        if self._version.matched is not self.handle:
            await self.call("ping", read=True)

    async def _check_version(self) -> None:
        """Ask the actor its code version: this process's lets every later call through this
        handle go unchecked; another (or none: an actor from before the method, whose handle
        has no such method) is 503 ``host_version_mismatch``, logged once per version, and
        answered so without asking for :data:`VERSION_RECHECK_S`. Ray's errors (the actor
        restarting, dead) are raised as a call's."""
        handle, check = self.handle, self._version
        mismatched = check.mismatched
        if mismatched is not None and mismatched[0] is handle and time.monotonic() < mismatched[1]:
            raise version_mismatch(self.name, mismatched[2])
        theirs: str | None
        try:
            ask = handle.code_version
        except AttributeError:  # an actor from before the check
            theirs = None
            await handle.ping.remote()  # (dead: a call's error, and _dead takes a new handle)
        else:
            theirs = str(await ask.remote())
        if theirs == code_version():
            check.matched, check.mismatched = handle, None
            return
        check.mismatched = (handle, time.monotonic() + VERSION_RECHECK_S, theirs)
        if theirs not in check.logged:
            check.logged.add(theirs)
            log.error("host %s runs another optserve commit (code version %s) than this front "
                      "(%s): it is answered 503 host_version_mismatch; fronts and host actors "
                      "must run one commit (docs/cluster.md, Several fronts)", self.name,
                      theirs or "from before versions", code_version())
        raise version_mismatch(self.name, theirs)

    async def wait_back(self, timeout: float) -> bool:
        """Wait until the host answers (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while time.monotonic() < deadline:
            try:
                await self.handle.ping.remote()
                return True
            except (RayTaskError, RayActorError) as exc:
                self._dead(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return False

    async def start(self) -> None:
        await self.call("ping", read=True)

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.call("snapshot_and_stop")

    async def status(self, *, memory: bool = False) -> EngineStatus:
        out: EngineStatus = await self.call("status", memory, read=True)
        return out

    async def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = await self.call("keys", prefix, read=True)
        return out

    async def refused(self) -> dict[str, str]:
        out: dict[str, str] = await self.call("refused", read=True)
        return out

    async def find_create(self, tenant: str, idem: IdemKey) -> str | None:
        out: str | None = await self.call("find_create", tenant, idem, read=True)
        return out

    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None
                     ) -> SessionInfo:
        out: SessionInfo = await self.call("create", key, spec_to_wire(spec), idem, self.made)
        return out

    async def forget(self, key: str, made: str | None) -> bool:
        return bool(await self.call("forget", key, made))

    async def unforget(self, key: str, made: str | None) -> None:
        await self.call("unforget", key, made)

    async def retire(self) -> bool:
        return bool(await self.call("retire"))

    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False) -> Any:
        return result_from_wire(await self.call("execute", key, op_to_wire(op), idem,
                                                want_params))

    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, upcast: bool = False,
        scalars: dict[str, float] | None = None,
    ) -> StepResult:
        out: StepResult = result_from_wire(await self.call(
            "step", key, {n: tensor_to_wire(t) for n, t in grads.items()}, want_params, worker,
            base_version, idem, options, self.front, upcast, scalars))
        return out

    async def withdraw(self, key: str, worker: str, idem: IdemKey | None) -> bool:
        return bool(await self.call("withdraw", key, worker, idem, self.front))

    async def describe(self, key: str) -> SessionInfo:
        out: SessionInfo = await self.call("describe", key, read=True)
        return out

    async def held_entries(self, key: str, idem_key: str | None, worker: str | None,
                           op: EntriesOp, expected: Expected | None) -> HeldEntries | None:
        out: HeldEntries | None = await self.call("held_entries", key, idem_key, worker, op,
                                                  expected)
        return out

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        out: list[SessionInfo] = await self.call("list_sessions", prefix, read=True)
        return out

    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        out: ParamsResult = result_from_wire(await self.call(
            "pull", key, names, min_version, wait_s, unless_versions, params_dtype, read=True,
            wait_at=(3,)))
        return out

    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        out: ParamsResult = result_from_wire(await self.call(
            "pull_rows", key, {n: tensor_to_wire(t) for n, t in rows.items()}, min_version,
            wait_s, unless_versions, params_dtype, read=True, wait_at=(3,)))
        return out

    async def export_state(self, key: str) -> StateExport:
        out: StateExport = result_from_wire(await self.call("export_state", key, read=True))
        return out

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        out: HistoryResult = await self.call("history", key, query, read=True)
        return out

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        return bool(await self.call("delete", key, idem, expected))

    async def deleted_with(self, tenant: str, idem: IdemKey) -> bool:
        return bool(await self.call("deleted_with", tenant, idem, read=True))

    async def prepare(self, key: str, op: Operation, idem: IdemKey) -> Checked:
        out: Checked = await self.call("prepare", key, op_to_wire(op), idem)
        return out

    async def commit(self, key: str, idem: IdemKey, op: Operation | None = None, *,
                     want_params: ReturnParams = False) -> Any:
        return result_from_wire(await self.call(
            "commit", key, idem, op_to_wire(op) if op is not None else None, want_params))

    async def abort(self, key: str, idem: IdemKey) -> None:
        await self.call("abort", key, idem)

    async def cut_tip(self, key: str) -> Tip:
        out: Tip = await self.call("cut_tip", key, read=True)
        return out

    async def revision_tip(self, key: str) -> RevisionTip:
        out: RevisionTip = await self.call("revision_tip", key, read=True)
        return out

    async def put_at_revision(self, key: str, revision: int) -> bool:
        return bool(await self.call("put_at_revision", key, revision))

    async def holds_key(self, key: str, idem_key: str) -> bool:
        return bool(await self.call("holds_key", key, idem_key, read=True))

    async def undo_last(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        return bool(await self.call("undo_last", key, idem_key, want))


class RemoteSharded:
    """A sharded session seen from a front: every call goes to its coordinator, in the host
    of its first shard."""

    def __init__(self, host: RayHost, key: str, entry: dict[str, Any]) -> None:
        self.host = host
        self.key = key
        self.entry = entry

    async def _coordinate(self, method: str, *args: Any, read: bool = False,
                          wait_at: int | None = None) -> Any:
        """``wait_at``: the index in ``args`` of a long poll's wait (:meth:`RayHost.call`)."""
        return result_from_wire(await self.host.call(
            "coordinate", self.key, self.entry, method, args, read=read,
            wait_at=None if wait_at is None else (3, wait_at)))

    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False) -> Any:
        return await self._coordinate("execute", op_to_wire(op), idem, want_params)

    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, upcast: bool = False,
        scalars: dict[str, float] | None = None,
    ) -> StepResult:
        if scalars:
            await self.host.same_commit()
            raise scalars_refused()
        out: StepResult = await self._coordinate(
            "step", {n: tensor_to_wire(t) for n, t in grads.items()}, want_params, worker,
            base_version, idem, options, upcast)
        return out

    async def describe(self, key: str) -> SessionInfo:
        out: SessionInfo = await self._coordinate("describe", read=True)
        return out

    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        out: ParamsResult = await self._coordinate("pull", names, min_version, wait_s,
                                                   unless_versions, params_dtype, read=True,
                                                   wait_at=2)
        return out

    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        out: ParamsResult = await self._coordinate(
            "pull_rows", {n: tensor_to_wire(t) for n, t in rows.items()}, min_version, wait_s,
            unless_versions, params_dtype, read=True, wait_at=2)
        return out

    async def export_state(self, key: str) -> StateExport:
        out: StateExport = await self._coordinate("export_state", read=True)
        return out

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        await self.host.same_commit()  # (a host of another commit: 503, as for any call)
        raise history_refused()

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        return bool(await self._coordinate("delete", idem, expected))


# ============================================================================ the router
@dataclass
class RayOptions:
    """The Ray engine's settings (from :class:`app.config.Settings`)."""

    data_dir: Path
    address: str = "local"
    namespace: str = "optserve"
    resources: dict[str, Any] = dataclasses.field(default_factory=lambda: {"num_cpus": 1.0})
    placement: str = "spread"
    sessions_per_host: int = 0
    host_start_timeout_s: float = 120.0
    commit_timeout_s: float = 30.0
    #: what each host's EmbeddedHost is made with (see HostActor._start)
    host: dict[str, Any] = dataclasses.field(default_factory=dict)


#: how old a mark of a create whose front died must be before its entry is looked at
#: (:meth:`RayRouter.drop_abandoned`): a host may still be making the session it asked for
ABANDONED_AFTER_S = 30.0
#: how long :meth:`RayRouter.drop_abandoned` waits for a host to say what it holds
ABANDONED_ASK_S = 5.0
#: how long placing a session waits for each existing host of its shape to say how many
#: sessions it holds: one that does not answer (an actor Ray cannot place or restart) is
#: passed over, not waited for under the placement lock, which every create of its shape takes
PLACE_PING_TIMEOUT_S = 5.0
#: the ``Retry-After`` of a create refused because no host of its shape started in
#: ``host_start_timeout_s`` (:meth:`RayRouter._new_host`, :meth:`RayRouter._placed_again`)
NO_CAPACITY_RETRY_S = 30.0
#: the ``Retry-After`` of a create refused because the room it would take is that of hosts
#: not placed now (:meth:`RayRouter._room_not_theirs`)
DOWN_HOSTS_RETRY_S = 10.0
#: how long a front waits for a session's host to say its parameters for the early refusal
#: of a body (:meth:`_Placed.early_refusal`): then the body is decoded whole and its operation
#: answers, as without
ENTRIES_ASK_S = 2.0
#: hosts being given up in the background (:meth:`RayRouter._place` cancelled): each task is
#: held until it is done
_BACKGROUND: set[asyncio.Future[Any]] = set()
#: how long a keyed create that finds the id's entry claimed by another front's try of it
#: waits for that try's index (written right after the claim: :meth:`RayRouter._indexed_soon`)
INDEX_WAIT_S = 10.0
INDEX_POLL_S = 0.01
#: how long a try of a keyed sharded create waits for another try of it asking the shards'
#: hosts through another front, before it answers 503 (:meth:`RayRouter._alone`): past a
#: host's restart (a shard's create waits :data:`RESTART_WAIT_S` for it)
MAKING_WAIT_S = 2 * RESTART_WAIT_S


def _actor_class() -> Any:
    return ray.remote(max_restarts=-1, max_task_retries=0)(HostActor)


def spawn_host(actor: Any, name: str, saved: dict[str, Any], host: dict[str, Any],
               hosts_dir: Path, namespace: str, commit_timeout_s: float) -> Any:
    """Start the host actor ``name`` of this ``host.json`` (which it writes again if the
    data directory is removed while it runs: :mod:`app.engine.kept_entries`), each host made
    with ``host`` (:attr:`RayOptions.host`): by a front (:meth:`RayRouter._handle`), or by a
    sharded session's coordinator for a shard's host gone for good (:meth:`HostActor._peer`).
    ``get_if_exists``: one started meanwhile by another is the one answered."""
    resources: dict[str, Any] = saved["resources"]
    placement = saved.get("placement", "spread")
    custom = dict(resources.get("resources") or {})
    config = {**host, "root": str(hosts_dir / name), "namespace": namespace,
              "commit_timeout_s": commit_timeout_s, "host_json": saved, "host_options": host}
    if not config.get("torch_threads") and resources.get("num_cpus", 0) >= 1:
        config["torch_threads"] = int(resources["num_cpus"])
    opts: dict[str, Any] = {
        "name": name, "namespace": namespace, "lifetime": "detached",
        "get_if_exists": True, "num_cpus": resources.get("num_cpus", 0),
        "num_gpus": resources.get("num_gpus", 0),
        "scheduling_strategy": "SPREAD" if placement == "spread" else "DEFAULT"}
    if resources.get("memory"):
        opts["memory"] = resources["memory"]
    if custom:
        opts["resources"] = custom
    return actor.options(**opts).remote(name, config)


class RayRouter:
    """Places sessions on host actors and finds them again (see the module docstring)."""

    def __init__(self, options: RayOptions) -> None:
        self.options = options
        self.device = "ray"
        self.directory = Directory(options.data_dir / "directory")
        self.hosts_dir = options.data_dir / "hosts"
        self.hosts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        #: readiness ahead of a full disk (``OPTSERVE_READY_MIN_FREE_BYTES``), measured here:
        #: the hosts' stores (``hosts/<name>/``) are on the data directory's file system, which
        #: every node mounts; not with durability ``memory`` (as the embedded engine's store)
        self._free_space = FreeSpace(
            options.data_dir,
            (int(options.host.get("ready_min_free_bytes", 0))
             if options.host.get("durability") != "memory" else 0),
            Files().free_bytes)
        never = self._free_space.unreachable(Files().total_bytes)
        if never is not None:
            log.warning("%s", never)
        self._hosts: dict[str, RayHost] = {}
        #: every host's host.json as this front wrote or read it (a host's shape never
        #: changes): placement still finds a host whose file was removed with the data
        #: directory while the server ran, until the host writes it again
        self._saved: dict[str, dict[str, Any]] = {}
        self._entries: dict[str, dict[str, Any]] = {}
        self._started_ray = False
        self._actor = _actor_class()
        #: one placement lock per shape (``shape_key``): a host of one shape that takes long to
        #: start (up to ``host_start_timeout_s``, e.g. one the cluster has no room for) delays
        #: only the creates of that shape
        self._place_locks: dict[str, asyncio.Lock] = {}
        #: set when this front drains (SIGTERM, :meth:`drain`)
        self._draining = asyncio.Event()
        #: this front's identity, carried by its sync pushes: its drain withdraws only those
        #: (another front's push of the same worker, keyless too, stays in its round)
        self.front = uuid.uuid4().hex
        #: the sync pushes waiting through this front (a step naming its worker), each with
        #: the call that waits for its answer
        self._pushes: dict[_Push, asyncio.Future[StepResult]] = {}
        self._withdrawals: set[asyncio.Task[None]] = set()
        #: per plain session, how many parameters its host said it held (with the creation,
        #: its entry's ``made``, it is of): a body naming no more is not refused from its
        #: entries, nothing asked (:meth:`_Placed.early_refusal`; a creation's parameters are
        #: only ever added to). Forgotten when the host refuses a name (:meth:`_Placed._again`):
        #: the id may have been made again through another front, on the same host
        self._held_counts: dict[str, tuple[str | None, int]] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._draining.clear()  # (a front started again after a drain serves as before)
        if not ray.is_initialized():
            # ("local": a new cluster, whatever runs beside it. None would join the one
            # RAY_ADDRESS or /tmp/ray/ray_current_cluster names, and leave this front's
            # detached hosts there, serving the data directory, once it stopped)
            address = self.options.address
            # ray.init replaces the SIGTERM handler with one that exits at once: keep the
            # server's own (it drains in-flight requests, then stops the engine)
            main = threading.current_thread() is threading.main_thread()
            previous = signal.getsignal(signal.SIGTERM) if main else None
            ray.init(address=address, namespace=self.options.namespace,
                     include_dashboard=False, logging_level=logging.WARNING)
            if main:
                signal.signal(signal.SIGTERM, previous)
            self._started_ray = self.options.address == "local"
        log.info("ray engine: cluster %s, namespace %s, data in %s", self.options.address,
                 self.options.namespace, self.options.data_dir)
        # creates whose front died before any host made their session (another front, or
        # this one before a restart)
        dropped = await self.drop_abandoned()
        if dropped:
            log.warning("dropped %d directory entries of creates cut short", dropped)

    async def stop(self, *, snapshot: bool = True) -> None:
        if self._started_ray:  # the local cluster ends with this process: snapshot first
            if snapshot:
                await asyncio.gather(*(h.stop() for h in self._hosts.values()),
                                     return_exceptions=True)
            ray.shutdown()

    # ------------------------------------------------------------------ draining
    def drain(self) -> None:
        """This front is draining (SIGTERM): what waits through it is answered now, and only
        that (other fronts of the cluster, and the host actors, go on as before; a rolling
        restart of the fronts disturbs no round of workers on the others). Each sync push
        through this front (its pushes carry :attr:`front`) waiting in its session's open
        round is taken out of it in its host (409
        ``round_aborted``: nothing of it applied, its retry with the same key joins a round
        through any front; the round keeps the other workers' pushes), and so is every push
        that reaches a round through this front from now on; one whose round closed already
        gets that round's answer. Long polls answer now with the current state
        (:meth:`polled`). The embedded engine fails the whole round instead: every worker of
        it waits through the one server draining."""
        self._draining.set()
        for push, call in self._pushes.items():
            self._withdraw_soon(push, call)

    def _withdraw_soon(self, push: _Push, call: asyncio.Future[StepResult]) -> None:
        task = asyncio.get_running_loop().create_task(self._withdraw(push, call))
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, push: _Push, call: asyncio.Future[StepResult]) -> None:
        """Ask the push's host to take it out of its round until its call is answered: asked
        again while it is not in the open round yet (on its way to the host, being checked,
        waiting for a discarding operation), since only there it can be taken out whole. A
        push in a round that closed is answered by that round's step (no long wait)."""
        delay = 0.05
        while not call.done():
            try:
                placed = await self.route(push.key)
                host = placed.host if isinstance(placed, _Placed) else placed
                if isinstance(host, RayHost):
                    await host.withdraw(push.key, push.worker, push.idem)
            except OptserveError:  # (the host restarts, the session is gone: the call says)
                pass
            await asyncio.wait({call}, timeout=delay)
            delay = min(delay * 2, 1.0)

    async def pushed(self, push: _Push, step: Awaitable[StepResult]) -> StepResult:
        """A sync push's step through this front: withdrawn from its round once this front
        drains (:meth:`drain`)."""
        call = asyncio.ensure_future(step)
        self._pushes[push] = call
        try:
            if self._draining.is_set():
                self._withdraw_soon(push, call)
            return await call
        finally:
            del self._pushes[push]

    async def polled(self, read: Callable[[float], Awaitable[ParamsResult]], wait_s: float
                     ) -> ParamsResult:
        """A pull that may wait (``wait_s``, a long poll) through this front: when the front
        drains (:meth:`drain`) it stops waiting for the host's answer and reads the current
        state at once, as the poll answers at the end of its wait (a ``not_modified`` one
        too), so that the drain does not wait for the poll (up to 60 s). A poll arriving
        while it drains waits for nothing."""
        if wait_s <= 0 or self._draining.is_set():
            return await read(0.0)
        waiting = asyncio.ensure_future(read(wait_s))
        drained = asyncio.ensure_future(self._draining.wait())
        try:
            done, _ = await asyncio.wait({waiting, drained},
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not waiting.done():
                # (the host's wait runs out by itself: nothing changes there)
                waiting.cancel()
        if waiting in done:
            return waiting.result()
        return await read(0.0)

    async def status(self, *, memory: bool = False) -> EngineStatus:
        reason = None
        if not ray.is_initialized():
            reason = "not connected to the Ray cluster"
        else:
            try:
                # (the data directory removed while the server runs: the write makes the
                # directory's folders again, Directory._in_folders)
                self.directory.put(".probe", {"t": time.time()})
            except OSError as exc:
                reason = f"the data directory cannot be written: {os.strerror(exc.errno or 0)}"
            else:
                reason = self._free_space.short()
        used = 0
        if memory and reason is None:
            outs = await asyncio.gather(*(self._host(n).status(memory=True)
                                          for n in self._host_names()), return_exceptions=True)
            used = sum(o.memory_bytes for o in outs if isinstance(o, EngineStatus))
        return EngineStatus(reason is None, reason, "ray", len(self.directory.keys()), used)

    async def refused(self) -> dict[str, str]:
        """Stored sessions the hosts refused at start (a host restarting is left out)."""
        outs = await asyncio.gather(*(asyncio.wait_for(self._host(n).refused(), 5.0)
                                      for n in self._host_names()), return_exceptions=True)
        found: dict[str, str] = {}
        for out in outs:
            if isinstance(out, dict):
                found.update({parent_key(k): v for k, v in out.items()})
        return found

    async def count(self, prefix: str) -> int:
        return len(self.directory.keys(prefix))

    async def drop_abandoned(self, prefix: str = "") -> int:
        """Drop the entries of unkeyed creates whose front died before their hosts made any of
        the session (they would sit in the directory for good, counted toward
        ``OPTSERVE_MAX_SESSIONS``): found by their marks left unlocked
        (:meth:`Directory.abandoned_creates <app.engine.directory.Directory.abandoned_creates>`,
        for keys under ``prefix``), once :data:`ABANDONED_AFTER_S` old (so that a host still
        making the session for a front that just died is not raced). A create in flight
        (its mark locked) is never looked at. An entry a host holds some of (a session the
        client lists and deletes), one refused at start, or one whose hosts cannot say now is
        kept; a keyed create's too (its retry finishes it under its key, :meth:`create`).
        Each mark looked at goes, but one whose hosts cannot say. At start, and when a tenant
        is at its session limit (:meth:`app.engine.front.Front.create`). How many went."""
        dropped = 0
        for made, key, mark in self.directory.abandoned_creates():
            if not key.startswith(prefix):
                continue
            with contextlib.suppress(FileNotFoundError):
                if time.time() - mark.stat().st_mtime < ABANDONED_AFTER_S:
                    continue
            entry = self.directory.get(key)
            if entry is None or entry.get("made") != made or entry.get("created_by"):
                self.directory.drop_mark(mark)
                continue
            try:
                gone = await asyncio.wait_for(self._drop_unheld(key, entry), ABANDONED_ASK_S)
            except (OptserveError, TimeoutError):
                continue  # (a host cannot say now: looked at again next time)
            if not gone:
                gone = await self._undo_part_made(key, entry)
            if gone:
                log.info("dropped the entry of %s: its create's front died before its hosts "
                         "made it", key)
                dropped += 1
            self.directory.drop_mark(mark)
        return dropped

    async def find_create(self, tenant: str, idem: IdemKey) -> str | None:
        made = self.directory.created(tenant, idem.key)
        if made is None:
            return None
        key = str(made["key"])
        entry = self.directory.get(key)
        if entry is not None and entry.get("created_by") != idem.key:
            entry = None  # (its id made again since, by another create)

        async def whole() -> bool:
            return all(await self._held(key, entry or {}))
        found = await indexed_session(made, entry, idem, whole)
        if found is None or made.get("deleted") or await whole():
            return found
        assert entry is not None
        if await self._refusal(key, entry) is not None:
            # stored, refused at start by its host (a shard's): it exists, as on the embedded
            # engine, and is not made again
            raise session_refused(idem.key, split_key(key)[1])
        # the key is kept before the hosts are asked (create): a session they do not all hold
        # is a create cut short (never acknowledged) or still in flight through another front,
        # which the retry finishes on the entry's hosts, under its key (create)
        return None

    async def _refusal(self, key: str, entry: dict[str, Any], *, deleting: bool = False
                       ) -> NotFound | None:
        """The 404 of a session its host (a shard's) refused at start, if it did (None also
        while a host cannot say)."""
        try:
            refused = await self._held(key, entry, refused=True)
        except OptserveError:
            return None
        shard = next((i for i, r in enumerate(refused) if r), None)
        if shard is None:
            return None
        return refused_at_start(key, shard if "shards" in entry else None, deleting=deleting)

    async def _held(self, key: str, entry: dict[str, Any], *, refused: bool = False
                    ) -> list[bool]:
        """Whether the session's host holds it (a sharded session's: whether each shard's host
        holds its shard); not held by a host that is gone for good. 503 while one restarts.
        ``refused``: whether each refused it at start instead."""
        where = _hosts_of(key, entry)

        async def held(name: str, k: str) -> bool:
            try:
                host = self._host(name)
                return k in (await host.refused() if refused else await host.keys(k))
            except NotFound:  # (a host whose host.json is gone)
                return False
        return list(await asyncio.gather(*(held(name, k) for name, k in where)))

    async def _drop_unheld(self, key: str, entry: dict[str, Any]) -> bool:
        """Remove the entry of a create none of whose hosts holds (or refused at start) any
        of the session: True when it went. The order that leaves no host holding a session
        without its entry, a host still making it for a front that died included: each host
        first forgets the creation (:meth:`HostActor.forget`: under the key's lock that a
        host's create holds from its check of the entry until the session is made, so a
        create is done before, and is found held, or is refused after: 503
        ``create_dropped``), and only then the entry goes (if still this creation's). A front
        that dies between the two leaves an entry no host makes, dropped by the next look
        (this again). When some host holds some of it the entry stays and the others may
        make their part again (:meth:`HostActor.unforget`). 503 while a host restarts."""
        made = entry.get("made")
        where = _hosts_of(key, entry)

        async def forget(name: str, k: str) -> bool:
            try:
                return await self._host(name).forget(k, made)
            except NotFound:  # (a host whose host.json is gone)
                return False
        held = await asyncio.gather(*(forget(name, k) for name, k in where))
        if any(held):
            await asyncio.gather(*(self._host(name).unforget(k, made)
                                   for (name, k), h in zip(where, held, strict=True) if not h))
            return False
        self._entries.pop(key, None)
        return self.directory.remove_made(key, made)

    # ------------------------------------------------------------------ hosts
    def _host_names(self) -> list[str]:
        """The hosts with a host.json, and those whose host.json this front read before (the
        data directory removed while the server runs: each host writes it again,
        app.engine.kept_entries)."""
        try:
            folders = list(self.hosts_dir.iterdir())
        except FileNotFoundError:
            folders = []
        return sorted({p.name for p in folders if (p / HOST_JSON).exists()} | set(self._saved))

    def _host_json(self, name: str, *, copy: bool = True) -> dict[str, Any]:
        """The host's host.json (FileNotFoundError when neither the file nor this front's copy
        of it is there, or the file with ``copy=False``; a damaged one raises
        orjson.JSONDecodeError)."""
        try:
            saved: dict[str, Any] = orjson.loads((self.hosts_dir / name / HOST_JSON).read_bytes())
        except FileNotFoundError:
            if copy and name in self._saved:
                return self._saved[name]
            raise
        self._saved[name] = saved
        return saved

    def _host(self, name: str) -> RayHost:
        host = self._hosts.get(name)
        if host is None:
            host = self._hosts[name] = RayHost(self._handle(name), name,
                                               revive=lambda: self._handle(name),
                                               front=self.front)
        return host

    def _handle(self, name: str) -> Any:
        """The host actor, started again from its host.json when Ray has none by this name:
        the file on disk, never this front's copy of it (:meth:`_host_json`). A host whose
        actor and file are both gone was given up (by any front: :meth:`_give_up`), and is
        forgotten here too: started again from the copy, it came up empty, its folder made
        again, holding its room for good (a host retired by another front, or one that front
        gave up for want of room, which then waited to be placed again)."""
        try:
            return ray.get_actor(name, namespace=self.options.namespace)
        except ValueError:
            pass
        try:
            saved = self._host_json(name, copy=False)
        except FileNotFoundError:
            self._saved.pop(name, None)
            self._hosts.pop(name, None)
            raise NotFound(f"host {name} is gone", code="session_not_found") from None
        except orjson.JSONDecodeError as exc:  # (cut short by an older version's write)
            log.error("%s of host %s cannot be read: %s", HOST_JSON, name, exc)
            raise Unavailable(f"the session's host {name} cannot be started: its {HOST_JSON} "
                              "in the data directory is damaged (an operator can write it "
                              "again: docs/cluster.md)", code="storage_error",
                              retry_after=30.0) from None
        log.warning("host %s has no actor: starting it again (it restores its sessions)", name)
        return self._spawn(name, saved)

    def _spawn(self, name: str, saved: dict[str, Any]) -> Any:
        """Start the host actor ``name`` of this ``host.json`` (:func:`spawn_host`)."""
        return spawn_host(self._actor, name, saved, self.options.host, self.hosts_dir,
                          self.options.namespace, self.options.commit_timeout_s)

    async def _new_host(self, resources: dict[str, Any], placement: str) -> RayHost:
        name = f"h-{uuid.uuid4().hex[:12]}"
        root = self.hosts_dir / name
        saved = {"name": name, "resources": resources, "placement": placement,
                 "created": time.time()}
        try:
            root.mkdir(mode=0o700, parents=True)
            Files().fsync_dir(self.hosts_dir)
            # (whole or not there, and on disk before any session is made on the host: a
            # restart starts the host again from it, and a host without one is gone)
            write_atomic(root / HOST_JSON, [orjson.dumps(saved)])
        except OSError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise storage_failure(exc, "the new session host's folder could not be written",
                                  outcome="nothing was made") from None
        self._saved[name] = saved
        handle = self._spawn(name, saved)
        host = RayHost(handle, name, revive=lambda: self._handle(name), front=self.front)
        try:
            info = await asyncio.wait_for(host.call("ping"), self.options.host_start_timeout_s)
        except TimeoutError:
            self._give_up(handle, name)
            raise Unavailable(f"the Ray cluster has no room for a session host asking "
                              f"{resources} (none started in "
                              f"{self.options.host_start_timeout_s:g} s)",
                              code="no_capacity", retry_after=NO_CAPACITY_RETRY_S) from None
        except asyncio.CancelledError:
            # (the create cancelled while it waits, e.g. by the server's shutdown after its
            # grace period: the host went on waiting for room, without a session, a later
            # placement's pick among hosts that do not answer, whose create then waited for it)
            self._give_up(handle, name)
            raise
        host.device = str(info["device"])
        self._hosts[name] = host
        log.info("started host %s (%s) on node %s", name, shape_key(resources),
                 str(info["node"])[:12])
        return host

    async def _placed_again(self, name: str, resources: dict[str, Any]) -> None:
        """Wait for a host of this shape that did not answer (not placed: started again after
        a restart of the cluster, or killed for good), picked for a session where the cluster
        has no room for a new host, to answer: up to ``host_start_timeout_s``, as for a new
        host's start, then 503 ``no_capacity`` with nothing made (no entry is claimed before
        placement; the host is left as it is: it holds sessions, or will take them once
        placed). The create's call to it waited without bound (:meth:`RayHost.call`: a call
        to an actor Ray has not placed answers once it is), and with it every create of the
        shape, behind the placement lock."""
        timeout = self.options.host_start_timeout_s
        try:
            await asyncio.wait_for(self._host(name).call("ping", read=True), timeout)
        except TimeoutError:
            raise Unavailable(f"the Ray cluster has no room for a session host asking "
                              f"{resources}: host {name} of that shape, which would take the "
                              f"session, did not start in {timeout:g} s",
                              code="no_capacity", retry_after=NO_CAPACITY_RETRY_S) from None

    def _give_up(self, handle: Any, name: str, *, started: bool = False) -> None:
        """Kill a new host not started yet (no session is on it) and remove its ``host.json``
        and its folder, made by :meth:`_new_host`, when empty: an actor that never started
        wrote nothing there (one that did keeps its files, and the folder with them).
        ``started``: a host that started and was retired (:meth:`_retire`: it holds no
        session and makes none; its store stopped): its folder goes with its store's files."""
        ray.kill(handle, no_restart=True)
        root = self.hosts_dir / name
        (root / HOST_JSON).unlink(missing_ok=True)
        self._saved.pop(name, None)
        self._hosts.pop(name, None)
        if started:
            shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()

    async def _retire(self, hosts: list[RayHost]) -> None:
        """Give up the hosts a placement started for a create that failed (503 ``no_capacity``
        for another of its shards' hosts, any other failure, or the create cancelled): they
        were left up, empty, each holding its room (:meth:`HostActor.retire`: only while it
        holds no session and makes none, which another front may have placed on it meanwhile:
        then it stays, with a warning)."""
        for host in hosts:
            try:
                retired = await asyncio.wait_for(host.retire(), PLACE_PING_TIMEOUT_S)
            except (OptserveError, TimeoutError) as exc:
                log.warning("host %s, started for a create that failed, could not be given "
                            "up: %s", host.name, exc)
                continue
            if not retired:
                log.warning("host %s, started for a create that failed, holds a session made "
                            "through another front meanwhile: kept", host.name)
                continue
            self._give_up(host.handle, host.name, started=True)
            log.info("gave up host %s, started for a create that failed", host.name)

    def _saved_hosts(self) -> list[tuple[str, dict[str, Any]]]:
        """Every host of this deployment with its host.json (those that cannot be read left
        out), each read once."""
        found = []
        for name in self._host_names():
            try:
                found.append((name, self._host_json(name)))
            except (FileNotFoundError, orjson.JSONDecodeError):
                continue
        return found

    @staticmethod
    def _cluster_has_room(resources: dict[str, Any], held: dict[str, float]) -> bool:
        """Whether Ray has this shape free now and the cluster holds it beside every host of
        this deployment (``held``: their shapes, summed): a host restarting (its process died)
        or killed for good (started again from its host.json by the next request for its
        sessions) frees its resources until it is placed again, and a new host that took them
        left it unplaced for good, its sessions a 503 ``host_restarting`` (seen by a kill -9
        chaos probe: 9 hosts of one CPU on a cluster of 8)."""
        available: Any = ray.available_resources  # typed or not, by Ray version
        total: Any = ray.cluster_resources
        return (_fits(resources, available())
                and _fits(resources, total(), less=held))

    def _holds_sessions(self, name: str) -> bool:
        """Whether the host's store holds any session (a folder under its ``sessions/``)."""
        try:
            with os.scandir(self.hosts_dir / name / "sessions") as found:
                return any(e.is_dir() and not e.name.startswith(".") for e in found)
        except OSError:
            return False

    async def _down_hosts(self, saved: list[tuple[str, dict[str, Any]]], asked: set[str],
                          answered: set[str]) -> dict[str, dict[str, Any]]:
        """The hosts of this deployment that hold sessions and are not placed now (their
        shapes by name), once each such host of another shape than the placement's was asked
        to answer (those of its shape were asked already: ``asked``, of which ``answered``
        did): the ask starts again a host killed for good (as its next front's call would) and
        waits up to :data:`PLACE_PING_TIMEOUT_S` for one Ray is restarting. A host holding no
        session is passed over: its room is anyone's (an operator may ``ray.kill`` it for the
        room)."""
        busy = {n: h["resources"] for n, h in saved if self._holds_sessions(n)}
        others = [n for n in busy if n not in asked]

        async def ask(name: str) -> Any:  # (a handle that cannot be had: an answer's error)
            return await asyncio.wait_for(self._host(name).call("ping", read=True),
                                          PLACE_PING_TIMEOUT_S)
        loads = await asyncio.gather(*(ask(n) for n in others), return_exceptions=True)
        up = answered | {n for n, out in zip(others, loads, strict=True)
                         if isinstance(out, dict)}
        return {n: shape for n, shape in busy.items() if n not in up}

    @staticmethod
    def _room_not_theirs(resources: dict[str, Any], down: dict[str, dict[str, Any]]) -> None:
        """Raise 503 ``no_capacity`` when Ray has this shape free now only with the room of
        hosts that hold sessions and are not placed (``down``: restarting, or started again
        and waiting for room; those whose shape the free room could hold): a new host would
        take it, leaving them unplaced for good, their sessions a 503. Where Ray has no room
        for it at all, the new host is started and waits for room (an autoscaler adds a node
        for it, as for the hosts that are down)."""
        if not down:
            return
        available: Any = ray.available_resources  # typed or not, by Ray version
        free: dict[str, float] = available()
        if not _fits(resources, free):
            return  # (no room now: the new host waits for room, as those hosts do)
        theirs: dict[str, float] = {}
        for shape in down.values():  # (one that would not fit there waits for new room too)
            if _fits(shape, free):
                _add_need(theirs, shape)
        if _fits(resources, free, less=theirs):
            return  # (room for it beside them)
        names = ", ".join(sorted(down)[:3]) + (", ..." if len(down) > 3 else "")
        raise Unavailable(f"the Ray cluster's free room for a session host asking {resources} "
                          f"is that of {len(down)} host(s) of this deployment not placed now "
                          f"({names}: restarting), whose sessions need it back; try again once "
                          "they are placed, or add room", code="no_capacity",
                          retry_after=DOWN_HOSTS_RETRY_S)

    async def _place(self, resources: dict[str, Any], placement: str, count: int = 1
                     ) -> list[RayHost]:
        """``count`` distinct hosts of this shape for new sessions (see the module doc)."""
        async with self._place_locks.setdefault(shape_key(resources), asyncio.Lock()):
            saved = self._saved_hosts()  # (read once for the whole placement)
            names = [n for n, h in saved
                     if shape_key(h["resources"]) == shape_key(resources)]

            async def ping(name: str) -> Any:  # (NotFound: given up, by another front too)
                return await asyncio.wait_for(self._host(name).call("ping", read=True),
                                              PLACE_PING_TIMEOUT_S)
            loads = await asyncio.gather(*(ping(n) for n in names), return_exceptions=True)
            gone = {n for n, out in zip(names, loads, strict=True) if isinstance(out, NotFound)}
            saved = [(n, h) for n, h in saved if n not in gone]
            names = [n for n in names if n not in gone]
            loads = [out for out in loads if not isinstance(out, NotFound)]
            held: dict[str, float] = {}
            for _, h in saved:
                _add_need(held, h["resources"])
            sessions = {n: int(out["sessions"]) for n, out in zip(names, loads, strict=True)
                        if isinstance(out, dict)}
            chosen: list[RayHost] = []
            started: list[RayHost] = []  # (new hosts, given up if the placement fails)
            try:
                await self._choose(resources, placement, count, names, sessions, held, saved,
                                   chosen, started)
            except asyncio.CancelledError:
                if started:  # (in the background: the create is cut short now)
                    retiring = asyncio.ensure_future(self._retire(started))
                    _BACKGROUND.add(retiring)
                    retiring.add_done_callback(_BACKGROUND.discard)
                raise
            except Exception:
                await self._retire(started)
                raise
            return chosen

    async def _choose(self, resources: dict[str, Any], placement: str, count: int,
                      names: list[str], sessions: dict[str, int], held: dict[str, float],
                      saved: list[tuple[str, dict[str, Any]]], chosen: list[RayHost],
                      started: list[RayHost]) -> None:
        """:meth:`_place`'s choice of ``count`` hosts, into ``chosen`` (the new hosts it
        started also into ``started``)."""
        cap = self.options.sessions_per_host
        down: dict[str, dict[str, Any]] | None = None  # (:meth:`_down_hosts`)
        for _ in range(count):
            room = [n for n, k in sessions.items() if (not cap or k < cap)
                    and n not in {h.name for h in chosen}]
            # (asked of Ray at most once a host placed: two calls to its state API)
            has_room: bool | None = None

            def cluster_has_room() -> bool:
                nonlocal has_room
                if has_room is None:
                    has_room = self._cluster_has_room(resources, held)
                return has_room
            pick: str | None = None
            if placement == "pack":
                pick = min(room, key=lambda n: (-sessions[n], n)) if room else None
            elif not cluster_has_room():
                pick = min(room, key=lambda n: (sessions[n], n)) if room else None
            # hosts of this shape that did not answer the ping in time (started again
            # after a restart of the cluster, or killed for good) take their room once
            # placed: with no room, a new host would wait for it and the create end in a
            # 503 no_capacity; one of them takes the session instead, the create waiting
            # for its start, up to host_start_timeout_s (their sessions are not counted)
            waiting = [n for n in names
                       if n not in sessions and n not in {h.name for h in chosen}]
            while pick is None and waiting and not cluster_has_room():
                try:
                    await self._placed_again(min(waiting), resources)
                except NotFound:  # (given up meanwhile, by another front too: passed over)
                    names.remove(min(waiting))
                    waiting.remove(min(waiting))
                    continue
                pick = min(waiting)
            if pick is not None:
                host = self._host(pick)
            else:
                if not cluster_has_room():
                    if down is None:  # (once a placement: the hosts of other shapes too)
                        down = await self._down_hosts(saved, set(names), set(sessions))
                    self._room_not_theirs(resources, down)
                host = await self._new_host(resources, placement)
                started.append(host)
                _add_need(held, resources)  # (its host.json, written by now)
            sessions[host.name] = sessions.get(host.name, 0) + 1
            chosen.append(host)

    # ------------------------------------------------------------------ sessions
    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None,
                     admit: Admit | None = None) -> SessionInfo:
        """``admit``: the front's check of the tenant's limits, run only before a new entry is
        claimed (a retry finishing a create that holds its entry is not a new session)."""
        check_create(spec, self.options.host.get("default_nonfinite", "reject"))
        resources = spec.resources if spec.resources is not None else self.options.resources
        placement = spec.placement or self.options.placement
        layout = plan_layout(spec.groups, spec.shards) if spec.shards > 1 else None
        if layout is not None and spec.ps_options.get("sync") is not None:
            raise Invalid("a sharded session steps without synchronous rounds", field="sync",
                          code="invalid_body")
        tenant = split_key(key)[0]
        for _ in range(3):
            if idem is not None:
                # a create under this key indexed before (its front died, or is still at it:
                # the client's retry reached this front first; a 503 cut it): finished on its
                # entry's hosts, under its key, so one session results however many fronts
                # run it (each host answers the key's create once)
                indexed = self._indexed_create(tenant, idem)
                if isinstance(indexed, tuple):
                    finished = await self._finish_create(*indexed, spec, idem)
                    if finished is not None:
                        return finished
                    continue  # (its creation was dropped: looked at again)
                if indexed is not None:
                    key = indexed  # (its entry went, its index stayed: made under that key)
            held = self.directory.get(key)
            if held is not None and not await self._stale(key):
                if idem is not None and held.get("created_by") == idem.key and \
                        await self._indexed_soon(tenant, idem, key, held):
                    continue  # (another front's try of this create: finished, or refused)
                raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                               code="session_exists", field="id")
            if admit is not None:
                await admit()
            hosts = await self._place(resources, placement, layout.shards if layout else 1)
            # ("made": this creation's own, so that nothing kept of a session deleted since,
            # e.g. its coordinator, is taken for one made again with its id; its mark in the
            # directory says the create is in flight, from before the claim until the hosts
            # made it: no other front drops the entry meanwhile, _stale)
            entry: dict[str, Any] = {"resources": resources, "placement": placement,
                                     "created_by": idem.key if idem is not None else None,
                                     "made": uuid.uuid4().hex,
                                     "first_version": self._first_version(key)}
            if layout is not None:
                entry.update(shards=[h.name for h in hosts], layout=layout.to_json())
            else:
                entry["host"] = hosts[0].name
            mark = self.directory.mark_creating(entry["made"], key)
            try:
                info = await self._make(key, entry, spec, idem, hosts, layout, mark)
            finally:
                mark.release()
            if info is not None:
                return info
        raise Unavailable("a create sent with this Idempotency-Key is being made through "
                          "another front; retry it with the same Idempotency-Key",
                          code="host_restarting", retry_after=1.0)

    async def _indexed_soon(self, tenant: str, idem: IdemKey, key: str,
                            held: dict[str, Any]) -> bool:
        """Whether the try of this keyed create that holds the id's entry (``held``, claimed
        under this key through another front, in flight) indexes it: it claims the entry, then
        the index (:meth:`_make`), and a try that found the entry between the two was a 409
        ``session_exists`` where it is the same create (the client's retry through another
        front, or the same request sent to several): now it waits for the index (up to
        :data:`INDEX_WAIT_S`), and the create looks again (answered with that session, or
        finished on its hosts, or 422 for another request under the key). False, for the 409,
        when the entry is another creation's by then, or that try left it unindexed (its
        front died: the entry goes once its mark is seen unlocked, :meth:`_stale`)."""
        deadline = time.monotonic() + INDEX_WAIT_S
        while True:
            if self.directory.created(tenant, idem.key) is not None:
                return True
            now = self.directory.get(key)
            if now is None or now.get("made") != held.get("made"):
                return True  # (gone or made again since: looked at again)
            if not self.directory.in_flight(held.get("made")) or time.monotonic() > deadline:
                return False
            await asyncio.sleep(INDEX_POLL_S)

    async def _make(self, key: str, entry: dict[str, Any], spec: CreateSpec,
                    idem: IdemKey | None, hosts: list[RayHost], layout: ShardLayout | None,
                    mark: CreateMark) -> SessionInfo | None:
        """Claim the entry and make the session on its hosts (:meth:`create`, its ``mark``
        held); None when a keyed create must look again (another front's try of it)."""
        tenant = split_key(key)[0]
        if not self.directory.claim(key, entry):
            mark.done()
            if idem is not None:
                return None  # (another front's try of this create, made under its key?)
            raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                           code="session_exists", field="id")
        if self._first_version(key) != entry["first_version"]:
            # (a delete of the id's session ended between the version's read and the claim:
            # looked at again, no host asked)
            self.directory.remove_made(key, entry["made"])
            mark.done()
            return None
        # on disk before any host is asked, the decision between fronts running this create
        # at once (the first indexed makes it, the others finish that one), and a front
        # that dies once the hosts made the session leaves its key: the retry is answered
        # with it (find_create)
        if idem is not None and self.directory.claim_created(
                tenant, idem.key, idem.fingerprint, key) is not None:
            self.directory.remove_made(key, entry["made"])  # (no host was asked)
            mark.done()
            return None
        hosts = [h.making(entry["made"]) for h in hosts]  # (HostActor.create checks it)
        spec = self._starting(spec, entry)
        try:
            if layout is not None:
                shards: list[tuple[Host, str]] = [(h, shard_key(key, i, layout.shards))
                                                  for i, h in enumerate(hosts)]
                _, info = await ShardedSession.create(
                    key, spec, layout, shards, idem=idem,
                    alone=self._alone(key, entry["made"]) if idem is not None else None)
            else:
                info = await hosts[0].create(key, spec, idem=idem)
        except Exception as exc:
            if await self._undo_create(key, entry, idem, exc):
                mark.done()  # (nothing of it left; else the mark stays, released: a later
                # look at it drops the entry once no host holds any of it, drop_abandoned)
                if isinstance(exc, NotFound):
                    # (a host given up meanwhile, killed, its host.json gone: another front's
                    # failed placement started it, :meth:`_retire`; nothing was made)
                    raise create_dropped(key) from None
            raise
        mark.done()
        self._entries[key] = entry
        return self._placed(info, entry)

    def _first_version(self, key: str) -> int:
        """The version a session made under ``key`` starts at (every shard of it): after the
        last version the directory keeps of a deleted session of the id
        (:meth:`Directory.note_version <app.engine.directory.Directory.note_version>`,
        :mod:`app.engine.last_versions`). Read into the creation's entry before its claim, and
        again once it is claimed (:meth:`_make`): a delete of the id's session wrote that version
        before its hosts deleted it, and they before its entry went (or a front dropped it,
        unheld), so the second read sees every delete before the claim; one that differs (a
        delete ended between the two) drops the claim and the create looks again. Kept in the
        entry, every try of the create (a retry finishing it through another front, after a
        restart) makes its shards at the same version, also where a part of it was undone
        meanwhile (which writes its own version into the directory)."""
        return first_after(self.directory.last_version(key))

    @staticmethod
    def _starting(spec: CreateSpec, entry: dict[str, Any]) -> CreateSpec:
        """The create of the creation ``entry`` at its first version (an entry of an older
        version, without one: the host's own, from 0)."""
        first = entry.get("first_version")
        return dataclasses.replace(spec, first_version=int(first) if first is not None else None)

    def _indexed_create(self, tenant: str, idem: IdemKey
                        ) -> tuple[str, dict[str, Any]] | str | None:
        """A keyed create indexed before (``.creates``) whose session is not answered yet
        (:meth:`find_create`: no host holds all of it): its key and entry, to be finished
        there; only its key when its entry is gone (a refusal cut between the two removals: it
        is made under that key); None when there is none. 422 for another request under the
        key; 409 ``session_exists`` when its id was taken since by another create."""
        made = self.directory.created(tenant, idem.key)
        if made is None or made.get("deleted"):
            return None  # (a deleted one's retry: find_create answered it)
        if made["fingerprint"] != idem.fingerprint:
            raise key_reused()
        key = str(made["key"])
        entry = self.directory.get(key)
        if entry is None:
            return key
        if entry.get("created_by") != idem.key:
            raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                           code="session_exists", field="id")
        if "host" in entry and str(entry["host"]) not in self._host_names():
            # its host is gone for good (its host.json too): nothing of it is anywhere, and it
            # is made again as new, on a host placed now (its entry only if still this
            # creation's: another front's retry of the create may have removed it, and a
            # create of the id claimed it, since it was read)
            if not self.directory.remove_made(key, entry.get("made")):
                return self._indexed_create(tenant, idem)  # (looked at again)
            # (the index goes only while no try of this create holds the id's entry, looked at
            # under the index's lock: another front's retry of it may have claimed the id again
            # since the removal and be making the session under this index, which a later retry
            # must still find; dropped, it would make a second session. Kept: that try's entry
            # is finished, looked at again. Directory.drop_created)
            if not self.directory.drop_created(tenant, idem.key, key):
                return self._indexed_create(tenant, idem)
            return None
        return key, entry

    async def _undo_create(self, key: str, entry: dict[str, Any], idem: IdemKey | None,
                           exc: Exception) -> bool:
        """After a create failed: its entry (and index) are removed when no host can hold any
        of the session (a host's refusal of an unsharded one; none of a sharded one's hosts
        holds a shard of it), else kept, so nothing a host made is left without them: a 503
        ``host_restarting`` (the host may have made it) or any failure of a keyed create keeps
        them, and its retry is answered with the session or finishes it on the same hosts
        (:meth:`create`); an unkeyed one's are kept while a host holds some of it (a session
        the client can list and delete) or cannot say. Only this creation's entry is removed
        (not one claimed since by another create of the id), and the index unless the entry
        there now is another try's of this create (looked at under the index's lock,
        :meth:`Directory.drop_created <app.engine.directory.Directory.drop_created>`). True
        when nothing of this creation's is left in the directory."""
        refused = isinstance(exc, OptserveError) and 400 <= exc.status < 500
        if idem is not None and not refused:
            return False
        if not (refused and "host" in entry):
            try:
                if any(await self._held(key, entry)):
                    return False
            except OptserveError:
                return False
        # (only this creation's entry: another front may have dropped it meanwhile, a retry
        # of a keyed create finishing it there, and a create of the id claimed it again)
        self.directory.remove_made(key, entry.get("made"))
        if idem is not None:
            # (kept for a try of this create that claimed the id again, through another front,
            # before the removal or after it: its index. Looked at under the index's lock, which
            # that try's claim of the index takes after its claim of the entry, so no claim
            # lands between the look and the drop: a look here before the drop, without the
            # lock, missed a try claiming the id between the two, whose session, once made,
            # had no index, and the next retry made a second one)
            self.directory.drop_created(split_key(key)[0], idem.key, key)
        return True

    async def _finish_create(self, key: str, entry: dict[str, Any], spec: CreateSpec,
                             idem: IdemKey) -> SessionInfo | None:
        """The retry of a keyed create indexed before (:meth:`_indexed_create`): made on its
        entry's hosts under its key; each host answers the key's create once (from the key, a
        replay, when it made its part already, also while a first try is still at it). Any
        part made stays on a failure (the first try's, and this one's: a first try still at
        it may have made it), for the next retry (:meth:`_undo_create` for an unsharded
        session's refusal). None when a host answers that another front dropped this creation
        (``create_dropped``, :meth:`HostActor.create`): its entry goes once no host holds any
        of it (:meth:`_drop_unheld`, also when that front died before it removed it), and the
        create looks again (:meth:`create`: made anew, or finished on the entry kept)."""
        made = entry.get("made")
        spec = self._starting(spec, entry)  # (the first try's)
        # (in flight again, on this front: no other front drops the entry meanwhile)
        mark = self.directory.mark_creating(str(made), key) if made else None
        try:
            try:
                if "host" in entry:
                    info = await self._host(str(entry["host"])).making(made).create(
                        key, spec, idem=idem)
                else:
                    layout = ShardLayout.from_json(entry["layout"])
                    shards: list[tuple[Host, str]] = [
                        (self._host(name).making(made), shard_key(key, i, layout.shards))
                        for i, name in enumerate(entry["shards"])]
                    _, info = await ShardedSession.create(key, spec, layout, shards,
                                                          idem=idem,
                                                          made=set(range(layout.shards)),
                                                          alone=self._alone(key, str(made)))
            except Exception as exc:
                if (isinstance(exc, Unavailable) and exc.code == "create_dropped"
                        or isinstance(exc, NotFound)):  # (NotFound: a host given up, _make)
                    await self._drop_unheld(key, entry)
                    if mark is not None:
                        mark.done()
                    return None
                if "host" in entry and await self._undo_create(key, entry, idem, exc) and mark:
                    mark.done()
                raise
            if mark is not None:
                mark.done()
        finally:
            if mark is not None:
                mark.release()
        self._entries[key] = entry
        return self._placed(info, entry)

    @contextlib.asynccontextmanager
    async def _alone(self, key: str, made: str) -> AsyncIterator[None]:
        """Hold the creation ``made``'s lock (:meth:`Directory.try_making
        <app.engine.directory.Directory.try_making>`) while a keyed sharded create asks its
        shards' hosts, waiting while another try of it holds it (through another front: the
        first try, or a retry finishing it). The hosts answer each shard's create once under
        the key; two tries asking them at once each made some shards, so neither found every
        shard made before, and both answered as the original (201 without
        ``Idempotent-Replayed``, where a plain session's host answers one try as the original
        and the others as replays). One after the other, the later try finds what the first
        made (replayed), or finishes what it left. A 503 (retry with the same key; nothing
        done) when the other still holds it after :data:`MAKING_WAIT_S`."""
        deadline = time.monotonic() + MAKING_WAIT_S
        delay = INDEX_POLL_S
        while (release := self.directory.try_making(made)) is None:
            if time.monotonic() > deadline:
                raise Unavailable(f"the create of session {split_key(key)[1]!r:.140} sent with "
                                  "this Idempotency-Key is still being made through another "
                                  "front; retry it with the same Idempotency-Key",
                                  code="host_restarting", retry_after=1.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
        try:
            yield
        finally:
            release()

    async def _stale(self, key: str) -> bool:
        """Drop the entry of a session its host does not hold (one kept in memory only, whose
        host restarted; a create cut short, its front dead): True when it was stale. One its
        host (a shard's) refused at start is kept, and so is one whose create is in flight
        through a front that is alive (its mark is locked, :meth:`Directory.in_flight
        <app.engine.directory.Directory.in_flight>`: its hosts do not hold the session yet).
        The mark is looked at before the hosts, so a create done in between is seen held; a
        host still making the session for a front that died is waited for, or never makes it
        (:meth:`_drop_unheld`). One a host (a shard's) holds some of is kept."""
        entry = self.directory.get(key)
        if entry is None:
            self._entries.pop(key, None)
            return True
        if self.directory.in_flight(entry.get("made")):
            return False
        if not await self._drop_unheld(key, entry) and \
                not await self._undo_part_made(key, entry):
            self._entries[key] = entry
            return False
        return True

    async def _undo_part_made(self, key: str, entry: dict[str, Any]) -> bool:
        """Undo an unkeyed create of a sharded session that was cut part way (its front died,
        or a host's crash discarded its shard as a create it interrupted) and is no longer in
        flight: some of its shards' hosts hold theirs, the others none. It was never
        acknowledged (the answer waits for every shard) and no retry can finish it (a keyed
        one's does, :meth:`_finish_create`); kept, its reads were 404s naming the missing
        shard and a create of its id a 409 for good. The hosts without a shard forget the
        creation first (:meth:`HostActor.forget`: a host still making its shard is waited
        for, and then the session is left as it is), then the shards made are deleted and the
        entry removed, with a warning (the embedded engine's start undoes such a create:
        :meth:`LocalRouter._undo_cut_create <app.engine.router.LocalRouter.
        _undo_cut_create>`). Nothing is done while a host cannot say, or refused a shard at
        start, or is gone for good. True when the entry went."""
        if "shards" not in entry or entry.get("created_by") or \
                self.directory.in_flight(entry.get("made")):
            return False
        made = entry.get("made")
        where = _hosts_of(key, entry)
        try:
            hosts = [self._host(name) for name, _ in where]
            if await self._refusal(key, entry) is not None:
                return False
            held = [k in await h.keys(k) for h, (_, k) in zip(hosts, where, strict=True)]
            if all(held) or not any(held):
                return False
            made_since = await asyncio.gather(*(
                h.forget(k, made) for h, (_, k), had in zip(hosts, where, held, strict=True)
                if not had))
            if any(made_since):
                return False
            log.warning("sharded session %s: its create was cut part way (shards %s missing): "
                        "its other shards and its directory entry are removed", key,
                        ", ".join(str(i) for i, had in enumerate(held) if not had))
            for h, (_, k), had in zip(hosts, where, held, strict=True):
                if had:
                    with contextlib.suppress(NotFound):
                        await h.delete(k)
        except OptserveError as exc:
            log.warning("could not undo the cut create of %s: %s", key, exc)
            return False
        self._entries.pop(key, None)
        return self.directory.remove_made(key, made)

    def _placed(self, info: SessionInfo, entry: dict[str, Any]) -> SessionInfo:
        placement = {"resources": entry["resources"], "placement": entry["placement"]}
        if "host" in entry:
            placement["host"] = entry["host"]
        info.placement = {**placement, **(info.placement or {})}
        return info

    def _entry(self, key: str, fresh: bool = False) -> dict[str, Any]:
        entry = None if fresh else self._entries.get(key)
        if entry is None:
            entry = self.directory.get(key)
            if entry is None:
                self._entries.pop(key, None)
                raise no_session(key)
            self._entries[key] = entry
        return entry

    async def _entry_again(self, key: str, cached: dict[str, Any] | None) -> dict[str, Any]:
        """The entry this front read before (``cached``), written again when the directory no
        longer holds it but every host it names still holds the session (the data directory
        was removed while the server ran, and no host wrote it again yet:
        app.engine.kept_entries); else the 404 (deleted through another front)."""
        if cached is None or not all(await self._held(key, cached)):
            raise no_session(key)
        if self.directory.claim(key, cached):
            log.error("the directory entry of session %s was removed from the data directory "
                      "while the server ran: written again", key)
        return self._entry(key, fresh=True)  # (the one claimed, or one claimed meanwhile)

    async def refuse_unknown(self, key: str) -> EmbeddedHost | None:
        """The 404 of a session the directory holds no entry for, as :meth:`route` raises it
        (this front's copy of the entry, else the directory's file). No host is asked: that
        costs a round trip to an actor (or a lookup of one in Ray's GCS, or its start, for a
        host this front has not reached yet) on every request; a host's own 404 (a session
        its directory entry outlived) comes after the body, as before. None: no session here
        is in this process."""
        self._entry(key)
        return None

    async def route(self, key: str) -> SessionHost:
        entry = self._entry(key)
        if "host" in entry:
            return _Placed(self, key, self._host(entry["host"]))
        shards = [self._host(name) for name in entry["shards"]]  # (started again if gone)
        return _Placed(self, key, RemoteSharded(shards[0], key, entry))

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        keys = self.directory.keys(prefix)
        hosts = [await self.route(k) for k in keys]
        outs = await asyncio.gather(*(h.describe(k) for h, k in zip(hosts, keys, strict=True)),
                                    return_exceptions=True)
        return [o for o in outs if isinstance(o, SessionInfo)]

    async def _deleted_before(self, key: str, deleting: dict[str, Any], idem: IdemKey
                              ) -> bool:
        """Whether the keyed delete whose key the directory kept before its hosts were asked
        (``deleting``, :meth:`Directory.note_deleted <app.engine.directory.Directory.
        note_deleted>`), and no more (a crash cut it there), was done and the session held
        under the id now (if any) was made since: the directory's entry is another creation's
        and a host of the session it was sent for answers that it deleted it, or its shard
        (:meth:`EmbeddedHost.deleted_with <app.engine.host.EmbeddedHost.deleted_with>`, the
        embedded engine's check, under the key's tenant, or the shard's key: a delete cut
        between the shards, whose rest a create of the id undid since, :meth:`_undo_part_made`).
        Then the delete is noted done and its retry answered (204), the new session left
        alone: it was deleted (on hosts without the key's tombstone), or its entry removed
        and its shards left on their hosts for good (on the same hosts). False when the
        session it was sent for is still there (or its hosts never deleted any of it): the
        retry deletes it."""
        entry = self.directory.get(key)
        if entry is not None and entry.get("made") == deleting["deleting"].get("made"):
            return False

        async def deleted_there(name: str, host_key: str) -> bool:
            try:
                return await self._host(name).deleted_with(
                    split_key(key)[0] if host_key == key else host_key, idem)
            except NotFound:  # (a host gone for good, its host.json too)
                return False
        done = any(await asyncio.gather(*(deleted_there(str(name), str(host_key))
                                          for name, host_key in deleting["deleting"]["hosts"])))
        if done:
            self.directory.note_deleted(split_key(key)[0], idem.key, idem.fingerprint,
                                        str(deleting["key"]))
        return done

    async def _deleted_meanwhile(self, key: str, idem: IdemKey) -> bool:
        """Whether another try of this keyed delete (the same request through another front,
        or the client's retry) deleted the session while this one was on its way to the
        hosts: the directory marks the key done (or its hosts say they deleted it,
        :meth:`_deleted_before`). A sharded session's coordinator answers a 404 once that
        try removed its entry, where a plain session's host answers from its tombstone: the
        first try of a keyed delete of a sharded session was a 404 while its retry through
        another front was a 204. Now both are the 204."""
        done = self.directory.deleted(split_key(key)[0], idem.key)
        if done is None or done.get("key") != key or done.get("fingerprint") != idem.fingerprint:
            return False
        if "deleting" in done:
            return await self._deleted_before(key, done, idem)
        return True

    async def _deleted_by_older(self, key: str, idem: IdemKey) -> bool:
        """Whether a host deleted the session with this key while the directory kept no mark
        of it: commits before ``.deletes/`` (c938206) kept a keyed delete's key in its hosts'
        tombstones only, so its retry after an upgrade was a 404. Asked only of a keyed delete
        of an id the directory holds no session under (each host answers from memory; 422 for
        another request under the key); the mark is written then, so it is asked once."""
        tenant = split_key(key)[0]

        async def deleted_there(name: str) -> bool:
            try:
                return await self._host(name).deleted_with(tenant, idem)
            except NotFound:  # (a host gone for good, its host.json too)
                return False
        if not any(await asyncio.gather(*(deleted_there(n) for n in self._host_names()))):
            return False
        self.directory.note_deleted(tenant, idem.key, idem.fingerprint, key)
        log.warning("keyed delete of %s: answered from a host's tombstone (an older commit "
                    "kept no mark of it in the directory); marked now", key)
        return True

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        tenant = split_key(key)[0]
        self._held_counts.pop(key, None)  # (what it counted: of a creation gone or going)
        if idem is not None:
            # a keyed delete done already: answered, through any front (its hosts keep the
            # key too, but the entry naming them may be gone, or name a session made since)
            done = self.directory.deleted(tenant, idem.key)
            if done is not None and "deleting" in done:
                if await self._deleted_before(key, done, idem):
                    return True
                done = None  # (not done, or its session is still there: deleted now)
            if done is not None:
                if done["fingerprint"] != idem.fingerprint:
                    raise key_reused()
                entry = self.directory.get(key)
                # (an entry a crash left, between the delete and its removal: its hosts no
                # longer hold the session; else it is a session made since, left alone, also
                # while its create is in flight, or its host still makes it for a front that
                # died: _drop_unheld)
                if entry is not None and not self.directory.in_flight(entry.get("made")):
                    with contextlib.suppress(OptserveError):
                        await self._drop_unheld(key, entry)
                return True
        cached = self._entries.get(key)
        try:
            entry = self._entry(key, fresh=True)
        except NotFound:
            try:
                entry = await self._entry_again(key, cached)
            except NotFound:
                if idem is not None and await self._deleted_by_older(key, idem):
                    return True
                raise
        refusal = await self._refusal(key, entry, deleting=True)
        if refusal is not None:  # (nothing deleted, nothing marked: left to an operator)
            raise refusal
        if "shards" in entry and self.directory.in_flight(entry.get("made")) and \
                not all(await self._held(key, entry)):
            # a sharded create still at its hosts through a front that is alive, some shards
            # not made yet: no session yet, as a plain session's host says of one it has not
            # made (404, nothing deleted, nothing marked). Deleted, the shards made went, and
            # the create, its entry gone, answered 503 create_dropped for a session this
            # delete answered 204
            raise no_session(key)
        host = await self.route(key)
        if entry.get("created_by"):
            # marked (on disk) before any host deletes the session, the delete's point of no
            # return: a crash anywhere after leaves the key marked, and one before, or a host's
            # refusal, leaves the session whole, which a retried create is still answered with
            # (find_create), through any front
            self.directory.forget_created(tenant, entry["created_by"], key)
        if idem is not None:  # (on disk before any host deletes: _deleted_before)
            self.directory.note_deleted(tenant, idem.key, idem.fingerprint, key, deleting={
                "made": entry.get("made"), "hosts": _hosts_of(key, entry)})
        try:
            replayed = await host.delete(key, idem=idem, expected=expected)
        except NotFound:
            if idem is None or not await self._deleted_meanwhile(key, idem):
                raise
            replayed = True
        if idem is not None:  # (before the entry goes: a crash between leaves the hosts' keys)
            self.directory.note_deleted(tenant, idem.key, idem.fingerprint, key)
        # (the entry of the creation deleted, read above, not whichever is there now: once
        # its hosts deleted the session, a create of the id through another front finds its
        # entry stale, drops it and claims its own, which a plain removal would take away)
        self.directory.remove_made(key, entry.get("made"))
        self._entries.pop(key, None)
        return replayed

    async def trim(self) -> None:
        """Each host actor returns its own free heap pages when it is idle."""


@dataclass(eq=False)
class _Push:
    """A sync push waiting through this front (:meth:`RayRouter.pushed`)."""

    key: str
    worker: str
    idem: IdemKey | None


class _Placed:
    """A session's host as the front sees it: describes carry the placement, and a host that
    says the session is not there makes the front read the directory again (another front may
    have deleted it and made another session with the same id elsewhere)."""

    def __init__(self, router: RayRouter, key: str, host: SessionHost) -> None:
        self.router = router
        self.key = key
        self.host = host

    async def _again(self, call: Callable[[SessionHost], Any]) -> Any:
        try:
            return await self._found(call)
        except Invalid as exc:
            if exc.code == "unknown_parameter":
                # (the count this front keeps for the early refusal may be of a session made
                # again since, with fewer parameters, through another front, on the same host:
                # the entry this front holds is then still the old one's, which only the
                # directory tells. Forgotten, the next body asks the host: a body it refuses
                # is decoded whole once, not every time, the refusal being the same)
                self.router._held_counts.pop(self.key, None)
            raise

    async def _found(self, call: Callable[[SessionHost], Any]) -> Any:
        try:
            return await call(self.host)
        except NotFound:
            cached = self.router._entries.get(self.key)
            fresh = self.router.directory.get(self.key)
            if cached is None or fresh is None or fresh == cached:
                # one refused at start (a shard of it): a 404 naming it, that says why
                refusal = await self.router._refusal(self.key, fresh) if fresh else None
                if refusal is not None:
                    raise refusal from None
                raise
            self.router._entries[self.key] = fresh
            # (kept: a request that calls its host twice, a describe and then the operation,
            # makes its second call where the first went, not to the creation deleted)
            routed = await self.router.route(self.key)
            assert isinstance(routed, _Placed)
            self.host = routed.host
            return await call(self.host)

    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False) -> Any:
        out = await self._again(lambda h: h.execute(key, op, idem=idem,
                                                    want_params=want_params))
        if isinstance(out, SessionInfo):  # (a description answered: as describe gives it)
            return self.router._placed(out, self.router._entry(key))
        return out

    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, upcast: bool = False,
        scalars: dict[str, float] | None = None,
    ) -> StepResult:
        step = self._again(lambda h: h.step(
            key, grads, want_params=want_params, worker=worker, base_version=base_version,
            idem=idem, options=options, upcast=upcast, scalars=scalars))
        if worker is None or not isinstance(self.host, RayHost):
            out: StepResult = await step  # (no sync round: a sharded session has none)
            return out
        return await self.router.pushed(_Push(key, worker, idem), step)

    async def describe(self, key: str) -> SessionInfo:
        info: SessionInfo = await self._again(lambda h: h.describe(key))
        return self.router._placed(info, self.router._entry(key))

    async def early_refusal(self, key: str, idem_key: str | None, worker: str | None,
                            op: EntriesOp, expected: Expected | None) -> EntriesRefusal | None:
        """The refusal of a body of ``op`` naming more tensors than the session holds, from
        its entries (:meth:`Front.entries_refusal <app.engine.front.Front.entries_refusal>`),
        as the session's host would give it once every tensor is made. Nothing is asked for a
        body naming no more tensors than the session held when this front last asked (a
        creation's parameters are only ever added to: :attr:`RayRouter._held_counts`), nor
        for a sharded session's (its layout, in its directory entry, is fixed), so a step
        costs nothing more. Otherwise (``EntriesRefusal.ready``, awaited once the body is
        read, then its entries looked at again): a plain session's host is asked its
        parameters' count, names, dtypes and shapes (:meth:`HostActor.held_entries`); a
        sharded session's refusal is its layout's (:func:`~app.engine.shards.layout_refusal`,
        as the embedded engine's) once its coordinator's host is known to run this commit
        (else its 503 is the answer) and the entry is still the directory's (else the session
        was deleted, perhaps made again, through another front: its operation finds out).
        Nothing is refused where the host declines (the embedded engine's cases), fails, or
        does not answer within :data:`ENTRIES_ASK_S` (then the operation answers)."""
        host, router = self.host, self.router
        if isinstance(host, RemoteSharded):
            known = len(ShardLayout.from_json(host.entry["layout"]).owner)
        elif isinstance(host, RayHost):
            made = (router._entries.get(key) or {}).get("made")
            counted = router._held_counts.get(key)
            known = counted[1] if counted is not None and counted[0] == made else 0
        else:
            return None
        answer: list[EntriesRefusal | None] = []

        async def ready() -> None:
            if not answer:
                answer.append(await self._entries_answer(key, idem_key, worker, op, expected))

        def held() -> int:  # (the host's answer; before it, what this front knew)
            if not answer:
                return known
            refusal = answer[0]
            return refusal.held() if refusal is not None else sys.maxsize

        def refuse(entries: HeaderEntries, upcast: bool, scalars: object) -> None:
            if not answer:
                raise EntriesUnknown
            refusal = answer[0]
            if refusal is not None:
                refusal.refuse(entries, upcast, scalars)
        # (a sharded session refuses any scalars first; a plain one's host checks a push's
        # scalar names first)
        scalars = op != "push" and isinstance(host, RayHost)
        return EntriesRefusal(held=held, refuse=refuse, scalars=scalars, ready=ready)

    async def _entries_answer(self, key: str, idem_key: str | None, worker: str | None,
                              op: EntriesOp, expected: Expected | None
                              ) -> EntriesRefusal | None:
        """:meth:`early_refusal`'s look where it must ask (None: no refusal)."""
        host, router = self.host, self.router
        try:
            if isinstance(host, RayHost):
                made = (router._entries.get(key) or {}).get("made")
                held = await asyncio.wait_for(host.held_entries(key, idem_key, worker, op,
                                                                expected), ENTRIES_ASK_S)
                if held is None:
                    return None
                router._held_counts[key] = (made, held.count)
                return held.refusal()
            if isinstance(host, RemoteSharded):
                await asyncio.wait_for(host.host.same_commit(), ENTRIES_ASK_S)
                if router.directory.get(key) != host.entry:
                    return None
                return layout_refusal(ShardLayout.from_json(host.entry["layout"]), worker, op)
        except (OptserveError, TimeoutError, RayTaskError, RayActorError):
            pass
        return None

    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        async def read(wait: float) -> ParamsResult:
            out: ParamsResult = await self._again(lambda h: h.pull(
                key, names, min_version=min_version, wait_s=wait,
                unless_versions=unless_versions, params_dtype=params_dtype))
            return out
        return await self.router.polled(read, wait_s)

    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        async def read(wait: float) -> ParamsResult:
            out: ParamsResult = await self._again(lambda h: h.pull_rows(
                key, rows, min_version=min_version, wait_s=wait,
                unless_versions=unless_versions, params_dtype=params_dtype))
            return out
        return await self.router.polled(read, wait_s)

    async def export_state(self, key: str) -> StateExport:
        out: StateExport = await self._again(lambda h: h.export_state(key))
        return out

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        out: HistoryResult = await self._again(lambda h: h.history(key, query))
        return out

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        return await self.host.delete(key, idem=idem, expected=expected)


def _ray_need(resources: dict[str, Any]) -> dict[str, float]:
    """A host shape (``num_cpus``, ``num_gpus``, ``memory``, custom ``resources``) in Ray's
    resource names."""
    return {"CPU": resources.get("num_cpus", 0), "GPU": resources.get("num_gpus", 0),
            "memory": resources.get("memory", 0), **(resources.get("resources") or {})}


def _fits(resources: dict[str, Any], room: dict[str, float],
          less: dict[str, float] | None = None) -> bool:
    """Whether a host shape fits in ``room`` (Ray's resource names), less ``less``."""
    less = less or {}
    return all(room.get(k, 0.0) - less.get(k, 0.0) + 1e-9 >= v
               for k, v in _ray_need(resources).items() if v)


def _add_need(held: dict[str, float], resources: dict[str, Any]) -> None:
    """Add a host shape's needs to ``held`` (Ray's resource names: :func:`_ray_need`)."""
    for k, v in _ray_need(resources).items():
        held[k] = held.get(k, 0.0) + v


# ============================================================================ the engine
def ray_options(settings: Any) -> RayOptions:
    try:
        resources = check_resources(orjson.loads(settings.ray_resources),
                                    "OPTSERVE_RAY_RESOURCES")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"OPTSERVE_RAY_RESOURCES is not JSON: {exc}") from None
    except Invalid as exc:
        raise ValueError(f"OPTSERVE_RAY_RESOURCES: {exc.field}: {exc.detail}") from None
    return RayOptions(
        data_dir=Path(settings.data_dir).resolve(), address=settings.ray_address,
        namespace=settings.ray_namespace, resources=resources,
        placement=settings.ray_placement, sessions_per_host=settings.ray_sessions_per_host,
        host_start_timeout_s=settings.ray_host_start_timeout_s,
        commit_timeout_s=settings.ray_commit_timeout_s,
        host={"device": settings.device, "torch_threads": settings.torch_threads,
              "default_nonfinite": settings.default_nonfinite,
              "durability": settings.durability,
              "snapshot_every_steps": settings.snapshot_every_steps,
              "snapshot_every_s": settings.snapshot_every_s,
              "snapshot_every_mb": settings.snapshot_every_mb,
              "max_open_logs": settings.max_open_logs,
              "fsync_interval_s": settings.fsync_interval_ms / 1000,
              "data_dir_wait_s": settings.data_dir_wait_s,
              "ready_min_free_bytes": settings.ready_min_free_bytes,
              "idempotency_window": settings.idempotency_window,
              "step_chunk": settings.step_chunk,
              "warm_up": settings.warm_up})


def ray_engine(settings: Any) -> Front:
    """The Ray engine: the front over a :class:`RayRouter`."""
    return Front(RayRouter(ray_options(settings)),
                 Limits(settings.max_sessions, settings.max_session_elements,
                        max_session_params=settings.max_session_params))
