"""The embedded session host: the sessions of one device, its worker thread, and its store.

A front (:mod:`app.engine.front`) drives it with operation values (:mod:`app.engine.ops`) and
gets typed results back; nothing here knows of HTTP or tenants beyond the session key.

Every operation on a session runs under that session's lock, in four stages:

1. ``check`` on the worker thread: every validation, nothing changed;
2. the operation's log record is written ahead (durability ``step``: written and fsynced on an
   I/O thread, so the worker steps other sessions meanwhile; ``interval``: written at once);
   a failed write leaves nothing applied (507 ``storage_full`` / 503 ``storage_error``);
3. ``apply`` on the worker thread; an apply that fails after touching tensors it cannot put
   back cheaply is cut from the log and the session is rebuilt from its store, through the
   same replay a restart runs (a session that keeps nothing on disk is then taken out of
   service for good: 503 ``session_damaged`` without ``Retry-After``; delete it). A gradient
   step with durability ``step`` is applied while its record is written and fsynced: no
   reader sees it and no answer completes until the fsync returns (a streamed answer's values
   go out once the write has returned, its last byte after the fsync), and a failed write or
   fsync cuts the record and rebuilds the session from its store
   (:meth:`EmbeddedHost._apply_while_syncing`);
4. the idempotency keys are remembered with the answer, and the answer is returned.

When that rebuild fails too (a second storage fault in a row: the cut of the record or the
read of the log fails), the session is out of service: every operation but delete gets 503
``session_damaged`` with ``Retry-After`` the time to its next try. Its first use after
``HostConfig.damaged_retry_s`` (5 s) since the last try cuts what the failed cut left in its
log (``Store.cut_pending``), then restores it through the restart's replay
(:meth:`EmbeddedHost._healed`): it comes back as a restart would bring it back (the
acknowledged operations only, its idempotency table with them), or stays out of service with
the new reason until the next try. A damaged session is never snapshotted (its tensors may
hold what must not count).

On start every stored session is rebuilt: its snapshot (if any), then a replay of its log
through the same ``check`` and ``apply`` (the first record of a log without a snapshot is the
session's create).

The host holds its parts, each in a module of its own, with what they share
(:class:`~app.engine.host_state.HostState`): the restore and recovery of sessions from the
store (:class:`~app.engine.host_restore.SessionRestorer`), the snapshots and the maintenance
(:class:`~app.engine.host_upkeep.StoreUpkeep`), and what a sharded session's coordinator asks
of its shards' host (:class:`~app.engine.host_shard_hooks.ShardHooks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from app.engine import (
    chunked,
    metrics,
    optimizers,
    persist,
    ps,
    sparse,
    state_dicts,
    state_order,
)
from app.engine.answer_stream import AnswerStream, RecordWritten
from app.engine.chunked import DEFAULT_CHUNK
from app.engine.deleted_creates import (
    DeletedCreates,
    delete_stone,
    is_create,
    session_refused,
    stone,
)
from app.engine.evaluations import Evaluations
from app.engine.held_entries import HeldEntries, ParamShape
from app.engine.history import HistoryQuery, HistoryResult, expand_fields
from app.engine.host_restore import SessionRestorer
from app.engine.host_shard_hooks import ShardHooks
from app.engine.host_state import Damage, HostState
from app.engine.host_upkeep import StoreUpkeep
from app.engine.idempotency import key_reused
from app.engine.idle import POLL_S, IdleClock, short_of_memory
from app.engine.interface import (
    CreateSpec,
    Durability,
    EngineStatus,
    EntriesOp,
    EntriesRefusal,
    Evaluation,
    EvaluationRequest,
    GradsResult,
    HeaderEntries,
    IdemKey,
    NonFinitePolicy,
    ParamsResult,
    ReturnParams,
    SchedulerResult,
    SessionInfo,
    StateExport,
    StepResult,
    Tensors,
    no_session,
    session_key,
    split_key,
)
from app.engine.last_versions import LastVersions, is_version
from app.engine.last_versions import stone as version_stone
from app.engine.ops import (
    AddParamGroup,
    ApplyFailed,
    Configure,
    CreateSession,
    Expected,
    ImportState,
    Operation,
    Overwrite,
    Step,
    apply_counted,
)
from app.engine.ops.gradients import StepPlan, staleness_of
from app.engine.ops.params import check_group_indexes
from app.engine.rounds import Round, SyncRounds
from app.engine.session import Session
from app.engine.shards import (
    RevisionTip,
    Tip,
    parent_of,
    shard_index,
    shown_id,
)
from app.engine.store import Files, Store, storage_failure
from app.engine.worker import DeviceWorker, Observer
from app.errors import (
    Conflict,
    Invalid,
    NotFound,
    OptserveError,
    PreconditionFailed,
    Unavailable,
)
from app.gc_settle import SWEEP_AFTER_S, settler
from app.runtime import release_memory
from app.wire.kept_by_header import forget_all as forget_kept_by_header
from app.wire.safetensors_body import pack
from app.wire.safetensors_header import forget_big_header
from app.wire.tensor_maps import PackedTensors

log = logging.getLogger("optserve.engine")
T = TypeVar("T")
MAX_WAIT_S = ps.MAX_WAIT_S
_TOMBSTONES = 10_000
#: idle polls in a row (a minute) before the garbage collector's sweep frees what freezing
#: sessions' objects trapped (:meth:`~app.gc_settle.Settler.sweep`: a full collection of
#: everything; after two seconds it ran between the steps of a client whose 100,000 tensors
#: take seconds to encode, and the next step waited for it)
SWEEP_IDLE_POLLS = 30

#: a deleted session of fewer parameters is freed on the event loop's thread (a hop to the
#: device worker would cost more than the freeing): :meth:`EmbeddedHost._let_go`
_LET_GO_INLINE = 1000


async def _to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """Run an operation to its end even when its caller is cancelled (a caller that gave up):
    stopped at an ``await``, it could leave a logged record unapplied, or a step applied whose
    fsync failed unrestored. The caller gets CancelledError; the operation finishes alone.

    It starts at once, on the caller's turn of the event loop: one that ends without waiting
    (a small session's step, run inline) needs no task. At its first wait, what is left of it
    becomes a task of its own, which the caller awaits through a shield. So until its first
    wait an operation runs in its caller's task and context: it must not set context variables
    or start timeouts there (none does)."""
    try:
        waits_for = coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    task = asyncio.ensure_future(_Rest(coro, waits_for))
    task.add_done_callback(_retrieved)
    return await asyncio.shield(task)


class _Rest(Coroutine[Any, Any, Any]):
    """The rest of a coroutine that has started and now waits for ``waits_for`` (what its
    ``await`` yielded: a future, or None for a bare yield), as a coroutine a task can drive:
    the task's first ``send`` gets ``waits_for``, and everything after (the outcome of each
    wait, a cancellation thrown in, even one before the task's first step) goes to the
    coroutine itself, at the ``await`` where it waits."""

    def __init__(self, coro: Coroutine[Any, Any, Any], waits_for: Any) -> None:
        self._coro = coro
        self._waiting: list[Any] = [waits_for]

    def send(self, value: Any) -> Any:
        if self._waiting:
            return self._waiting.pop()
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._waiting.clear()
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # the old three-argument form

    def close(self) -> None:
        self._coro.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> _Rest:
        return self

    def __await__(self) -> Generator[Any, None, Any]:
        return self  # (an iterator with send and throw, as a generator is)


async def _finished_first(fut: asyncio.Future[T]) -> T:
    """Await ``fut`` (work on another thread) to its end even when the caller is cancelled
    meanwhile, and only then let the cancellation through: a caller that holds a session's
    lock keeps it until the work it started there is done (a snapshot's write, cancelled with
    the maintenance task at stop, must not overlap the snapshot ``stop`` then writes)."""
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            try:
                await asyncio.wait([fut])
            except asyncio.CancelledError:
                continue
        raise


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # an abandoned operation's failure is its own (already logged)


#: a step's log record at least this large is written beside the step, not before it
OVERLAP_WRITE_BYTES = 1 << 20
#: a record written beside its step, of gradients decoded from one body that average less
#: than this per tensor, takes its own copy of their bytes (one copy:
#: :meth:`persist.RecordParts.own_body`) and the step takes the gradients as they are, not a
#: copy of each (:func:`own_gradients`: 20,000 tensors of 4 floats, ~70 ms a step here)
OWN_RECORD_MEAN_BYTES = 64 * 1024


#: a step of a session with at most this many parameter tensors and bytes runs on the event
#: loop's thread when the device worker is idle (``DeviceWorker.run``'s ``inline``): at most a
#: few hundred microseconds of torch (1 MB: a 250,000-parameter Adam step, about 0.3 ms here), for
#: which the hop to the worker and back (0.1-0.2 ms on 2 cores) is a large share; other
#: connections wait that long. 1 MB, not 256 KB: a 1e5 Adam step over HTTP went 1.28-1.49 ->
#: 1.15-1.23 ms (``benchmarks.ab``, CHANGELOG)
INLINE_TENSORS = 64
INLINE_BYTES = 1024 * 1024


def _small(s: Session, op: Operation) -> bool:
    """A step of ``s`` short enough to run inline (no other operation: they are rarer, and
    some are not short)."""
    params = s.params
    return (isinstance(op, Step) and len(params) <= INLINE_TENSORS
            and sum(t.nbytes for t in params.values()) <= INLINE_BYTES)


def own_gradients(plan: StepPlan, op: Step) -> None:
    """The step's gradients as copies wherever they share memory with the ones its log record
    is written from (CPU sessions: the very same tensors; device copies, accumulated or
    widened gradients are new tensors already)."""
    sent = {t.untyped_storage().data_ptr() for t in op.grads.values()
            if t.layout == torch.strided}
    for name, t in plan.total.items():
        if t.layout != torch.strided or t.untyped_storage().data_ptr() in sent:
            plan.total[name] = t.clone()


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"OPTSERVE_DEVICE={setting} but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"OPTSERVE_DEVICE={setting}: only auto, cpu, cuda, cuda:N")
    return device


@dataclass
class HostConfig:
    device: str = "auto"
    torch_threads: int = 0
    #: CPU steps take parameters larger than this chunk by chunk (``app.engine.chunked``)
    step_chunk: int = DEFAULT_CHUNK
    default_nonfinite: NonFinitePolicy = "reject"
    data_dir: Path | None = None
    durability: Durability = "memory"
    snapshot_every_steps: int = 1000
    snapshot_every_s: float = 300.0
    #: also snapshot once the session's log holds this many MB since its last snapshot (a
    #: 1e7-parameter session logs 40 MB per step: 1000 steps would be 40 GB of log)
    snapshot_every_mb: float = 1024.0
    #: session logs kept open at once (0: the store's default from ``RLIMIT_NOFILE``,
    #: :func:`app.engine.store.default_open_logs`)
    max_open_logs: int = 0
    fsync_interval_s: float = 0.05
    idempotency_window: int = 1000
    #: per-step norms for sessions that do not say (``"metrics"`` on create)
    metrics: bool = True
    #: history rows per session for sessions that do not say (``"history"`` on create)
    history_steps: int = 100_000
    #: load torch's lazily imported kernels before readiness (tests that restart often skip it)
    warm_up: bool = True
    #: how long a start waits for another process to release the data directory
    #: (:mod:`app.engine.data_dir_lock`) before it fails
    data_dir_wait_s: float = 30.0
    #: readiness fails while the data directory has less free space than this (0: never; a
    #: ``memory`` durability host never checks: it writes only for a session that asks)
    ready_min_free_bytes: int = 0
    #: the store's file system calls (tests inject faults here)
    files: Files | None = None
    #: how long an LBFGS step waits for each evaluation before it is abandoned
    evaluation_timeout_s: float = 60.0
    #: a session taken out of service because its store failed twice in a row is restored
    #: from its store at its next use once this long has passed since the last try (503
    #: ``session_damaged`` answers ``Retry-After`` with the time left)
    damaged_retry_s: float = 5.0
    #: a session made again under a deleted one's id continues its versions
    #: (:mod:`app.engine.last_versions`). Off for the Ray engine's hosts: a sharded session's
    #: shards are made on several hosts, each of which would know another last version (its
    #: shards would start out of step), and a session made again may land on another host; the
    #: directory keeps them there, and a front passes each create ``CreateSpec.first_version``
    continue_versions: bool = True


_OLD_SHARD_ID = re.compile(r"shard[0-9]+of[0-9]+")


def old_sharded_delete(stone: Mapping[str, str]) -> tuple[str, str] | None:
    """(its shard's key, its sharded session's key) for the tombstone of a keyed delete of a
    sharded session as commits before 118a618 logged it: under the first shard's own tenant
    and id (``<tenant>#<id>``, ``shard0of<S>``), never the session's, so that after a restart
    the delete's retry was a 404 (and its other shards stayed, out of sight, their id taken).
    None for any other tombstone (this commit scopes a shard's by its whole key)."""
    owner, sep, session_id = stone["tenant"].partition("#")
    if not sep or "~" in stone["tenant"] or not _OLD_SHARD_ID.fullmatch(stone["id"]):
        return None
    return f"{stone['tenant']}~{stone['id']}", session_key(owner, session_id)


class EmbeddedHost:
    def __init__(self, config: HostConfig | None = None, observer: Observer | None = None
                 ) -> None:
        self.config = config = config or HostConfig()
        self._device = resolve_device(config.device)
        self.device = str(self._device)
        self._worker = DeviceWorker(self._device, config.torch_threads, observer)
        chunked.configure(config.step_chunk)
        self._store = (Store(config.data_dir, config.fsync_interval_s, config.files,
                             config.max_open_logs, config.data_dir_wait_s,
                             config.ready_min_free_bytes if config.durability != "memory"
                             else 0)
                       if config.data_dir is not None else None)
        self._default_durability: Durability = (config.durability if self._store is not None
                                                else "memory")
        self._sessions: dict[str, Session] = {}
        self._refused: dict[str, str] = {}
        #: the sessions this start discarded as creates a crash interrupted (never
        #: acknowledged): a sharded session's router undoes the rest of such a create
        self.interrupted: set[str] = set()
        self._damaged: dict[str, Damage] = {}
        self._locks: dict[str, _KeyLock] = {}
        self._key_locks: dict[tuple[str, str], _KeyLock] = {}
        self._changed: dict[str, asyncio.Event] = {}
        #: the server is draining (:meth:`drain`): long polls answer at once
        self._draining = False
        self._rounds = SyncRounds(self._apply_round, self._check_push, self._answered)
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="optserve-io")
        # tenant-wide idempotency: creates (by the session they made) and deletes
        self._tombstones: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()
        #: the create keys of deleted sessions (a retried create is refused, not run again)
        self._deleted_creates = DeletedCreates(_TOMBSTONES)
        #: the versions deleted sessions were at: one made again under the same id continues
        #: past it (:mod:`app.engine.last_versions`)
        self._last_versions = LastVersions(_TOMBSTONES)
        #: sharded sessions (their keys) whose keyed delete a commit from before 118a618
        #: logged (:func:`old_sharded_delete`): it deleted their first shard only, and the
        #: router deletes the others at start
        self.old_sharded_deletes: set[str] = set()
        #: the create keys of sessions refused at start, as their files still tell them:
        #: (tenant, key) -> (fingerprint, session id)
        self._refused_creates: dict[tuple[str, str], tuple[str, str]] = {}
        self._snapshotter: asyncio.Task[None] | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._evaluations = Evaluations(self)
        #: sessions with a step applied whose log record's fsync is still running
        self._unsettled: dict[str, asyncio.Future[None]] = {}
        #: called with a session's key once its files, removed from the data directory while
        #: the server ran, are written again (:meth:`StoreUpkeep.write_again
        #: <app.engine.host_upkeep.StoreUpkeep.write_again>`): a router writes again
        #: what it keeps there for the session (a sharded session's directory entry). An
        #: OSError fails the operation that found the removal (503)
        self.written_again: list[Callable[[str], None]] = []
        #: called once the maintenance took the data directory's lock again (the directory
        #: had been removed while the server ran), after the tombstone log: a Ray host writes
        #: again the marks of its sessions' deletes (logged: an OSError fails nothing)
        self.directory_again: list[Callable[[], None]] = []
        #: called with a session's key (a shard's) and its version as it is deleted, before
        #: the delete's commit point (an OSError refuses the delete, nothing done): a Ray host
        #: writes the version into the directory (:mod:`app.engine.last_versions`)
        self.deleting: list[Callable[[str, int], None]] = []
        #: what the host's parts share with it (the same objects)
        self._shared = HostState(config, self._device, self._worker, self._store,
                                 self._sessions, self._damaged)
        self._restorer = SessionRestorer(
            self._shared, refused=self._refused, refused_creates=self._refused_creates,
            interrupted=self.interrupted, build=self._build, lock=self._lock,
            settle=self._settle)
        self._upkeep = StoreUpkeep(
            self._shared, tombstones=self._tombstones, deleted_creates=self._deleted_creates,
            last_versions=self._last_versions,
            written_again=self.written_again, directory_again=self.directory_again,
            in_io=self._in_io, in_io_whole=self._in_io_whole, lock=self._lock,
            evaluations=self._evaluations)
        self._shard_hooks = ShardHooks(
            self._shared, restorer=self._restorer, upkeep=self._upkeep, get=self._get,
            lock=self._lock, settled=self._settled)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._draining = False  # (a host started again after a drain serves as before)
        self._rounds.reopen()
        self._worker.start()
        if self.config.warm_up:
            await self._worker.run(self._warm_up)
        if self._store is not None:
            store = self._store
            store.open()
            # (a delete writes up to two keyed lines: its own key's, its session's create
            # key's; and one of its session's last version, kept apart)
            for t in await self._in_io(lambda: store.tombstones(2 * _TOMBSTONES,
                                                                _TOMBSTONES)):
                if is_version(t):
                    self._last_versions.restore(t)
                    continue
                if is_create(t):
                    self._deleted_creates.note(t["tenant"], t["key"], t["fingerprint"],
                                               t["id"])
                    continue
                self._tombstones[(t["tenant"], t["key"])] = (t["fingerprint"], t["id"])
                old = old_sharded_delete(t)
                if old is not None:  # (as a delete of this commit keeps its key)
                    shard, parent = old
                    self._tombstones[(shard, t["key"])] = (t["fingerprint"], t["id"])
                    self._tombstones[split_key(parent)[0], t["key"]] = (
                        t["fingerprint"], split_key(parent)[1])
                    self.old_sharded_deletes.add(parent)
                while len(self._tombstones) > _TOMBSTONES:
                    self._tombstones.popitem(last=False)
            await self._worker.run(self._restorer.restore_all)
            for key in list(self._sessions):  # (a restart's sessions: out of the collector's
                self._settle(key)  # walks from the start)
            self._snapshotter = asyncio.create_task(self._upkeep.maintain())
        for key, session in self._sessions.items():
            self._rounds.set(key, session.ps.sync)
        self._trimmer = asyncio.create_task(self._trim_when_idle())

    def drain(self) -> None:
        """The server is draining (SIGTERM): open sync rounds fail now with 409
        ``round_aborted`` (:meth:`SyncRounds.abort`), and long polls answer now with the
        current state (as at the end of their wait), instead of holding the drain."""
        self._draining = True
        self._rounds.abort()
        for key in list(self._changed):
            self._version_changed(key)

    def withdraw_push(self, key: str, worker: str, idem: IdemKey | None,
                      front: str | None = None) -> bool:
        """Take a push that came through ``front`` and waits in the session's open sync round
        out of it, failing it with 409 ``round_aborted`` (:meth:`SyncRounds.withdraw`): a Ray
        front draining asks it for the pushes that wait through it. Whether it was there."""
        return self._rounds.withdraw(key, worker, idem, front)

    async def stop(self, *, snapshot: bool = True) -> None:
        """Snapshot every session (so the next start replays nothing), then stop. Without
        ``snapshot`` the disk stays as the operations left it (what a crash leaves, minus the
        torn write: tests use it)."""
        tasks = [task for task in (self._snapshotter, self._trimmer) if task is not None]
        for task in tasks:
            task.cancel()
        # a snapshot or a repair they started ends first (_finished_first); tasks of another
        # loop (a test's start and stop in two asyncio.run calls) cannot be waited for here
        loop = asyncio.get_running_loop()
        mine = [task for task in tasks if task.get_loop() is loop]
        if mine:
            await asyncio.wait(mine)
        await self._evaluations.abandon_all()
        await self._rounds.stop()
        if self._store is not None and self._worker.alive() and snapshot:
            await self._upkeep.snapshot_all(self._store)
        if self._store is not None:
            self._store.close()
        self._worker.stop()
        self._io.shutdown(wait=True)

    async def status(self, *, memory: bool = False) -> EngineStatus:
        reason = None
        if not self._worker.alive():
            reason = "the device worker is not running"
        elif self._store is not None:
            reason = await self._in_io(self._store.health)
        used = await self._worker.run(self._memory_bytes, "status") if memory else 0
        return EngineStatus(reason is None, reason, self.device, len(self._sessions), used,
                            dict(self._refused))

    def _memory_bytes(self) -> int:
        """Bytes of tensors the sessions hold (CUDA: what torch's allocator has handed out)."""
        if self._device.type == "cuda":
            return int(torch.cuda.memory_allocated(self._device))
        return sum(s.memory_bytes() for s in list(self._sessions.values()))

    def _warm_up(self) -> None:
        """Load torch's lazily imported kernels before readiness, so the first client
        request does not pay for them."""
        for name in optimizers.SUPPORTED:
            cls = optimizers.optimizer_class(name)
            optimizers.probe(cls, {}, [{}], [torch.float32], self._device, {})

    def _submit_io(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """``fn`` handed to an I/O thread now (not when a task first runs)."""
        return asyncio.get_running_loop().run_in_executor(self._io, fn)

    async def _in_io(self, fn: Callable[[], T]) -> T:
        return await self._submit_io(fn)

    async def _in_io_whole(self, fn: Callable[[], T]) -> T:
        """:meth:`_in_io`, and a caller cancelled meanwhile waits for ``fn`` to end first."""
        return await _finished_first(self._submit_io(fn))

    def _lock(self, key: str) -> _SessionLock:
        """The session's lock, to hold with ``async with``."""
        return _SessionLock(self._locks, key, self._sessions)

    def _get(self, key: str) -> Session:
        damage = self._damaged.get(key)
        if damage is not None:
            raise damage.error(split_key(key)[1])
        session = self._sessions.get(key)
        if session is None:
            raise no_session(key)
        return session

    async def _healed(self, key: str, *, locked: bool = False) -> None:
        """Restore the session if it is out of service and its next try is due
        (:meth:`SessionRestorer.healed <app.engine.host_restore.SessionRestorer.healed>`);
        ``locked``: the caller holds the session's lock."""
        await self._restorer.healed(key, locked=locked)

    def _version_changed(self, key: str) -> None:
        """Wake the long polls on this session (they check the version again)."""
        event = self._changed.pop(key, None)
        if event is not None:
            event.set()

    # ------------------------------------------------------------------ queries
    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self._sessions if k.startswith(prefix)]

    def refused(self) -> dict[str, str]:
        return dict(self._refused)

    async def describe(self, key: str) -> SessionInfo:
        await self._healed(key)
        await self._settled(key)
        info = await self._worker.run(lambda: self._get(key).describe())
        info.pending = self._rounds.pending(key)
        return info

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        def describe_all() -> list[SessionInfo]:
            return [s.describe() for k, s in self._sessions.items()
                    if k.startswith(prefix) and k not in self._damaged]
        await self._settled()
        infos = await self._worker.run(describe_all)
        for info in infos:
            info.pending = self._rounds.pending(f"{prefix}{info.id}")
        return infos

    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_into: Tensors | None = None, params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        """The parameters; first waiting up to ``wait_s`` (capped) for ``min_version``.
        ``not_modified`` (no tensors) when the version is one of ``unless_versions``.
        ``params_dtype``: narrowed as a step's answer is (``Session.pack_params``; the session
        keeps its own); not with ``params_into`` (the same-host transport's full-width views)."""
        if params_into is not None and params_dtype is not None:
            raise ValueError("a pull into views is not narrowed")
        await self._healed(key)
        if min_version is not None and wait_s > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(wait_s, MAX_WAIT_S)
            while True:
                # Registered before the version is read: a step in between still wakes us.
                changed = self._changed.setdefault(key, asyncio.Event())
                await self._settled(key)
                version = await self._worker.run(lambda: self._get(key).version, "version")
                remaining = deadline - loop.time()
                if version >= min_version or remaining <= 0 or self._draining:
                    break
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    pass

        def read() -> ParamsResult:
            s = self._get(key)
            s.check_names(names)
            if s.version in unless_versions:
                return ParamsResult(s.version, s.step_count, s.lrs(), {}, not_modified=True)
            if params_into is not None:
                s.check_room(params_into)
            params = (s.copy_params_into(params_into) if params_into is not None
                      else s.pack_params(names, params_dtype))
            return ParamsResult(s.version, s.step_count, s.lrs(), params)
        await self._settled(key)
        return await self._worker.run(read)

    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        """Some rows of some parameters (row-sparse tensors), as :meth:`pull` answers whole
        parameters (waiting, ``not_modified``, narrowed to ``params_dtype``). A shard's
        rows are not sized here: its coordinator sized the pull against the whole session."""
        sized = parent_of(key) is None

        def read(check_only: bool = False) -> ParamsResult | None:
            s = self._get(key)
            sparse.check_rows(s.params, rows, sized=sized)
            if check_only:
                return None
            if s.version in unless_versions:
                return ParamsResult(s.version, s.step_count, s.lrs(), {}, not_modified=True)
            return ParamsResult(s.version, s.step_count, s.lrs(),
                                sparse.gather_rows(s, rows, params_dtype))
        await self._healed(key)
        if min_version is not None and wait_s > 0:
            await self._worker.run(lambda: read(check_only=True), "pull_rows")
            await self.pull(key, [], min_version=min_version, wait_s=wait_s)
        await self._settled(key)
        out = await self._worker.run(read, "pull_rows")
        assert out is not None
        return out

    async def export_state(self, key: str) -> StateExport:
        def read() -> StateExport:
            s = self._get(key)
            sd = export_state_dict(s)
            order = None if s.state_order is None else dict(s.state_order)
            return StateExport(sd, s.version, s.step_count, s.revision, order, s.token)
        await self._healed(key)
        await self._settled(key)
        return await self._worker.run(read)

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        """Rows of the session's history: copies, taken on the worker between operations."""
        def read() -> HistoryResult:
            session = self._get(key)
            h = session.history
            fields = expand_fields(query.fields, h.fields, len(session.optimizer.param_groups))
            first, last = h.bounds()
            cols = h.select(query.since, query.until, fields)
            return HistoryResult(h.capacity, first, last, len(cols["n"]), query.points, cols)
        await self._healed(key)
        await self._settled(key)
        return await self._worker.run(read, "history")

    async def _trim_when_idle(self) -> None:
        """Once the host has been idle (:class:`~app.engine.idle.IdleClock`: two seconds, or
        twice its recent pauses between bursts unless memory is short), give the heap's free
        pages back (a training loop keeps its per-step blocks for reuse; a session at rest
        holds only its parameters and state), the kept parse of a big safetensors header
        first."""
        clock = IdleClock()
        last = 0
        while True:
            await asyncio.sleep(POLL_S)
            ops = self._worker.jobs
            active, last = ops != last, ops
            # asked only when the answer decides, and off the event loop (it reads
            # /proc/self/smaps: milliseconds)
            short: bool = clock.asks(active) and await self._in_io(short_of_memory)
            if clock.poll(active, functools.partial(bool, short)):
                try:
                    await self._worker.run(_at_rest, "trim")
                except RuntimeError:
                    return
                last = self._worker.jobs
            elif settler.freezes and (clock.idle >= SWEEP_IDLE_POLLS
                                      or settler.overdue(SWEEP_AFTER_S)):
                # (a full collection of everything: once the host rests for long, or, on a
                # host that never rests, once what a freeze trapped has been held long enough)
                try:
                    await self._worker.run(settler.sweep, "trim")
                except RuntimeError:
                    return
                last = self._worker.jobs

    async def trim(self) -> None:
        """Return the heap's free pages to the OS (after large one-off operations)."""
        await self._worker.run(release_memory, "trim")

    # ------------------------------------------------------------------ create and delete
    def find_create(self, tenant: str, idem: IdemKey) -> str | None:
        """The session a create with this idempotency key made (422 when the key came with
        another request), or None; 409 ``session_deleted`` when that session was deleted
        (:mod:`app.engine.deleted_creates`)."""
        for key, s in self._sessions.items():
            if s.created_by is not None and s.created_by[0] == idem.key \
                    and split_key(key)[0] == tenant:
                if s.created_by[1] != idem.fingerprint:
                    raise key_reused()
                return key
        refused = self._refused_creates.get((tenant, idem.key))
        if refused is not None:
            if refused[0] != idem.fingerprint:
                raise key_reused()
            raise session_refused(idem.key, refused[1])
        self._deleted_creates.check(tenant, idem)
        return None

    def made_by(self, key: str, idem: IdemKey) -> str | None:
        """The session a create of ``key`` with this idempotency key made already. The shards
        of one sharded session share their tenant (``<tenant>#<id>``) and the create's key, so
        a shard's create is answered only by that shard (not by a sibling made before it)."""
        from app.engine.shards import parent_of
        if parent_of(key) is None:
            return self.find_create(split_key(key)[0], idem)
        s = self._sessions.get(key)
        if s is None or s.created_by is None or s.created_by[0] != idem.key:
            return None
        if s.created_by[1] != idem.fingerprint:
            raise key_reused()
        return key

    @contextlib.asynccontextmanager
    async def _keyed(self, tenant: str, idem: IdemKey | None) -> AsyncIterator[None]:
        """Hold a tenant-wide idempotency key (creates, deletes): a retry that runs alongside
        its original waits for it, then finds what it did."""
        if idem is None:
            yield
            return
        entry = self._key_locks.setdefault((tenant, idem.key), _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users:
                del self._key_locks[(tenant, idem.key)]

    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None
                     ) -> SessionInfo:
        async with self._keyed(split_key(key)[0], idem):
            return await self._create(key, spec, idem)

    async def _create(self, key: str, spec: CreateSpec, idem: IdemKey | None) -> SessionInfo:
        tenant, session_id = split_key(key)
        if idem is not None:
            made = self.made_by(key, idem)
            if made is not None:
                info = await self.describe(made)
                info.replayed = True
                return info
        async with self._lock(key):
            if key in self._sessions or key in self._refused or key in self._damaged \
                    or (self._store is not None and self._store.exists(key)):
                raise Conflict(f"a session with id {session_id!r} already exists",
                               code="session_exists", field="id")
            durability = spec.durability or self._default_durability
            if self._store is None:
                durability = "memory"
            keys = [(idem.key, idem.fingerprint)] if idem is not None else []
            if spec.first_version is not None:  # (its router's: the Ray engine's)
                first_version = spec.first_version
            else:
                first_version = (self._last_versions.first_version(key)
                                 if self.config.continue_versions else 0)

            def build() -> tuple[CreateSession, Session]:  # (its checks off the event loop:
                # every parameter's values, 2.8 s of a create of 300,000, held it)
                op = CreateSession.from_spec(spec, session_id,
                                             spec.nonfinite or self.config.default_nonfinite,
                                             durability, self.config.metrics,
                                             self.config.history_steps, first_version)
                return op, self._build(op, keys, key)
            op, session = await self._worker.run(build, "create")
            if self._store is not None and durability != "memory":
                store = self._store

                def write() -> None:  # (encoded off the event loop: a create of 300,000
                    # parameters held it 3.7 s, every other request waiting)
                    store.create(key, persist.encode_record_parts(
                        persist.Record(op, 1, op.first_version, keys)), durability)
                await self._in_io(write)
                session.seq = 1
            self._sessions[key] = session
            self._settle(key)
            self._rounds.set(key, session.ps.sync)
            info = await self._worker.run(session.describe)
        await self._worker.run(release_memory, "trim")
        info.pending = self._rounds.pending(key)
        return info

    def _build(self, op: CreateSession, keys: list[tuple[str, str]], key: str) -> Session:
        session = op.build(self._device)
        session.shown_id = shown_id(key)
        session.idem.window = self.config.idempotency_window
        session.created_by = keys[0] if keys else None
        session.snapshot_time = time.monotonic()  # the time-based snapshot counts from now
        if shard_index(key) is not None:  # (Adagrad's states, made at construction)
            session.state_order = {}
            state_order.note_new(session)
        return session

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        """Delete the session; True when this was a retry of a delete already done.
        ``expected``: only if the session is still at that version and/or revision (412
        otherwise, nothing done)."""
        async with self._keyed(split_key(key)[0], idem):
            return await self._delete(key, idem, expected)

    def deleted_with(self, scope: str, idem: IdemKey) -> bool:
        """Whether a delete sent with this key was done (its tombstone is kept under
        ``scope``: the tenant, or a shard's own key); 422 ``idempotency_key_reused`` when the
        key was used for another request."""
        gone = self._tombstones.get((scope, idem.key))
        if gone is None:
            return False
        if gone[0] != idem.fingerprint:
            raise key_reused()
        return True

    def _delete_expected(self, key: str, expected: Expected | None) -> None:
        """A conditional delete's precondition (412 unless it holds; NotFound without the
        session). A session refused at start has no version to hold."""
        if key in self._damaged:
            if expected is not None:
                raise PreconditionFailed(
                    f"session {split_key(key)[1]!r:.140} could not be read at start, so it is "
                    "at no version; delete it without a precondition",
                    field=(expected.version_field if expected.versions is not None
                           else "base_revision"))  # (what the request sent: If-Match too)
            return
        s = self._get(key)
        if expected is not None:
            expected.check(s)

    async def _delete(self, key: str, idem: IdemKey | None, expected: Expected | None) -> bool:
        from app.engine.shards import parent_of, shard_index
        tenant, session_id = split_key(key)
        parent = parent_of(key)
        # (scope, id) of the delete key's tombstones. A delete's key is tenant-wide, but a
        # shard's is its own: the shards of a sharded session share their tenant
        # (``<tenant>#<id>``) and its delete's key, and the first shard's tombstone answered
        # the others' deletes (they were left on disk, their id taken for good). The first
        # shard keeps the key for its sharded session too, where a retry finds it once the
        # session's directory entry is gone (the front keeps the keys it answered in memory)
        scopes = [(tenant if parent is None else key, session_id)]
        if parent is not None and shard_index(key) == 0:
            scopes.append(split_key(parent))
        if idem is not None and self.deleted_with(scopes[0][0], idem):
            return True
        # (before an open LBFGS step is abandoned, and again under the lock: a refused delete
        # leaves everything as it was)
        self._delete_expected(key, expected)
        await self._evaluations.abandon_all(key)
        async with self._lock(key):
            self._delete_expected(key, expected)
            created = self._created_by(key)
            held = self._sessions.get(key)
            # (None: refused at start or out of service, at a version not known here)
            at = held.version if held is not None else None
            last = at if self.config.continue_versions else None
            if at is not None and self.deleting:
                await self._in_io(lambda: self._noted_deleting(key, at))
            if self._store is not None:
                store = self._store
                stones = [] if idem is None else [delete_stone(owner, idem.key, idem.fingerprint,
                                                               sid) for owner, sid in scopes]
                if created is not None:
                    stones.append(stone(tenant, created[0], created[1], session_id))
                if last is not None:
                    stones.append(version_stone(key, last))
                await self._in_io(lambda: store.delete(key, stones))
            dropped = [self._sessions.pop(key, None)]
            del held
            if created is not None:
                self._deleted_creates.note(tenant, created[0], created[1], session_id)
            if last is not None:
                self._last_versions.note(key, last)
            self._damaged.pop(key, None)
            self._locks.pop(key, None)
            if idem is not None:
                for owner, sid in scopes:
                    self._tombstones[(owner, idem.key)] = (idem.fingerprint, sid)
                while len(self._tombstones) > _TOMBSTONES:
                    self._tombstones.popitem(last=False)
        self._rounds.drop(key, NotFound(f"session {session_id!r:.140} was deleted during the "
                                        "round", code="session_not_found", field="session_id"))
        self._version_changed(key)
        await self._let_go(dropped)
        return False

    def _noted_deleting(self, key: str, version: int) -> None:
        """The :attr:`deleting` hooks of a delete of ``key`` at ``version`` (503
        ``storage_error`` where one cannot write: the delete is refused, nothing done)."""
        try:
            for hook in self.deleting:
                hook(key, version)
        except OSError as exc:
            raise storage_failure(exc, "writing the deleted session's last version") from exc

    async def _let_go(self, dropped: list[Session | None]) -> None:
        """Free a deleted session (``dropped`` holds it: emptied here) on the device worker's
        thread: dropping the last reference to a session of many parameters frees them and
        their optimizer state one by one (0.7 s for 100,000 Adam parameters here), which on the
        event loop's thread kept every other request waiting as long. A small one is let go
        where it is (an inline job), and so is any once the worker has stopped."""
        session = dropped[0]
        small = session is None or len(session.params) < _LET_GO_INLINE
        del session
        try:
            await self._worker.run(dropped.clear, op="delete", inline=small)
        except RuntimeError:  # (the worker has stopped: the server is stopping)
            dropped.clear()

    def create_key_of(self, key: str) -> tuple[str, str] | None:
        """The idempotency key and fingerprint of the create that made this session (a
        shard: its sharded session's create), if it is held and was made with one."""
        session = self._sessions.get(key)
        return session.created_by if session is not None else None

    def _created_by(self, key: str) -> tuple[str, str] | None:
        """The idempotency key (and fingerprint) of the create that made this session; None
        for a shard (its sharded session's create key is kept in the directory)."""
        from app.engine.shards import parent_of
        return self.create_key_of(key) if parent_of(key) is None else None

    # ------------------------------------------------------------------ operations
    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False, params_into: Tensors | None = None,
                      params_dtype: torch.dtype | None = None, into_seen: bool = False) -> Any:
        """Apply one operation to the session, all or nothing; a repeated idempotency key is
        answered from the session's table without applying anything. A step's parameters come
        back packed in a new buffer (``want_params``; ``"touched"``: only the rows its sparse
        gradients touched), or copied into ``params_into`` (views a caller owns, e.g. a
        shared-memory segment of the same-host transport). ``into_seen``: the client sees
        ``params_into`` as it is written (the same-host segment, which the SDK's parameters
        may live in), so it gets only values the session keeps: under durability ``step``,
        once the record is durable (else they are copied while its fsync runs)."""
        self._evaluations.refuse_if_open(key)

        async def locked() -> Any:
            async with self._lock(key):
                await self._healed(key, locked=True)
                session = self._get(key)
                if idem is not None:
                    hit = session.idem.lookup(idem.key, idem.fingerprint, idem.legacy)
                    if hit is not None:
                        return await self._worker.run(
                            lambda: replay_answer(session, op, hit, want_params, params_into,
                                                  params_dtype))
                seal = None
                if isinstance(op, (Overwrite, ImportState)):
                    # they change the parameters, or the version, outside a round: what a
                    # sync round gathered at the old version is discarded (logged with the
                    # operation: the discarded pushes' retries get the same 409)
                    seal = self._rounds.seal(key, session.version)
                    if seal is not None:
                        op.discarded = seal.discarded()
                try:
                    result = await self._run(key, session, op, [idem] if idem else [],
                                             want_params, params_into=params_into,
                                             params_dtype=params_dtype, into_seen=into_seen)
                except BaseException:
                    if seal is not None:  # refused: the rounds go on as they were
                        self._rounds.unseal(seal)
                    raise
                if seal is not None:
                    self._rounds.discard(seal, op.kind, self._sessions[key].version)
                if isinstance(op, Configure):
                    self._rounds.set(key, self._sessions[key].ps.sync)
                return result
        result = await _to_the_end(locked())
        self._version_changed(key)
        if isinstance(op, (ImportState, AddParamGroup, Overwrite)):
            await self._worker.run(release_memory, "trim")
        return result

    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, params_into: Tensors | None = None,
        upcast: bool = False, params_dtype: torch.dtype | None = None,
        scalars: dict[str, float] | None = None, answer_metrics: bool = True,
        into_seen: bool = False, front: str | None = None, answer: AnswerStream | None = None,
    ) -> StepResult:
        """One step now (async mode), or this worker's push into the open sync round (whose
        parameters come back packed, ``want_params``, whatever ``params_into`` says;
        ``into_seen``: see :meth:`execute`; ``front``: the Ray front it came through, whose
        drain withdraws it, :meth:`withdraw_push`).
        ``upcast`` widens float16/bfloat16 gradients of wider parameters on the device;
        ``params_dtype`` narrows the parameters sent back (the session keeps its own).
        ``answer_metrics=False``: the answer need not carry the step's metrics, and an async
        step takes its norms after answering (a round's step, which answers all its workers,
        takes them before; ``Front.step`` leaves them out of this worker's answer)."""
        if worker is not None:
            ps.check_worker(worker)
        await self._healed(key)
        if self._rounds.config(key) is not None:
            held = self._sessions.get(key)
            if options and held is not None:  # (entries that change nothing: checked to
                # name a group, as the step of a session without rounds checks them)
                check_group_indexes(len(held.optimizer.param_groups), options)
            if options and any(options.values()):
                raise Invalid("option changes travel with a step only in sessions without sync "
                              "rounds (a round's step is every worker's); PATCH the group "
                              "between rounds", code="invalid_body", field="param_groups")
            wanted = bool(want_params) or params_into is not None
            if idem is not None and self._answered(key, idem):
                # a retry of a push whose round already stepped (or was discarded: raised)
                return await self._replay_push(key, idem, grads, wanted, params_dtype)
            if upcast:
                grads = await self._worker.run(lambda: self._widen(key, grads), "upcast")
            pushed = await self._rounds.push(key, worker, grads, base_version, idem, wanted,
                                             scalars, room=params_into, front=front)
            if pushed is None:  # a retry whose push was answered meanwhile
                assert idem is not None
                return await self._replay_push(key, idem, grads, wanted, params_dtype)
            result = pushed
            if params_dtype is not None and result.params is not None:
                result = dataclasses.replace(result, params=_narrowed(result.params,
                                                                      params_dtype))
            return result
        out: StepResult = await self.execute(
            key, Step(grads, base_version, options=options, upcast=upcast,
                      scalars=scalars or None, answer_metrics=answer_metrics,
                      touched=want_params == "touched", request=True,
                      refuse_replaced=True, scheduler_range=True, tensor_range=True,
                      counter_range=True, scalar_names=True, scaled_lr=True,
                      answer=answer),
            idem=idem,
            want_params=want_params, params_into=params_into, params_dtype=params_dtype,
            into_seen=into_seen)
        return out

    def entries_refusal(self, key: str, idem_key: str | None, worker: str | None,
                        op: EntriesOp = "step", expected: Expected | None = None
                        ) -> EntriesRefusal | None:
        """For a step's, a push's or an overwrite's (``op``) body whose header names more
        tensors than the session holds: what refuses it from the header's entries alone (safe
        on any thread: it reads only the parameters' names, dtypes and shapes, and for a push
        with scalars its scalar names, for an overwrite with ``expected`` its version), with
        the answer the operation would give once its tensors were made (the session's
        :meth:`~app.engine.session.Session.check_tensors`: 422 ``unknown_parameter``, or an
        earlier entry's ``dtype_mismatch``/``shape_mismatch``). None where that answer could
        be another: no such session, a step of a session with sync rounds (a push's staleness
        is checked first), an idempotency key the session holds (its replay or its 422 comes
        first), a worker id :func:`ps.check_worker` refuses. None from the refusal (the body
        decoded whole, the operation answering) where what the operation checks before the
        tensors would refuse it: an open LBFGS step (409), a session out of service (503), an
        overwrite's precondition that no longer holds (412), a push's scalars bringing the
        session past its scalar names."""
        session = self._sessions.get(key)
        rounds = op == "step"  # (a push or an overwrite is checked as without rounds)
        if (session is None or (rounds and self._rounds.config(key) is not None)
                or (idem_key is not None and session.idem.holds(idem_key))):
            return None
        if worker is not None:
            try:
                ps.check_worker(worker)
            except Invalid:
                return None
        field = "params" if op == "overwrite" else "grads"

        def unchanged() -> bool:
            """Whether the session is still the one asked about, as it was (its body is read
            after this: meanwhile it may have been deleted, made again with other parameters,
            given sync rounds, or the key used), so the operation's answer is still this
            one."""
            return (self._sessions.get(key) is session
                    and not (rounds and self._rounds.config(key) is not None)
                    and not (idem_key is not None and session.idem.holds(idem_key))
                    and not self._evaluations.is_open(key) and key not in self._damaged)

        def held() -> int:
            return len(session.params) if unchanged() else sys.maxsize  # (else: no refusal)

        def refuse(entries: HeaderEntries, upcast: bool, scalars: object) -> None:
            if not unchanged() or not _checked_first(session, op, expected, scalars):
                return
            try:
                session.refuse_entries(((name, dtype, shape) for name, (dtype, shape, _)
                                        in entries.items()), field,
                                       None if op == "overwrite" else upcast)
            except RuntimeError:  # (its parameters changed meanwhile: the operation will say)
                return
        return EntriesRefusal(held=held, refuse=refuse)

    def held_entries(self, key: str, idem_key: str | None, worker: str | None,
                     op: EntriesOp = "step", expected: Expected | None = None
                     ) -> HeldEntries | None:
        """How many parameters the session holds and, where :meth:`entries_refusal` would
        refuse a body of ``op`` now, their names, dtypes and shapes, for that refusal made in
        another process (a Ray front: :class:`~app.engine.held_entries.HeldEntries`); none of
        those where it declines now (its cases, and those it checks again at the refusal: an
        open LBFGS step, a session out of service, an overwrite's precondition that no longer
        holds). None: no such session here."""
        session = self._sessions.get(key)
        if session is None:
            return None
        refusal = self.entries_refusal(key, idem_key, worker, op, expected)
        try:
            count = len(session.params)
            if (refusal is None or refusal.held() == sys.maxsize
                    or not _checked_first(session, op, expected, None)):
                return HeldEntries(count, None, op)
            return HeldEntries(count, {name: ParamShape(p.dtype, tuple(p.shape))
                                       for name, p in session.params.items()}, op)
        except RuntimeError:  # (its parameters changed meanwhile: the operation will say)
            return None

    def may_hold(self, key: str) -> bool:
        """Whether an operation on ``key`` may find its session (False: it would be the 404
        of :meth:`_get`, :func:`~app.engine.front.Front.refuse_unknown`): one served, one out
        of service (a 503, or restored at its next use), or one whose finished LBFGS step
        still answers a repeat of its evaluations. Every stored session is in memory from the
        start on (:meth:`start` restores them all before the server serves): none is loaded
        at its first use."""
        return (key in self._sessions or key in self._damaged
                or self._evaluations.knows(key))

    def settled_session(self, key: str, idem_key: str | None) -> Session | None:
        """The session ``key`` when its version and revision are settled for a check from a
        request's head (:meth:`refuse_stale`; a sharded session's shards:
        :meth:`ShardedSession.refuse_stale <app.engine.shards.ShardedSession.refuse_stale>`):
        None where the operation's answer could be another (no such session here, one out of
        service, an open LBFGS step, an operation under way or not yet durable, an
        idempotency key the session holds)."""
        session = self._sessions.get(key)
        held = self._locks.get(key)
        if (session is None or key in self._damaged or self._evaluations.is_open(key)
                or (held is not None and (held.users or held.lock.locked()))
                or key in self._unsettled
                or (idem_key is not None and session.idem.holds(idem_key))):
            return None
        return session

    def refuse_stale(self, key: str, expected: Expected, idem_key: str | None) -> None:
        """The 412 of a change's precondition that can no longer hold, from its request's
        head, before its body is read (it was read whole first): the one the operation's own
        check gives now (:meth:`Expected.check`, the same problem), where the session is
        past every version ``If-Match`` names (or it names weak tags only, which match none)
        or past the ``?base_revision=`` sent. Versions and revisions of a plain session only
        move forward, so such a precondition is false for good; a version not reached yet
        may still be, and is checked after the body as before. Nothing is refused where the
        operation's answer could be another: no such session here, one out of service, an
        open LBFGS step (its 409 comes first), an operation under way or not yet durable
        (what it moved may still be undone by a failed write, and a retry of it under its
        idempotency key is answered from its record, which is written with it), or an
        idempotency key the session holds (a retry is answered from its record whatever the
        version now). The operation checks again after the body."""
        session = self.settled_session(key, idem_key)
        if session is None:
            return
        versions = expected.versions
        if ((versions is not None and all(v < session.version for v in versions))
                or (expected.revision is not None and expected.revision < session.revision)):
            expected.check(session)

    # ------------------------------------------------------------------ LBFGS evaluations
    def uses_evaluations(self, key: str) -> bool:
        """Whether the session steps through evaluations (LBFGS); the 404 of one this host
        cannot hold (:meth:`may_hold`), before the step's body is read."""
        session = self._sessions.get(key)
        if session is None and not self.may_hold(key):
            raise no_session(key)
        return session is not None and session.optimizer_name == "LBFGS"

    async def open_evaluation_step(
        self, key: str, first: Evaluation | None, *, want_params: ReturnParams,
        idem: IdemKey | None = None, timeout_s: float | None = None,
        base_version: int | None = None,
    ) -> EvaluationRequest | StepResult:
        """Open an LBFGS step (:mod:`app.engine.evaluations`): its first question, or its end."""
        timeout = self.config.evaluation_timeout_s if timeout_s is None else timeout_s
        await self._healed(key)
        return await self._evaluations.open(key, first, idem=idem, timeout_s=timeout,
                                            want_params=want_params, base_version=base_version)

    async def evaluate(self, key: str, eval_id: str, ev: Evaluation, fingerprint: str
                       ) -> EvaluationRequest | StepResult:
        """An evaluation for an open LBFGS step: its next question, or its end."""
        return await self._evaluations.evaluate(key, eval_id, ev, fingerprint)

    async def abandon_step(self, key: str, step_id: str) -> str:
        """Abandon an open LBFGS step; how it ended (``abandoned`` or ``committed``)."""
        return await self._evaluations.abandon(key, step_id)

    def _answered(self, key: str, idem: IdemKey) -> bool:
        """Whether the session's idempotency table answers this push: its round stepped
        (True), or was discarded (the 409 it kept is raised); 422 for a reused key."""
        hit = self._get(key).idem.lookup(idem.key, idem.fingerprint, idem.legacy)
        return hit is not None

    async def _replay_push(self, key: str, idem: IdemKey, grads: Tensors, want_params: bool,
                           params_dtype: torch.dtype | None) -> StepResult:
        """A retried push's answer from the idempotency table: its parameters (the session's
        current ones) narrowed to ``params_dtype`` as the push asked, as its first answer was."""
        session = self._get(key)
        hit = session.idem.lookup(idem.key, idem.fingerprint, idem.legacy)
        assert hit is not None
        op = Step(grads)
        result: StepResult = await self._worker.run(
            lambda: replay_answer(session, op, hit, want_params, params_dtype=params_dtype))
        return result

    async def _check_push(self, key: str, grads: Tensors, base_version: int | None,
                          room: Tensors | None = None, scalars: dict[str, float] | None = None,
                          gathered: frozenset[str] = frozenset()) -> tuple[Tensors, int]:
        """A push's gradients checked (and its staleness, ``room``: a same-host binding's
        slots, :meth:`Session.check_room`, and its scalars' names with those the round has
        ``gathered`` against the session's bound), in one hop to the worker; with the version
        they were checked at."""
        def check() -> tuple[Tensors, int]:
            s = self._get(key)
            if room is not None:  # (a binding's slots: still the session's?)
                s.check_room(room, grads)
            if base_version is not None:
                staleness_of(s, base_version, replaced=True)
            metrics.check_scalar_names(s, scalars, gathered=gathered)
            return s.check_grads(grads), s.version
        await self._settled(key)
        return await self._worker.run(check, "sync_push")

    async def _apply_round(self, key: str, rnd: Round, how: ps.Reduce, sync: dict[str, Any]
                           ) -> StepResult:
        """One step with the round's reduced gradients, logged as one ordinary ``step``
        record answering every worker's idempotency key; every waiter gets the same result.
        Under the session's lock: a round an overwrite discarded meanwhile is not stepped,
        nor one whose pushes were checked at another version than the session's now (a
        safety net: whatever changes the version outside a round discards the round)."""
        async with self._lock(key):
            session = self._get(key)
            if rnd.discarded:  # (its workers have their answers)
                raise Conflict("this round was discarded", code="stale_gradient")
            if rnd.versions != {session.version}:
                gathered = sorted(rnd.versions)
                log.warning("%s: a sync round gathered at version %s was not stepped at "
                            "version %d", key, gathered, session.version)
                raise Conflict(f"this push's round was gathered at version {gathered[0]} and "
                               f"the session is at version {session.version}: its gradients "
                               "are not applied; pull the parameters and push again",
                               code="stale_gradient", field="base_version",
                               current_version=session.version, base_version=gathered[0])
            pushes, scalars = rnd.pushes, rnd.scalars
            reduced = await self._worker.run(lambda: ps.reduce(pushes, how), "reduce")
            step = Step(reduced, workers=list(sync["workers"]),
                        scalars=metrics.mean_scalars([scalars[w] for w in sorted(scalars)])
                        if scalars else None, scheduler_range=True, tensor_range=True,
                        counter_range=True, scalar_names=True)
            result: StepResult = await self._run(key, session, step, list(rnd.keys.values()),
                                                 rnd.want_params, sync)
        if isinstance(result.params, PackedTensors):  # every worker's answer sends them
            result.params.share()
        self._version_changed(key)
        return result

    async def _run(self, key: str, s: Session, op: Operation, keys: list[IdemKey],
                   want_params: ReturnParams, sync: dict[str, Any] | None = None,
                   params_into: Tensors | None = None,
                   params_dtype: torch.dtype | None = None, into_seen: bool = False) -> Any:
        """check, log ahead, apply (the caller holds the session's lock); ``into_seen``: see
        :meth:`execute`."""
        store = self._store if s.durability != "memory" else None
        record_keys = [(k.key, k.fingerprint) for k in keys]
        if store is not None and store.log_removed(key):
            await self._upkeep.write_again(key, s, store)
        if key in self._upkeep.hooks_owed:  # (what a restart needs to find it, written first)
            failed = self._upkeep.hooks_again(key)
            if failed is not None:
                raise Unavailable(f"the files of session {split_key(key)[1]!r:.140} were "
                                  "removed from the data directory while the server ran, and "
                                  f"writing them again failed ({failed}): nothing was applied",
                                  code="storage_error", retry_after=2)

        def check() -> Any:
            plan = op.checked(s)
            if params_into is not None and params_dtype is None and isinstance(op, Step):
                s.check_room(params_into, op.grads)  # (slots no gradient came in for)
            return plan

        def check_and_encode() -> tuple[Any, list[bytes | memoryview], int]:
            plan = check()
            assert store is not None
            record = persist.Record(op, s.seq + 1, op.version_after(s, plan), record_keys, sync)
            parts = persist.encode_record_parts(record)
            if (isinstance(op, Step) and s.durability == "step" and parts.body is not None
                    and sum(memoryview(p).nbytes for p in parts) >= OVERLAP_WRITE_BYTES
                    and (memoryview(parts[parts.body]).nbytes
                         < OWN_RECORD_MEAN_BYTES * len(op.grads))):
                parts.own_body()  # (written beside the step: _apply_while_syncing)
            return plan, parts, store.log_length(key)

        if store is not None and s.durability == "step" and isinstance(op, Step):
            # a small session's check and apply run inline like its steps without a log (the
            # write and the fsync stay on I/O threads), unless the store is failing (then its
            # log may be reopened: I/O)
            inline = _small(s, op) and not store.failing
            plan, parts, before = await self._worker.run(check_and_encode, f"{op.kind}_check",
                                                         inline=inline)
            written = RecordWritten()  # the record's write has returned (or failed)
            if op.answer is not None and not into_seen:
                # a streamed answer is written over the body the record is written from:
                # its values go in once the write has returned (its last byte, as every
                # answer, once the fsync has)
                op.answer.hold(written)
            # (into_seen: the answer's values go into params_into once they are durable)
            later = params_into if into_seen else None
            result = await self._apply_while_syncing(
                key, store, op, plan, parts, before, written,
                lambda: self._apply(key, s, op, plan, keys,
                                    want_params if later is None else False, before, sync,
                                    params_into if later is None else None, params_dtype,
                                    written.wait), inline)
            if later is not None:
                result.params = await self._worker.run(
                    lambda: answer_params(s, plan, want_params, later, params_dtype),
                    "answer", inline=inline)
        elif store is not None and s.durability == "step":
            plan, parts, before = await self._worker.run(check_and_encode, f"{op.kind}_check")
            await self._in_io(lambda: store.append(key, parts, "step"))
            result = await self._worker.run(
                lambda: self._apply(key, s, op, plan, keys, want_params, before, sync,
                                    params_into, params_dtype), op.kind)
        else:
            def all_at_once() -> Any:
                if store is None:
                    plan, before = check(), None
                else:  # interval: written now, fsynced by the store's flusher
                    plan, parts, before = check_and_encode()
                    store.append(key, parts, "interval")
                return self._apply(key, s, op, plan, keys, want_params, before, sync,
                                   params_into, params_dtype)
            result = await self._worker.run(all_at_once, op.kind,
                                            inline=store is None and _small(s, op))
        session = self._sessions.get(key)
        if session is not None and self._upkeep.snapshot_due(key, session):
            await self._upkeep.snapshot(key, session)
        self._settle(key, whole=isinstance(op, ImportState))
        return result

    def _settle(self, key: str, *, whole: bool = False) -> None:
        """Count the long-lived tensors the session gained since it was last counted
        (``whole``: all of them, new objects in place of old ones, as an import's state) for
        :data:`~app.gc_settle.settler`, which keeps them out of the cyclic collector's walks
        once enough have gathered (the server process only)."""
        s = self._sessions.get(key)
        if s is None or not settler.enabled:
            return
        now = sum(len(g["params"]) for g in s.optimizer.param_groups) + len(s.optimizer.state)
        grown = now if whole else now - s.settled_tensors
        s.settled_tensors = now
        settler.grew(grown)

    async def _apply_while_syncing(self, key: str, store: Store, op: Step, plan: StepPlan,
                                   parts: list[Any], before: int, written: RecordWritten,
                                   apply: Callable[[], T], inline: bool = False) -> T:
        """Durability ``step`` for a step: the record is written and fsynced on an I/O thread
        while the step is applied on the worker, so the step costs about the larger of the two,
        not their sum. The optimizer steps with copies of the gradients the record is being
        written from (torch may change gradients in place: foreach SGD with Nesterov momentum
        does), unless the record holds its own copy of the gradients' bytes (many small
        gradients from one body: ``OWN_RECORD_MEAN_BYTES``). Nothing is answered, and no
        reader sees the session (they wait:
        :meth:`_settled`), before the fsync returns. When the write or the fsync fails, the
        record is cut off and the session is rebuilt from its store without it (the replay a
        restart runs): it is as it was, and the client gets the storage error.

        A small record (under :data:`OVERLAP_WRITE_BYTES`: copying many small gradients costs
        more than writing them) is written first and only its fsync runs beside the step; so
        is every record while the store is failing (a full disk): nothing is applied unless
        that write succeeds, and a client retrying against a full disk costs no rebuilds.
        ``inline``: the apply may run on the event loop's thread (``DeviceWorker.run``) when it
        does not wait for the write (a small record, written first).

        A streamed answer (``op.answer``, written over the request body the record is written
        from) is held until ``written`` (:meth:`AnswerStream.hold
        <app.engine.answer_stream.AnswerStream.hold>`): its head may go out as the step
        begins and its chunks step on, but no value is copied into the body before the write
        has returned; its last byte waits for this method's result (the fsync). When the write
        or the fsync fails, the answer is never completed."""
        def write_and_sync() -> None:
            try:
                store.append(key, parts, "step", fsync=False)
                written.ok = True
            finally:
                written.set()
            store.sync(key, before)

        def apply_on_copies() -> T:
            try:
                own_gradients(plan, op)
            except BaseException:
                written.wait()  # then cut: the record must not outlive its refusal
                self._cut(key, before)
                raise
            return apply()

        size = sum(memoryview(p).nbytes for p in parts)
        beside = not (store.failing or size < OVERLAP_WRITE_BYTES)
        if beside and not store.is_open(key):
            # a log the store's bound closed is reopened first: when that fails (no descriptor
            # left), the step is refused before it is applied, not rebuilt after
            await self._in_io(lambda: store.open_log(key))
        if not beside:
            try:
                await self._in_io(lambda: store.append(key, parts, "step", fsync=False))
                written.ok = True
            finally:
                written.set()
            write: Callable[[], None] = lambda: store.sync(key, before)  # noqa: E731
            run_apply: Callable[[], T] = apply
        elif isinstance(parts, persist.RecordParts) and parts.owned:
            # the record holds its own copy of the gradients' bytes: nothing to copy here
            write, run_apply = write_and_sync, apply
        else:
            write, run_apply = write_and_sync, apply_on_copies
        settled = asyncio.get_running_loop().create_future()
        self._unsettled[key] = settled
        try:
            # submitted now, not from a task's first step: an apply that runs inline (on this
            # thread, before anything here awaits) would otherwise run before the write or the
            # fsync had even started, not beside it
            writing = self._submit_io(write)
            try:
                result = await self._worker.run(run_apply, op.kind,
                                                inline=inline and not beside)
            except BaseException:
                # refused (its record is cut) or restored: the write's outcome changes nothing
                with contextlib.suppress(Exception):
                    await asyncio.shield(writing)
                raise
            try:
                await asyncio.shield(writing)
            except Exception:  # the record did not reach the disk whole: not applied either
                await self._worker.run(
                    lambda: self._restorer.rebuild(
                        key, f"a {op.kind}'s log record was not written"), "restore")
                raise
            return result
        finally:
            del self._unsettled[key]
            settled.set_result(None)

    async def _settled(self, key: str | None = None) -> None:
        """Wait until no operation on this session (None: on any) is applied but not yet
        durable: readers never see what a failed fsync would take back."""
        while True:
            if key is None:
                pending = list(self._unsettled.values())
            else:
                one = self._unsettled.get(key)
                pending = [] if one is None else [one]
            if not pending:
                return
            for f in pending:
                await asyncio.shield(f)

    def _apply(self, key: str, s: Session, op: Operation, plan: Any, keys: list[IdemKey],
               want_params: ReturnParams, before: int | None, sync: dict[str, Any] | None,
               params_into: Tensors | None = None,
               params_dtype: torch.dtype | None = None,
               written: Callable[[], object] | None = None) -> Any:
        """Apply on the worker thread; on failure leave the session and its log as they were
        (``written``: wait until the record's write, running beside, has returned, so that
        the cut comes after it, and so that answers written over the request body the record
        is written from come after it too)."""
        try:
            result = apply_counted(op, s, plan)
        except ApplyFailed as exc:
            if written is not None:
                written()
            self._restorer.recover(key, op, before, exc)
        except BaseException:
            if before is not None:  # refused cleanly (the session is unchanged): unlog it
                if written is not None:
                    written()
                self._cut(key, before)
            raise
        if before is not None:
            s.seq += 1
        if sync is not None:
            result.sync = sync
        refused = op.refusals(s)
        if not s.idem.unchanged_by(keys, refused):  # (most steps carry no key: no answer kept)
            s.idem.remember_all([(k.key, k.fingerprint) for k in keys], op.result_json(result),
                                refused)
        if isinstance(result, StepResult) and isinstance(op, Step) and op.answer is not None \
                and op.answer.began:
            result.params = op.answer.tensors  # (written chunk by chunk by the step)
        elif isinstance(result, StepResult):
            if (params_into is not None and written is not None
                    and s.fits_answer(params_into, params_dtype)):
                written()  # the views may be the request body the record is being written
                # from: overwrite it only after that
            result.params = answer_params(s, plan, want_params, params_into, params_dtype)
        return result

    def _widen(self, key: str, grads: Tensors) -> Tensors:
        s = self._get(key)
        s.check_tensors(grads, "grads", upcast=True)
        return s.on_device(grads)

    def _cut(self, key: str, before: int) -> None:
        assert self._store is not None
        try:
            self._store.truncate(key, before)
        except OSError as exc:  # the store retries before its next write; replay skips it
            log.error("could not cut a refused operation's record from %s: %s", key, exc)

    # ------------------------------------------------------------------ sharded sessions
    # (what a sharded session's coordinator asks of the host of its shards: ShardHooks)
    def align_old_revisions(self, keys: list[str]) -> int | None:
        """:meth:`ShardHooks.align_old_revisions
        <app.engine.host_shard_hooks.ShardHooks.align_old_revisions>`."""
        return self._shard_hooks.align_old_revisions(keys)

    async def revision_tip(self, key: str) -> RevisionTip:
        """:meth:`ShardHooks.revision_tip <app.engine.host_shard_hooks.ShardHooks.revision_tip>`."""
        return await self._shard_hooks.revision_tip(key)

    async def put_at_revision(self, key: str, revision: int) -> bool:
        """:meth:`ShardHooks.put_at_revision
        <app.engine.host_shard_hooks.ShardHooks.put_at_revision>`."""
        return await self._shard_hooks.put_at_revision(key, revision)

    def cut_tip(self, key: str) -> Tip:
        """:meth:`ShardHooks.cut_tip <app.engine.host_shard_hooks.ShardHooks.cut_tip>`."""
        return self._shard_hooks.cut_tip(key)

    def holds_key(self, key: str, idem_key: str) -> bool:
        """:meth:`ShardHooks.holds_key <app.engine.host_shard_hooks.ShardHooks.holds_key>`."""
        return self._shard_hooks.holds_key(key, idem_key)

    def undo_last(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        """:meth:`ShardHooks.undo_last <app.engine.host_shard_hooks.ShardHooks.undo_last>`."""
        return self._shard_hooks.undo_last(key, idem_key, want)

    async def cut_tip_live(self, key: str) -> Tip:
        """:meth:`ShardHooks.cut_tip_live <app.engine.host_shard_hooks.ShardHooks.cut_tip_live>`."""
        return await self._shard_hooks.cut_tip_live(key)

    async def undo_last_live(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        """:meth:`ShardHooks.undo_last_live
        <app.engine.host_shard_hooks.ShardHooks.undo_last_live>`."""
        return await self._shard_hooks.undo_last_live(key, idem_key, want)


class _SessionLock:
    """Holds the lock ``locks`` has for ``key`` when it is taken. A delete drops its session's
    lock while others wait for it: each of them, once it has the dropped one, lets it go and
    waits for the key's current lock instead, so a session made again with that id is never
    changed under two locks at once (steps ran side by side, their versions and log records
    mixed). The last user of a lock whose key names no session (in ``sessions``) by then
    drops it too (those waiters' new locks would stay otherwise)."""

    def __init__(self, locks: dict[str, _KeyLock], key: str, sessions: Mapping[str, Any]
                 ) -> None:
        self._locks = locks
        self._key = key
        self._sessions = sessions
        self._held: _KeyLock | None = None

    async def __aenter__(self) -> None:
        while True:
            entry = self._locks.get(self._key)
            if entry is None:
                entry = self._locks[self._key] = _KeyLock()
            entry.users += 1
            try:
                await entry.lock.acquire()
            except BaseException:
                self._leave(entry)
                raise
            if self._locks.get(self._key) is entry:
                self._held = entry
                return
            entry.lock.release()  # dropped meanwhile: its session was deleted
            self._leave(entry)

    async def __aexit__(self, *exc: object) -> None:
        assert self._held is not None
        held, self._held = self._held, None
        held.lock.release()
        self._leave(held)

    def _leave(self, entry: _KeyLock) -> None:
        entry.users -= 1
        if (entry.users == 0 and self._key not in self._sessions
                and self._locks.get(self._key) is entry):
            del self._locks[self._key]


@dataclass(eq=False)
class _KeyLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


def export_state_dict(s: Session) -> dict[str, Any]:
    """The session's state dict in torch's format, copied (later steps cannot change it)."""
    sd = state_dicts.detach_tree(s.optimizer.state_dict())
    if s.scheduler is not None:
        sd["scheduler"] = state_dicts.detach_tree(s.scheduler.state_dict())
    return dict(sd)


def answer_params(s: Session, plan: Any, want_params: ReturnParams,
                  params_into: Tensors | None, params_dtype: torch.dtype | None
                  ) -> Tensors | None:
    """A step's parameters for its answer (on the worker): copied into ``params_into`` when
    they fit it, only the rows its sparse gradients touched (``"touched"``), packed, or none."""
    if params_into is not None and s.fits_answer(params_into, params_dtype):
        return s.copy_params_into(params_into)
    if want_params == "touched" and isinstance(plan, StepPlan):
        return sparse.touched(s, plan.total, params_dtype)
    if want_params or params_into is not None:
        return s.pack_params(dtype=params_dtype)
    return None


def replay_answer(s: Session, op: Operation, hit: dict[str, Any], want_params: ReturnParams,
                  params_into: Tensors | None = None,
                  params_dtype: torch.dtype | None = None) -> Any:
    """The answer to a repeated idempotency key, from what the table kept (no tensors): a step
    returns its own version, step and lr with the session's current parameters (with their
    version); a push, zero_grad or scheduler step its answer as kept; other operations the
    session as it is now."""
    if isinstance(op, Step):
        result = StepResult(int(hit["version"]), int(hit["step"]),
                            [_float(x) for x in hit["lr"]], skipped=bool(hit.get("skipped")),
                            nonfinite=list(hit.get("nonfinite", [])), sync=hit.get("sync"),
                            staleness=hit.get("staleness"), replayed=True,
                            params_version=s.version, metrics=hit.get("metrics"))
        if params_into is not None and s.fits_answer(params_into, params_dtype):
            if params_dtype is None:  # (fits_answer checked each view's dtype and shape)
                s.check_room(params_into)
            result.params = s.copy_params_into(params_into)
        elif want_params == "touched":  # what the first answer held, not every parameter
            result.params = sparse.touched_again(s, op.grads, hit.get("touched"),
                                                 params_dtype)
        elif want_params or params_into is not None:
            result.params = s.pack_params(dtype=params_dtype)
        return result
    if op.kind in ("push", "zero_grad"):
        return GradsResult(int(hit["version"]), int(hit["step"]), list(hit["accumulated"]),
                           replayed=True)
    if op.kind == "scheduler_step":
        return SchedulerResult(int(hit["version"]), int(hit["step"]),
                               [_float(x) for x in hit["lr"]], hit.get("last_epoch"),
                               replayed=True)
    if isinstance(op, Overwrite):
        names = [n for n in op.params if n in s.params]
        return ParamsResult(s.version, s.step_count, s.lrs(), s.pack_params(names),
                            replayed=True)
    if op.kind == "bump":  # a shard an overwrite of a sharded session names none of
        return ParamsResult(s.version, s.step_count, s.lrs(), {}, replayed=True)
    info = s.describe()
    info.replayed = True
    if isinstance(op, AddParamGroup):  # (the kept answer is the session as the group left it)
        groups = hit.get("param_groups")
        info.added_group = len(groups) - 1 if isinstance(groups, list) and groups else None
    return info


def _float(x: Any) -> float:
    if isinstance(x, dict):
        return {"inf": float("inf"), "-inf": float("-inf")}.get(x.get("$float", ""),
                                                                 float("nan"))
    return float(x)


def _narrowed(params: Tensors, dtype: torch.dtype) -> PackedTensors:
    """``params`` narrowed to ``dtype`` and packed; once for all the workers of a sync round
    that ask for this dtype (their answers share it)."""
    def make() -> PackedTensors:
        out = pack(params, dtype)
        out.share()
        return out
    if isinstance(params, PackedTensors) and params.shared:
        return params.encoded(("narrow", dtype), make)
    return make()


def _at_rest() -> None:
    """What an idle host gives back: the kept parse of a big safetensors header (tens of MB
    for 100,000 tensors), then the heap's free pages."""
    forget_big_header()
    forget_kept_by_header()
    release_memory()


def _checked_first(session: Session, op: EntriesOp, expected: Expected | None,
                   scalars: object) -> bool:
    """Whether what ``op`` checks before its tensors lets them be checked
    (:meth:`EmbeddedHost.entries_refusal`): an overwrite's precondition (:meth:`Operation.checked
    <app.engine.ops.base.Operation.checked>`), a push's scalar names (:meth:`Push.check
    <app.engine.ops.gradients.Push.check>`)."""
    try:
        if expected is not None:
            expected.check(session)
        if op == "push" and scalars is not None:
            try:
                named = metrics.check_scalars(scalars)
            except Invalid:  # (their form's refusal: the route's, after the entries)
                named = {}
            metrics.check_scalar_names(session, named)
    except (OptserveError, RuntimeError):
        return False
    return True
