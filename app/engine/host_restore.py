"""Restore and recovery of the embedded host's sessions from its store
(:class:`SessionRestorer`): every stored session at start, a session rebuilt after an
operation that changed it but must not count, and a session out of service brought back once
its next try is due. Every one goes through the same replay: its snapshot (if any), then each
log record through the operation's own ``check`` and ``apply`` (the first record of a log
without a snapshot is the session's create)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from app.engine import persist, state_order
from app.engine.host_state import Damage, HostState
from app.engine.interface import StepResult, split_key
from app.engine.ops import ApplyFailed, CreateSession, Operation, apply_counted
from app.engine.session import Session
from app.engine.shards import shard_index, shown_id
from app.engine.store import StoreCorrupt
from app.errors import Invalid, OptserveError, Unavailable

log = logging.getLogger("optserve.engine")


class CreateInterrupted(Exception):
    """A session's log holds nothing but a torn first record: a crash cut its create short
    (never acknowledged), as a directory with an empty log is."""


def _misnamed(key: str, stored_id: str) -> str | None:
    """Why the session folder ``key`` must not be served as it is: it holds another session
    than its name says (a folder copied or renamed by hand: served, it would list the same
    id twice, or answer under one id with another's), or None."""
    named = split_key(key)[1]
    if named == stored_id:
        return None
    return (f"its folder {key!r} holds session {stored_id!r} (copied or renamed by hand?): "
            "a session is served from the folder <tenant>~<its id>; name it so again, or "
            "move it out of the sessions folder")


class SessionRestorer:
    """Brings the host's sessions back from its store: all of them at start
    (:meth:`restore_all`: one that cannot be read is refused and kept out of service, one
    whose create a crash interrupted is discarded), one whose operation changed it but must
    not count (:meth:`rebuild`, :meth:`recover`: taken out of service when that fails too),
    and one out of service once its next try is due (:meth:`healed`).

    It holds the host's shared state (:class:`~app.engine.host_state.HostState`), the
    sessions refused at start (``refused``: key -> reason) and their create keys
    (``refused_creates``), the creates a crash interrupted (``interrupted``), and what it
    calls of the host: ``build`` (a session from its create operation), ``lock`` (a session's
    lock) and ``settle`` (count a session's tensors for the garbage collector)."""

    def __init__(self, state: HostState, *, refused: dict[str, str],
                 refused_creates: dict[tuple[str, str], tuple[str, str]],
                 interrupted: set[str],
                 build: Callable[[CreateSession, list[tuple[str, str]], str], Session],
                 lock: Callable[[str], AbstractAsyncContextManager[None]],
                 settle: Callable[[str], None]) -> None:
        self.config = state.config
        self._device = state.device
        self._worker = state.worker
        self._store = state.store
        self._sessions = state.sessions
        self._damaged = state.damaged
        self._refused = refused
        self._refused_creates = refused_creates
        self.interrupted = interrupted
        self._build = build
        self._lock = lock
        self._settle = settle

    def restore_all(self) -> None:
        assert self._store is not None
        for key in self._store.session_ids():
            started = time.perf_counter()
            if self._store.incomplete(key):  # a create cut short: never acknowledged
                log.warning("discarding %s: a create that a crash interrupted", key)
                self._store.discard(key)
                self.interrupted.add(key)
                continue
            try:
                session, replayed, torn = self.restore(key)
            except CreateInterrupted:  # its own record torn: never acknowledged either
                log.warning("discarding %s: a create that a crash interrupted (its record "
                            "torn)", key)
                self._store.discard(key)
                self.interrupted.add(key)
                continue
            except Exception as exc:  # noqa: BLE001 - refuse this one, serve the rest
                # relative to the sessions directory: /readyz shows it to the tenant
                self._refuse_stored(key, f"{type(exc).__name__}: {exc}".replace(
                    f"{self._store.sessions_dir}/", ""))
                self._keep_refused_create(key)
                continue
            misnamed = _misnamed(key, session.id)
            if misnamed is not None:  # (its create key is its original's, not this folder's)
                self._refuse_stored(key, misnamed)
                continue
            self._sessions[key] = session
            log.info("restored session %s at version %d (%d logged operations replayed%s) in "
                     "%.2f s", key, session.version, replayed,
                     ", torn last record dropped" if torn else "",
                     time.perf_counter() - started)

    def restore(self, key: str, *, live: bool = False, but_last: bool = False
                 ) -> tuple[Session, int, bool]:
        """The session as its snapshot and log make it: the snapshot, then each record through
        the operation's own ``check`` and ``apply`` (``live``: a running session's rebuild,
        which leaves a torn tail in the file to its log's repair; ``but_last``: without the
        log's last record)."""
        assert self._store is not None
        payload, records, torn = self._store.read(key, cut_torn=not live)
        if but_last:
            records = records[:-1]
        session = (Session.restore(persist.decode_tree(payload, persist.SNAPSHOT_KEY),
                                   self._device) if payload is not None else None)
        if session is not None:  # the replayed records' keys kept as many as live ones are
            session.shown_id = shown_id(key)
            if session.state_order is None and shard_index(key) is not None:
                session.state_order = {}  # (a snapshot from before the stamps: as they are)
                state_order.note_new(session)
            session.idem.window = self.config.idempotency_window  # (_build sets a create's)
        replayed = 0
        for i, raw in enumerate(records):
            record = persist.decode_record(raw)
            if session is not None and record.seq <= session.seq:
                continue  # already in the snapshot (a crash between snapshot and truncate)
            if session is None:
                if not isinstance(record.op, CreateSession) or record.seq != 1:
                    raise StoreCorrupt(f"{key}: the log starts with {record.op.kind} record "
                                       f"{record.seq}, not the session's create")
                session = self._build(record.op, record.keys, key)
                session.seq = 1
                replayed += 1
                continue
            if record.seq != session.seq + 1:
                raise StoreCorrupt(f"log record {record.seq} follows {session.seq}: a record "
                                   "is missing")
            op = record.op.replayed()
            try:
                plan = op.check(session)
            except OptserveError as exc:
                # An acknowledged operation replays exactly as it ran; one that is refused was
                # never acknowledged: a record whose apply was refused and whose cut failed.
                if i != len(records) - 1:
                    raise StoreCorrupt(f"log record {record.seq} ({record.op.kind}) is refused "
                                       f"at replay ({exc.detail}) and records follow it"
                                       ) from None
                log.warning("%s: dropping the last log record (%s), refused at replay: %s",
                            key, record.op.kind, exc.detail)
                if not but_last:  # (cut from the file too: the next record takes its place)
                    self._cut_refused_tail(key)
                break
            result = apply_counted(op, session, plan)
            session.seq = record.seq
            if session.version != record.version:
                raise StoreCorrupt(f"replay of record {record.seq} ({record.op.kind}) reached "
                                   f"version {session.version}, the log says {record.version}")
            if record.sync is not None and isinstance(result, StepResult):
                result.sync = record.sync
            session.idem.remember_all(list(record.keys), record.op.result_json(result),
                                      record.op.refusals(session))
            replayed += 1
        if session is None:
            if payload is None and not records and torn:
                raise CreateInterrupted(f"{key}: the create's record is torn")
            raise StoreCorrupt(f"{key}: no snapshot and no create record")
        session.snapshot_time = time.monotonic()
        return session, replayed, torn

    def _cut_refused_tail(self, key: str) -> None:
        """Cut from the session's log its last record, which replay refused
        (:meth:`~app.engine.store.Store.cut_last_record`); when that fails, the log stays
        marked for repair and is cut before its next write."""
        assert self._store is not None
        try:
            self._store.cut_last_record(key)
        except OSError as exc:
            log.error("%s: cutting the log record refused at replay failed: %s (cut before the "
                      "session's next write)", key, exc)

    def _refuse_stored(self, key: str, reason: str) -> None:
        """Leave the stored session ``key`` out of service, its files as they are (``/readyz``
        lists it with ``reason``)."""
        self._refused[key] = reason
        log.error("refusing stored session %s: %s", key, reason)

    def _keep_refused_create(self, key: str) -> None:
        """Keep the create key of a session refused at start, as its snapshot's or its
        create record's header still tells it, so that the create's retry is not run again
        (:func:`~app.engine.deleted_creates.session_refused`)."""
        from app.engine.shards import parent_of
        assert self._store is not None
        if parent_of(key) is not None:  # (a shard's: its sharded session's is in the directory)
            return
        made = persist.created_by(*self._store.salvage(key))
        if made is None:
            log.warning("%s: its files name no create key (made without one, or not "
                        "readable): a create retried with one would make a new session", key)
            return
        tenant, session_id = split_key(key)
        self._refused_creates[(tenant, made[0])] = (made[1], session_id)

    def rebuild(self, key: str, why: str, cut: int | None = None) -> Exception | None:
        """The session as its store holds it, after an operation that changed it but must not
        count (its record first cut back to ``cut`` when given); taken out of service when
        that fails (the failure is returned), until :meth:`healed` restores it."""
        try:
            assert self._store is not None
            if cut is not None:
                self._store.truncate(key, cut)
            self._sessions[key] = self.restore(key, live=True)[0]
        except Exception as exc:  # noqa: BLE001 - any failure here takes it out of service
            log.error("restoring %s after %s: %s (it is out of service; tried again at its "
                      "first use after %s s)", key, why, exc, self.config.damaged_retry_s)
            self._damaged[key] = Damage(f"{why} and its restore failed: {exc}",
                                         time.monotonic() + self.config.damaged_retry_s)
            return exc
        return None

    def recover(self, key: str, op: Operation, before: int | None, exc: ApplyFailed
                 ) -> None:
        """An apply failed half-way: rebuild the session from its store without the
        operation, or take it out of service. Always raises."""
        cause = exc.__cause__
        log.error("%s on %s failed after it changed the session: %s", op.kind, key, exc)
        if before is None:
            self._damaged[key] = Damage(f"a {op.kind} failed half-way ({exc}) and this session "
                                         "keeps nothing on disk to restore it from", None)
            raise Unavailable(f"the {op.kind} failed and the session could not be restored: "
                              f"{exc}; it keeps nothing on disk to restore it from: delete it",
                              code="session_damaged", retry_after=None) from None
        again = self.rebuild(key, f"a {op.kind} failed half-way", cut=before)
        if again is not None:
            raise Unavailable(f"the {op.kind} failed and the session could not be restored: "
                              f"{again}; it is restored from its store at its first use after "
                              f"{self.config.damaged_retry_s:.1f} s, once the store works "
                              "again", code="session_damaged",
                              retry_after=self.config.damaged_retry_s) from None
        if isinstance(cause, (ValueError, TypeError)):
            raise Invalid(f"torch refused this {op.kind}: {cause}; the session is as it was",
                          code=f"{op.kind}_failed", field="param_groups") from None
        raise OptserveError(f"the {op.kind} failed on the server ({exc}); the session was "
                            "restored to its state before it", code="apply_failed") from None

    async def healed(self, key: str, *, locked: bool = False) -> None:
        """Restore a session that a second storage fault in a row took out of service
        (:meth:`rebuild`), when its next try is due: through the replay a restart runs, after
        the cut of its log that failed (``Store.cut_pending``), so that no record of an
        operation that did not count is replayed. Restored, it is served again as a restart
        would have restored it (its idempotency table included); otherwise it stays out of
        service with the new reason until the next try. ``locked``: the caller holds the
        session's lock."""
        damage = self._damaged.get(key)
        if damage is None or damage.retry_at is None or time.monotonic() < damage.retry_at:
            return
        if not locked:
            async with self._lock(key):
                await self.healed(key, locked=True)
            return
        store = self._store
        assert store is not None  # (only a session restored from a store retries)

        def restore() -> Session:
            store.cut_pending(key)
            return self.restore(key, live=True)[0]
        try:
            session = await self._worker.run(restore, "restore")
        except Exception as exc:  # noqa: BLE001 - whatever failed, it stays out of service
            log.error("restoring %s, out of service (%s), failed again: %s", key,
                      damage.reason, exc)
            damage.reason = f"its restore from its store failed: {exc}"
            damage.retry_at = time.monotonic() + self.config.damaged_retry_s
            return
        self._sessions[key] = session
        self._settle(key)
        del self._damaged[key]
        log.info("restored session %s, out of service since %s, at version %d", key,
                 damage.reason, session.version)

