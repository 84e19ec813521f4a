"""Durability upkeep of the embedded host's sessions (:class:`StoreUpkeep`): the snapshots
that keep their logs short (after an operation, by the maintenance, at a stop), the
maintenance pass, and what the data directory lost while the server ran written again from
memory (a session's files, its ``written_again`` hooks, the directory's lock and the
tombstone log)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol, TypeVar

from app.engine import persist
from app.engine.deleted_creates import DeletedCreates, delete_stone
from app.engine.host_state import HostState
from app.engine.interface import split_key
from app.engine.last_versions import LastVersions
from app.engine.session import Session
from app.engine.store import Store
from app.errors import OptserveError, Unavailable
from app.runtime import release_memory

if TYPE_CHECKING:
    from app.engine.evaluations import Evaluations

log = logging.getLogger("optserve.engine")
T = TypeVar("T")


class InIo(Protocol):
    """Run ``fn`` on one of the host's I/O threads and await its end
    (:meth:`EmbeddedHost._in_io <app.engine.host.EmbeddedHost._in_io>`)."""

    def __call__(self, fn: Callable[[], T]) -> Awaitable[T]: ...


class StoreUpkeep:
    """Keeps the sessions' files in the data directory: each session's snapshot when it is
    due (:meth:`snapshot_due`, :meth:`snapshot`), the maintenance (:meth:`maintain`) and a
    stop's last pass (:meth:`snapshot_all`), and the files removed from the data directory
    while the server ran written again from memory (:meth:`write_again`), with what the
    ``written_again`` and ``directory_again`` hooks keep there for the host's owner.

    It holds the host's shared state (:class:`~app.engine.host_state.HostState`), the keys
    of past deletes (``tombstones``, ``deleted_creates``) it writes again, the hooks, the
    sessions owed their ``written_again`` hooks (:attr:`hooks_owed`), and what it calls of
    the host: its I/O threads (``in_io``; ``in_io_whole``: a caller cancelled meanwhile
    waits for the work's end), a session's lock (``lock``), and its open LBFGS steps
    (``evaluations``: a session with one open is not snapshotted by the maintenance)."""

    def __init__(self, state: HostState, *,
                 tombstones: OrderedDict[tuple[str, str], tuple[str, str]],
                 deleted_creates: DeletedCreates,
                 last_versions: LastVersions,
                 written_again: list[Callable[[str], None]],
                 directory_again: list[Callable[[], None]],
                 in_io: InIo, in_io_whole: InIo,
                 lock: Callable[[str], AbstractAsyncContextManager[None]],
                 evaluations: Evaluations) -> None:
        self.config = state.config
        self._worker = state.worker
        self._store = state.store
        self._sessions = state.sessions
        self._damaged = state.damaged
        self._tombstones = tombstones
        self._deleted_creates = deleted_creates
        self._last_versions = last_versions
        self.written_again = written_again
        self.directory_again = directory_again
        self._in_io = in_io
        self._in_io_whole = in_io_whole
        self._lock = lock
        self._evaluations = evaluations
        #: sessions whose ``written_again`` hooks failed (a full disk just then): retried by
        #: the maintenance, the stop, and before the session's next operation
        self.hooks_owed: set[str] = set()

    def snapshot_due(self, key: str, s: Session) -> bool:
        if self._store is None or s.durability == "memory" or s.seq == s.seq_at_snapshot:
            return False
        if s.seq - s.seq_at_snapshot >= self.config.snapshot_every_steps:
            return True
        try:
            logged = self._store.log_length(key)
        except OptserveError:  # the next append says so; a snapshot would not help now
            return False
        return logged >= self.config.snapshot_every_mb * 2**20

    async def snapshot(self, key: str, s: Session, *, removed: bool = False) -> None:
        """Write the session's snapshot (the caller holds its lock: no operation changes it
        meanwhile, so the encoding may reference its tensors). Its tree is taken on the device
        worker, as every read of a session is: after what earlier jobs deferred there
        (``worker.after_job``: the norms of a ``?metrics=history`` step are filled into its
        history row outside the lock). A snapshot that fails, for whatever reason, is logged
        and changes nothing (its log still holds every operation): the operation that made it
        due is answered, and a stop goes on to the other sessions.

        A snapshot that finds the session's files removed from the data directory (after the
        maintenance looked for removed ones: ``removed`` when the caller,
        :meth:`write_again`, knows) writes them again, and then, as :meth:`write_again`
        does, what else the directory held for it (``written_again``: a sharded session's
        directory entry, without which a restart answers 404 for it, its shards on disk)."""
        store = self._store
        if store is None or s.durability == "memory" or key in self._damaged:
            return  # (a damaged session's tensors may hold what must not count)
        seq = s.seq

        def write() -> bool:
            parts = persist.encode_tree_parts(tree, persist.SNAPSHOT_KEY)
            return store.write_snapshot(key, parts)
        try:
            tree = (await self._worker.run(s.snapshot_tree, "snapshot") if self._worker.alive()
                    else s.snapshot_tree())  # (a dead worker runs nothing more)
            made_again = await self._in_io_whole(write)
        except OptserveError as exc:
            log.error("snapshot of %s failed: %s (its log still holds every operation)", key,
                      exc.detail)
            return
        except Exception:  # (a bug: never an operation's or a stop's failure)
            log.exception("snapshot of %s failed (its log still holds every operation)", key)
            return
        s.seq_at_snapshot = seq
        s.snapshot_time = time.monotonic()
        if made_again and not removed:
            log.error("the files of session %s were removed from the data directory while the "
                      "server ran: its snapshot wrote them again from memory", key)
            self.hooks_again(key)
        await self._in_io(release_memory)

    async def snapshot_all(self, store: Store) -> None:
        """At a stop: snapshot every session that logged operations since its last snapshot,
        and, as the maintenance does (:meth:`_write_back`), write again from memory what was
        removed from the data directory while the server ran and the maintenance had not
        found yet (the sessions whose files are gone, snapshotted lately or not; the
        directory's lock and the tombstone log). Before, a stop right after an ``rm -rf``
        lost every session with nothing new to snapshot, and the keys of past deletes."""
        try:
            await self._write_back(store, lambda key, s: s.seq > s.seq_at_snapshot)
        except Exception:  # (a bug: never a stop's failure)
            log.exception("store maintenance at the stop")

    async def write_again(self, key: str, s: Session, store: Store) -> None:
        """The session's files were removed from the data directory while the server ran:
        write them again from memory (a snapshot, then a new log; the caller holds its lock).
        Where that fails, the operation that found it is refused (503): its record would go to
        a file no restart reads."""
        log.error("the files of session %s were removed from the data directory while the "
                  "server ran: writing them again from memory", key)
        await self.snapshot(key, s, removed=True)  # (logs its own failure)
        failed: str | None = "its snapshot was not written"
        if not store.log_removed(key) and await self._in_io(lambda: store.exists(key)):
            failed = self.hooks_again(key)
            if failed is None:
                return
        raise Unavailable(f"the files of session {split_key(key)[1]!r:.140} were removed from "
                          "the data directory while the server ran, and writing them again "
                          f"failed ({failed}): nothing was applied", code="storage_error",
                          retry_after=2)

    def hooks_again(self, key: str) -> str | None:
        """Run the ``written_again`` hooks for the session ``key`` (its files were written
        again): None when they all ran, else what failed, the session then owed them
        (:attr:`hooks_owed`: retried by the maintenance, the stop, and before its next
        operation; without them a restart would not find a sharded session's shards)."""
        try:
            for hook in self.written_again:
                hook(key)
        except OSError as exc:
            self.hooks_owed.add(key)
            log.error("writing again what the data directory held for session %s (removed "
                      "while the server ran) failed: %s (tried again later)", key, exc)
            return str(exc)
        self.hooks_owed.discard(key)
        return None

    def _owed_hooks_again(self) -> None:
        """Retry the ``written_again`` hooks the sessions are owed (:meth:`hooks_again`)."""
        for key in sorted(self.hooks_owed):
            if key in self._sessions:
                self.hooks_again(key)
            else:  # (deleted since: nothing to write for it)
                self.hooks_owed.discard(key)

    async def _stones_again(self, store: Store) -> None:
        """The data directory was removed while the server ran (its lock taken again): the
        keys of past deletes (and of deleted sessions' creates) this host keeps in memory go
        back into the tombstone log, so that a keyed retry after a restart is still answered."""
        stones = [delete_stone(owner, key, fingerprint, sid)
                  for (owner, key), (fingerprint, sid) in self._tombstones.items()]
        stones += self._deleted_creates.stones()
        stones += self._last_versions.stones()
        try:
            written = await self._in_io(lambda: store.tombstones_again(stones))
        except OSError as exc:
            log.error("the tombstone log was removed from the data directory while the server "
                      "ran, and writing it again failed: %s", exc)
            return
        if written:
            log.error("the tombstone log was removed from the data directory while the server "
                      "ran: %d line(s) written again", written)
        for hook in self.directory_again:
            try:
                hook()
            except OSError as exc:
                log.error("writing again what the data directory held (removed while the "
                          "server ran) failed: %s", exc)

    async def _write_back(self, store: Store, due: Callable[[str, Session], bool]) -> None:
        """One pass of the maintenance (:meth:`maintain`, and a stop's): each session whose
        files were removed from the data directory while the server ran (``Store.removed``)
        written again from memory, each other one that ``due`` names snapshotted (none with an
        LBFGS evaluation open: busy for a while); the hooks sessions are owed
        (:meth:`hooks_again`); then the directory's lock and tombstone log taken again where
        they were removed too."""
        kept = [k for k, s in self._sessions.items() if s.durability != "memory"]
        try:
            removed = set(await self._in_io(functools.partial(store.removed, kept)))
        except Exception:  # (a bug: the due snapshots are still taken)
            log.exception("looking for sessions removed from the data directory")
            removed = set()
        for key in list(self._sessions):
            s = self._sessions.get(key)
            if s is None or self._evaluations.is_open(key) or \
                    not (key in removed or due(key, s)):
                continue
            async with self._lock(key):
                if self._sessions.get(key) is not s:
                    continue
                if key in removed:
                    with contextlib.suppress(OptserveError):  # (logged)
                        await self.write_again(key, s, store)
                else:
                    await self.snapshot(key, s)
        self._owed_hooks_again()  # (this pass's failures too: a stop has no next pass)
        if await self._in_io_whole(store.repair):
            await self._stones_again(store)

    async def maintain(self) -> None:
        """Snapshot sessions that have logged operations for a while, heal logs a failed
        background fsync left in doubt, write again from memory the sessions whose files were
        removed from the data directory while the server ran (``Store.removed``), and retry
        cutting logs a failed write left long."""
        assert self._store is not None
        store = self._store
        period = max(0.5, min(self.config.snapshot_every_s, 60.0) / 4)
        while True:
            await asyncio.sleep(period)
            try:
                await self._write_back(store, functools.partial(
                    _due, set(store.suspects()), time.monotonic() - self.config.snapshot_every_s))
            except asyncio.CancelledError:
                raise
            except Exception:  # never let maintenance die
                log.exception("store maintenance")


def _due(suspects: set[str], before: float, key: str, s: Session) -> bool:
    """Whether the maintenance snapshots the session: its log is in doubt (``suspects``), or
    it logged operations and its last snapshot is older than ``before``."""
    return key in suspects or (s.seq > s.seq_at_snapshot and s.snapshot_time <= before)
