"""The server's own request ids (``X-Request-Id`` of a request that brings none): what
``uuid.uuid4().hex`` gives for the same random bytes, and a fresh one per request."""

from __future__ import annotations

import os
import uuid

import pytest

from app import observability
from app.observability import new_request_id


def test_a_new_id_is_uuid4_hex_of_the_same_random_bytes(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    # every byte value at the version's and the variant's bytes, and random ones elsewhere
    samples = [bytes([b] * 16) for b in range(256)] + [os.urandom(16) for _ in range(2000)]
    for raw in samples:
        monkeypatch.setattr(observability.os, "urandom", lambda n, raw=raw: raw)
        assert new_request_id() == uuid.UUID(bytes=raw, version=4).hex, raw.hex()
    monkeypatch.undo()
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    for rid in ids:
        assert uuid.UUID(hex=rid).version == 4
        assert uuid.UUID(hex=rid).variant == uuid.RFC_4122
        assert observability._REQUEST_ID_RE.match(rid)
