"""The embedded persistent store: per session a snapshot plus a write-ahead log.

Layout under the data directory::

    sessions/<key>/snapshot.bin   OPTSNAP2 | u64 length | u32 crc32c | payload
    sessions/<key>/wal.bin        records: OPR2 | u64 length | u32 crc32c(payload)
                                          | u32 crc32c(the 16 header bytes before) | payload
    tombstones.jsonl              one JSON line per delete that came with an idempotency key
                                  (and per deleted session's create key, and its last version:
                                  app.engine.last_versions)

(The first format, ``OPTSNAP1``/``OPTR`` with zlib's crc32 and a u32 length, is still read.)

The log is written ahead: a record reaches the file (and, for durability ``step``, the disk)
before its operation touches the session, so a failed write or fsync leaves nothing applied.
A failed append truncates the file back to its last good length; when even that fails, the
log is marked for repair, the failed record's header is zeroed (so a crash before the repair
leaves a torn tail, never a refused operation; where that write fails too, the record may stay
whole, and a restart replays it: a retry under its idempotency key is then answered from it,
not applied again), every later append to it first retries the
truncate, and :meth:`Store.health` names the problem until it succeeds. A replay of an open
log (a live session's rebuild) reads only its good length, so such a record is never in it,
whether its header could be zeroed or not. The interval flusher
never dies: a failed background fsync marks the log *suspect* (the kernel may have dropped
pages it could not write), health reports it, and the engine heals such a log by writing a
fresh snapshot from memory. After ENOSPC, health reports the full disk until the free space
would take the write that failed (a small probe may fit where a large record does not).

Snapshots are written atomically (temp file, fsync, rename, fsync the directory). On reading, a
damaged record (bad header, length past the end of the file, payload checksum) with no valid
record anywhere after it is a torn write from a crash (never acknowledged) and is dropped; a
damaged record followed by a valid one is corruption and the session is refused. The magic and
the header's own checksum make that search exact and cheap.

Durability levels: ``step`` (a record is fsynced before the operation is applied and
acknowledged), ``interval`` (written at once, fsynced by a background flusher every
``interval_s``), ``memory`` (nothing on disk). Payloads are opaque bytes here. All file system
calls go through :class:`Files`, which tests replace to inject faults (EIO, ENOSPC).

Open logs are bounded (``max_open``, ``OPTSERVE_MAX_OPEN_LOGS``; by default
:func:`default_open_logs`: the soft ``RLIMIT_NOFILE`` / 8, at least 32): a log's descriptor is
not kept for as long as its session exists, or enough idle sessions would take every descriptor
the process may have (each operation then a 503 ``out_of_file_descriptors``). Past the bound,
the least recently used logs are closed as another opens, and a closed log is reopened by its
session's next write; its length, repair and suspect marks stay in memory. A log is closed only
when nothing it holds is waiting for an fsync: an ``interval`` log written since its last fsync
is fsynced first (a failure marks it suspect, as the flusher does, and it stays open), and one
holding a ``step`` record whose :meth:`Store.sync` has not run yet is not closed. A log in use
(its lock held: an operation writing it) is skipped, so while operations are writing the
bound can be passed by the logs they hold. A reopen that fails (EMFILE, ENOSPC, ...) fails the
operation before anything is written: the session and its log stay as they were. The store
takes no lock on its logs (its own, :mod:`app.engine.data_dir_lock`, and the directory's
``flock`` locks are on files of their own), so closing a log drops no lock.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import resource
import shutil
import stat
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import crc32c

from app.engine.data_dir_lock import DataDirLock
from app.engine.delete_reserve import RESERVE, DeleteReserve
from app.engine.free_space import FreeSpace
from app.engine.last_versions import is_version
from app.errors import OptserveError, StorageFull, Unavailable

log = logging.getLogger("optserve.store")
Durability = Literal["step", "interval", "memory"]
Buffer = bytes | bytearray | memoryview
SNAP_MAGIC = b"OPTSNAP2"
_SNAP_HEAD = struct.Struct("<8sQI")
SNAP_MAGIC_V1 = b"OPTSNAP1"
REC_MAGIC = b"OPR2"
_REC_HEAD = struct.Struct("<4sQII")  # magic, payload length, payload crc32c, header crc32c
_REC_HEAD_BODY = struct.Struct("<4sQI")
REC_MAGIC_V1 = b"OPTR"
_REC_HEAD_V1 = struct.Struct("<4sIII")  # magic, length, zlib crc32(payload), crc32(head)
_REC_HEAD_BODY_V1 = struct.Struct("<4sII")
_IOV_MAX = 512
_FULL = (errno.ENOSPC, errno.EDQUOT)
#: the process (EMFILE) or the system (ENFILE) has no file descriptor left
_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)
#: the ``Retry-After`` of an operation refused for want of file descriptors: they come back as
#: soon as connections or files are closed
DESCRIPTORS_RETRY_S = 2.0
#: the session logs kept open at once by default: the soft descriptor limit divided by this
#: (within the quarter of it that ``OPTSERVE_MAX_CONNECTIONS``'s default keeps for files) ...
OPEN_LOGS_SHARE = 8
#: ... and at least this many
OPEN_LOGS_MIN = 32
#: an unlimited ``RLIMIT_NOFILE`` is taken as this
_UNLIMITED_FILES = 1 << 20
#: logs in use (or awaiting an fsync) passed over at most, beyond those to close, as room is
#: made for another
_SKIPPABLE = 16
TOMBSTONE = "tombstone"  # in a session directory being deleted: the delete's idempotency key
TOMBSTONES = "tombstones.jsonl"  # under the data directory: the keys of past deletes
#: temporary files only a store writes in its data directory (under its lock), which a crash
#: (or an older server) may leave: removed at the start, before the store writes anything. The
#: delete reserve as commits before ddfc298 made it (written as ``.delete-reserve.tmp``, then
#: renamed), the write probe's (:meth:`Store.probe`), and a cut of the tombstone log's
#: (:func:`write_atomic`). Never another process's (``python -m app``'s ``.write-probe-*``
#: check runs before the lock is taken)
STALE_TEMPS = (f"{RESERVE}.tmp", ".write-probe.tmp", ".write-probe", f"{TOMBSTONES}.tmp")
#: how often the flusher looks whether a short delete reserve can be topped up (a ``stat``
#: and a ``statvfs``; none while it is whole)
RESERVE_LOOK_S = 1.0


def _version_stone(line: bytes) -> tuple[str, int] | bool:
    """A tombstone-log line's deleted session and last version when it is such a line
    (:func:`app.engine.last_versions.stone`); True for one whose version cannot be read (it
    restores nothing); False for any other line."""
    if b'"version"' not in line:
        return False
    try:
        stone = json.loads(line)
    except ValueError:
        return False
    if not isinstance(stone, dict) or not is_version(stone):
        return False
    try:
        return str(stone["session"]), int(stone["version"])
    except (KeyError, ValueError, TypeError):
        return True


def _deleted_at(trash: Path) -> int:
    """When the delete whose ``.deleted-<id>-<pid>-<ns>`` folder this is was committed (its
    name's last part; 0 when it has none)."""
    try:
        return int(trash.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return 0


def _last_stones(lines: list[bytes], keep: int, keep_versions: int) -> list[bytes]:
    """The last ``keep`` lines of the tombstone log that are not versions', and the version
    lines of the last ``keep_versions`` sessions deleted (ids, as
    :class:`~app.engine.last_versions.LastVersions` keeps them: a session deleted again and
    again takes one place, not one a delete), in their order. Of each such session its newest
    line is kept (its place among them) and, where an older one holds a higher version, that
    one too (the highest is what a restore keeps)."""
    kept = [False] * len(lines)
    left = keep
    newest: dict[str, int] = {}  # session -> the index of its newest version line
    highest: dict[str, tuple[int, int]] = {}  # session -> (version, index) of its highest
    for i in range(len(lines) - 1, -1, -1):
        stone = _version_stone(lines[i])
        if stone is False:
            if left > 0:
                left -= 1
                kept[i] = True
            continue
        if stone is True:  # (restores nothing)
            continue
        session, version = stone
        if session not in newest:
            if len(newest) >= keep_versions:
                continue
            newest[session] = i
        if session not in highest or version > highest[session][0]:
            highest[session] = (version, i)
    for session, i in newest.items():
        kept[i] = kept[highest[session][1]] = True
    return [line for line, k in zip(lines, kept, strict=True) if k]


def _soft_files() -> int | None:
    """This process's soft descriptor limit (None: unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY or soft < 0 else soft


def default_open_logs(soft: int | None = None) -> int:
    """The session logs kept open at once by default, for the soft descriptor limit ``soft``
    (this process's when None): a eighth of it, at least :data:`OPEN_LOGS_MIN` (1024 -> 128,
    65536 -> 8192)."""
    if soft is None:
        soft = _soft_files() or _UNLIMITED_FILES
    return max(OPEN_LOGS_MIN, min(soft, _UNLIMITED_FILES) // OPEN_LOGS_SHARE)


def open_logs_warning(max_open: int, soft: int | None = None) -> str | None:
    """What to warn of when ``OPTSERVE_MAX_OPEN_LOGS`` (``max_open``) may take more than half of
    the soft descriptor limit ``soft`` (this process's when None): the logs held open would
    leave too few descriptors for connections and snapshots. None when it fits."""
    if soft is None:
        soft = _soft_files()
        if soft is None:
            return None
    if max_open <= soft // 2:
        return None
    return (f"OPTSERVE_MAX_OPEN_LOGS={max_open} is more than half of this process's "
            f"descriptor limit ({soft}): the session logs held open can take the descriptors "
            "connections and snapshots need (503 out_of_file_descriptors). Raise the limit "
            "(ulimit -n, LimitNOFILE=, docker --ulimit nofile=) or lower OPTSERVE_MAX_OPEN_LOGS "
            f"(0: {default_open_logs(soft)} here)")


class StoreCorrupt(Exception):
    """A snapshot or log that cannot be trusted; the session is refused, not guessed at."""


#: a refused operation's words (:func:`storage_failure`'s ``outcome``)
NOT_APPLIED = "nothing was applied"
#: the words when its log record could be neither cut off nor spoiled (three storage failures
#: in a row): the session is as it was, but a restart before the log's repair replays it
IN_DOUBT = ("nothing was applied, but its log record could not be removed (the disk refused "
            "that too): if the server stops before it repairs the log, its restart applies "
            "the operation; retry under the same Idempotency-Key (answered once, never "
            "applied twice), or read the session before sending it again")


def storage_failure(exc: OSError, what: str, *, outcome: str = NOT_APPLIED
                    ) -> OptserveError:
    """The client's answer for a store error: 507 ``storage_full`` when the disk is full, 503
    ``out_of_file_descriptors`` when the process or the system has no file descriptor left
    (EMFILE, ENFILE), else 503 ``storage_error``. ``outcome`` opens the detail."""
    reason = f"{what}: {os.strerror(exc.errno) if exc.errno else exc}"
    if exc.errno in _FULL:
        return StorageFull(f"{outcome}: {reason}; free space in the data directory and retry",
                           code="storage_full")
    if exc.errno in _NO_DESCRIPTORS:
        return Unavailable(f"{outcome}: {reason}: the server is out of file descriptors "
                           "(too many connections or open files); retry later",
                           code="out_of_file_descriptors", retry_after=DESCRIPTORS_RETRY_S)
    return Unavailable(f"{outcome}: {reason}; retry later", code="storage_error",
                       retry_after=5.0)


@contextlib.contextmanager
def files_failing(what: str) -> Iterator[None]:
    """Raise an OSError of the block as :func:`storage_failure` says (``what``: what the
    block does, in its detail), from the OSError."""
    try:
        yield
    except OSError as exc:
        raise storage_failure(exc, what) from exc


class Files:
    """The file system calls the store makes (tests inject faults by overriding these)."""

    def open_append(self, path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> int:
        return os.pwritev(fd, parts, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def truncate(self, path: Path, length: int) -> None:
        """Cut the file at ``path`` (no descriptor needed)."""
        os.truncate(path, length)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)

    def free_bytes(self, path: Path) -> int:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def total_bytes(self, path: Path) -> int:
        """The size of the file system ``path`` is on."""
        st = os.statvfs(path)
        return st.f_blocks * st.f_frsize


def _write_all(files: Files, fd: int, parts: Sequence[Buffer], offset: int) -> int:
    """Write every part at ``offset`` (no joined copy); the bytes written."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = 0
    first = 0  # views[:first] are written (an index: popping the list's head each time
    #            moved every part after it, quadratic in a 20,000-tensor record's parts)
    while first < len(views):
        batch = views[first:first + _IOV_MAX]
        n = files.pwritev(fd, batch, offset + total)
        if n <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        total += n
        while n and first < len(views):  # skip what was written, keep a partly written rest
            if n >= len(views[first]):
                n -= len(views[first])
                first += 1
            else:
                views[first] = views[first][n:]
                n = 0
    return total


def write_atomic(path: Path, parts: Sequence[Buffer], files: Files | None = None) -> None:
    """Replace ``path`` with these bytes, or leave it as it was (temp file, fsync, rename)."""
    files = files or Files()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            _write_all(files, fd, parts, 0)
            files.fsync(fd)
        finally:
            os.close(fd)
        files.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    files.fsync_dir(path.parent)


def _crc(parts: Sequence[Buffer]) -> int:
    value = 0
    for part in parts:
        value = crc32c.crc32c(part, value)
    return value


def frame_snapshot(payload: Buffer | Sequence[Buffer]) -> list[Buffer]:
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else list(payload)
    head = _SNAP_HEAD.pack(SNAP_MAGIC, sum(len(p) for p in parts), _crc(parts))
    return [head, *parts]


def read_snapshot(path: Path) -> bytes:
    data = path.read_bytes()
    if len(data) < _SNAP_HEAD.size:
        raise StoreCorrupt(f"{path}: truncated snapshot header")
    magic, length, crc = _SNAP_HEAD.unpack_from(data)
    payload = data[_SNAP_HEAD.size:]
    if magic not in (SNAP_MAGIC, SNAP_MAGIC_V1):
        raise StoreCorrupt(f"{path}: not an optserve snapshot")
    if len(payload) != length:
        raise StoreCorrupt(f"{path}: snapshot holds {len(payload)} bytes, header says {length}")
    actual = crc32c.crc32c(payload) if magic == SNAP_MAGIC else zlib.crc32(payload)
    if actual != crc:
        raise StoreCorrupt(f"{path}: snapshot checksum mismatch")
    return payload


def record_head(payload: Buffer | Sequence[Buffer]) -> bytes:
    """The framing header of a record whose payload is ``payload`` (or these pieces of it)."""
    parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    head = _REC_HEAD_BODY.pack(REC_MAGIC, sum(len(p) for p in parts), _crc(parts))
    return head + struct.pack("<I", crc32c.crc32c(head))


def frame_record(payload: bytes) -> bytes:
    return record_head(payload) + payload


def _record_at(data: memoryview, pos: int) -> tuple[int, int] | None:
    """(payload start, end) of the valid record that starts at ``pos``, or None."""
    magic = bytes(data[pos:pos + 4])
    if magic == REC_MAGIC:
        if len(data) - pos < _REC_HEAD.size:
            return None
        _, length, crc, head_crc = _REC_HEAD.unpack_from(data, pos)
        if crc32c.crc32c(data[pos:pos + _REC_HEAD_BODY.size]) != head_crc:
            return None
        start = pos + _REC_HEAD.size
        end = start + int(length)
        if end > len(data) or crc32c.crc32c(data[start:end]) != crc:
            return None
        return start, end
    if magic == REC_MAGIC_V1:
        if len(data) - pos < _REC_HEAD_V1.size:
            return None
        _, length, crc, head_crc = _REC_HEAD_V1.unpack_from(data, pos)
        if zlib.crc32(data[pos:pos + _REC_HEAD_BODY_V1.size]) != head_crc:
            return None
        start = pos + _REC_HEAD_V1.size
        end = start + int(length)
        if end > len(data) or zlib.crc32(data[start:end]) != crc:
            return None
        return start, end
    return None


def _next_valid_record(data: bytes, view: memoryview, pos: int) -> int | None:
    """The offset of the first valid record at or after ``pos``, or None."""
    found: list[int] = []
    for magic in (REC_MAGIC, REC_MAGIC_V1):
        p = pos
        while (p := data.find(magic, p)) != -1:
            if _record_at(view, p) is not None:
                found.append(p)
                break
            p += 1
    return min(found) if found else None


def read_log(path: Path, limit: int | None = None) -> tuple[list[bytes], int, bool]:
    """(records, length of the valid prefix, whether a torn tail was dropped), of the file's
    first ``limit`` bytes when given."""
    if not path.exists():
        return [], 0, False
    with open(path, "rb") as f:
        data = f.read() if limit is None else f.read(limit)
    view = memoryview(data)
    records: list[bytes] = []
    pos = 0
    while pos < len(data):
        span = _record_at(view, pos)
        if span is None:
            later = _next_valid_record(data, view, pos + 1)
            if later is not None:
                raise StoreCorrupt(f"{path}: record {len(records) + 1} (byte {pos}) is damaged "
                                   f"and a valid record follows it (byte {later})")
            return records, pos, True
        records.append(data[span[0]:span[1]])
        pos = span[1]
    return records, pos, False


@dataclass(eq=False)
class _Log:
    path: Path
    fd: int = -1  # -1: not open (closed to keep within the bound, or not yet opened)
    good: int = -1  # bytes of whole records: everything past this is not part of the log
    #               (-1: not known before the log is first opened)
    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: bool = False  # written since the last fsync (durability interval)
    repair: bool = False  # a failed append left bytes past ``good`` that a truncate must drop
    suspect: str | None = None  # a background fsync failed: heal with a fresh snapshot
    closed: bool = False  # forgotten (its session deleted, or the store closed): never reopened
    unsynced: bool = False  # a ``step`` record written without its fsync, which is to come


class _NoRoom(Exception):
    """A delete's tombstone found the disk full (tried again in turn with the reserve)."""


class Store:
    """Snapshots and logs for every session, with a background fsync thread (``interval``)."""

    def __init__(self, root: Path, interval_s: float = 0.05, files: Files | None = None,
                 max_open: int = 0, lock_wait_s: float = 0.0, min_free_bytes: int = 0) -> None:
        self.root = root
        #: held from :meth:`open` to :meth:`close`: one process at a time writes here
        self.lock = DataDirLock(root)
        #: how long :meth:`open` waits for another process to release the directory
        self.lock_wait_s = lock_wait_s
        self.sessions_dir = root / "sessions"
        self.interval_s = interval_s
        self.files = files or Files()
        #: :meth:`health` reports a data directory with less free space than its bound
        self._free_space = FreeSpace(root, min_free_bytes, self.files.free_bytes)
        #: released for a delete's tombstone on a full disk (:mod:`app.engine.delete_reserve`)
        self.reserve = DeleteReserve(root)
        #: logs kept open at once (0: :func:`default_open_logs`)
        self.max_open = max_open or default_open_logs()
        if max_open:
            warning = open_logs_warning(max_open)
            if warning is not None:
                log.warning("%s", warning)
        #: every session's log written since the start (open or not), until it is forgotten
        self._logs: dict[str, _Log] = {}
        #: the open logs, least recently used first
        self._open: OrderedDict[_Log, None] = OrderedDict()
        self._lock = threading.Condition()
        #: taken by each append to the tombstone log (a delete's, :meth:`tombstones_again`)
        self._stones = threading.Lock()
        #: the tombstone lines kept (set by :meth:`tombstones` at the start; None: no cut)
        #: and about how many lines the log holds: past twice the lines kept an append cuts it
        self._stones_keep: tuple[int, int] | None = None
        self._stones_lines = 0
        #: held by a delete that found the disk full, from its tombstone to the reserve's
        #: top-up (:meth:`delete`)
        self._full_deletes = threading.Lock()
        #: ``.deleted-*`` folders whose tombstone could not be logged yet (:meth:`_bury`)
        self._unburied: set[Path] = set()
        self._burying = threading.Lock()
        self._stop = False
        self._flusher = threading.Thread(target=self._flush_loop, name="optserve-fsync",
                                         daemon=True)
        self._error: str | None = None  # the last storage failure, until a write succeeds
        self._need = 0  # bytes the last write that found no space needed (0: not ENOSPC)
        #: when the flusher next looks whether a short delete reserve can be topped up
        self._reserve_look = 0.0

    # ------------------------------------------------------------- lifecycle and health
    def open(self) -> None:
        """Take the data directory (:class:`~app.engine.data_dir_lock.DataDirLock`: raises
        :class:`~app.engine.data_dir_lock.DataDirInUse` when another process keeps it), clean
        what a crash left, and start the interval flusher."""
        self.lock.acquire(self.lock_wait_s)
        try:
            self._clean_and_start()
        except BaseException:
            self.lock.release()
            raise

    def _clean_and_start(self) -> None:
        self.sessions_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        never = self._free_space.unreachable(self.files.total_bytes)
        if never is not None:
            log.warning("%s", never)
        for leftover in self.sessions_dir.glob(".deleted-*"):  # a crash in the middle of delete
            self._bury(leftover)
        for stray in self.sessions_dir.glob(f"*/{TOMBSTONE}"):  # a delete that never happened
            if not stray.parent.name.startswith("."):
                stray.unlink(missing_ok=True)
        for tmp in self.sessions_dir.glob("*/*.tmp"):  # a snapshot a crash cut short
            tmp.unlink(missing_ok=True)
        for name in STALE_TEMPS:  # (this store writes none of them yet: its flusher waits)
            self._remove_stale(self.root / name)
        self.reserve.make()  # (best effort: a full disk makes it later)
        try:
            self.probe()
        except OSError as exc:  # a full disk (a crash while it filled): serve what is stored
            if exc.errno not in _FULL:
                raise
            self._failed("probing the data directory at start", exc)
        self._flusher.start()

    @staticmethod
    def _remove_stale(path: Path) -> None:
        """Remove a temporary file a crash or an older server left (a plain file only)."""
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                path.unlink()
                log.info("removed %s, left by a crash or an older server", path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # (harmless where it stays: the start goes on)
            log.warning("could not remove %s, left by a crash or an older server: %s", path,
                        os.strerror(exc.errno) if exc.errno else exc)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._flusher.is_alive():
            self._flusher.join(timeout=30)
        with self._lock:
            logs = list(self._logs.values())
            self._logs.clear()
        for lg in logs:
            with lg.lock:
                if lg.dirty and lg.fd >= 0:
                    try:
                        self.files.fsync(lg.fd)
                    except OSError as exc:
                        log.error("fsync of %s at close failed: %s", lg.path, exc)
                self._close(lg)
        self.lock.release()

    def probe(self) -> None:
        """Write, fsync and remove a small file; raise OSError when the directory cannot."""
        probe = self.root / ".write-probe"
        write_atomic(probe, [b"ok"], self.files)
        probe.unlink()

    def health(self) -> str | None:
        """Why the store cannot write now (readiness answers 503 with it), or None."""
        if self.lock.lost is not None:
            return self.lock.lost
        gone = self._root_gone()
        if gone is not None:
            return gone
        with self._lock:
            broken = [lg.path for lg in self._logs.values() if lg.repair]
            suspect = [lg.suspect for lg in self._logs.values() if lg.suspect is not None]
            error, need = self._error, self._need
        self._bury_again()
        self._remake_reserve()
        if error is None and not broken and not suspect:
            return self._free_space.short()
        try:
            self.probe()
        except OSError as exc:
            return f"the data directory cannot be written: {os.strerror(exc.errno or 0)}"
        if need:  # a small probe fits where the record that failed does not
            try:
                free = self.files.free_bytes(self.root)
            except OSError:
                free = need
            if free < need:
                return (f"the data directory is full: {error} (that write needs {need} bytes, "
                        f"{free} are free)")
        if broken:
            return f"{len(broken)} session log(s) await repair after a failed write: {error}"
        if suspect:
            return (f"{len(suspect)} session log(s) could not be synced to disk ({suspect[0]}); "
                    "a fresh snapshot will replace them")
        with self._lock:
            self._error, self._need = None, 0  # the disk takes writes again
        return self._free_space.short()

    def _root_gone(self) -> str | None:
        """Why the data directory is missing (removed while the server runs: no log can be
        written there, and its free space cannot be measured), or None. The maintenance makes
        it again (:meth:`repair`, then each session written again from memory)."""
        try:
            there = stat.S_ISDIR(os.stat(self.root).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            there = False
        except OSError:
            return None  # (left to the probe and the other checks)
        if there:
            return None
        return (f"the data directory {self.root} is gone (removed while the server ran?): "
                "the server cannot write its sessions' logs there until its maintenance "
                "makes it again")

    def _remake_reserve(self) -> None:
        """Top the delete reserve up to its whole size where it is short and the disk has room
        for what it lacks with a whole reserve's size to spare (no write is tried on a disk
        still full), unless an acknowledged operation waits for room: a delete's tombstone
        not yet logged, a log awaiting its healing snapshot (:meth:`suspects`). A whole
        reserve is only marked so (:attr:`DeleteReserve.whole`: no write)."""
        missing = self.reserve.size - self.reserve.bytes_held()
        if missing <= 0:
            self.reserve.make()
            return
        with self._lock:
            waiting = bool(self._unburied) or any(
                lg.suspect is not None for lg in self._logs.values())
        if waiting:
            return
        try:
            free = self.files.free_bytes(self.root)
        except OSError:
            return
        if free >= missing + self.reserve.size:
            self.reserve.make()

    def top_up_reserve(self) -> None:
        """The background look (the flusher's, each :data:`RESERVE_LOOK_S` while the reserve
        is short): log the tombstones that wait for room first, then top the reserve up where
        there is room (:meth:`_remake_reserve`). A reserve left short by a full disk is so
        whole again within about a second of the room's return, with no readiness check or
        delete to ask for it, and no work added to a step."""
        self._bury_again()
        self._remake_reserve()

    @property
    def min_free_bytes(self) -> int:
        """:meth:`health` reports a data directory with less free space than this (0: never)."""
        return self._free_space.min_free_bytes

    @property
    def failing(self) -> bool:
        """Whether the last write or fsync failed and none has succeeded since."""
        return self._error is not None

    def _failed(self, what: str, exc: OSError, size: int = 0) -> None:
        """Remember a failed write (``size``: the bytes it tried to write) for :meth:`health`."""
        reason = f"{what}: {os.strerror(exc.errno) if exc.errno else exc}"
        log.error("storage failure: %s", reason)
        with self._lock:
            self._error = reason
            self._need = size if exc.errno in _FULL else 0

    def _succeeded(self) -> None:
        if self._error is not None:
            with self._lock:
                self._error, self._need = None, 0

    def suspects(self) -> list[str]:
        """Sessions whose log a failed background fsync left in doubt (heal by snapshot)."""
        with self._lock:
            return [k for k, lg in self._logs.items() if lg.suspect is not None]

    # ------------------------------------------------------------- sessions
    def session_ids(self) -> Iterator[str]:
        if not self.sessions_dir.exists():
            return iter(())
        return iter(sorted(p.name for p in self.sessions_dir.iterdir() if p.is_dir()
                           and not p.name.startswith(".")))

    def _dir(self, session_id: str) -> Path:
        return self.sessions_dir / session_id

    def exists(self, session_id: str) -> bool:
        return self._dir(session_id).exists()

    def incomplete(self, session_id: str) -> bool:
        """A directory a crash left in the middle of a create: no snapshot, no log record
        (that create was never acknowledged)."""
        d = self._dir(session_id)
        wal = d / "wal.bin"
        return not (d / "snapshot.bin").exists() and (not wal.exists() or wal.stat().st_size == 0)

    def discard(self, session_id: str) -> None:
        shutil.rmtree(self._dir(session_id), ignore_errors=True)

    def create(self, session_id: str, parts: Sequence[Buffer], durability: Durability) -> None:
        """A new session's directory with its first record (the create), or nothing at all."""
        d = self._dir(session_id)
        try:
            try:
                self.files.mkdir(d)
                self.files.fsync_dir(self.sessions_dir)
            except OSError as exc:
                self._failed(f"creating {session_id}", exc)
                raise storage_failure(exc, "creating the session's directory") from None
            self.append(session_id, parts, durability)
        except BaseException:
            self.forget(session_id)
            shutil.rmtree(d, ignore_errors=True)
            raise

    def read(self, session_id: str, *, cut_torn: bool = True
             ) -> tuple[bytes | None, list[bytes], bool]:
        """(snapshot payload or None, log records, torn tail dropped). The torn tail is also cut
        from the file unless ``cut_torn`` is False (a live session's log: its repair is the
        next append's, under the log's lock). Of an open log only its good length is read."""
        d = self._dir(session_id)
        snap = d / "snapshot.bin"
        payload = read_snapshot(snap) if snap.exists() else None
        with self._lock:
            lg = self._logs.get(session_id)
        limit = None
        if lg is not None:  # (written: a live session's) past ``good`` is no part of the log: a
            with lg.lock:  # record whose cut failed (and its header's zeroing too) may be whole
                limit = lg.good if lg.good >= 0 else None
        records, valid, torn = read_log(d / "wal.bin", limit)
        if torn and cut_torn:
            with open(d / "wal.bin", "r+b") as f:
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        return payload, records, torn

    def salvage(self, session_id: str) -> tuple[bytes | None, bytes | None]:
        """What a refused session's files may still tell, read without trusting them: its
        snapshot's payload as the file holds it (its checksum not checked: a caller reads its
        header only) and its log's first record when that record is whole (its own
        checksums)."""
        d = self._dir(session_id)
        snapshot = None
        try:
            data = (d / "snapshot.bin").read_bytes()
            if data[:len(SNAP_MAGIC)] in (SNAP_MAGIC, SNAP_MAGIC_V1):
                snapshot = data[_SNAP_HEAD.size:]
        except OSError:
            pass
        first = None
        try:
            with open(d / "wal.bin", "rb") as f:
                head = f.read(_REC_HEAD.size)
                framing = _REC_HEAD if head[:4] == REC_MAGIC else _REC_HEAD_V1
                if len(head) >= framing.size:
                    length = framing.size + int(framing.unpack_from(head)[1])
                    if length <= os.fstat(f.fileno()).st_size:  # (a damaged length: no read)
                        data = head + f.read(length - len(head))
                        span = _record_at(memoryview(data), 0)
                        first = data[span[0]:span[1]] if span is not None else None
        except OSError:
            pass
        return snapshot, first

    def delete(self, session_id: str,
               tombstone: dict[str, str] | Sequence[dict[str, str]] | None = None) -> None:
        """Remove the session's files (the rename into ``.deleted-*`` is the commit point).
        A ``tombstone`` (the delete's idempotency key; or several: also the key of the create
        that made the session) is written into the directory before that rename, so it is
        durable exactly when the delete is; it then moves to the tombstone log
        (:meth:`tombstones`, one line each), where a retry after a restart finds it.

        On a full disk the tombstone is written into the delete reserve's blocks
        (:mod:`app.engine.delete_reserve`), and the reserve is topped up again from the space
        the delete freed before this returns; such deletes take turns (one at a time from the
        tombstone to the top-up), so each finds the reserve its predecessor left."""
        stones = [tombstone] if isinstance(tombstone, dict) else list(tombstone or [])
        self.forget(session_id)
        d = self._dir(session_id)
        if not d.exists():
            return
        data = b"\n".join(json.dumps(t).encode() for t in stones) if stones else None
        try:
            self._delete_dir(session_id, d, data, full=False)
        except _NoRoom:
            with self._full_deletes:
                self._delete_dir(session_id, d, data, full=True)

    def _delete_dir(self, session_id: str, d: Path, data: bytes | None, *, full: bool) -> None:
        """:meth:`delete`'s tombstone, commit and cleanup; ``full``: the tombstone found the
        disk full before (the caller holds ``_full_deletes``): written into the reserve's
        blocks if it finds it full again. Raises _NoRoom when the disk is full and not
        ``full``."""
        trash = self.sessions_dir / f".deleted-{session_id}-{os.getpid()}-{time.time_ns()}"
        try:
            if data is not None:
                self._write_tombstone(d, data, full=full)
            else:
                (d / TOMBSTONE).unlink(missing_ok=True)
            self.files.replace(d, trash)
            self.files.fsync_dir(self.sessions_dir)
        except OSError as exc:  # (not _NoRoom: the caller's to catch)
            self._failed(f"deleting {session_id}", exc)
            raise storage_failure(exc, "deleting the session's files") from None
        self._bury(trash)
        self._bury_again()
        if full:  # (from the space this delete freed: the next delete's tombstone needs it)
            self.reserve.make(take_what_fits=True)
        else:
            self._remake_reserve()

    def _write_tombstone(self, d: Path, data: bytes, *, full: bool) -> None:
        """Write a delete's tombstone into the session's directory ``d``. On a full disk:
        _NoRoom unless ``full``, else the tombstone goes into the delete reserve's blocks (a
        delete frees space, it must not need any: :mod:`app.engine.delete_reserve`)."""
        try:
            write_atomic(d / TOMBSTONE, [data], self.files)
        except OSError as exc:
            if exc.errno not in _FULL:
                raise
            if not full:
                raise _NoRoom from None
            if not self.reserve.become(d / TOMBSTONE, data, self.files):
                raise

    def _bury(self, trash: Path) -> bool:
        """Append a deleted session's tombstone (if any) to the tombstone log, then remove
        its files; whether it was done. When the append fails, the session's files are
        removed all the same (the delete is done: their space is free at once) but the
        tombstone stays in ``trash``, tried again by the next delete, readiness check or
        start."""
        stone = trash / TOMBSTONE
        if stone.exists():
            try:
                with self._stones:
                    self._append_stones(stone.read_bytes().strip() + b"\n")
            except OSError as exc:
                log.error("could not log the tombstone of %s (its files are removed, the "
                          "tombstone kept there and logged later): %s", trash.name, exc)
                with contextlib.suppress(OSError):
                    for f in trash.iterdir():
                        if f.is_dir():
                            shutil.rmtree(f)
                        elif f.name != TOMBSTONE:
                            f.unlink()
                with self._lock:
                    self._unburied.add(trash)
                return False
        shutil.rmtree(trash, ignore_errors=True)
        with self._lock:
            self._unburied.discard(trash)
        return True

    def _bury_again(self) -> None:
        """Log the tombstones a failed append left in ``.deleted-*`` (:meth:`_bury`); one
        caller at a time (another finds it under way and goes on)."""
        if not self._unburied or not self._burying.acquire(blocking=False):
            return
        try:
            with self._lock:
                left = sorted(self._unburied, key=_deleted_at)  # (logged in their order)
            for trash in left:
                if not trash.exists():
                    with self._lock:
                        self._unburied.discard(trash)
                elif not self._bury(trash):
                    return
        finally:
            self._burying.release()

    def tombstones(self, keep: int, keep_versions: int = 0) -> list[dict[str, str]]:
        """The last ``keep`` tombstones of deletes and the last ``keep_versions`` lines of
        deleted sessions' versions (:mod:`app.engine.last_versions`; counted apart, so that
        deletes without a key do not push keyed ones out), oldest first; the log is cut to
        them when it holds more than twice as many. A line a crash tore is skipped."""
        path = self.root / TOMBSTONES
        with self._stones:
            self._stones_keep = (keep, keep_versions)
            try:
                lines = path.read_bytes().splitlines()
            except FileNotFoundError:
                lines = []
            self._stones_lines = len(lines)
            if len(lines) > 2 * (keep + keep_versions):
                lines = self._cut_stones(lines, (keep, keep_versions))
            # (read under the lock a bury's append takes: a line is in the log or in its folder)
            lines = lines + self._unlogged_stones()
        out = []
        for line in _last_stones(lines, keep, keep_versions):
            try:
                stone = json.loads(line)
            except ValueError:
                continue
            if isinstance(stone, dict):
                out.append({str(k): str(v) for k, v in stone.items()})
        return out

    def _unlogged_stones(self) -> list[bytes]:
        """The tombstone lines of committed deletes that are not in the tombstone log yet: an
        append :meth:`_bury` could not make (a full disk, at a delete or at the start that found
        a crash's ``.deleted-*`` folder) left them in their folder, logged later; oldest first.
        Without them a restart on a full disk forgot those deletes (a retry of a keyed delete
        then deleted the session made again under the id, which also started at version 0
        again). The caller holds ``_stones``."""
        with self._lock:
            left = sorted(self._unburied, key=_deleted_at)
        lines: list[bytes] = []
        for trash in left:
            try:
                data = (trash / TOMBSTONE).read_bytes()
            except OSError:  # (buried meanwhile: its lines were read from the log)
                continue
            lines += [line for line in data.splitlines() if line.strip()]
        return lines

    def forget(self, session_id: str) -> None:
        """Close the session's log (its records stay on disk)."""
        with self._lock:
            lg = self._logs.pop(session_id, None)
        if lg is not None:
            with lg.lock:
                self._close(lg)

    def _close(self, lg: _Log) -> None:
        """Forget the log for good (under ``lg.lock``): closed, never reopened."""
        if not lg.closed:
            lg.closed = True
            self._shut(lg)

    def _shut(self, lg: _Log) -> None:
        """Close the log's descriptor (under ``lg.lock``); a later use reopens it unless it is
        :attr:`_Log.closed`."""
        with self._lock:
            self._open.pop(lg, None)
        if lg.fd >= 0:
            fd, lg.fd = lg.fd, -1
            try:
                self.files.close(fd)
            except OSError as exc:
                log.warning("closing %s: %s", lg.path, exc)

    def open_logs(self) -> int:
        """How many session logs are open now."""
        with self._lock:
            return len(self._open)

    def is_open(self, session_id: str) -> bool:
        """Whether the session's log is open now (its next write needs no descriptor)."""
        with self._lock:
            lg = self._logs.get(session_id)
            return lg is not None and lg.fd >= 0

    def open_log(self, session_id: str) -> None:
        """Open the session's log unless it is (an operation that must not fail half-way for
        want of a descriptor opens it first); :class:`OptserveError` (503, 507) when it cannot
        be opened."""
        lg = self._entry(session_id)
        with lg.lock:
            self._opened_or_refused(session_id, lg)

    def _opened(self, lg: _Log) -> int:
        """The log's descriptor (under ``lg.lock``), reopened when the bound closed it, after
        closing the least recently used logs past the bound (:meth:`_make_room`). OSError when
        it cannot be opened (nothing changed); 503 when the log was forgotten."""
        if lg.closed:
            raise Unavailable("the session's log was closed (deleted or shutting down)",
                              code="storage_error")
        if lg.fd >= 0:
            with self._lock:
                if lg in self._open:
                    self._open.move_to_end(lg)
            return lg.fd
        self._make_room(lg)
        fd = self.files.open_append(lg.path)
        if lg.good < 0:
            try:
                lg.good = os.fstat(fd).st_size
            except OSError:
                self.files.close(fd)
                raise
        lg.fd = fd
        with self._lock:
            self._open[lg] = None
        return fd

    def _opened_or_refused(self, session_id: str, lg: _Log) -> int:
        """:meth:`_opened`, its OSError as the client's answer (507, 503)."""
        try:
            return self._opened(lg)
        except OSError as exc:
            self._failed(f"opening the log of {session_id}", exc)
            raise storage_failure(exc, "opening the session's log") from None

    def _make_room(self, keep: _Log) -> None:
        """Close the least recently used open logs until one more fits the bound: each one not
        in use now (its lock free), with no ``step`` record awaiting its fsync, and fsynced
        first when it holds ``interval`` writes not yet on disk (when that fsync fails, it is
        marked suspect, as the flusher marks it, and stays open). Logs in use are skipped:
        while they are, the bound is passed. Only the least recently used few are looked at
        (not every open log, each reopen)."""
        with self._lock:
            over = len(self._open) - self.max_open + 1
            if over <= 0:
                return
            candidates = list(itertools.islice((lg for lg in self._open if lg is not keep),
                                               over + _SKIPPABLE))
        for lg in candidates:
            with self._lock:
                if len(self._open) < self.max_open:
                    return
            if not lg.lock.acquire(blocking=False):
                continue  # in use: the next one
            try:
                if lg.fd < 0 or lg.unsynced:
                    continue
                if lg.dirty:
                    try:
                        self.files.fsync(lg.fd)
                    except OSError as exc:
                        lg.suspect = os.strerror(exc.errno) if exc.errno else str(exc)
                        self._failed(f"fsync of {lg.path.parent.name} before closing it", exc)
                        continue
                    lg.dirty = False
                self._shut(lg)
            finally:
                lg.lock.release()

    # ------------------------------------------------------------- snapshots
    def write_snapshot(self, session_id: str, payload: Buffer | Sequence[Buffer]) -> bool:
        """Atomically replace the session's snapshot, then empty its log (the snapshot holds
        every record in it). Raises :class:`OptserveError` (507/503) when the disk refuses.
        True when the session's files had been removed from the data directory while the
        server ran (its folder gone, or its open log a file no folder holds) and this snapshot
        made them again: what else the data directory held for it (a sharded session's
        directory entry) must be written again too (the host's ``written_again``)."""
        d = self._dir(session_id)
        framed = frame_snapshot(payload)
        made_again = False
        try:
            if not d.exists():  # (a create makes it: only a removal takes it away)
                made_again = True
                self.files.mkdir(d)
                self.files.fsync_dir(self.sessions_dir)
                self.files.fsync_dir(self.root)
            write_atomic(d / "snapshot.bin", framed, self.files)
        except OSError as exc:
            self._failed(f"snapshot of {session_id}", exc, sum(len(p) for p in framed))
            raise storage_failure(exc, "writing a snapshot",
                                  outcome="no snapshot was written") from None
        self._succeeded()
        lg = self._entry(session_id)
        with lg.lock:
            # A crash between the rename above and this truncate is harmless: replay skips the
            # records the snapshot already holds. A truncate that fails leaves them for the
            # same reason, and a suspect log is healed: the snapshot holds everything.
            if lg.closed:  # (deleted or the store closed meanwhile: nothing to empty)
                return made_again
            if self._unlinked(lg):  # its file was removed: the next records go to a new one
                made_again = True
                self._shut(lg)
                lg.good, lg.repair, lg.dirty, lg.unsynced = -1, False, False, False
            try:
                fd = self._opened(lg)
            except OSError as exc:  # its records stay: replay skips what the snapshot holds
                log.warning("opening the log of %s after its snapshot: %s (its records stay "
                            "and are skipped at replay)", session_id, exc)
                lg.suspect = None
                return made_again and (d / "snapshot.bin").exists()
            try:
                self.files.ftruncate(fd, 0)
                self.files.fsync(fd)
                lg.good, lg.repair, lg.dirty, lg.unsynced = 0, False, False, False
            except OSError as exc:
                log.warning("emptying %s after a snapshot failed: %s (its records are skipped "
                            "at replay)", lg.path, exc)
                lg.repair = True
            lg.suspect = None
        return made_again

    def removed(self, session_ids: Sequence[str]) -> list[str]:
        """Those of ``session_ids`` whose files were removed from the data directory while the
        server ran (an ``rm -rf``, a temp-file cleaner): their folder is gone, or their open
        log is a file no folder holds. Their records since went nowhere a restart reads; a
        snapshot (:meth:`write_snapshot`) writes them again from memory and starts a new log.
        Changes nothing."""
        gone = []
        for session_id in session_ids:
            with self._lock:
                lg = self._logs.get(session_id)
            if lg is not None:
                with lg.lock:
                    if lg.closed:
                        continue
                    if self._unlinked(lg):
                        gone.append(session_id)
                        continue
            if not self._dir(session_id).is_dir():
                gone.append(session_id)
        return gone

    def log_removed(self, session_id: str) -> bool:
        """Whether the session's files were removed from the data directory while the server
        runs: its open log is a file no folder holds any more, or, where its log is not open
        (closed by the open logs' bound, or by a snapshot that could not open its new log), its
        folder is gone, so that reopening the log by its path would fail. Cheap enough for
        every operation (one ``fstat``, or one ``stat`` for a log not open; no lock: a
        descriptor the bound closes meanwhile answers False, or, reused, whatever its new file
        says)."""
        lg = self._logs.get(session_id)
        if lg is None or lg.closed:
            return False
        if lg.fd < 0:
            return not lg.path.parent.is_dir()
        return self._unlinked(lg)

    def _unlinked(self, lg: _Log) -> bool:
        """Whether the log's open descriptor is a file no folder holds any more (under
        ``lg.lock``)."""
        if lg.fd < 0:
            return False
        try:
            return os.fstat(lg.fd).st_nlink == 0
        except OSError:
            return False

    # ------------------------------------------------------------- log
    def _entry(self, session_id: str) -> _Log:
        """The session's log, open or not (:meth:`_opened` opens it)."""
        with self._lock:
            lg = self._logs.get(session_id)
            if lg is None:
                lg = self._logs[session_id] = _Log(self._dir(session_id) / "wal.bin")
            return lg

    def append(self, session_id: str, payload: Buffer | Sequence[Buffer],
               durability: Durability, *, fsync: bool = True) -> int:
        """Write one record (given whole or in pieces, written without being joined), and for
        ``step`` fsync it (unless ``fsync`` is False: the caller then calls :meth:`sync`
        before it acknowledges anything), before returning its end offset. On failure the log
        is left as it was and :class:`OptserveError` (507 ``storage_full`` or 503
        ``storage_error``) says why."""
        parts = [payload] if isinstance(payload, (bytes, bytearray, memoryview)) else payload
        head = record_head(parts)
        lg = self._entry(session_id)
        with lg.lock:
            fd = self._opened_or_refused(session_id, lg)  # (nothing written when it fails)
            try:
                if lg.repair:
                    self._cut_to_good(lg)
                n = _write_all(self.files, fd, [head, *parts], lg.good)
                if durability == "step" and fsync:
                    self.files.fsync(fd)
            except OSError as exc:
                outcome = self._undo(lg)
                self._failed(f"log of {session_id}", exc,
                             len(head) + sum(len(p) for p in parts))
                raise storage_failure(exc, "writing the operation's log record",
                                      outcome=outcome) from None
            lg.good += n
            if durability == "interval":
                lg.dirty = True
            # (a step record whose fsync is to come: the log is not closed before it)
            lg.unsynced = durability == "step" and not fsync
            self._succeeded()
            return lg.good

    def sync(self, session_id: str, before: int) -> None:
        """fsync the record that ``append(..., fsync=False)`` wrote past ``before``. On failure
        the record is cut off (the log back at ``before``, as :meth:`append` leaves a failed
        write) and :class:`OptserveError` says why."""
        lg = self._entry(session_id)
        with lg.lock:
            if lg.good <= before:  # cut meanwhile (its operation was refused): nothing to sync
                lg.unsynced = False
                return
            try:
                # (open: a log is not closed before its step record's fsync, this one)
                self.files.fsync(self._opened(lg))
            except OSError as exc:
                lg.unsynced = False
                size = lg.good - before
                lg.good = before
                outcome = self._undo(lg)
                self._failed(f"log of {session_id}", exc, size)
                raise storage_failure(exc, "writing the operation's log record",
                                      outcome=outcome) from None
            lg.unsynced = False
            self._succeeded()

    def _undo(self, lg: _Log) -> str:
        """Cut a failed record off the log. When that fails, the log is marked for repair and
        the record's header is zeroed (best effort): the record may be whole (its fsync
        failed), and a crash before the repair must leave a torn tail that restart drops,
        never an operation that was refused. Returns the refusal's outcome words:
        :data:`NOT_APPLIED`, or :data:`IN_DOUBT` when neither the cut nor the zeroing took
        (a restart before the repair would apply the record)."""
        try:
            self._cut_to_good(lg)
        except OSError as exc:
            log.error("truncating %s back to %d bytes failed: %s (retried before its next "
                      "write)", lg.path, lg.good, exc)
            lg.repair = True
            return NOT_APPLIED if self._spoil(lg) else IN_DOUBT
        return NOT_APPLIED

    def _spoil(self, lg: _Log) -> bool:
        """Zero the header of the record at ``lg.good`` (one that could not be cut off): a
        crash before the repair then leaves a torn tail, which restart drops. A log the bound
        closed, which could not be reopened, is cut by its path instead (no descriptor needed;
        on disk once the repair's fsync runs). False when neither could be written (the
        zeroed header, once written, is what a restart after kill -9 reads, fsynced or not)."""
        try:
            if lg.fd < 0:
                self.files.truncate(lg.path, lg.good)
                return True
            self.files.pwritev(lg.fd, [bytes(_REC_HEAD.size)], lg.good)
        except OSError as exc:
            log.error("zeroing the header of the record at byte %d of %s: %s", lg.good,
                      lg.path, exc)
            return False
        try:
            self.files.fsync(lg.fd)
        except OSError as exc:
            log.error("fsync of the zeroed header at byte %d of %s: %s", lg.good, lg.path,
                      exc)
        return True

    def truncate(self, session_id: str, length: int) -> None:
        """Drop the records past ``length`` (an operation that was logged but could not be
        applied). Raises OSError when the file cannot be cut (the log is then marked for repair
        and cut before its next write, and the record's header is zeroed meanwhile)."""
        lg = self._entry(session_id)
        with lg.lock:
            if lg.good < 0:  # (never opened here: its length is the file's)
                self._opened(lg)
            lg.good = min(lg.good, length)
            try:
                self._cut_to_good(lg)
            except OSError:
                lg.repair = True
                self._spoil(lg)
                raise

    def last_record_start(self, session_id: str, limit: int | None = None) -> int:
        """Where the last whole record of the session's log (of its first ``limit`` bytes when
        given) starts (0 for an empty log)."""
        path = self._dir(session_id) / "wal.bin"
        try:
            with open(path, "rb") as f:
                data = f.read() if limit is None else f.read(limit)
        except FileNotFoundError:
            return 0
        view = memoryview(data)
        pos = start = 0
        while pos < len(data):
            span = _record_at(view, pos)
            if span is None:
                break
            start, pos = pos, span[1]
        return start

    def cut_last_record(self, session_id: str) -> None:
        """Cut the last whole record off the session's log (of its good length, where the log
        is open): one that replay refused, an operation refused after it was logged whose cut
        and header zeroing both failed before a crash. Left in the file, the session's next
        record would follow it under the same sequence number, and the next restart would
        refuse the session (a record refused at replay with records following is a corrupt
        log). Raises OSError when the file cannot be cut: the log is then marked for repair
        (cut before its next write), as :meth:`truncate` leaves it."""
        with self._lock:
            lg = self._logs.get(session_id)
        limit = None
        if lg is not None:
            with lg.lock:
                limit = lg.good if lg.good >= 0 else None
        self.truncate(session_id, self.last_record_start(session_id, limit))

    def cut_pending(self, session_id: str) -> None:
        """Cut the records a failed truncate left past the session's log's last good length
        now (before a replay reads the file: they must not count); OSError when it still
        cannot be cut (the log stays marked for repair)."""
        with self._lock:
            lg = self._logs.get(session_id)
        if lg is None:
            return
        with lg.lock:
            if lg.repair and not lg.closed:
                self._cut_to_good(lg)

    def repair(self) -> bool:
        """Retry cutting every log a failed write left long (readiness waits for it), and take
        the data directory's lock again if its file was removed
        (:meth:`~app.engine.data_dir_lock.DataDirLock.renew`): True when it was (the data
        directory was removed while the server ran, and is this process's again)."""
        renewed = self.lock.renew()
        with self._lock:
            logs = [lg for lg in self._logs.values() if lg.repair]
        for lg in logs:
            with lg.lock:
                if not lg.closed:
                    with contextlib.suppress(OSError):
                        self._cut_to_good(lg)
        return renewed

    def tombstones_again(self, stones: Sequence[dict[str, str]]) -> int:
        """After the data directory was removed while the server ran: append to the tombstone
        log each of these lines (the ones the host keeps in memory) that it lacks, under the
        lock a delete's append takes; how many were written. OSError when it cannot."""
        with self._stones:
            path = self.root / TOMBSTONES
            try:
                have = set(path.read_bytes().splitlines())
            except FileNotFoundError:
                have = set()
            lines = [json.dumps(t).encode() for t in stones]
            missing = [line for line in lines if line not in have]
            if missing:
                self._append_stones(b"\n".join(missing) + b"\n")
            return len(missing)

    def _append_stones(self, lines: bytes) -> None:
        """Append whole lines to the tombstone log, durably (a line a crash tore before them
        is ended first); the caller holds ``_stones``."""
        path = self.root / TOMBSTONES
        new = not path.exists()
        with open(path, "a+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size and os.pread(f.fileno(), 1, size - 1) != b"\n":
                lines = b"\n" + lines  # after a line a crash tore
            f.write(lines)
            f.flush()
            self.files.fsync(f.fileno())
        if new:
            self.files.fsync_dir(self.root)
        self._stones_lines += lines.count(b"\n")
        keep = self._stones_keep
        if keep is not None and self._stones_lines > 2 * sum(keep):  # while the server runs too
            self._cut_stones(path.read_bytes().splitlines(), keep)

    def _cut_stones(self, lines: list[bytes], keep: tuple[int, int]) -> list[bytes]:
        """Cut the tombstone log to its last ``keep`` lines (:func:`_last_stones`; the caller
        holds ``_stones``); those lines. When it cannot be written (a full disk) it stays
        whole, cut later."""
        lines = _last_stones(lines, *keep)
        try:
            write_atomic(self.root / TOMBSTONES, [b"".join(ln + b"\n" for ln in lines)],
                         self.files)
        except OSError as exc:
            log.warning("could not cut the tombstone log %s: %s", self.root / TOMBSTONES, exc)
        else:
            self._stones_lines = len(lines)
        return lines

    def _cut_to_good(self, lg: _Log) -> None:
        """Cut the log's file back to its last good length, durably (under ``lg.lock``); the
        log is then no longer marked for repair. OSError when it cannot be cut."""
        fd = self._opened(lg)
        self.files.ftruncate(fd, lg.good)
        self.files.fsync(fd)
        lg.repair = lg.unsynced = False

    def log_length(self, session_id: str) -> int:
        """The length of the session's log (its whole records). Opens nothing (it may run on
        the event loop's thread): a log not written since the start is as long as its file."""
        lg = self._entry(session_id)
        good = lg.good
        if good >= 0:
            return good
        with lg.lock:
            if lg.good < 0:
                try:
                    lg.good = os.stat(lg.path).st_size
                except FileNotFoundError:
                    lg.good = 0  # (made by its first write)
                except OSError as exc:
                    self._failed(f"reading the length of the log of {session_id}", exc)
                    raise storage_failure(exc, "reading the session's log") from None
            return lg.good

    def _flush_loop(self) -> None:
        """Every ``interval_s``: fsync the logs written since their last fsync; and while the
        delete reserve is short, each :data:`RESERVE_LOOK_S`, :meth:`top_up_reserve`. Never
        dies: a failure marks the log suspect (the engine heals it with a snapshot) and is
        reported by :meth:`health`."""
        while True:
            with self._lock:
                if not self._stop:
                    self._lock.wait(timeout=self.interval_s)
                if self._stop:
                    return
                pending = [lg for lg in self._logs.values() if lg.dirty]
            for lg in pending:
                try:
                    with lg.lock:
                        if lg.closed or lg.fd < 0 or not lg.dirty:
                            continue
                        lg.dirty = False
                        try:
                            self.files.fsync(lg.fd)
                        except OSError as exc:
                            lg.suspect = os.strerror(exc.errno) if exc.errno else str(exc)
                            raise
                except OSError as exc:
                    self._failed(f"background fsync of {lg.path.parent.name}", exc)
                except Exception:  # never let the flusher die
                    log.exception("fsync loop")
            if not self.reserve.whole and time.monotonic() >= self._reserve_look:
                self._reserve_look = time.monotonic() + RESERVE_LOOK_S
                try:
                    self.top_up_reserve()
                except Exception:  # never let the flusher die
                    log.exception("topping the delete reserve up")
