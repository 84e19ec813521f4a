"""Exactly-once under retries: a session remembers the ``Idempotency-Key`` of its last
operations with the answer each got.

A key travels in the operation's log record, so the table is rebuilt by replay (and kept in
snapshots): a repeat is answered, not applied again, also after a restart. The answer kept is
the operation's scalar result (never tensors: a replayed step returns the session's current
parameters, with their version), as plain JSON values (:func:`plain_json`: a description's
tensor ``lr`` as a JSON tensor whose ``data`` is a list), which a snapshot keeps as they are. A
repeat with another request fingerprint is a 422.

An entry may also keep a refusal (:func:`refusal`): the answer of a request that an operation
decided without applying it, a sync push whose round an overwrite discarded. A repeat of its
key gets the same problem again (:meth:`IdempotencyTable.lookup` raises it); the operation's
record names those keys, so replay keeps them as well.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import torch

from app.errors import Conflict, Invalid, OptserveError
from app.wire.tree import tree_to_json


def key_reused() -> Invalid:
    """The 422 ``idempotency_key_reused``: a key sent again with another request."""
    return Invalid("this Idempotency-Key was already used for a different request; use a "
                   "fresh key for every new operation", code="idempotency_key_reused",
                   field="Idempotency-Key")

KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
DEFAULT_WINDOW = 1000
REFUSED = "$refused"
_REFUSALS: dict[int, type[OptserveError]] = {409: Conflict, 422: Invalid}


def refusal(exc: OptserveError) -> dict[str, Any]:
    """A refusal as the table keeps it (JSON)."""
    return {REFUSED: {"status": exc.status, "code": exc.code, "detail": exc.detail,
                      "field": exc.field, "extra": dict(exc.extra)}}


def plain_json(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer as the table keeps it: plain JSON values, the ones the wire carried (a tensor
    as a JSON tensor; numpy arrays and numbers, such as a JSON tensor's ``data``, as the lists
    and numbers orjson writes for them), so that a snapshot can hold it and a retry answers
    what the first answer said, byte for byte, whatever the session does after it."""
    try:  # (the common answer, scalars only: no walk)
        orjson.dumps(answer)
        return answer
    except TypeError:
        out: dict[str, Any] = _plain(answer)
        return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _plain(tree_to_json(obj))
    if isinstance(obj, (np.ndarray, np.generic)):
        return orjson.loads(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))
    return obj


def _refused(kept: dict[str, Any]) -> OptserveError:
    cls = _REFUSALS.get(int(kept["status"]), OptserveError)
    return cls(str(kept["detail"]), code=str(kept["code"]), field=kept.get("field"),
               **dict(kept.get("extra") or {}))


def check_key(key: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise Invalid("Idempotency-Key must be 1-255 printable ASCII characters without spaces",
                      code="invalid_idempotency_key", field="Idempotency-Key")
    return key


class IdempotencyTable:
    """The last ``window`` keys of one session: key -> (fingerprint, result as JSON). The keys
    of the latest operation all stay, however many: a sync round answers one key per worker,
    and a round of more workers than the window is still answered exactly once."""

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self._entries: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, fingerprint: str, legacy: tuple[str, ...] = ()
               ) -> dict[str, Any] | None:
        """The recorded answer of ``key``, or None; 422 when the key came with another
        request. ``legacy``: the request's fingerprints as older servers took them (an entry
        replayed from their records holds one of those)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] != fingerprint and entry[0] not in legacy:
            raise key_reused()
        kept = entry[1].get(REFUSED)
        if kept is not None:
            raise _refused(kept)
        return entry[1]

    def newest(self) -> str | None:
        """The key remembered last (one of the latest operation's), or None."""
        return next(reversed(self._entries), None)

    def holds(self, key: str) -> bool:
        """Whether ``key`` is among the keys kept (whatever request it came with)."""
        return key in self._entries

    def remember(self, key: str, fingerprint: str, result: dict[str, Any]) -> None:
        self.remember_all([(key, fingerprint)], result)

    def unchanged_by(self, keys: Sequence[object], refused: Sequence[object]) -> bool:
        """Whether :meth:`remember_all` with these keys and refusals would leave the table as it
        is (no key to keep, and none past the window to forget): then the answer to keep need
        not be made."""
        return not keys and not refused and len(self._entries) <= self.window

    def remember_all(self, keys: list[tuple[str, str]], result: dict[str, Any],
                     refused: list[tuple[str, str, dict[str, Any]]] | None = None) -> None:
        """The keys (with their fingerprints) of one operation, all answered by ``result``,
        and the keys it refused (``refused``: key, fingerprint, :func:`refusal`); the oldest
        others are forgotten past the window. Answers are kept as :func:`plain_json` makes
        them."""
        result = plain_json(result)
        entries = [(key, fingerprint, result) for key, fingerprint in keys]
        entries += [(key, fingerprint, plain_json(answer))
                    for key, fingerprint, answer in refused or []]
        for key, fingerprint, answer in entries:
            self._entries[key] = (fingerprint, answer)
            self._entries.move_to_end(key)
        while len(self._entries) > max(self.window, len(entries)):
            self._entries.popitem(last=False)

    def to_json(self) -> list[list[Any]]:
        return [[k, fp, result] for k, (fp, result) in self._entries.items()]

    @classmethod
    def from_json(cls, data: Any, window: int = DEFAULT_WINDOW) -> IdempotencyTable:
        """The table as :meth:`to_json` kept it, every entry (it was within its window; a
        smaller window forgets the excess at the next operation)."""
        table = cls(window)
        for k, fp, result in data or []:
            table._entries[str(k)] = (str(fp), dict(result))
        return table

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdempotencyTable) and self._entries == other._entries

    __hash__ = None  # type: ignore[assignment]
