"""Keyed creates whose session was deleted.

A create that came with an ``Idempotency-Key`` keeps the key with the session it made
(``Session.created_by``; a sharded session's or a Ray-hosted one's in the directory's
``.creates`` index), so a retry is answered with that session. Once the session is deleted the
key would be forgotten and a retry would make the session a second time. Instead the key is
kept, marked deleted, and a retry of the create (same key, same request) is a 409
``session_deleted`` naming the key and the session; with another request it is the usual 422
``idempotency_key_reused``.

The embedded host keeps the last :data:`KEEP` of them (like its keyed deletes): in memory
(:class:`DeletedCreates`) and in its tombstone log (:func:`stone`: one line beside the delete's
own, written into the session's directory before the delete's commit point, so a ``kill -9``
keeps it exactly when it keeps the delete). A sharded session's key is marked in the directory
before its shards' files go (:meth:`~app.engine.directory.Directory.forget_created`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from app.engine.idempotency import key_reused
from app.engine.interface import IdemKey, split_key
from app.errors import Conflict, NotFound

#: deleted sessions' create keys kept per host (and per directory)
KEEP = 10_000
#: the ``kind`` of a create's line in the tombstone log (a delete's lines have none)
KIND = "create"


def session_deleted(idem_key: str, session_id: str) -> Conflict:
    """The answer of a retried create whose session was deleted since."""
    return Conflict(f"the create sent with this Idempotency-Key made session "
                    f"{session_id!r:.140}, which has been deleted since; it is not made "
                    "again. Send a new key to create a new session",
                    code="session_deleted", field="Idempotency-Key",
                    idempotency_key=idem_key, session_id=session_id)


def session_refused(idem_key: str, session_id: str) -> Conflict:
    """The answer of a retried create whose session is stored but was refused at start (its
    files are damaged): the session exists, it is not made a second time."""
    return Conflict(f"the create sent with this Idempotency-Key made session "
                    f"{session_id!r:.140}, which is stored but was refused at start (its "
                    "files are damaged; GET /readyz lists it); it is not made again. Its files "
                    "are left to an operator; send a new key to create a new session",
                    code="session_exists", field="Idempotency-Key",
                    idempotency_key=idem_key, session_id=session_id)


def refused_at_start(key: str, shard: int | None, *, deleting: bool = False) -> NotFound:
    """The 404 of a session (key) refused at start, or one of its shards (``shard``), as
    an unsharded one refused at start is not found: it names the session (not the shard) and
    why. A delete of it deletes nothing (``deleting``): its files are left to an operator."""
    damaged = "its files are" if shard is None else f"its shard {shard}'s files are"
    return NotFound(f"no session {split_key(key)[1]!r:.140}: it was refused at start "
                    f"({damaged} damaged; GET /readyz lists it)"
                    + (", so it is not deleted: its files are left to an operator"
                       if deleting else ""),
                    code="session_not_found", field="session_id")


def stone(tenant: str, idem_key: str, fingerprint: str, session_id: str) -> dict[str, str]:
    """The tombstone-log line of a deleted session's create key."""
    return {**delete_stone(tenant, idem_key, fingerprint, session_id), "kind": KIND}


def delete_stone(owner: str, idem_key: str, fingerprint: str, session_id: str
                 ) -> dict[str, str]:
    """The tombstone-log line of a keyed delete (``owner``: the key's scope, a tenant or a
    shard's key)."""
    return {"tenant": owner, "key": idem_key, "fingerprint": fingerprint, "id": session_id}


def is_create(line: dict[str, str]) -> bool:
    return line.get("kind") == KIND


class DeletedCreates:
    """The last ``keep`` create keys whose sessions were deleted: (tenant, key) ->
    (fingerprint, session id)."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._kept: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def note(self, tenant: str, idem_key: str, fingerprint: str, session_id: str) -> None:
        self._kept[(tenant, idem_key)] = (fingerprint, session_id)
        self._kept.move_to_end((tenant, idem_key))
        while len(self._kept) > self.keep:
            self._kept.popitem(last=False)

    def stones(self) -> list[dict[str, str]]:
        """Their tombstone-log lines, oldest first."""
        return [stone(tenant, key, fingerprint, sid)
                for (tenant, key), (fingerprint, sid) in self._kept.items()]

    def check(self, tenant: str, idem: IdemKey) -> None:
        """Raise the answer of a create retried with a key whose session was deleted."""
        kept = self._kept.get((tenant, idem.key))
        if kept is None:
            return
        if kept[0] != idem.fingerprint:
            raise key_reused()
        raise session_deleted(idem.key, kept[1])


def check_indexed(made: dict[str, Any] | None, idem: IdemKey, session_id: str) -> None:
    """The directory's entry of a create key (``.creates``): 422 for another request, 409
    ``session_deleted`` when it is marked deleted."""
    if made is None:
        return
    if made["fingerprint"] != idem.fingerprint:
        raise key_reused()
    if made.get("deleted"):
        raise session_deleted(idem.key, session_id)


async def indexed_session(made: dict[str, Any], entry: dict[str, Any] | None, idem: IdemKey,
                          whole: Callable[[], Awaitable[bool]]) -> str | None:
    """The session a directory-indexed create key made (``made``, its ``.creates`` entry;
    ``entry``, the session's directory entry), for a retried create: its key while the session
    is there, None when it is not; 422/409 as :func:`check_indexed` says. A key marked deleted
    still answers with the session while ``whole()`` says every part of it is held: a delete
    marks the key before any part goes, so until one has, the delete was cut short or refused
    (both routers, embedded and Ray)."""
    key = str(made["key"])
    if made.get("deleted") and entry is not None and \
            entry.get("created_by") == idem.key and await whole():
        made = {**made, "deleted": False}
    check_indexed(made, idem, split_key(key)[1])  # (422; 409 deleted)
    return key if entry is not None else None
