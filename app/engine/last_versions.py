"""The last versions of deleted sessions, so that a session made again under the same id
continues their numbering.

A session's version names its parameters' values (``ETag: "<version>"``,
``X-Optserve-Version``, ``If-Match``, ``If-None-Match``, ``base_version``, ``min_version``).
Counted from 0 by every session, a session deleted and made again under the same id would
answer the same versions for other values: a client's ``If-None-Match: "1"`` kept from the
old session would be a 304, its ``If-Match: "1"`` would pass, a push computed on the old
values would be taken at staleness 0. So a delete remembers the version the session was at
(per tenant and id, :class:`LastVersions`), and a create under that id starts at the next one
(:func:`first_after`: ``last + 1``), carried in its ``CreateSession`` operation (and its log
record) as ``first_version``: no version the deleted session answered is answered again.

The embedded host keeps the last :data:`KEEP` ids: in memory and in its tombstone log (one
line per delete of a stored session, :func:`stone`, written into the session's directory
before the delete's commit point, as a keyed delete's line is: durable exactly when the
delete is). A shard's delete is remembered under its sharded session's key (every shard is at
the same version), so a sharded session made again, with any number of shards, or as a plain
one, continues too. An id whose record was evicted (more than :data:`KEEP` deletes since),
a session of durability ``memory`` across a restart, and a session refused at start or out of
service when it was deleted (its version unknown) start at 0 again. A create undone part-way
(a sharded create one shard refused; one a crash cut, undone at start) deletes what it made, at
version 0: the create's retry starts at 1.

The Ray engine's hosts run with their own record off (``HostConfig.continue_versions``): a
sharded session's shards are made on several hosts, each of which would remember another last
version (its shards would start at different versions, out of step), and a session made again
may land on another host. Its directory keeps the last versions instead, for every front
(:meth:`Directory.note_version <app.engine.directory.Directory.note_version>`, written by each
host's ``deleting`` hook before its delete's commit point, :class:`LastVersions` in memory where
the directory has no root), and a front passes the create's first version to every shard's host
(``CreateSpec.first_version``, kept in the session's entry: :meth:`RayRouter._first_version
<app.engine.ray_host.RayRouter._first_version>`).
"""

from __future__ import annotations

from collections import OrderedDict

from app.engine.deleted_creates import KEEP

#: the ``kind`` of a delete's last-version line in the tombstone log
KIND = "version"


def owner_key(key: str) -> str:
    """The key a session's last version is remembered under: a shard's, its sharded
    session's."""
    from app.engine.shards import parent_of
    return parent_of(key) or key


def stone(key: str, version: int) -> dict[str, str]:
    """The tombstone-log line of a deleted session's (``key``'s) last version."""
    return {"kind": KIND, "session": owner_key(key), "version": str(version)}


def is_version(line: dict[str, str]) -> bool:
    return line.get("kind") == KIND


def first_after(last: int | None) -> int:
    """The first version of a session made under an id whose last session ended at
    ``last`` (None: none remembered)."""
    return 0 if last is None else last + 1


class LastVersions:
    """The last ``keep`` deleted sessions' versions: owner key -> version."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._kept: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def note(self, key: str, version: int) -> None:
        """The session ``key`` (a shard's: its sharded session's) was deleted at ``version``
        (a lower version than one kept for the key does not lower it)."""
        owner = owner_key(key)
        self._kept[owner] = max(version, self._kept.get(owner, version))
        self._kept.move_to_end(owner)
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)

    def restore(self, line: dict[str, str]) -> None:
        """Keep what a tombstone-log line (:func:`stone`) says; a damaged one is skipped."""
        try:
            version = int(line["version"])
            key = line["session"]
        except (KeyError, ValueError):
            return
        if version >= 0:
            self.note(key, version)

    def last(self, key: str) -> int | None:
        """The last version kept for ``key`` (a shard's: its sharded session's), or None."""
        return self._kept.get(owner_key(key))

    def first_version(self, key: str) -> int:
        """The version a session made under ``key`` starts at."""
        return first_after(self.last(key))

    def stones(self) -> list[dict[str, str]]:
        """Their tombstone-log lines, oldest first."""
        return [stone(key, version) for key, version in self._kept.items()]
