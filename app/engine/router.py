"""Session hosts, and the router that maps session keys to them.

A **host** (:class:`Host`) holds sessions on one device with its worker thread and its store:
the embedded host in this process (:class:`InProcessHost` around
:class:`app.engine.host.EmbeddedHost`), or a Ray actor running the same code
(:class:`app.engine.ray_host.RayHost`). The front drives a host only with session keys,
operation values and plain results, so it cannot tell the two apart.

A **router** (:class:`Router`) knows where each session lives: :class:`LocalRouter` has one
in-process host; :class:`app.engine.ray_host.RayRouter` places sessions on Ray actor hosts. For a
sharded session a router hands out its coordinator (:class:`app.engine.shards.ShardedSession`),
which drives the session's shards on their hosts and looks like a host to the front.

Beyond the operations a host takes a sharded operation in two phases: ``prepare`` (checks
against the session, changes nothing, keeps the operation for the commit) and ``commit``
(``execute`` with the operation's idempotency key: a commit that already happened is answered,
not applied again). See :mod:`app.engine.shards`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from app.engine.deleted_creates import indexed_session, refused_at_start, session_refused
from app.engine.directory import Directory
from app.engine.history import HistoryQuery, HistoryResult
from app.engine.host import EmbeddedHost
from app.engine.interface import (
    CreateSpec,
    EngineStatus,
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
from app.engine.ops import Expected, Operation
from app.engine.ops.gradients import StepPlan
from app.engine.shards import RevisionTip, Tip
from app.engine.store import files_failing, storage_failure
from app.errors import Conflict, NotFound, OptserveError, Unavailable

log = logging.getLogger("optserve.router")
#: what a failed read of the directory was doing (:func:`~app.engine.store.files_failing`)
_READING = "reading the session directory"

#: how long a prepared (checked, not committed) operation is kept for its commit
PREPARED_TTL_S = 120.0
#: the front's check of a tenant's limits (429 ``too_many_sessions``), which a router runs
#: before it claims anything for a new session: a retry finishing a create that was cut part
#: way (its entry already counted) is not refused by it
Admit = Callable[[], Awaitable[None]]


@dataclass
class Checked:
    """What the first phase of a sharded operation learned on one shard."""

    #: this idempotency key was applied here already (its commit will answer it)
    applied: bool = False
    #: a step this shard would skip (non-finite gradients under ``nonfinite: skip``)
    skip: bool = False
    nonfinite: list[str] = field(default_factory=list)
    version: int = 0
    step: int = 0
    #: the shard's change counter (an option change moves it, not the version)
    revision: int = 0


class SessionHost(Protocol):
    """What the front calls for one session key: a host, or a sharded session's coordinator."""

    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False) -> Any: ...
    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, upcast: bool = False,
        scalars: dict[str, float] | None = None,
    ) -> StepResult: ...
    async def describe(self, key: str) -> SessionInfo: ...
    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult: ...
    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult: ...
    async def export_state(self, key: str) -> StateExport: ...
    async def history(self, key: str, query: HistoryQuery) -> HistoryResult: ...
    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool: ...


class Host(SessionHost, Protocol):
    """Sessions on one device, driven by operation values (see the module docstring)."""

    name: str
    device: str

    async def start(self) -> None: ...
    async def stop(self, *, snapshot: bool = True) -> None: ...
    async def status(self, *, memory: bool = False) -> EngineStatus: ...
    async def keys(self, prefix: str = "") -> list[str]: ...
    async def refused(self) -> dict[str, str]: ...
    async def find_create(self, tenant: str, idem: IdemKey) -> str | None: ...
    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None
                     ) -> SessionInfo: ...
    async def list_sessions(self, prefix: str) -> list[SessionInfo]: ...

    async def prepare(self, key: str, op: Operation, idem: IdemKey) -> Checked: ...
    async def commit(self, key: str, idem: IdemKey, op: Operation | None = None, *,
                     want_params: ReturnParams = False) -> Any: ...
    async def abort(self, key: str, idem: IdemKey) -> None: ...
    async def cut_tip(self, key: str) -> Tip: ...
    async def revision_tip(self, key: str) -> RevisionTip: ...
    async def put_at_revision(self, key: str, revision: int) -> bool: ...
    async def holds_key(self, key: str, idem_key: str) -> bool: ...
    async def undo_last(self, key: str, idem_key: str, want: tuple[int, int]) -> bool: ...


class InProcessHost:
    """:class:`Host` over an :class:`EmbeddedHost` in this process (also what a Ray host
    actor runs inside)."""

    def __init__(self, host: EmbeddedHost, name: str = "local") -> None:
        self.embedded = host
        self.name = name
        self.device = host.device
        self._prepared: dict[tuple[str, str], tuple[Operation, float]] = {}

    async def start(self) -> None:
        await self.embedded.start()

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.embedded.stop(snapshot=snapshot)

    async def status(self, *, memory: bool = False) -> EngineStatus:
        return await self.embedded.status(memory=memory)

    async def keys(self, prefix: str = "") -> list[str]:
        return self.embedded.keys(prefix)

    async def refused(self) -> dict[str, str]:
        return self.embedded.refused()

    async def find_create(self, tenant: str, idem: IdemKey) -> str | None:
        return self.embedded.find_create(tenant, idem)

    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None
                     ) -> SessionInfo:
        return await self.embedded.create(key, spec, idem=idem)

    async def execute(self, key: str, op: Operation, *, idem: IdemKey | None = None,
                      want_params: ReturnParams = False) -> Any:
        return await self.embedded.execute(key, op, idem=idem, want_params=want_params)

    async def step(
        self, key: str, grads: Tensors, *, want_params: ReturnParams, worker: str | None = None,
        base_version: int | None = None, idem: IdemKey | None = None,
        options: dict[int, dict[str, Any]] | None = None, upcast: bool = False,
        scalars: dict[str, float] | None = None, front: str | None = None,
    ) -> StepResult:
        return await self.embedded.step(key, grads, want_params=want_params, worker=worker,
                                        base_version=base_version, idem=idem, options=options,
                                        upcast=upcast, scalars=scalars, front=front)

    async def describe(self, key: str) -> SessionInfo:
        return await self.embedded.describe(key)

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        return await self.embedded.list_sessions(prefix)

    async def pull(
        self, key: str, names: list[str] | None, *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        return await self.embedded.pull(key, names, min_version=min_version, wait_s=wait_s,
                                        unless_versions=unless_versions,
                                        params_dtype=params_dtype)

    async def pull_rows(
        self, key: str, rows: dict[str, torch.Tensor], *, min_version: int | None = None,
        wait_s: float = 0.0, unless_versions: frozenset[int] = frozenset(),
        params_dtype: torch.dtype | None = None,
    ) -> ParamsResult:
        return await self.embedded.pull_rows(key, rows, min_version=min_version,
                                             wait_s=wait_s, unless_versions=unless_versions,
                                             params_dtype=params_dtype)

    async def export_state(self, key: str) -> StateExport:
        return await self.embedded.export_state(key)

    async def history(self, key: str, query: HistoryQuery) -> HistoryResult:
        return await self.embedded.history(key, query)

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        return await self.embedded.delete(key, idem=idem, expected=expected)

    # ------------------------------------------------------------------ two phases
    async def prepare(self, key: str, op: Operation, idem: IdemKey) -> Checked:
        """Check ``op`` against the session as it is (nothing changes) and keep it for its
        commit; ``applied`` when this key's operation was applied here already."""
        host = self.embedded
        now = time.monotonic()
        for stale in [k for k, (_, t) in self._prepared.items() if now - t > PREPARED_TTL_S]:
            del self._prepared[stale]
        # EmbeddedHost's own lock and worker: the check sees the session between operations
        async with host._lock(key):
            await host._healed(key, locked=True)
            session = host._get(key)

            def check() -> Checked:
                if session.idem.lookup(idem.key, idem.fingerprint, idem.legacy) is not None:
                    return Checked(applied=True, version=session.version,
                                   step=session.step_count, revision=session.revision)
                plan = op.checked(session)
                if isinstance(plan, StepPlan):
                    return Checked(False, plan.skip, list(plan.nonfinite), session.version,
                                   session.step_count, session.revision)
                return Checked(version=session.version, step=session.step_count,
                               revision=session.revision)
            checked = await host._worker.run(check, f"{op.kind}_prepare")
        if not checked.applied:
            self._prepared[(key, idem.key)] = (op, now)
        return checked

    async def commit(self, key: str, idem: IdemKey, op: Operation | None = None, *,
                     want_params: ReturnParams = False) -> Any:
        """Apply the prepared operation (or ``op``) under its idempotency key (a commit that
        already happened is answered from the session's table)."""
        kept = self._prepared.pop((key, idem.key), None)
        if op is None:
            if kept is None:
                raise Unavailable("this host no longer holds the prepared operation (it "
                                  "restarted); send it again", code="not_prepared",
                                  retry_after=0.0)
            op = kept[0]
        return await self.embedded.execute(key, op, idem=idem, want_params=want_params)

    async def abort(self, key: str, idem: IdemKey) -> None:
        self._prepared.pop((key, idem.key), None)

    async def cut_tip(self, key: str) -> Tip:
        return await self.embedded.cut_tip_live(key)

    async def revision_tip(self, key: str) -> RevisionTip:
        return await self.embedded.revision_tip(key)

    async def put_at_revision(self, key: str, revision: int) -> bool:
        return await self.embedded.put_at_revision(key, revision)

    async def holds_key(self, key: str, idem_key: str) -> bool:
        return self.embedded.holds_key(key, idem_key)

    async def undo_last(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        return await self.embedded.undo_last_live(key, idem_key, want)


class Router(Protocol):
    """Where sessions live: the front asks it for the host of a session key."""

    device: str

    async def start(self) -> None: ...
    async def stop(self, *, snapshot: bool = True) -> None: ...
    async def status(self, *, memory: bool = False) -> EngineStatus: ...
    async def refused(self) -> dict[str, str]: ...
    async def count(self, prefix: str) -> int: ...
    async def drop_abandoned(self, prefix: str = "") -> int: ...
    async def find_create(self, tenant: str, idem: IdemKey) -> str | None: ...
    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None,
                     admit: Admit | None = None) -> SessionInfo: ...
    async def route(self, key: str) -> SessionHost: ...
    async def refuse_unknown(self, key: str) -> EmbeddedHost | None:
        """The 404 an operation on ``key`` would get from its routing and no more (before
        its request's body is read, :meth:`app.engine.front.Front.refuse_unknown`); returns
        where the session may exist: the in-process host of a plain session of this process,
        or None (a sharded session, or one on a Ray host)."""
    async def list_sessions(self, prefix: str) -> list[SessionInfo]: ...
    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool: ...
    async def trim(self) -> None: ...
    def drain(self) -> None: ...


def parent_key(key: str) -> str:
    """The session key a host key belongs to (a shard's key names its session)."""
    from app.engine.shards import parent_of
    return parent_of(key) or key


class LocalRouter:
    """Every session in one in-process host (the embedded engine). A sharded session keeps its
    shards there too (one device: useful to test sharding, not to gain memory); its layout is
    in the directory."""

    def __init__(self, host: EmbeddedHost, directory: Directory | None = None) -> None:
        from app.engine.shards import ShardedSession
        self.local = InProcessHost(host)
        self.device = host.device
        self.directory = directory or Directory(None)
        self._sharded: dict[str, ShardedSession] = {}
        #: every sharded session's directory entry, as this router wrote or read it (it is its
        #: directory's only writer, so the step path never reads the directory; and an entry
        #: removed with the data directory while the server ran is written again from here:
        #: :meth:`_write_entry_again`)
        self._entries: dict[str, dict[str, Any]] = {}
        #: keyed creates of sharded sessions cut before their ``.creates`` index was written:
        #: (tenant, idempotency key) -> session key (:meth:`_cut_create`)
        self._unindexed: dict[tuple[str, str], str] = {}
        #: sharded sessions being created (their entries claimed, their shards not all made):
        #: a create of the same id meanwhile is a 409, not a drop of the entry (:meth:`_stale`)
        self._creating: set[str] = set()
        host.written_again.append(self._write_entry_again)

    async def start(self) -> None:
        await self.local.start()
        for key in self.directory.keys():
            entry = self.directory.get(key)
            if entry is not None:
                self._entries[key] = entry
        for key in sorted(self._entries):  # sharded sessions whose shards are gone
            await self._stale(key)
        await self._finish_old_sharded_deletes()
        for key in sorted(self._entries):  # shards snapshotted before revisions existed
            aligned = self.local.embedded.align_old_revisions(
                self._shard_keys(key, self._entries[key]))
            if aligned is not None:
                log.warning("sharded session %s: shards restored from snapshots older than "
                            "revisions put at revision %d", key, aligned)
        for key in sorted(self._entries):
            if await self._undo_cut_create(key):
                await self._undo_cut_operation(key)
        for key, entry in self._entries.items():
            made_by = entry.get("created_by")
            tenant = split_key(key)[0]
            if made_by and self.directory.created(tenant, made_by) is None:
                self._unindexed[(tenant, made_by)] = key

    async def _finish_old_sharded_deletes(self) -> None:
        """Delete the shards a keyed delete of their sharded session left, as commits before
        118a618 did (they deleted its first shard and its directory entry only, and answered
        204: :func:`~app.engine.host.old_sharded_delete`). Held, they were out of sight (no
        entry routes to them) and took the id for good (its create a 409 naming a shard)."""
        from app.engine.shards import parent_of
        gone = self.local.embedded.old_sharded_deletes
        for skey in sorted(await self.local.keys()):
            parent = parent_of(skey)
            entry = self._entries.get(parent) if parent is not None else None
            if parent is None or parent not in gone or \
                    (entry is not None and skey in self._shard_keys(parent, entry)):
                continue  # (a session made again under the id keeps its shards)
            log.warning("sharded session %s: deleted with an Idempotency-Key by an older "
                        "commit, which left its shard %s: deleted now", parent, skey)
            try:
                with contextlib.suppress(NotFound):
                    await self.local.delete(skey)
            except (OSError, OptserveError) as exc:
                log.warning("could not delete the left shard %s: %s", skey, exc)

    async def _stale(self, key: str) -> bool:
        """Drop the entry of a sharded session none of whose shards exists (a session kept in
        memory only, before a restart)."""
        from app.engine.shards import ShardLayout, shard_key
        entry = self.directory.get(key)
        if entry is None:
            return True
        layout = ShardLayout.from_json(entry["layout"])
        shards = {shard_key(key, i, layout.shards) for i in range(layout.shards)}
        held = set(await self.local.keys()) | set(await self.local.refused())
        if shards & held:
            return False
        # (only the entry read above: a create of the id that found it stale too may have
        # dropped it and claimed its own meanwhile, which is not stale)
        if not self.directory.remove_made(key, entry.get("made")) and \
                self.directory.get(key) is not None:
            return False
        self._sharded.pop(key, None)
        self._entries.pop(key, None)
        return True

    async def _undo_cut_create(self, key: str) -> bool:
        """Undo an unkeyed create of a sharded session that a crash cut part way: a shard
        this start discarded as an interrupted create (never acknowledged: the answer waits
        for every shard) and others made. No retry can finish it (a keyed one's finishes it,
        :meth:`_cut_create`), and served, its reads were 404s naming the missing shard and
        a create of its id a 409 for good: its shards and its entry go, with a warning (what
        cannot be removed now stays, as before, for a delete of the id). Whether the session
        is still there."""
        entry = self._entries[key]
        if entry.get("created_by"):
            return True
        keys = self._shard_keys(key, entry)
        cut = [k for k in keys if k in self.local.embedded.interrupted]
        if not cut or set(keys) & set(await self.local.refused()):
            return True  # (a shard refused at start: every file is left to an operator)
        log.warning("sharded session %s: its create was cut by a crash (%s discarded): its "
                    "other shards and its directory entry are removed", key, ", ".join(cut))
        try:
            for skey in keys:
                if skey not in cut:
                    with contextlib.suppress(NotFound):
                        await self.local.delete(skey)
            self.directory.remove_made(key, entry.get("made"))
        except (OSError, OptserveError) as exc:
            log.warning("could not undo the cut create of %s: %s", key, exc)
            return True
        self._sharded.pop(key, None)
        self._entries.pop(key, None)
        return False

    async def _undo_cut_operation(self, key: str) -> None:
        """Make a sharded session whole again where an operation a crash cut between its
        shards' commits reached some of them only (:meth:`ShardedSession.undo_cut
        <app.engine.shards.ShardedSession.undo_cut>`, as a Ray coordinator made anew does).
        Left apart, it answered 503 ``shards_out_of_step`` until that operation's retry with
        its key completed it, and went out of service for good without one (an unkeyed
        operation has none)."""
        from app.engine.shards import ShardedSession
        if self.directory.root is None:
            return
        try:
            session = await self.route(key)
            if isinstance(session, ShardedSession):
                await session.undo_cut()
        except NotFound:
            pass  # (a shard missing or refused: a create cut part way, finished by its retry)
        except Exception as exc:  # noqa: BLE001 - as it was: apart, for the retry to complete
            log.warning("could not undo the operation that reached some shards of %s only: "
                        "%s", key, exc)

    def _write_entry_again(self, host_key: str) -> None:
        """A shard's files were written again after the data directory was removed while the
        server ran: its sharded session's entry too, where it is gone (without it, a restart
        would not know the session: 404, its shards on disk). Runs on the event loop, between
        a delete's removal of the entry and its forgetting of the key, never inside it."""
        from app.engine.shards import parent_of
        key = parent_of(host_key)
        entry = self._entries.get(key) if key is not None else None
        if key is None or entry is None or key in self._creating or \
                self.directory.root is None or self.directory.get(key) is not None:
            return
        if self.directory.claim(key, entry):  # (its write makes the folders again)
            log.error("the directory entry of sharded session %s was removed from the data "
                      "directory while the server ran: written again", key)

    async def stop(self, *, snapshot: bool = True) -> None:
        await self.local.stop(snapshot=snapshot)

    def drain(self) -> None:
        """The server is draining (SIGTERM): open sync rounds fail now, and long polls, of
        plain and sharded sessions, answer now (:meth:`EmbeddedHost.drain`)."""
        self.local.embedded.drain()
        for session in self._sharded.values():
            session.drain()

    async def status(self, *, memory: bool = False) -> EngineStatus:
        status = await self.local.status(memory=memory)
        plain = [k for k in await self.local.keys() if parent_key(k) == k]
        status.sessions = len(plain) + len(self._entries)
        return status

    async def refused(self) -> dict[str, str]:
        return {parent_key(k): reason for k, reason in (await self.local.refused()).items()}

    async def count(self, prefix: str) -> int:
        return len(await self.local.keys(prefix)) + sum(k.startswith(prefix)
                                                        for k in self._entries)

    async def drop_abandoned(self, prefix: str = "") -> int:
        """Nothing: this router is its directory's only writer, and its start drops the
        entries of sharded creates cut before any shard was made (:meth:`_stale`)."""
        return 0

    async def find_create(self, tenant: str, idem: IdemKey) -> str | None:
        # (reads, and the index of a create a crash cut, written whole or not at all: a
        # failure leaves it to the next retry)
        with files_failing(_READING):
            made = self.directory.created(tenant, idem.key)
            if made is not None:
                key = str(made["key"])
                entry = self.directory.get(key)
                found = await indexed_session(made, entry, idem,
                                              lambda: self._whole(key, entry or {}))
                if found is not None:
                    await self._check_not_refused(found, idem, self.directory.get(found))
                    return found
            elif (tenant, idem.key) in self._unindexed:
                cut, whole = await self._cut_create(tenant, idem)
                if cut is not None and whole:  # (the index the crash cut, written now)
                    self.directory.note_created(tenant, idem.key, idem.fingerprint, cut)
                    self._unindexed.pop((tenant, idem.key), None)
                    return cut
        return await self.local.find_create(tenant, idem)

    def _shard_keys(self, key: str, entry: dict[str, Any]) -> list[str]:
        from app.engine.shards import ShardLayout, shard_key
        shards = ShardLayout.from_json(entry["layout"]).shards
        return [shard_key(key, i, shards) for i in range(shards)]

    async def _refused_shard(self, key: str, entry: dict[str, Any] | None) -> str | None:
        """The key of a shard of this sharded session (``entry``: its directory entry, None
        when it has none) refused at start, if any."""
        if entry is None:
            return None
        refused = await self.local.refused()
        return next((k for k in self._shard_keys(key, entry) if k in refused), None)

    async def _check_not_refused(self, key: str, idem: IdemKey,
                                 entry: dict[str, Any] | None) -> None:
        """A retried create of a sharded session with a shard refused at start: the session
        exists (as an unsharded one refused at start does), it is not made again."""
        if await self._refused_shard(key, entry) is not None:
            raise session_refused(idem.key, split_key(key)[1])

    async def _cut_create(self, tenant: str, idem: IdemKey) -> tuple[str | None, bool]:
        """A keyed create of a sharded session cut by a crash after its entry was claimed,
        before its ``.creates`` index was written (never acknowledged): its key, and whether
        every shard is there. Each shard there must be this request's (422 for another
        request under the key, 409 when a shard is refused at start); None when the session
        is gone (deleted since)."""
        key = self._unindexed[(tenant, idem.key)]
        entry = self.directory.get(key)
        if entry is None or entry.get("created_by") != idem.key:
            del self._unindexed[(tenant, idem.key)]
            return None, False
        held = set(await self.local.keys())
        shard_keys = self._shard_keys(key, entry)
        mine = [self.local.embedded.made_by(k, idem) for k in shard_keys
                if k in held]  # (422 for another request)
        await self._check_not_refused(key, idem, entry)
        if None in mine:  # (a shard made otherwise: the id is taken, as before)
            raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                           code="session_exists", field="id")
        return key, len(mine) == len(shard_keys)

    def _index_cut_create(self, key: str, entry: dict[str, Any], made_by: str) -> None:
        """Write the ``.creates`` index of a keyed create cut before it (:meth:`_cut_create`),
        with the request's fingerprint its shards keep, so that a delete can mark it: its
        retry is then a 409 ``session_deleted``, not a new session."""
        for skey in self._shard_keys(key, entry):
            made = self.local.embedded.create_key_of(skey)
            if made is not None and made[0] == made_by:
                self.directory.note_created(split_key(key)[0], made_by, made[1], key)
                return

    async def _whole(self, key: str, entry: dict[str, Any]) -> bool:
        """Whether every shard of this sharded session is held (none deleted yet)."""
        return set(self._shard_keys(key, entry)) <= set(await self.local.keys())

    async def create(self, key: str, spec: CreateSpec, *, idem: IdemKey | None = None,
                     admit: Admit | None = None) -> SessionInfo:
        """``admit``: the front's check of the tenant's limits, run only for a new session (a
        retry finishing a sharded create cut part way is not refused by it)."""
        from app.engine.shards import ShardedSession, check_shardable, plan_layout, shard_key
        check_shardable(spec)
        with files_failing(_READING):  # (reads, and the drop of a stale entry: nothing made)
            if idem is not None and (split_key(key)[0], idem.key) in self._unindexed:
                cut, whole = await self._cut_create(split_key(key)[0], idem)
                if cut is not None and not whole and not await self._stale(cut):
                    return await self._finish_create(cut, spec, idem)
            taken = key in self._creating or (self.directory.get(key) is not None
                                              and not await self._stale(key))
        if taken:
            raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                           code="session_exists", field="id")
        if admit is not None:
            await admit()
        if spec.shards <= 1:
            return await self.local.create(key, spec, idem=idem)
        if key in await self.local.keys(key) or key in await self.local.refused():
            raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                           code="session_exists", field="id")
        layout = plan_layout(spec.groups, spec.shards)
        # ("made": this creation's own, so that its removals never take the entry of another
        # creation of the id, remove_made)
        entry: dict[str, Any] = {"layout": layout.to_json(), "shards": ["local"] * layout.shards,
                                 "created_by": idem.key if idem is not None else None,
                                 "made": uuid.uuid4().hex}
        try:
            claimed = self.directory.claim(key, entry)
        except OSError as exc:  # (linked but not fsynced: dropped; else a stale entry)
            self._drop_entry(key, entry["made"])
            raise storage_failure(exc, "claiming the session's directory entry") from exc
        if not claimed:
            raise Conflict(f"a session with id {split_key(key)[1]!r} already exists",
                           code="session_exists", field="id")
        hosts: list[tuple[Host, str]] = [(self.local, shard_key(key, i, layout.shards))
                                         for i in range(layout.shards)]
        self._creating.add(key)
        try:
            try:
                session, info = await ShardedSession.create(key, spec, layout, hosts, idem=idem)
            except BaseException:
                self._drop_entry(key, entry["made"])
                raise
            if idem is not None:
                try:
                    self.directory.note_created(split_key(key)[0], idem.key, idem.fingerprint,
                                                key)
                except OSError as exc:
                    # not acknowledged: its shards and its entry go, so nothing is left
                    if await self._undo_shards(hosts):
                        self._drop_entry(key, entry["made"])
                        # (an index in place, its folder's fsync failed: it goes too; one
                        # left names no session, and the retry makes one and indexes it)
                        with contextlib.suppress(OSError):
                            self.directory.drop_created(split_key(key)[0], idem.key, key)
                        raise storage_failure(exc, "indexing the create's Idempotency-Key") \
                            from exc
                    # (they stay: as a create a crash cut before its index, :meth:`_cut_create`)
                    self._unindexed[(split_key(key)[0], idem.key)] = key
                    self._entries[key] = entry
                    raise storage_failure(
                        exc, "indexing the create's Idempotency-Key",
                        outcome="the create was not completed; retry it with the same "
                                "Idempotency-Key to complete it") from exc
        finally:
            self._creating.discard(key)
        self._sharded[key] = session
        self._entries[key] = entry
        return info

    def _drop_entry(self, key: str, made: str) -> None:
        """Remove this creation's entry of ``key`` as its create fails; where the directory
        fails that too, the entry is left stale (no shard of it is held): the next create of
        the id, and the next start, drop it (:meth:`_stale`)."""
        try:
            self.directory.remove_made(key, made)
        except OSError as exc:
            log.warning("the directory entry of the failed create of %s is left for the next "
                        "create of its id to drop: %s", key, exc)

    async def _undo_shards(self, hosts: list[tuple[Host, str]]) -> bool:
        """Delete the shards a sharded create made before it failed (as
        :meth:`ShardedSession.create <app.engine.shards.ShardedSession.create>` deletes those
        of a create a shard refused): True when none is left."""
        results = await asyncio.gather(*(host.delete(skey) for host, skey in hosts),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)
                  and not isinstance(r, NotFound)]
        for exc in failed:
            log.warning("a shard of a failed sharded create is kept for its retry: %s", exc)
        return not failed

    async def _finish_create(self, key: str, spec: CreateSpec, idem: IdemKey) -> SessionInfo:
        """The retry of a keyed create cut by a crash before every shard was made (see
        :meth:`_cut_create`; its shards there are this request's): the missing shards are
        made, the session is answered as created. Nothing was acknowledged or could run on
        it (an operation needs every shard). A refusal leaves it as it was."""
        from app.engine.shards import ShardedSession, ShardLayout, shard_key
        entry = self.directory.get(key)
        assert entry is not None
        layout = ShardLayout.from_json(entry["layout"])
        hosts: list[tuple[Host, str]] = [(self.local, shard_key(key, i, layout.shards))
                                         for i in range(layout.shards)]
        held = set(await self.local.keys())
        session, info = await ShardedSession.create(
            key, spec, layout, hosts, idem=idem,
            made={i for i, (_, skey) in enumerate(hosts) if skey in held})
        self._sharded[key] = session
        self.directory.note_created(split_key(key)[0], idem.key, idem.fingerprint, key)
        self._unindexed.pop((split_key(key)[0], idem.key), None)  # (a concurrent retry's too)
        return info

    async def route(self, key: str) -> SessionHost:
        session = self._sharded.get(key)
        if session is not None:
            return session
        entry = self._entries.get(key)
        if entry is None:  # (a plain session's every step comes here)
            return self.local
        # (imported past that return: a step of a plain session routes twice, and the import
        # statement cost more than the rest of the look-up)
        from app.engine.shards import ShardedSession, ShardLayout, shard_index, shard_key
        refused = await self._refused_shard(key, entry)
        if refused is not None:  # (as an unsharded session refused at start: not found)
            raise refused_at_start(key, shard_index(refused))
        layout = ShardLayout.from_json(entry["layout"])
        session = ShardedSession(key, layout, [(self.local, shard_key(key, i, layout.shards))
                                               for i in range(layout.shards)])
        self._sharded[key] = session
        return session

    async def refuse_unknown(self, key: str) -> EmbeddedHost | None:
        """The 404 of a session nothing here holds: what :meth:`route` raises (a sharded
        session refused at start), or, for a key it routes to this process's host, the
        host's own 404 (:meth:`EmbeddedHost.may_hold`); that host, for a plain session (None
        for a sharded one). Only memory is read (the directory's entries are read at
        start)."""
        if await self.route(key) is not self.local:
            return None
        if not self.local.embedded.may_hold(key):
            raise no_session(key)
        return self.local.embedded

    async def list_sessions(self, prefix: str) -> list[SessionInfo]:
        infos = await self.local.list_sessions(prefix)
        for key in sorted(k for k in self._entries if k.startswith(prefix)):
            try:
                infos.append(await (await self.route(key)).describe(key))
            except Exception:  # noqa: BLE001 - a damaged sharded session is left out
                continue
        return infos

    async def trim(self) -> None:
        await self.local.embedded.trim()

    def _deleted_before(self, key: str, session: SessionHost, idem: IdemKey) -> bool:
        """Whether this keyed delete was done before and the sharded session held now under
        the id was made since: its first shard is held, while a delete done whole (or cut
        short after its first shard went) keeps the key under the session's id in that shard's
        tombstone. Such a retry is answered (204) and leaves the new session alone, as a plain
        session's is: it went on to mark the new session's create deleted, delete its
        directory entry (a 404 from then on) and leave its shards' files for good. A delete
        cut short before its first shard went keeps no such tombstone: its retry finishes
        it."""
        from app.engine.shards import ShardedSession
        if not isinstance(session, ShardedSession) or \
                not self.local.embedded.deleted_with(split_key(key)[0], idem):
            return False
        return session.shards[0][1] in self.local.embedded.keys(session.shards[0][1])

    async def delete(self, key: str, *, idem: IdemKey | None = None,
                     expected: Expected | None = None) -> bool:
        from app.engine.shards import shard_index
        # (a session already routed had every shard: none of them was refused at start)
        refused = (await self._refused_shard(key, self._entries.get(key))
                   if key not in self._sharded else None)
        if refused is not None:
            # as an unsharded session refused at start: not deleted (none of its shards),
            # its files left to an operator
            raise refused_at_start(key, shard_index(refused), deleting=True)
        host = await self.route(key)
        if host is self.local:  # (a plain session's create key goes with its tombstone)
            return await host.delete(key, idem=idem, expected=expected)
        if idem is not None and self._deleted_before(key, host, idem):
            return True
        # (before any shard is touched: a failure leaves the session as it was, and the
        # create's index, moved or not, answers a retried create as a crash here would)
        with files_failing("marking the session's create deleted"):
            entry = self.directory.get(key)
            if entry is not None and entry.get("created_by"):
                tenant, made_by = split_key(key)[0], str(entry["created_by"])
                if (tenant, made_by) in self._unindexed:
                    self._index_cut_create(key, entry, made_by)
                    del self._unindexed[(tenant, made_by)]
                # marked (on disk) before the first shard's files go, the delete's point of
                # no return: a crash anywhere after leaves the key marked, and one before
                # leaves the session whole, which a retried create is still answered with
                # (find_create)
                self.directory.forget_created(tenant, made_by, key)
        # (a refusal, the precondition's included, leaves the session whole, and the create's
        # index moved: a retried create is answered with the session, as above)
        replayed = await host.delete(key, idem=idem, expected=expected)
        # (the entry of the creation deleted, read above, not whichever is there now: once
        # its shards are deleted, a create of the id finds the entry stale, drops it and makes
        # its own session, whose entry, and place here, stay)
        made = entry.get("made") if entry is not None else None
        try:
            gone = self.directory.remove_made(key, made) or self.directory.get(key) is None
        except OSError as exc:  # (deleted: its entry, stale now, is dropped by a later create)
            log.warning("the directory entry of deleted session %s is left stale: %s", key, exc)
            gone = True
        if gone:
            self._sharded.pop(key, None)
            self._entries.pop(key, None)
        return replayed
