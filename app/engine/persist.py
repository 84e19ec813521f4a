"""Sessions to bytes and back: snapshots (whole session) and log records (one operation each).

Both are safetensors files: tensors by tree path, the rest as JSON in ``__metadata__``
(``optserve_snapshot`` / ``optserve_record``), built with the same tree codec as state-dict
export, so nothing is pickled. A record is an operation value (:mod:`app.engine.ops`): its
``kind`` and arguments, the session's sequence number and version after it, and the
idempotency keys (with request fingerprints) it answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app.engine.ops import Operation, decode
from app.wire.safetensors_body import read_safetensors, safetensors_parts
from app.wire.tree import tree_from_json, tree_to_safetensors

SNAPSHOT_KEY = "optserve_snapshot"
RECORD_KEY = "optserve_record"


def encode_tree_parts(tree: Any, key: str) -> list[bytes | memoryview]:
    """The safetensors file as pieces that reference the tree's tensors (write them before
    those tensors change)."""
    skeleton, tensors = tree_to_safetensors(tree, escape=True)
    return safetensors_parts(tensors, {key: orjson.dumps(skeleton).decode()})


def encode_tree(tree: Any, key: str) -> bytes:
    return b"".join(encode_tree_parts(tree, key))


def decode_tree(payload: bytes, key: str) -> Any:
    tensors, metadata = read_safetensors(bytearray(payload))
    skeleton = orjson.loads(metadata[key])
    return tree_from_json(skeleton, "", tensors, sparse=True)


@dataclass
class Record:
    op: Operation
    seq: int
    #: the session's version after the operation
    version: int
    #: (idempotency key, request fingerprint) pairs this operation answers
    keys: list[tuple[str, str]]
    #: a sync round's step: the round's answer (workers, expected, partial)
    sync: dict[str, Any] | None = None


def encode_record_parts(record: Record) -> list[bytes | memoryview]:
    tree: dict[str, Any] = {"op": record.op.kind, "args": record.op.to_tree(),
                            "version": record.version, "seq": record.seq,
                            "keys": [list(k) for k in record.keys]}
    if record.sync is not None:
        tree["sync"] = record.sync
    return encode_tree_parts(tree, RECORD_KEY)


def encode_record(record: Record) -> bytes:
    return b"".join(encode_record_parts(record))


def decode_record(payload: bytes) -> Record:
    tree = decode_tree(payload, RECORD_KEY)
    keys = [(str(k), str(fp)) for k, fp in tree.get("keys") or []]
    return Record(decode(str(tree["op"]), dict(tree["args"])), int(tree["seq"]),
                  int(tree["version"]), keys, tree.get("sync"))
