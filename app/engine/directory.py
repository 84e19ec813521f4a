"""Where sessions live, kept where every front can read it.

A directory maps a session key to its entry (a small JSON object: the host that holds the
session, or a sharded session's shards and layout). The Ray engine keeps an entry for every
session; the embedded engine only for sharded sessions (its plain sessions are all in its one
host). Entries are files under ``<data dir>/directory/`` (a shared filesystem in a cluster), so
any number of fronts see the same directory with no service of its own:

- a claim is exclusive: the entry is written to a temporary file and hard-linked to its name,
  which fails when the name exists (two fronts creating one id: one wins, the other gets 409);
- an update replaces the file atomically (rename);
- a removal of one creation's entry (:meth:`Directory.remove_made`: only if the entry is still
  the one that creation claimed) reads the entry and unlinks it holding the key's lock, a
  ``flock`` on ``.locks/<key>`` that claims and updates of the key take too, so no claim of
  the key by another front lands between the read and the unlink (:meth:`Directory._key_lock`);
- claims and removals are on disk (the folder fsynced) when they return, and so is a create's
  mark in flight before its entry is claimed (a machine that crashes keeps the entry of every
  session a host was asked to make, and the mark that tells a create its front died with);
- ``.creates/`` indexes creates by their idempotency key (per tenant), so a retried create is
  answered with the session the first one made, whichever front it reaches (an index is
  claimed, dropped when its create failed, and moved when its session is deleted, holding its
  own lock, ``.locks/.creates.<name>``; dropped only while no try of its create holds the id's
  entry: :meth:`Directory.drop_created`); as that session
  is deleted its entry moves to ``.deleted-creates/`` (:meth:`Directory.forget_created`; the last
  :data:`~app.engine.deleted_creates.KEEP`, and every one whose session is still there: a
  delete refused or cut short), where a retry finds that it was deleted
  (:mod:`app.engine.deleted_creates`);
- ``.deletes/`` keeps the Ray engine's keyed deletes (per tenant, the last
  :data:`~app.engine.deleted_creates.KEEP`), so a retried delete is answered by any front,
  also once the session's entry, which named its host, is gone;
- ``.versions/`` keeps the Ray engine's deleted sessions' last versions (per session key, the
  last :data:`~app.engine.deleted_creates.KEEP`), written by their hosts before each delete's
  commit point, so that a session made again under the id, through any front and on any host,
  continues their numbering (:mod:`app.engine.last_versions`, :meth:`Directory.note_version`);
- ``.creating/`` holds a mark of each create in flight (:meth:`Directory.mark_creating`): a
  file named after its entry's ``made`` that the creating front holds locked (``flock``) from
  before it claims the entry until its hosts made the session. The kernel drops the lock when
  that process dies (``kill -9`` included), so any front tells a create in flight (locked)
  from one whose front died (a mark left unlocked) and never drops the entry of the first;
  a mark left by a front that died is how the second is found and cleaned
  (:meth:`RayRouter.drop_abandoned <app.engine.ray_host.RayRouter.drop_abandoned>`). (On a
  shared filesystem the locks must reach every node: NFSv4 and CephFS carry ``flock``; NFS
  drops a dead node's locks when its lease ends.)

Without a data directory (tests, ``memory`` durability everywhere) the directory is a dict.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson

from app.engine.deleted_creates import KEEP
from app.engine.interface import split_key
from app.engine.last_versions import LastVersions, owner_key
from app.engine.store import Files

#: how many marks (of deleted creates, of keyed deletes) are written between two prunes of the
#: oldest
_PRUNE_EVERY = 100
#: deleted sessions' last versions (the Ray engine's: :meth:`Directory.note_version`)
_VERSIONS = ".versions"
#: the folders of marks, each pruned to its last KEEP
_MARKS = (".deleted-creates", ".deletes", _VERSIONS)
#: the marks of creates in flight
_CREATING = ".creating"
#: what a create's mark holds: a session key, ``<tenant>~<id>`` (the name of its entry)
_MARK_KEY = re.compile(r"[^./~\0][^/~\0]*~[^./~\0][^/~\0]*")
#: the keys' lock files (:meth:`Directory._key_lock`)
_LOCKS = ".locks"
#: the keys this process locks, each with how many threads are at or waiting for it (where
#: ``flock`` is emulated with POSIX locks, e.g. on NFS, a process's own lock does not stop its
#: other threads: they take the key's lock in this process first)
_KEY_LOCKS: dict[str, tuple[threading.Lock, int]] = {}
_KEY_LOCKS_GUARD = threading.Lock()
#: the marks of creates in flight that this process holds, by path (the lock's descriptor):
#: they are never opened again here (where ``flock`` is emulated with POSIX locks, e.g. on NFS,
#: a process's own lock does not stop it, and closing any descriptor of the file drops it)
_HELD: dict[str, int] = {}
#: a mark still unlocked this long after it was written (its front died before it locked it,
#: or, under a temporary name, before it was in place) is taken for left over
_UNPLACED_S = 60.0

log = logging.getLogger("optserve.directory")
T = TypeVar("T")


def _index_lock(name: str) -> str:
    """The name of the lock (:meth:`Directory._key_lock`) of the index ``.creates/<name>``
    (never a session key's: those have a ``~``)."""
    return f".creates.{name}"


@dataclass
class CreateMark:
    """A create in flight (:meth:`Directory.mark_creating`): ``done`` once the hosts made the
    session, or nothing of it is left (the mark goes); ``release`` in every case (``finally``:
    a mark released but not done is one a front died with, looked at again by
    :meth:`RayRouter.drop_abandoned <app.engine.ray_host.RayRouter.drop_abandoned>`)."""

    directory: Directory
    made: str
    path: Path | None  # (None: a directory without a root; the mark is in its memory)
    fd: int = -1

    def done(self) -> None:
        if self.path is None:
            self.directory._in_flight.discard(self.made)
            return
        if self.fd >= 0:  # (unlinked while locked: nobody takes it for a dead front's)
            self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.path is None:
            self.directory._in_flight.discard(self.made)
            return
        if self.fd >= 0:
            _HELD.pop(str(self.path), None)
            os.close(self.fd)
            self.fd = -1


def entry_at(root: Path, key: str) -> dict[str, Any] | None:
    """The entry of ``key`` in the directory at ``root``, or None (read only: what a host
    actor reads)."""
    try:
        raw = (root / key).read_bytes()
    except FileNotFoundError:
        return None
    entry: dict[str, Any] = orjson.loads(raw)
    return entry


def created_at(root: Path, tenant: str, idem_key: str) -> dict[str, Any] | None:
    """``{"key", "fingerprint"}`` of the create ``idem_key`` made in the directory at ``root``,
    with ``"deleted": true`` once that session was deleted, or None (read only: what a host
    actor reads; :meth:`Directory.created`)."""
    name = create_name(tenant, idem_key)
    for where, deleted in ((".creates", False), (".deleted-creates", True)):
        try:
            found: dict[str, Any] = orjson.loads((root / where / name).read_bytes())
        except FileNotFoundError:
            continue
        return {**found, "deleted": True} if deleted else found
    return None


def create_name(tenant: str, idem_key: str) -> str:
    """The file name of a keyed create's index (``.creates/``) and of its mark once its
    session is deleted (``.deleted-creates/``)."""
    return hashlib.sha256(f"{tenant}\0{idem_key}".encode()).hexdigest()


class Directory:
    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._memory: dict[str, dict[str, Any]] = {}
        self._creates: dict[str, dict[str, Any]] = {}
        #: deleted sessions' creates by name, oldest first (without a root)
        self._deleted: dict[str, dict[str, Any]] = {}
        #: keyed deletes by name, oldest first (without a root)
        self._deletes: dict[str, dict[str, Any]] = {}
        #: deleted sessions' last versions (without a root)
        self._versions = LastVersions()
        self._marked = 0  # marks written since the last prune (with a root)
        #: the ``made`` of creates in flight (without a root)
        self._in_flight: set[str] = set()
        #: the ``made`` of creations whose hosts a try is asking (without a root:
        #: :meth:`try_making`)
        self._making: set[str] = set()
        if root is not None:
            self.make_folders()
            self._sweep_locks()
            # (the count between prunes starts again with each front: a front that deletes
            # fewer than that before it ends would leave its marks to pile up)
            self.prune_deleted()

    def make_folders(self) -> None:
        """The directory's folders, where they are missing (at start; again after the data
        directory was removed while the server ran)."""
        assert self.root is not None
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (".creates", _CREATING, _LOCKS, *_MARKS):
            (self.root / folder).mkdir(mode=0o700, exist_ok=True)

    def _in_folders(self, write: Callable[[], T]) -> T:
        """``write()``, once more after making the folders when a folder of it was missing
        (the data directory removed while the server ran: the first write after it makes
        them, as the hosts' writes and a readiness probe do)."""
        try:
            return write()
        except FileNotFoundError:
            self.make_folders()
            return write()

    # ------------------------------------------------------------------ entries
    def get(self, key: str) -> dict[str, Any] | None:
        if self.root is None:
            kept = self._memory.get(key)
            return dict(kept) if kept is not None else None
        return entry_at(self.root, key)

    def claim(self, key: str, entry: dict[str, Any]) -> bool:
        """Write the entry if the key has none; False when it has one. On disk (its folder
        fsynced) when this returns True."""
        if self.root is None:
            if key in self._memory:
                return False
            self._memory[key] = dict(entry)
            return True
        tmp = self._write_tmp(entry)
        try:
            with self._key_lock(key):
                os.link(tmp, self.root / key)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        Files().fsync_dir(self.root)
        return True

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if self.root is None:
            self._memory[key] = dict(entry)
            return
        tmp = self._write_tmp(entry)
        try:
            with self._key_lock(key):
                os.replace(tmp, self.root / key)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, key: str) -> None:
        """Remove the entry of ``key``, whichever creation it is now (on disk when this
        returns). For a caller that means one creation, :meth:`remove_made`."""
        if self.root is None:
            self._memory.pop(key, None)
            return
        with contextlib.suppress(FileNotFoundError):
            (self.root / key).unlink()
        Files().fsync_dir(self.root)

    def remove_made(self, key: str, made: str | None) -> bool:
        """Remove the entry of ``key`` if it is still the creation ``made`` (not one claimed
        since by another create of its id): True when it was. The read and the removal hold
        the key's lock (:meth:`_key_lock`), which every claim and update of the key takes: no
        other front's claim of the id lands between the two (without it, two fronts dropping
        one entry at once, a claim landing between one's read and its unlink, removed the
        entry just claimed)."""
        if self.root is None:
            entry = self._memory.get(key)
            if entry is None or entry.get("made") != made:
                return False
            self.remove(key)
            return True
        with self._key_lock(key):
            entry = self.get(key)
            if entry is None or entry.get("made") != made:
                return False
            self.remove(key)
        return True

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """Hold the key's lock: ``flock`` on ``.locks/<key>``, made when needed and removed
        by its holder as it lets go, so no lock file stays for a key nobody is at. A waiter
        that then gets the lock of the file removed (its inode is no longer the name's) takes
        it again on the file now there. The kernel drops a lock whose process dies
        (``kill -9`` too); the file it leaves is reused by the key's next lock and removed
        then, or at a front's start (:meth:`_sweep_locks`). Reads take no lock (an entry is
        replaced and linked whole). In this process the key's threads take it one at a time
        first (:data:`_KEY_LOCKS`)."""
        assert self.root is not None
        path = self.root / _LOCKS / key
        with _KEY_LOCKS_GUARD:
            mutex, users = _KEY_LOCKS.get(key, (threading.Lock(), 0))
            _KEY_LOCKS[key] = (mutex, users + 1)
        try:
            with mutex:
                fd = self._in_folders(lambda: self._lock_file(path, block=True))
                assert fd >= 0
                try:
                    yield
                finally:
                    path.unlink(missing_ok=True)  # (while locked: a waiter takes it again)
                    os.close(fd)
        finally:
            with _KEY_LOCKS_GUARD:
                mutex, users = _KEY_LOCKS[key]
                if users == 1:
                    del _KEY_LOCKS[key]
                else:
                    _KEY_LOCKS[key] = (mutex, users - 1)

    def try_making(self, made: str) -> Callable[[], None] | None:
        """Take the lock of the creation ``made``'s shard creates, without waiting: the call
        that lets it go, or None while another try of that create (another front, another
        thread) holds it. A keyed sharded create asks its shards' hosts holding it
        (:meth:`RayRouter._alone <app.engine.ray_host.RayRouter._alone>`), so tries of one
        create through several fronts at once ask them one after the other. It is the key
        lock (:meth:`_key_lock`) of ``.making.<made>``: ``flock`` on its file, which the
        kernel drops with its process, and in this process its key's mutex."""
        if self.root is None:
            if made in self._making:
                return None
            self._making.add(made)
            return lambda: self._making.discard(made)
        key = f".making.{made}"
        path = self.root / _LOCKS / key
        with _KEY_LOCKS_GUARD:
            mutex, users = _KEY_LOCKS.get(key, (threading.Lock(), 0))
            if not mutex.acquire(blocking=False):
                return None
            _KEY_LOCKS[key] = (mutex, users + 1)

        def unused() -> None:
            mutex.release()
            with _KEY_LOCKS_GUARD:
                left = _KEY_LOCKS[key][1] - 1
                if left:
                    _KEY_LOCKS[key] = (mutex, left)
                else:
                    del _KEY_LOCKS[key]
        try:
            fd = self._in_folders(lambda: self._lock_file(path, block=False))
        except BaseException:
            unused()
            raise
        if fd < 0:
            unused()
            return None

        def release() -> None:
            try:
                path.unlink(missing_ok=True)  # (while locked, as _key_lock does)
                os.close(fd)
            finally:
                unused()
        return release

    @staticmethod
    def _lock_file(path: Path, *, block: bool) -> int:
        """A descriptor of the lock file at ``path``, locked (exclusive), the file still in
        place under that name; -1 when ``block`` is False and another holds it."""
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return -1
                held = os.fstat(fd)
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
            except BaseException:
                os.close(fd)
                raise
            if now is not None and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)  # (removed by the holder before: taken again)

    def _sweep_locks(self) -> None:
        """Remove the lock files a process that died holding a key's lock left (nobody
        holds them); one held now is left to its holder."""
        assert self.root is not None
        folder = self.root / _LOCKS
        for name in os.listdir(folder):
            # (under the guard: no thread of this process takes the key's lock meanwhile,
            # whose lock a close of another descriptor of the file would drop where flock is
            # emulated with POSIX locks; the attempt here never waits)
            with _KEY_LOCKS_GUARD, contextlib.suppress(FileNotFoundError):
                if name in _KEY_LOCKS:  # (this process is at it)
                    continue
                fd = self._lock_file(folder / name, block=False)
                if fd >= 0:
                    (folder / name).unlink(missing_ok=True)
                    os.close(fd)

    def keys(self, prefix: str = "") -> list[str]:
        if self.root is None:
            return sorted(k for k in self._memory if k.startswith(prefix))
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:  # (the data directory removed while the server runs: its
            return []  # hosts write their entries again, app.engine.kept_entries)
        return sorted(n for n in names
                      if n.startswith(prefix) and not n.startswith(".") and n != "")

    def _write_tmp(self, entry: dict[str, Any]) -> Path:
        return self._in_folders(lambda: self._write_tmp_once(entry))

    def _write_tmp_once(self, entry: dict[str, Any]) -> Path:
        assert self.root is not None
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(orjson.dumps(entry))
                f.flush()
                os.fsync(f.fileno())
        except BaseException:  # (a write or fsync that failed leaves no temporary file)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _place(self, entry: dict[str, Any], path: Path) -> None:
        """Write ``entry`` to ``path`` atomically (a temporary file renamed over it), and
        fsync ``path``'s folder; a failure leaves no temporary file."""
        tmp = self._write_tmp(entry)
        try:
            self._in_folders(lambda: os.replace(tmp, path))
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        Files().fsync_dir(path.parent)

    # ------------------------------------------------------------------ creates in flight
    def mark_creating(self, made: str, key: str) -> CreateMark:
        """Mark a create of ``key`` (its entry's ``made``) in flight, before its entry is
        claimed (or, for a retry finishing it, before its hosts are asked): a file in
        ``.creating/`` named ``<made>.<random>``, holding ``key``, locked by this process until
        :meth:`CreateMark.release`. It is written and locked under a temporary name, then
        renamed, so every mark in place is locked by the front that made it until that front
        releases it or dies. On disk (the file and its folder fsynced) when this returns."""
        if self.root is None:
            self._in_flight.add(made)
            return CreateMark(self, made, None)
        folder = self.root / _CREATING
        tmp = folder / f".tmp-{made}.{uuid.uuid4().hex[:8]}"
        fd = self._in_folders(lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, key.encode())
            os.fsync(fd)
            path = folder / tmp.name.removeprefix(".tmp-")
            os.rename(tmp, path)
            # (on disk before the entry is claimed: a machine that crashes once the entry is
            # claimed leaves the mark, unlocked, by which the entry is found and dropped when
            # no host made the session, drop_abandoned; without it, an unkeyed create's entry
            # would stay for good, counted toward its tenant's session limit)
            Files().fsync_dir(folder)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        _HELD[str(path)] = fd
        return CreateMark(self, made, path, fd)

    def _locked(self, path: Path) -> bool | None:
        """Whether a create's mark is locked (its create in flight; None when the mark is
        gone)."""
        if str(path) in _HELD:
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # (drops the shared lock just taken, if it was)
        return False

    def in_flight(self, made: str | None) -> bool:
        """Whether a create of the entry made ``made`` is in flight: a front that is alive is
        still making it (its mark is locked). False for a create done, or whose front died."""
        if made is None:
            return False
        if self.root is None:
            return made in self._in_flight
        folder = self.root / _CREATING
        return any(self._locked(folder / name) for name in os.listdir(folder)
                   if name.partition(".")[0] == made)

    def abandoned_creates(self) -> list[tuple[str, str, Path]]:
        """The marks of creates whose front died before it was done with them (unlocked, so
        that front is gone or has let it go): ``(made, key, mark)`` each, to be dropped with
        :meth:`drop_mark` once the create's entry is seen to. Leftovers of a front that died
        before its mark was in place go, and so does a mark that names no session key (empty
        or garbled: one an older version wrote without an fsync, cut by a machine's crash;
        nothing says which entry it was of), with a warning; one that cannot be read now is
        left, with a warning, for the next look."""
        if self.root is None:
            return []
        folder = self.root / _CREATING
        found = []
        for name in os.listdir(folder):
            path = folder / name
            with contextlib.suppress(FileNotFoundError):
                if name.startswith(".tmp-"):
                    if time.time() - path.stat().st_mtime > _UNPLACED_S and \
                            self._locked(path) is False:
                        path.unlink()
                    continue
                if self._locked(path) is False:
                    made = name.partition(".")[0]
                    try:
                        raw = path.read_bytes()
                    except FileNotFoundError:
                        continue  # (gone meanwhile: another front's look dropped it)
                    except OSError as exc:
                        log.warning("the mark %s of a create whose front died cannot be read "
                                    "(%s): left for the next look", path, exc)
                        continue
                    try:
                        key = raw.decode()
                    except UnicodeDecodeError:
                        key = ""
                    if not _MARK_KEY.fullmatch(key):
                        log.warning("dropped the mark %s of a create whose front died: it "
                                    "names no session (%d bytes: %r), so its entry (made %s) "
                                    "cannot be seen to", path, len(raw), raw[:64], made)
                        path.unlink()
                        continue
                    found.append((made, key, path))
        return found

    def drop_mark(self, mark: Path) -> None:
        mark.unlink(missing_ok=True)

    # ------------------------------------------------------------------ creates by key
    def created(self, tenant: str, idem_key: str) -> dict[str, Any] | None:
        """``{"key", "fingerprint"}`` of the create this idempotency key made, or None; with
        ``"deleted": true`` when that session has been deleted (:meth:`forget_created`)."""
        if self.root is None:
            name = create_name(tenant, idem_key)
            live = self._creates.get(name)
            return live if live is not None else self._deleted.get(name)
        return created_at(self.root, tenant, idem_key)

    def note_created(self, tenant: str, idem_key: str, fingerprint: str, key: str) -> None:
        """Index a keyed create of ``key`` (its folder fsynced when this returns), replacing
        any index of the key (the embedded engine's sharded creates, indexed once made). The
        Ray engine's router indexes with :meth:`claim_created` once the session's entry is
        claimed, before any host is asked, so a create whose front dies once the hosts made the
        session keeps its key (its retry is answered with it, or finishes it on the entry's
        hosts: :meth:`RayRouter.create <app.engine.ray_host.RayRouter.create>`)."""
        entry = {"key": key, "fingerprint": fingerprint}
        name = create_name(tenant, idem_key)
        if self.root is None:
            self._creates[name] = entry
            return
        self._place(entry, self.root / ".creates" / name)

    def claim_created(self, tenant: str, idem_key: str, fingerprint: str, key: str
                      ) -> str | None:
        """Index a keyed create of ``key`` if this idempotency key has no index yet (an
        exclusive hard link, as :meth:`claim`; its folder fsynced when this returns): None when
        the key is indexed for ``key`` now, else the session key it was indexed for first. The
        Ray engine's point of decision between fronts running one keyed create at once (a
        client's retry reaching another front while the first try is in flight): the one
        whose index is written makes the session, the others finish that one
        (:meth:`RayRouter.create <app.engine.ray_host.RayRouter.create>`)."""
        entry = {"key": key, "fingerprint": fingerprint}
        name = create_name(tenant, idem_key)
        if self.root is None:
            first = self._creates.setdefault(name, entry)
            return None if first.get("key") == key else str(first["key"])
        path = self.root / ".creates" / name
        tmp = self._write_tmp(entry)
        try:
            with self._key_lock(_index_lock(name)):  # (as drop_created)
                while True:
                    try:
                        self._in_folders(lambda: os.link(tmp, path))
                        break
                    except FileExistsError:
                        with contextlib.suppress(FileNotFoundError):
                            first_key = str(orjson.loads(path.read_bytes())["key"])
                            return None if first_key == key else first_key
                    # (gone since the link: moved by a front that took no lock, an older
                    # version's; every removal here holds it now)
        finally:
            tmp.unlink(missing_ok=True)
        Files().fsync_dir(self.root / ".creates")
        return None

    def drop_created(self, tenant: str, idem_key: str, key: str) -> bool:
        """Remove the index of a create of ``key`` that failed (or is made anew): only if it
        still names ``key`` and no try of this create holds ``key``'s entry now (one that
        claimed the id again, through another front, once this try's entry went: the index is
        its). True when it went. The reads and the removal hold the index's lock, which
        :meth:`claim_created` takes too, and a try claims its entry before its index: so a
        claim of the index by another try lands before the look here (which then sees that
        try's entry, and keeps the index) or after the removal (and writes the index again);
        without the lock, a claim landing between the read and the unlink (the index dropped
        and claimed again by other tries meanwhile) lost the index just claimed. On disk (its
        folder fsynced) when this returns True."""
        name = create_name(tenant, idem_key)
        if self.root is None:
            if self._creates.get(name, {}).get("key") != key or self._retried(key, idem_key):
                return False
            del self._creates[name]
            return True
        path = self.root / ".creates" / name
        with self._key_lock(_index_lock(name)):
            try:
                if orjson.loads(path.read_bytes()).get("key") != key or \
                        self._retried(key, idem_key):
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
            Files().fsync_dir(path.parent)  # (gone for good: a machine's crash keeps it gone)
        return True

    def _retried(self, key: str, idem_key: str) -> bool:
        """Whether ``key``'s entry is a try's of the create sent with ``idem_key``."""
        entry = self.get(key)
        return entry is not None and entry.get("created_by") == idem_key

    def _lives(self, name: str, mark: dict[str, Any] | Path) -> bool:
        """Whether a deleted create's mark is of a session that is still there: its entry
        is, made by that create's key (its delete was refused, or cut short before any host
        deleted it; a retried create is answered with it, :func:`indexed_session
        <app.engine.deleted_creates.indexed_session>`)."""
        if isinstance(mark, Path):
            try:
                mark = dict(orjson.loads(mark.read_bytes()))
            except orjson.JSONDecodeError:
                return False
        key = str(mark.get("key"))
        entry = self.get(key)
        made_by = entry.get("created_by") if entry is not None else None
        return made_by is not None and \
            create_name(split_key(key)[0], str(made_by)) == name

    def forget_created(self, tenant: str, idem_key: str, key: str) -> None:
        """The session ``key`` this key's create made is deleted: its entry is kept, marked
        deleted (a retried create is refused, not run again), among the last :data:`KEEP`;
        only if it still names ``key`` (not the index of another create under the key, made
        once this one's was dropped). The mark is on disk (its folders fsynced) when this
        returns. The read and the move hold the index's lock, as :meth:`claim_created` and
        :meth:`drop_created` do (without it, a retry's claim of the index reading it as the
        move landed took it for gone and wrote it again: a live index of a session deleted).
        The embedded engine's router marks a sharded session before its shards' files start to
        go, so a crash anywhere in the delete leaves the whole session or the mark; while the
        session is still whole, a retried create is answered with it (:meth:`LocalRouter.find_create
        <app.engine.router.LocalRouter.find_create>`); the Ray engine's router marks every
        session before its hosts delete it, in the same way (:meth:`RayRouter.find_create
        <app.engine.ray_host.RayRouter.find_create>`)."""
        name = create_name(tenant, idem_key)
        if self.root is None:
            entry = self._creates.get(name)
            if entry is not None and entry.get("key") == key:
                del self._creates[name]
                self._deleted.pop(name, None)
                self._deleted[name] = {**entry, "deleted": True}
                excess = len(self._deleted) - KEEP
                for old in list(self._deleted):
                    if excess <= 0:
                        break
                    if not self._lives(old, self._deleted[old]):
                        del self._deleted[old]
                        excess -= 1
            return
        path = self.root / ".creates" / name
        mark = self.root / ".deleted-creates" / name
        with self._key_lock(_index_lock(name)):
            try:
                if orjson.loads(path.read_bytes()).get("key") != key:
                    return
                os.replace(path, mark)
            except FileNotFoundError:
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(mark)  # (marked now: the oldest marks are pruned first)
            for folder in (".deleted-creates", ".creates"):
                Files().fsync_dir(self.root / folder)
        self._count_mark()

    def _count_mark(self) -> None:
        self._marked += 1
        if self._marked >= _PRUNE_EVERY:
            self._marked = 0
            self.prune_deleted()

    def prune_deleted(self, keep: int | None = None) -> None:
        """Remove the oldest marks of deleted creates, and of keyed deletes, past ``keep``
        each (default :data:`KEEP`; by the time they were marked: a rename keeps the file's
        times, so they are touched when marked). Also when a directory is opened on its
        folder. A deleted create's mark whose session is still there (:meth:`_lives`) is kept
        (among the ``keep``): its create's retry is answered with the session, not run again."""
        assert self.root is not None
        keep = KEEP if keep is None else keep
        for where in _MARKS:
            folder = self.root / where
            marks: list[tuple[float, str]] = []
            for entry in os.scandir(folder):
                with contextlib.suppress(FileNotFoundError):
                    marks.append((entry.stat().st_mtime, entry.name))
            excess = len(marks) - keep
            marks.sort()
            for _, name in marks:
                if excess <= 0:
                    break
                with contextlib.suppress(FileNotFoundError):
                    if where == ".deleted-creates" and self._lives(name, folder / name):
                        continue
                    (folder / name).unlink()
                excess -= 1

    # ------------------------------------------------------------------ deletes by key
    def note_deleted(self, tenant: str, idem_key: str, fingerprint: str, key: str, *,
                     deleting: dict[str, Any] | None = None) -> None:
        """A delete sent with this idempotency key deleted ``key``: its retry is answered,
        through any front, among the last :data:`KEEP`. On disk (its folder fsynced) when
        this returns. (The Ray engine's: its hosts keep the keys of their deletes too, but a
        front finds the host only through the session's entry, which goes with the delete.)
        ``deleting``: not yet, its hosts are about to be asked; kept with the creation it
        deletes (``made``) and the host that keeps its key (``host``), so that a retry after
        a crash tells that session from one made again with the id since
        (:meth:`RayRouter.delete <app.engine.ray_host.RayRouter.delete>`)."""
        entry: dict[str, Any] = {"key": key, "fingerprint": fingerprint}
        if deleting is not None:
            entry["deleting"] = deleting
        name = create_name(tenant, idem_key)
        if self.root is None:
            self._deletes.pop(name, None)
            self._deletes[name] = entry
            while len(self._deletes) > KEEP:
                del self._deletes[next(iter(self._deletes))]
            return
        self._place(entry, self.root / ".deletes" / name)
        self._count_mark()

    def marks_again(self, key: str, create: tuple[str, str] | None,
                    delete: tuple[str, str] | None) -> int:
        """The marks of the deleted session ``key`` written again where the directory holds
        none under their keys (it was removed while the server ran): its keyed create's
        (``(idempotency key, fingerprint)``, in ``.deleted-creates/``: a retried create is
        refused) and its keyed delete's (in ``.deletes/``: a retried delete is answered).
        How many were written."""
        assert self.root is not None
        tenant = split_key(key)[0]
        written = 0
        if create is not None and self.created(tenant, create[0]) is None:
            self._place({"key": key, "fingerprint": create[1]},
                        self.root / ".deleted-creates" / create_name(tenant, create[0]))
            written += 1
        if delete is not None and self.deleted(tenant, delete[0]) is None:
            self.note_deleted(tenant, delete[0], delete[1], key)
            written += 1
        return written

    def deleted(self, tenant: str, idem_key: str) -> dict[str, Any] | None:
        """``{"key", "fingerprint"}`` of the delete sent with this idempotency key (with
        ``"deleting"`` while it may not be done: :meth:`note_deleted`), or None."""
        name = create_name(tenant, idem_key)
        if self.root is None:
            return self._deletes.get(name)
        try:
            found: dict[str, Any] = orjson.loads((self.root / ".deletes" / name).read_bytes())
        except FileNotFoundError:
            return None
        return found

    # ------------------------------------------------------------------ last versions
    def note_version(self, key: str, version: int) -> None:
        """The session ``key`` (a shard's: its sharded session's) is being deleted at
        ``version``: a session made again under its id starts after it
        (:mod:`app.engine.last_versions`), whichever front makes it, on whichever host. Kept
        among the last :data:`KEEP` (as the marks of deletes); a lower version than the one
        kept does not lower it (the read and the write hold the mark's lock: the shards of a
        sharded session, all at one version, are deleted by their hosts at once). On disk (its
        folder fsynced) when this returns: its host calls it before its delete's commit point,
        so a delete is durable only with it (one refused after it leaves a mark at or below the
        session's version, which changes nothing)."""
        owner = owner_key(key)
        if self.root is None:
            self._versions.note(owner, version)
            return
        path = self.root / _VERSIONS / owner
        with self._key_lock(f"{_VERSIONS}.{owner}"):
            kept = self._version_at(path)
            if kept is not None and kept >= version:
                return
            self._place({"version": version}, path)
        self._count_mark()

    def last_version(self, key: str) -> int | None:
        """The last version of the deleted session ``key`` (a shard's: its sharded
        session's) kept by :meth:`note_version`, or None."""
        owner = owner_key(key)
        if self.root is None:
            return self._versions.last(owner)
        return self._version_at(self.root / _VERSIONS / owner)

    @staticmethod
    def _version_at(path: Path) -> int | None:
        try:
            version = orjson.loads(path.read_bytes())["version"]
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("the last version at %s cannot be read (%s): taken for none", path, exc)
            return None
        return version if isinstance(version, int) and version >= 0 else None
