"""What a sharded session's coordinator asks of the embedded host of its shards
(:class:`ShardHooks`): the revisions of shards restored from snapshots written before
revisions were counted, put in step (:func:`~app.engine.shards.old_revisions_aligned`); and
the tip of each shard's log, whose last operation a crash left on some shards only, cut where
that puts them in step again (:func:`~app.engine.shards.cut_candidates`). They are called
through the host's methods of the same names: by the embedded router, and by a Ray host actor
for a coordinator on another host (:class:`~app.engine.shards.ShardedSession`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from app.engine import persist
from app.engine.host_restore import SessionRestorer
from app.engine.host_state import HostState
from app.engine.host_upkeep import StoreUpkeep
from app.engine.ops import CreateSession, Push
from app.engine.session import Session
from app.engine.shards import RevisionTip, Tip, old_revisions_aligned

log = logging.getLogger("optserve.engine")


class ShardHooks:
    """The host's answers to a sharded session's coordinator about the shards it holds: their
    revision tips (:meth:`revision_tip`, :meth:`cut_tip`), their revisions put in step
    (:meth:`align_old_revisions`, :meth:`put_at_revision`), and an operation that reached
    some shards only undone (:meth:`holds_key`, :meth:`undo_last`; ``_live``: on a session
    served, under its lock).

    It holds the host's shared state (:class:`~app.engine.host_state.HostState`), the
    restore (``restorer``: a session without its last record) and the snapshots
    (``upkeep``), and what it calls of the host: ``get`` (a session served, or its 404 or
    503), ``lock`` (a session's lock) and ``settled`` (wait until no operation on the session
    is applied but not yet durable)."""

    def __init__(self, state: HostState, *, restorer: SessionRestorer, upkeep: StoreUpkeep,
                 get: Callable[[str], Session],
                 lock: Callable[[str], AbstractAsyncContextManager[None]],
                 settled: Callable[[str], Awaitable[None]]) -> None:
        self._worker = state.worker
        self._store = state.store
        self._sessions = state.sessions
        self._restorer = restorer
        self._upkeep = upkeep
        self._get = get
        self._lock = lock
        self._settled = settled

    def align_old_revisions(self, keys: list[str]) -> int | None:
        """Put a sharded session's shards (``keys``, all held here: the embedded engine's
        start) at one revision where some were restored from snapshots written before
        revisions were counted (``Session.revision_unknown``), by the rule of
        :func:`~app.engine.shards.old_revisions_aligned`; the revision aligned, if any. (A Ray
        coordinator asks its shards' hosts: :meth:`ShardedSession.align_old_revisions
        <app.engine.shards.ShardedSession.align_old_revisions>`.)"""
        sessions = [self._sessions.get(k) for k in keys]
        held = [s for s in sessions if s is not None]
        if len(held) != len(keys):
            return None
        top = old_revisions_aligned([(s.version, s.revision, s.revision_unknown)
                                     for s in held])
        if top is not None:
            for s in held:
                s.revision = top
        return top

    async def revision_tip(self, key: str) -> RevisionTip:
        """The session's version and revision, and whether it was restored from a snapshot
        written before revisions were counted (its revision unknown: it counts only what was
        logged after that snapshot); read with its operations settled, under its lock."""
        async with self._lock(key):
            await self._settled(key)
            s = self._get(key)
            return s.version, s.revision, s.revision_unknown

    async def put_at_revision(self, key: str, revision: int) -> bool:
        """Put the session (a shard) at ``revision``, the one its sharded session's shards are
        aligned at (:func:`~app.engine.shards.old_revisions_aligned`), and snapshot it, so that
        it holds that revision when its host is restored again by itself (a Ray host restarted
        while the coordinator, on another host, stays; its old snapshot would give it the
        revision it counted before). A snapshot that fails leaves it put in memory only (its
        coordinator made anew aligns it again). Whether it moved."""
        async with self._lock(key):
            await self._settled(key)
            s = self._get(key)
            if s.revision == revision:
                return False
            log.info("%s: restored from a snapshot older than revisions, at revision %d: "
                     "put at its sharded session's revision %d", key, s.revision, revision)
            s.revision = revision
            await self._upkeep.snapshot(key, s)
            return True

    def cut_tip(self, key: str) -> Tip:
        """The session's version and revision, and the key of its latest operation (the newest
        of its idempotency table: a sharded session's operations all carry one): what
        :func:`~app.engine.shards.cut_candidates` compares, read without its log."""
        s = self._get(key)
        return s.version, s.revision, s.idem.newest()

    def _undoable_key(self, key: str) -> str | None:
        """The key its log's last record was sent with where that record is the session's
        last operation (not its create, nor one a snapshot took since) and one that went to
        every shard of its session (a push logged before pushes did, to some shards only,
        never is: ``Push.every_shard``), else None: the operation :meth:`undo_last` may cut."""
        assert self._store is not None
        s = self._get(key)
        records = self._store.read(key, cut_torn=False)[1]  # (a live log: its good length)
        if records:
            last = persist.decode_record(records[-1])
            if last.seq == s.seq and last.keys and not isinstance(last.op, CreateSession) \
                    and (not isinstance(last.op, Push) or last.op.every_shard):
                return last.keys[0][0]
        return None

    def holds_key(self, key: str, idem_key: str) -> bool:
        """Whether the session's idempotency table holds ``idem_key``."""
        return self._get(key).idem.holds(idem_key)

    def undo_last(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        """Cut the session's last logged operation, sent with ``idem_key``, off its log and
        restore it without it, where that gives the version and revision ``want`` (the other
        shards' of its session, which never took it: :meth:`ShardedSession.undo_cut
        <app.engine.shards.ShardedSession.undo_cut>`); else nothing changes.
        Whether it was undone.

        The log is read as a live session's is (``live``: its good length only, a torn tail
        left to the log's repair), also at the embedded engine's start (its restore cut any
        torn tail already): a record a failed cut left past the good length (its header
        zeroing failed too: it is whole) is no part of the log, and the record cut is the
        operation's (:meth:`Store.cut_last_record <app.engine.store.Store.cut_last_record>`).
        Before, the cut took the last whole record of the file: the one past the good
        length, leaving the operation's in the log, so a restart replayed the operation
        undone (and skipped the next one, logged under the same sequence number).

        Long polls are not woken: the undo moves the session back (to the version the other
        shards hold, or only its revision back), and a poll waits for a version above the
        one it holds (``min_version``, or ``If-None-Match``'s highest + 1), which a move back
        never meets; the session's next change wakes them."""
        assert self._store is not None
        if self._undoable_key(key) != idem_key:
            return False
        before = self._restorer.restore(key, live=True, but_last=True)[0]
        if (before.version, before.revision) != want:
            return False
        self._store.cut_last_record(key)
        self._sessions[key] = before
        log.warning("%s: its last logged operation reached some shards of its session only (a "
                    "crash cut it): undone", key)
        return True

    async def cut_tip_live(self, key: str) -> Tip:
        """:meth:`cut_tip` of a session served (its operations settled, under its lock)."""
        async with self._lock(key):
            await self._settled(key)
            return await self._worker.run(lambda: self.cut_tip(key), "restore")

    async def undo_last_live(self, key: str, idem_key: str, want: tuple[int, int]) -> bool:
        """:meth:`undo_last` on a session served (under its lock, on the worker: a Ray
        coordinator made anew, :meth:`ShardedSession.undo_cut
        <app.engine.shards.ShardedSession.undo_cut>`)."""
        async with self._lock(key):
            await self._settled(key)
            return await self._worker.run(lambda: self.undo_last(key, idem_key, want),
                                          "restore")

