"""Gradients end to end, in the pieces the per-step metrics take norms of.

A group's gradient norm must not depend on how its gradients lie in memory: the same values
come apart in a JSON body or from an in-process caller, and end to end in a safetensors body,
the same-host segment and the log record a restart replays (so a history rebuilt after
``kill -9`` must equal what the steps answered). torch's float32 norm of a run of tensors is
not the norm of its tensors' norms in the last bits, so every group's gradients are normed
the same way whatever their layout: flattened and joined in the group's order (a new run
where the dtype or the device changes), cut into pieces of ``chunked`` 's norm piece at fixed
offsets from the run's start (:func:`joined`). A piece that lies inside one tensor, or in
tensors laid end to end, is a view; one that straddles tensors apart is a copy of its parts,
at most one piece's worth per tensor boundary; a strided tensor is copied (torch's norm of
strided values rounds otherwise). torch's norm of a contiguous piece depends on its values
only (its kernels load unaligned), so the pieces' norms, and the group's norm combined from
them in float64, are the same bits for every layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine import chunked


def span_bytes(first: torch.Tensor, start: int, nbytes: int) -> torch.Tensor | None:
    """The ``nbytes`` bytes from data pointer ``start`` as one flat uint8 view of ``first``'s
    storage (tensors found laid end to end by their data pointers, ``first`` the lowest), or
    None when they do not all lie inside that storage."""
    storage = first.untyped_storage()
    lo = start - storage.data_ptr()
    if lo < 0 or lo + nbytes > storage.nbytes():
        return None
    return torch.empty(0, dtype=torch.uint8, device=first.device).set_(storage, lo, (nbytes,),
                                                                        (1,))


def joined(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``ts`` flattened and end to end in this order, in pieces (:func:`chunked.pieces` of the
    join, a new run from each change of dtype or device); empty tensors add nothing."""
    ts = [t for t in ts if t.numel()]
    out: list[torch.Tensor] = []
    i = 0
    while i < len(ts):
        j = i + 1
        while j < len(ts) and ts[j].dtype == ts[i].dtype and ts[j].device == ts[i].device:
            j += 1
        out.extend(_run(ts[i:j]))
        i = j
    return out


def norms(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The norms (0-d, in the tensors' dtype) of :func:`joined`'s pieces, in one torch call."""
    cut = joined(ts)
    return list(torch._foreach_norm(cut)) if cut else []


#: consecutive tensors smaller than a piece are joined by one torch call into copies of up to
#: this many elements (the same elements in the same order: the same pieces); one by one, a
#: group of 1,000 gradients of 4 floats laid out of the group's order (a safetensors body
#: sorted by name) took 6.5 ms of Python per step, joined 0.6 ms
BATCH = 1 << 20


def _batched(ts: list[torch.Tensor], size: int) -> list[torch.Tensor]:
    """``ts`` with each stretch of consecutive tensors of fewer than ``size`` elements joined
    flat into one tensor (up to :data:`BATCH` elements each); the others as they are."""
    out: list[torch.Tensor] = []
    small: list[torch.Tensor] = []
    held = 0

    def flush() -> None:
        nonlocal held
        if len(small) == 1:
            out.append(small[0])
        elif small:
            out.append(torch._C._nn.flatten_dense_tensors(small))
        small.clear()
        held = 0
    for t in ts:
        n = t.numel()
        if n >= size:
            flush()
            out.append(t)
            continue
        if held + n > BATCH:
            flush()
        small.append(t)
        held += n
    flush()
    return out


def _run(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pieces of tensors of one dtype and device (non-empty)."""
    span = _tiled(ts)
    if span is not None:
        return chunked.pieces(span)
    size = chunked.piece()
    if len(ts) > 2:
        ts = _batched(ts, size)
    out: list[torch.Tensor] = []
    open_parts: list[torch.Tensor] = []  # the piece being gathered across tensors
    have = 0
    for t in ts:
        flat, at, n = t.reshape(-1).contiguous(), 0, t.numel()
        if have:
            at = min(size - have, n)
            open_parts.append(flat[:at])
            have += at
            if have == size:
                out.append(torch.cat(open_parts))
                open_parts, have = [], 0
        while n - at >= size:
            out.append(flat[at:at + size])
            at += size
        if at < n:
            open_parts.append(flat[at:])
            have += n - at
    if open_parts:
        out.append(open_parts[0] if len(open_parts) == 1 else torch.cat(open_parts))
    return out


def _tiled(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """One flat view of ``ts`` when they lie end to end in one storage (each contiguous,
    each starting where the one before ends), else None."""
    first = ts[0]
    if len(ts) == 1:
        return first.reshape(-1) if first.is_contiguous() else None
    start = ptr = first.data_ptr()
    for t in ts:
        if t.data_ptr() != ptr or not t.is_contiguous():
            return None
        ptr += t.nbytes
    raw = span_bytes(first, start, ptr - start)
    return None if raw is None else raw.view(first.dtype)
