"""Sessions to bytes and back: snapshots (whole session) and log records (one update each).

Both are safetensors files: tensors by tree path, the rest as JSON in ``__metadata__``
(``optserve_snapshot`` / ``optserve_record``), built with the same tree codec as state-dict
export, so nothing is pickled.
"""

from __future__ import annotations

from typing import Any

import orjson

from app.wire.safetensors_body import read_safetensors, safetensors_parts
from app.wire.tree import tree_from_json, tree_to_safetensors

SNAPSHOT_KEY = "optserve_snapshot"
RECORD_KEY = "optserve_record"


def encode_tree_parts(tree: Any, key: str) -> list[bytes | memoryview]:
    """The safetensors file as pieces that reference the tree's tensors (write them before
    those tensors change)."""
    skeleton, tensors = tree_to_safetensors(tree)
    return safetensors_parts(tensors, {key: orjson.dumps(skeleton).decode()})


def encode_tree(tree: Any, key: str) -> bytes:
    return b"".join(encode_tree_parts(tree, key))


def decode_tree(payload: bytes, key: str) -> Any:
    tensors, metadata = read_safetensors(bytearray(payload))
    skeleton = orjson.loads(metadata[key])
    return tree_from_json(skeleton, "", tensors)


def encode_record_parts(
    op: str, args: dict[str, Any], version: int, seq: int
) -> list[bytes | memoryview]:
    return encode_tree_parts({"op": op, "args": args, "version": version, "seq": seq},
                             RECORD_KEY)


def encode_record(op: str, args: dict[str, Any], version: int, seq: int) -> bytes:
    return b"".join(encode_record_parts(op, args, version, seq))


def decode_record(payload: bytes) -> tuple[str, dict[str, Any], int, int]:
    """(operation, its arguments, the version after it, its sequence number)."""
    tree = decode_tree(payload, RECORD_KEY)
    return str(tree["op"]), dict(tree["args"]), int(tree["version"]), int(tree["seq"])
