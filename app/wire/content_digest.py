"""A cheap fingerprint of a map of tensors' *content*, whatever carried them.

A step's gradients arrive as a safetensors body, a JSON body or slots of a same-host shared
segment, laid out in whatever order the sender chose. Their fingerprint must be the same for
the same tensors (a retry of a step over another transport is answered, not refused as a
reused key), so it is taken of what they are, not of the bytes that carried them:

- the tensors' names (sorted), dtypes and shapes (a row-sparse tensor: its values' dtype and
  shape, marked as rows; its dense shape is a declaration the engine checks, and a JSON body
  may give it where safetensors cannot), crc32c'd;
- their bytes laid end to end in that order (a row-sparse tensor: its int64 row indices, then
  its values), sampled as :func:`app.api.conditions.body_digest` samples a body: the whole
  stream up to 768 KiB, else its head, middle and tail (256 KiB each). Hashing every byte of a
  40 MB step would cost a few ms a step; two steps of equal names, dtypes and shapes that
  differ only outside the windows pass for the same, which no real gradient push does.

A body as decoding made it (:class:`BodyTensors` with its header and its runs of tensors laid
end to end) is sampled without looking at each tensor: which bytes of which run the windows
fall on is worked out once per header and kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import crc32c
import orjson
import torch

from app.wire.dtypes import DTYPE_NAMES
from app.wire.kept_by_header import KeptByHeader, names_bytes
from app.wire.tensor_maps import BodyTensors

WINDOW = 256 * 1024
#: the memory the kept sampling plans may hold, headers included (a client sends the same
#: header every step; 16,000 tensors: about 2 MB a plan)
KEEP_PLANS_BYTES = 32 * 1024 * 1024
#: and how many of them at most (many clients of small models)
KEEP_PLANS = 1024

#: a stretch of the stream: (source, begin, end) with source a run's or a chunk's index
Piece = tuple[int, int, int]


def windows(total: int) -> list[tuple[int, int]]:
    """The stretches of a stream of ``total`` bytes that are hashed."""
    if total <= 3 * WINDOW:
        return [(0, total)] if total else []
    mid = total // 2 - WINDOW // 2
    return [(0, WINDOW), (mid, mid + WINDOW), (total - WINDOW, total)]


def _pieces(chunks: Sequence[Piece], total: int) -> list[Piece]:
    """The windows of the stream that ``chunks`` (each ``(source, begin, nbytes)``, laid end
    to end in this order) make, as stretches of their sources; adjacent stretches of one
    source merged."""
    out: list[Piece] = []
    spans = windows(total)
    if not spans:
        return out
    pos, i = 0, 0
    for source, begin, nbytes in chunks:
        end = pos + nbytes
        while i < len(spans) and spans[i][1] <= pos:
            i += 1
        j = i
        while j < len(spans) and spans[j][0] < end:
            lo, hi = max(spans[j][0], pos), min(spans[j][1], end)
            piece = (source, begin + lo - pos, begin + hi - pos)
            if out and out[-1][0] == source and out[-1][2] == piece[1]:
                out[-1] = (source, out[-1][1], piece[2])
            else:
                out.append(piece)
            j += 1
        pos = end
        if i >= len(spans):
            break
    return out


def _entry(name: str, t: torch.Tensor) -> list[object]:
    if t.layout == torch.sparse_coo:
        values = t._values()
        return [name, DTYPE_NAMES[values.dtype], list(values.shape), "rows"]
    return [name, DTYPE_NAMES[t.dtype], list(t.shape)]


def _raw(t: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes, in C order."""
    flat = t.detach().contiguous().reshape(-1)
    if not flat.is_cpu:
        flat = flat.cpu()
    return flat.view(torch.uint8).numpy().data


def _digest(count: int, entries: bytes, total: int, data: int) -> str:
    return f"{count}:{crc32c.crc32c(entries):08x}:{total}:{data:08x}"


@dataclass(frozen=True)
class _Plan:
    """How the windows fall on the runs of a body of one header."""

    count: int
    entries: bytes
    total: int
    pieces: tuple[Piece, ...]
    #: each run's names (checked against the body's runs before use)
    runs: tuple[tuple[str, ...], ...]


    def nbytes(self) -> int:
        """About the memory the plan holds (its names are the body's, kept alive by it)."""
        return (len(self.entries) + 24 * len(self.pieces)
                + sum(names_bytes(names) for names in self.runs))


_plans: KeptByHeader[_Plan] = KeptByHeader(KEEP_PLANS_BYTES, _Plan.nbytes, KEEP_PLANS)


def cheap(tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether :func:`tensors_digest` of these takes a kept plan (no look at each tensor)."""
    if not isinstance(tensors, BodyTensors) or tensors.header is None or not tensors.runs:
        return False
    return tensors.header in _plans


def _plan_of(tensors: BodyTensors) -> _Plan | None:
    """The sampling plan of a body whose runs hold every tensor with bytes; None when they do
    not (or a tensor is not a plain CPU one)."""
    where: dict[str, tuple[int, int, int]] = {}
    for r, (flat, names) in enumerate(tensors.runs):
        if not flat.is_cpu:
            return None
        size, pos = flat.element_size(), 0
        for name in names:
            nbytes = tensors[name].numel() * size
            where[name] = (r, pos, nbytes)
            pos += nbytes
    chunks: list[Piece] = []
    entries: list[list[object]] = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.layout != torch.strided:
            return None
        entries.append(_entry(name, t))
        if name in where:
            if where[name][2]:
                chunks.append(where[name])
        elif t.numel():
            return None
    total = sum(c[2] for c in chunks)
    return _Plan(len(entries), orjson.dumps(entries), total, tuple(_pieces(chunks, total)),
                 tuple(names for _, names in tensors.runs))


def _kept_plan(tensors: BodyTensors) -> _Plan | None:
    header = tensors.header
    assert header is not None
    plan = _plans.get(header)
    if plan is None:
        plan = _plan_of(tensors)
        if plan is None:
            return None
        _plans.put(header, plan)
    if len(plan.runs) != len(tensors.runs) or any(
            names != kept for (_, names), kept in zip(tensors.runs, plan.runs, strict=True)):
        return _plan_of(tensors)  # (not this header's runs after all: not kept)
    return plan


def _sampled(pieces: Sequence[Piece], source: Callable[[int], torch.Tensor]) -> int:
    """The crc32c of ``pieces`` (stretches of the tensors ``source`` gives by index), reading
    each tensor the pieces fall on once, and no other."""
    raw: dict[int, memoryview] = {}
    data = 0
    for i, begin, end in pieces:
        view = raw.get(i)
        if view is None:
            view = raw[i] = _raw(source(i))
        data = crc32c.crc32c(view[begin:end], data)
    return data


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of these tensors' content (see the module docstring): equal for equal
    names, dtypes, shapes and bytes, whatever their order, encoding or memory."""
    if isinstance(tensors, BodyTensors) and tensors.header is not None and tensors.runs:
        plan = _kept_plan(tensors)
        if plan is not None:
            runs = tensors.runs
            return _digest(plan.count, plan.entries, plan.total,
                           _sampled(plan.pieces, lambda r: runs[r][0]))
    entries: list[list[object]] = []
    parts: list[torch.Tensor] = []
    for name in sorted(tensors):
        t = tensors[name]
        entries.append(_entry(name, t))
        parts += [t._indices()[0], t._values()] if t.layout == torch.sparse_coo else [t]
    # sizes from the tensors' shapes: only those the windows fall on are read (reading each
    # of 16,000 small tensors' bytes took 60-200 ms)
    chunks = [(i, 0, nbytes) for i, p in enumerate(parts)
              if (nbytes := p.numel() * p.element_size())]
    total = sum(c[2] for c in chunks)
    return _digest(len(entries), orjson.dumps(entries), total,
                   _sampled(_pieces(chunks, total), parts.__getitem__))
