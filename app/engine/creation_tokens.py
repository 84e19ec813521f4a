"""A session object's creation token: random, minted whenever a :class:`~app.engine.session.
Session` object is made (a create, and a restore from storage: never persisted), so that the
state tag a client holds, ``"r<revision>.<token>"`` (``GET .../state_dict``'s
``X-Optserve-State-Tag``), names one session object at one revision. Revisions count from 0 for
each creation: without the token, a tag read from a session deleted and made again under the
same id matched the new one at the same revision, and a 304 served the old session's state. A
restart or a restore makes every tag held before a whole answer once (safe: never a false 304).
A sharded session's token is its shards' joined (:func:`joined`): it changes whenever one
shard's does."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

#: random bits in a token (a false match between two creations must be impossible in practice)
TOKEN_BITS = 64


def minted() -> str:
    """A fresh token: :data:`TOKEN_BITS` random bits as lowercase hex."""
    return secrets.token_hex(TOKEN_BITS // 8)


def joined(tokens: Sequence[str]) -> str:
    """A sharded session's token, from its shards' in shard order: a hash of them as long as
    one token (it changes when any shard's does); one token alone is itself."""
    if len(tokens) == 1:
        return tokens[0]
    digest = hashlib.blake2b(".".join(tokens).encode("ascii"), digest_size=TOKEN_BITS // 8)
    return digest.hexdigest()
