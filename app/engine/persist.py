"""Sessions to bytes and back: snapshots (whole session) and log records (one operation each).

Both are safetensors files: tensors by tree path, the rest as JSON in ``__metadata__``
(``optserve_snapshot`` / ``optserve_record``), built with the same tree codec as state-dict
export, so nothing is pickled. A record is an operation value (:mod:`app.engine.ops`): its
``kind`` and arguments, the session's sequence number and version after it, and the
idempotency keys (with request fingerprints) it answers.

A record of gradients as a request body decoded them (:class:`BodyTensors` laid end to end in
one run) is the same file built without looking at each tensor: their header entries and tree
skeleton, kept by the body's header, and their bytes as the one piece of the body they lie in
(:func:`_body_record`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import orjson
import torch

from app.engine.ops import Operation, decode
from app.wire.kept_by_header import KeptByHeader, names_bytes
from app.wire.safetensors_body import (
    BodyTensors,
    framed_header,
    header_entries,
    read_safetensors,
    safetensors_parts,
)
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


class RecordParts(list[bytes | memoryview]):
    """A record's pieces (:func:`encode_record_parts`). ``body``: the index of the piece that
    holds the operation's gradients' bytes end to end (a view of the request body they were
    decoded from), when the record was built from it; ``owned``: that piece is a copy
    (:meth:`own_body`), so nothing the step does to the gradients changes the record."""

    body: int | None = None
    owned: bool = False

    def own_body(self) -> None:
        """Replace the gradients' piece with a copy of its bytes (one copy, however many
        tensors)."""
        assert self.body is not None
        self[self.body] = bytes(self[self.body])
        self.owned = True


def encode_record_parts(record: Record) -> RecordParts:
    tree: dict[str, Any] = {"op": record.op.kind, "args": record.op.to_tree(),
                            "version": record.version, "seq": record.seq,
                            "keys": [list(k) for k in record.keys]}
    if record.sync is not None:
        tree["sync"] = record.sync
    fast = _body_record(tree)
    return fast if fast is not None else RecordParts(encode_tree_parts(tree, RECORD_KEY))


#: stands for the gradients in a record's tree while the rest of it is encoded: random, so
#: that no string a client sends (a scalar's name, an idempotency key) can be it
_GRADS_TOKEN = f"$optserve-grads-{secrets.token_hex(16)}"
#: the token, quoted, as it appears in the ``__metadata__`` JSON (a JSON string within a JSON
#: string)
_GRADS_TOKEN_JSON = orjson.dumps(orjson.dumps(_GRADS_TOKEN).decode())[1:-1]
#: where gradients lie in a record's tree (``args.grads``)
_GRADS_PATH = "args.grads"


@dataclass(frozen=True)
class _GradsLayout:
    """What a record of gradients of one layout holds for them, worked out once."""

    #: the gradients' names, in order
    names: tuple[str, ...]
    #: their tree skeleton (``{name: {"$tensor": "args.grads.<name>"}}``) as it appears in the
    #: ``__metadata__`` JSON (a JSON string's content)
    skeleton: bytes
    #: the header entries of the tensors under their record paths (:func:`header_entries`)
    entries: bytes

    def nbytes(self) -> int:
        return len(self.skeleton) + len(self.entries) + names_bytes(self.names)


#: the last gradient layouts records were built for, by the header of the bodies they came in
#: (a client sends the same one with every step); 20,000 tensors: ~2.5 MB each. Kept up to
#: this much memory (headers included), at most this many
KEEP_LAYOUTS_BYTES = 32 * 1024 * 1024
KEEP_LAYOUTS = 1024
_grads_layouts: KeptByHeader[_GradsLayout] = KeptByHeader(KEEP_LAYOUTS_BYTES,
                                                          _GradsLayout.nbytes, KEEP_LAYOUTS)


def _grads_layout(grads: BodyTensors, header: bytes, names: tuple[str, ...]) -> _GradsLayout:
    kept = _grads_layouts.get(header)
    if kept is not None and kept.names == names:
        return kept
    skeleton = {name: {"$tensor": f"{_GRADS_PATH}.{name}"} for name in names}
    made = _GradsLayout(
        names, orjson.dumps(orjson.dumps(skeleton).decode())[1:-1],
        header_entries([(f"{_GRADS_PATH}.{name}", grads[name].dtype, grads[name].shape)
                        for name in names]))
    _grads_layouts.put(header, made)
    return made


def _body_record(tree: dict[str, Any]) -> RecordParts | None:
    """The record of ``tree`` as :func:`encode_tree_parts` writes it, byte for byte, when its
    only tensors are gradients decoded from one body (:class:`BodyTensors`) that lie end to end
    in one run in their order: the header from their kept entries and skeleton, their bytes as
    one piece of the body (20,000 tensors: no 20,000 skeleton objects, header entries and
    pieces made each step). Else None."""
    args = tree["args"]
    grads = args.get("grads") if isinstance(args, dict) else None
    if not isinstance(grads, BodyTensors) or grads.header is None or len(grads.runs) != 1:
        return None
    flat, names = grads.runs[0]
    if not flat.is_contiguous() or tuple(grads) != names:
        return None
    layout = _grads_layout(grads, grads.header, names)
    rest, tensors = tree_to_safetensors({**tree, "args": {**args, "grads": _GRADS_TOKEN}})
    if tensors:  # (other tensors: the general encoding)
        return None
    meta = orjson.dumps({RECORD_KEY: orjson.dumps(rest).decode()})
    if meta.count(_GRADS_TOKEN.encode()) != 1 or meta.count(_GRADS_TOKEN_JSON) != 1:
        return None
    meta = meta.replace(_GRADS_TOKEN_JSON, layout.skeleton)
    out = RecordParts([framed_header(layout.entries, meta)])
    if flat.numel():
        out.body = len(out)
        out.append(flat.view(torch.uint8).numpy().data)
    return out


def created_by(snapshot: bytes | None, first_record: bytes | None) -> tuple[str, str] | None:
    """The (idempotency key, request fingerprint) of the keyed create that made a session, as
    its snapshot's ``meta`` says or else its log's first record (the create's own), from their
    JSON headers only (no tensor is read: the files may be damaged); None when neither says."""
    for payload, key in ((snapshot, SNAPSHOT_KEY), (first_record, RECORD_KEY)):
        if payload is None or len(payload) < 8:
            continue
        size = int.from_bytes(payload[:8], "little")
        try:
            header = orjson.loads(payload[8:8 + min(size, len(payload) - 8)])
            tree = orjson.loads(header["__metadata__"][key])
            if key == SNAPSHOT_KEY:
                made = tree["meta"]["created_by"]
            elif tree["op"] == "create" and tree["seq"] == 1 and tree["keys"]:
                made = tree["keys"][0]
            else:
                continue
        except (ValueError, KeyError, TypeError, IndexError):
            continue
        if isinstance(made, list) and len(made) == 2 and all(isinstance(x, str) for x in made):
            return made[0], made[1]
        if made is None:  # (said: made without a key)
            return None
    return None


def encode_record(record: Record) -> bytes:
    return b"".join(encode_record_parts(record))


def decode_record(payload: bytes) -> Record:
    tree = decode_tree(payload, RECORD_KEY)
    keys = [(str(k), str(fp)) for k, fp in tree.get("keys") or []]
    return Record(decode(str(tree["op"]), dict(tree["args"])), int(tree["seq"]),
                  int(tree["version"]), keys, tree.get("sync"))
