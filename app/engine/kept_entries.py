"""What a Ray host actor keeps of the directory, to write it again after the data directory
was removed while the server ran (an ``rm -rf`` of it, a volume mounted over it).

The embedded host writes a removed session's files again from memory (its snapshot and a new
log: :meth:`StoreUpkeep.write_again <app.engine.host_upkeep.StoreUpkeep.write_again>`), and the
embedded router its sharded sessions' entries. On the Ray engine the session's files are not
all: a restart finds a session through its directory entry (which host holds it), starts that
host from its ``host.json``, and answers a keyed create's retry through the create's index
(``.creates/``). A front knows only the entries it read, so each host keeps, for every session
it holds some of, the entry and the index as they were when it made the session (or found it
at its start): both are written once, when the session is created, and never changed after.
When its files are written again (the host's ``written_again`` hook, before the operation that
found them removed is acknowledged, or by the host's maintenance), this writes again, where they
are missing, the host's ``host.json``, the entry (a claim: a front's entry, or another shard's
host's, is never replaced) and the index (only while the directory holds neither it nor the
mark of that session's delete). The host also keeps, for the last
:data:`~app.engine.deleted_creates.KEEP` sessions it deleted, their keyed create's and keyed
delete's keys, and once its maintenance took the data directory's lock again (the sign that
the directory was removed) writes their marks again (``.deleted-creates/``, ``.deletes/``)
where the directory holds none under those keys: a retried create of such a session is still
refused, and a retried delete still answered.

Before, after such a removal the sessions were held again but a restart found none of them
(404), and a keyed create's retry made a second session.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from app.engine.deleted_creates import KEEP
from app.engine.directory import Directory, created_at, entry_at
from app.engine.interface import IdemKey, split_key
from app.engine.last_versions import LastVersions
from app.engine.router import parent_key
from app.engine.store import write_atomic

log = logging.getLogger("optserve.ray")

#: the name of a host's own file in its folder (its shape, read to start it again)
HOST_JSON = "host.json"


@dataclass(frozen=True)
class _Kept:
    entry: dict[str, Any]
    #: (tenant, idempotency key, fingerprint) of the keyed create that made the session
    index: tuple[str, str, str] | None


class KeptEntries:
    """The directory entries (and create indexes) of the sessions one host holds some of."""

    def __init__(self, directory: Path, host_root: Path,
                 host_json: dict[str, Any] | None) -> None:
        self.directory = directory
        self.host_root = host_root
        #: the host's ``host.json`` as the front wrote it (None: a host started by an older
        #: front, which did not pass it)
        self.host_json = host_json
        self._kept: dict[str, _Kept] = {}
        #: sessions deleted here, oldest first: (idempotency key, fingerprint) of their keyed
        #: create, and of their keyed delete
        self._deleted: OrderedDict[str, tuple[tuple[str, str] | None,
                                              tuple[str, str] | None]] = OrderedDict()
        self._writer: Directory | None = None  # (made at the first write: it makes folders)
        #: the last versions of the sessions deleted here since this actor started, written
        #: again by :meth:`directory_again`
        self._versions = LastVersions()

    def keep(self, key: str, entry: dict[str, Any] | None = None) -> None:
        """Keep the entry of the session ``key`` (not a shard's key) as the directory holds
        it (``entry``: as the caller just read it), with its create's index (nothing when it
        has no entry)."""
        if entry is None:
            entry = entry_at(self.directory, key)
        if entry is None:
            return
        index = None
        made_by = entry.get("created_by")
        if made_by:
            tenant = split_key(key)[0]
            found = created_at(self.directory, tenant, str(made_by))
            if found is not None and found.get("key") == key and not found.get("deleted"):
                index = (tenant, str(made_by), str(found["fingerprint"]))
        self._kept[key] = _Kept(entry, index)

    def deleted(self, key: str, idem: IdemKey | None) -> None:
        """The session ``key`` was deleted here (``idem``: its delete's key): its entry is no
        longer kept, and its keyed delete's key is, for :meth:`directory_again`, with its
        keyed create's where the directory marks that create's session deleted (a front marks
        it before its hosts delete; a create undone, whose shards a refusal deleted, is not
        marked: its retry makes it, its index still there when its hosts delete). Where the
        directory holds neither the create's index nor its mark (removed while the server ran,
        before this host wrote them again), this host marks it now: its front found no index
        to mark, and a retry of the create would make the session again."""
        kept = self._kept.pop(key, None)
        create = None
        if kept is not None and kept.index is not None:
            tenant, made_by, fingerprint = kept.index
            found = created_at(self.directory, tenant, made_by)
            if found is None:
                found = {"key": key, "deleted": True}
                try:
                    self._directory().marks_again(key, (made_by, fingerprint), None)
                    log.error("the index of the keyed create of session %s was removed from "
                              "the data directory while the server ran: its delete marked it",
                              key)
                except OSError as exc:  # (the session is deleted: kept for directory_again)
                    log.error("marking the keyed create of deleted session %s failed: %s",
                              key, exc)
            if found.get("deleted") and found.get("key") == key:
                create = (made_by, fingerprint)
        delete = (idem.key, idem.fingerprint) if idem is not None else None
        if create is None and delete is None:
            return
        self._deleted.pop(key, None)
        self._deleted[key] = (create, delete)
        while len(self._deleted) > KEEP:
            self._deleted.popitem(last=False)

    def deleting(self, host_key: str, version: int) -> None:
        """The host's ``deleting`` hook: the session (a shard) ``host_key`` is being deleted
        at ``version``, which the directory keeps from now on, before the delete's commit point
        (:meth:`Directory.note_version <app.engine.directory.Directory.note_version>`): a
        session made again under its id, through any front, on any host, starts after it. An
        OSError goes to the caller (the delete is refused, nothing done)."""
        self._directory().note_version(host_key, version)
        self._versions.note(host_key, version)

    def directory_again(self) -> None:
        """The data directory was removed while the server ran: the host's ``host.json`` and
        the marks of the deletes kept here, where the directory holds none under their keys
        (an OSError goes to the caller)."""
        self.host_json_again()
        writer = self._directory()
        for line in self._versions.stones():  # (a lower one than the directory's: unchanged)
            writer.note_version(line["session"], int(line["version"]))
        if not self._deleted:
            return
        written = sum(writer.marks_again(key, create, delete)
                      for key, (create, delete) in list(self._deleted.items()))
        if written:
            log.error("the marks of past deletes were removed from the data directory while "
                      "the server ran: %d written again", written)

    def host_json_again(self) -> None:
        """The host's ``host.json``, where it is missing (an OSError goes to the caller)."""
        if self.host_json is not None and not (self.host_root / HOST_JSON).exists():
            self.host_root.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.host_root / HOST_JSON, [orjson.dumps(self.host_json)])
            log.error("host.json of %s was removed from the data directory while the server "
                      "ran: written again", self.host_root.name)

    def _directory(self) -> Directory:
        """The directory to write in (its writes make its folders again where they are
        missing: ``Directory._in_folders``)."""
        if self._writer is None:
            self._writer = Directory(self.directory)
        return self._writer

    def write_again(self, host_key: str) -> None:
        """The files of ``host_key`` (a session's, or a shard's) were written again: the host's
        ``host.json``, its session's entry and index too, where they are missing. An OSError
        goes to the caller (the operation that found the files removed is refused)."""
        self.host_json_again()
        key = parent_key(host_key)
        kept = self._kept.get(key)
        if kept is None:
            return
        writer = self._directory()
        if writer.get(key) is None and writer.claim(key, kept.entry):
            log.error("the directory entry of session %s was removed from the data directory "
                      "while the server ran: written again", key)
        if kept.index is not None:
            tenant, made_by, fingerprint = kept.index
            if writer.created(tenant, made_by) is None and \
                    writer.claim_created(tenant, made_by, fingerprint, key) is None:
                log.error("the index of the keyed create of session %s was removed from the "
                          "data directory while the server ran: written again", key)
