"""Row-sparse gradients for embedding tables, and row reads.

A row-sparse gradient is a ``torch.sparse_coo_tensor`` with one sparse dimension (the rows
of the parameter) and dense rows: exactly what ``nn.Embedding(sparse=True)`` makes. The
service keeps it as sent — its indices in their order, duplicates included — so every
optimizer sees the bits torch's own backward would have given it (``SparseAdam`` and
``Adagrad`` coalesce it themselves, summing the duplicate rows; ``SGD`` adds the rows as they
come, as it does in process).

Which optimizer groups take sparse gradients is torch's to say: the group's options are tried
on a throwaway optimizer over a tiny parameter with sparse gradients (two steps); when torch
raises, or leaves sparse tensors in the optimizer's state (``SGD`` with momentum keeps a sparse
momentum buffer, which the service's state formats do not carry), the option that prevents it
is found by putting each option back to its default in turn, and the step is a 422 naming it.
"""

from __future__ import annotations

import base64
import copy
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from app.engine import optimizers
from app.errors import Invalid
from app.wire.dtypes import DTYPE_NAMES
from app.wire.safetensors_body import narrowed_dtype, pack
from app.wire.tensor_maps import dense_body

if TYPE_CHECKING:
    from app.engine.interface import Tensors
    from app.engine.session import Session

#: optimizers that take only sparse gradients
SPARSE_ONLY = frozenset({"SparseAdam"})
#: optimizers some of whose groups take row-sparse gradients (torch's verdict per group:
#: :func:`check_optimizer_takes`)
TAKE_SPARSE = frozenset({"SparseAdam", "SGD", "Adagrad"})
#: optimizers that take gradients only through the evaluation protocol
EVALUATION_ONLY = frozenset({"LBFGS"})
_PROBE_CACHE: dict[tuple[Any, ...], tuple[str, str | None] | None] = {}
_PROBE_CACHE_MAX = 1024


def own_storage(s: Session, grads: dict[str, torch.Tensor]) -> None:
    """Give each 1-D parameter about to take a row-sparse gradient a storage of its own (a copy
    of its values; the same tensor to the optimizer and its state): torch 2.x adds a sparse
    tensor into a 1-D dense view that does not start its storage at the wrong place (or
    crashes), and SGD, Adagrad and SparseAdam step with exactly that add. Parameters start as
    views of the session's one block (:func:`app.engine.session.flat_block`: one copy sends
    them all), and only those that take such gradients leave it: their values do not change,
    and a replay makes the same move at the same step."""
    if dense_body(grads):
        return
    with torch.no_grad():
        for name, g in grads.items():
            p = s.params.get(name)
            if p is None or g.layout == torch.strided or p.dim() != 1:
                continue
            if p.storage_offset() or p.untyped_storage().nbytes() != p.numel() * p.element_size():
                p.data = p.data.clone()


def is_sparse(t: torch.Tensor) -> bool:
    return t.layout == torch.sparse_coo


def row_sparse(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...] | torch.Size
               ) -> torch.Tensor:
    """A row-sparse COO tensor from row indices (1-D int64) and their rows, unchecked (the
    caller has checked the indices)."""
    return torch.sparse_coo_tensor(indices.reshape(1, -1), values, tuple(shape),
                                   check_invariants=False)


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """The row indices of a row-sparse tensor (1-D, in their order, duplicates kept)."""
    return t._indices()[0]


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b`` with torch's layout rules: dense + sparse is dense, sparse + sparse sparse.
    torch has no ``sparse + dense``: IEEE addition commutes, so ``b + a`` gives its bits."""
    if is_sparse(a) and not is_sparse(b):
        return b + a
    return a + b


def add_checked(name: str, a: torch.Tensor, b: torch.Tensor, field: str = "grads"
                ) -> torch.Tensor:
    """:func:`add` for the gradients of parameter ``name``; torch's refusal to sum them (no sum
    of two float16 row-sparse tensors on a CPU: "cadd_sparse" not implemented for 'Half') a
    422 naming the gradient, as torch's own accumulation of them would raise too."""
    try:
        return add(a, b)
    except RuntimeError as exc:  # (NotImplementedError is one)
        raise Invalid(f"torch cannot add the row-sparse gradients of {name!r:.80} "
                      f"({DTYPE_NAMES.get(a.dtype, str(a.dtype))} on {a.device.type}: "
                      f"{type(exc).__name__}: {str(exc)[:200]}); step the gradient already "
                      "accumulated first, or send one of them dense",
                      code="sparse_unsupported", field=f"{field}.{name}") from None


def check_sparse(name: str, p: torch.Tensor, t: torch.Tensor, field: str,
                 widening: bool = False) -> None:
    """A row-sparse gradient ``t`` sent for parameter ``p``: one sparse dimension (rows), rows
    shaped like the parameter's, every index one of its rows, values in the parameter's dtype
    (or, ``widening``, in a narrower one the caller asked to widen: ``?upcast=true``). Its
    declared row count may be smaller than the parameter's (torch infers the smallest that
    holds the indices), never larger."""
    where = f"{field}.{name}"
    if p.dim() == 0:
        raise Invalid(f"{name!r:.80} is a scalar; a sparse gradient needs a parameter with rows",
                      code="invalid_sparse", field=where)
    if t.layout != torch.sparse_coo or t.sparse_dim() != 1:
        raise Invalid(f"{name!r:.80}: a sparse gradient has one sparse dimension (the rows)",
                      code="invalid_sparse", field=where)
    if t.dtype != p.dtype and not widening:
        raise Invalid(f"{name!r:.80} is {DTYPE_NAMES[p.dtype]} but the values sent are "
                      f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))} (no silent casts)",
                      code="dtype_mismatch", field=f"{where}.values")
    if t.shape[1:] != p.shape[1:]:
        raise Invalid(f"{name!r:.80} has rows of shape {list(p.shape[1:])} but the values sent "
                      f"have rows of shape {list(t.shape[1:])}", code="shape_mismatch",
                      field=f"{where}.values")
    idx = rows_of(t)
    if idx.numel():
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= p.shape[0]:
            bad = low if low < 0 else high
            raise Invalid(f"row index {bad} is out of range for {name!r:.80}, which has "
                          f"{p.shape[0]} rows", code="index_out_of_range",
                          field=f"{where}.indices")
    if t.shape[0] > p.shape[0]:
        raise Invalid(f"{name!r:.80} has {p.shape[0]} rows but the sparse gradient declares "
                      f"{t.shape[0]}", code="shape_mismatch", field=f"{where}.shape")


def fit(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A checked row-sparse gradient at its parameter's shape, device and dtype (the indices
    as sent, the values as sent or widened: ``?upcast=true``)."""
    if tuple(t.shape) == tuple(p.shape) and t.device == p.device and t.dtype == p.dtype:
        return t
    indices, values = t._indices(), t._values()
    return torch.sparse_coo_tensor(indices.to(p.device), values.to(p.device, p.dtype), p.shape,
                                   is_coalesced=t.is_coalesced(), check_invariants=False)


# ---------------------------------------------------------------------------- optimizer checks
def check_optimizer_takes(s: Session, grads: Tensors, field: str = "grads") -> None:
    """Whether the session's optimizer takes these gradients as they are laid out: LBFGS takes
    gradients only through evaluations, SparseAdam only sparse ones, and a sparse gradient only
    in a param group whose options torch steps sparse gradients with."""
    name = s.optimizer_name
    if name in EVALUATION_ONLY:
        raise Invalid(f"{name} calls its closure several times per step: it takes gradients "
                      "only as evaluations (POST .../step opens a step that asks for them)",
                      code="evaluation_protocol", field=field)
    if not grads:
        return
    sparse_names = [] if dense_body(grads) else [n for n, t in grads.items() if is_sparse(t)]
    if name in SPARSE_ONLY:
        dense = [n for n in grads if n not in sparse_names]
        if dense:
            raise Invalid(f"{name} does not support dense gradients (torch: \"SparseAdam does "
                          "not support dense gradients, please consider Adam instead\"); send "
                          f"{dense[0]!r:.80} as a sparse gradient (indices + values)",
                          code="dense_gradient", field=f"{field}.{dense[0]}")
    if not sparse_names:
        return
    group_of = {n: i for i, g in enumerate(s.optimizer.param_groups) for n in g["param_names"]}
    groups = s.group_options()
    dtypes = s.group_dtypes()
    seen: set[int] = set()
    for n in sparse_names:
        index = group_of[n]
        if index in seen:
            continue
        seen.add(index)
        refusal = sparse_refusal(s.cls, groups[index], dtypes[index], s.device)
        if refusal is not None:
            message, option = refusal
            where = f"param_groups.{index}.{option}" if option else "optimizer"
            with_option = f" with {option}={groups[index][option]!r}" if option else ""
            raise Invalid(f"{name}{with_option} cannot step sparse gradients (sent for "
                          f"{n!r:.80}): {message}", code="sparse_unsupported", field=where)


def sparse_refusal(cls: type[torch.optim.Optimizer], options: dict[str, Any],
                   dtype: torch.dtype, device: torch.device) -> tuple[str, str | None] | None:
    """None when a group with these options steps sparse gradients (torch's own verdict, cached);
    else (why, the option that prevents it or None when the optimizer never does)."""
    ctor = optimizers.default_options(cls)
    opts = {k: v for k, v in options.items() if k in ctor}
    key = (cls.__name__, repr(sorted(opts.items())), dtype, device.type)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    why = _try_sparse(cls, opts, dtype, device)
    verdict: tuple[str, str | None] | None = None
    if why is not None:
        blamed = None
        for option, default in ctor.items():
            if option not in opts or _same(opts[option], default):
                continue
            if _try_sparse(cls, {**opts, option: default}, dtype, device) is None:
                blamed = option
                break
        verdict = (why, blamed)
    if len(_PROBE_CACHE) >= _PROBE_CACHE_MAX:
        _PROBE_CACHE.clear()
    _PROBE_CACHE[key] = verdict
    return verdict


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def _try_sparse(cls: type[torch.optim.Optimizer], opts: dict[str, Any], dtype: torch.dtype,
                device: torch.device) -> str | None:
    t = torch.zeros(3, 2, dtype=dtype, device=device)
    try:
        opt = cls([t], **copy.deepcopy(opts))
        for row in (0, 1):
            values = torch.full((1, 2), 0.25, dtype=dtype, device=device)
            t.grad = torch.sparse_coo_tensor(torch.tensor([[row]], device=device), values,
                                             t.shape, check_invariants=False)
            opt.step()
    except optimizers.TORCH_ERRORS as exc:
        return f"torch raises {type(exc).__name__}: {exc}"
    kept = [k for k, v in opt.state[t].items()
            if isinstance(v, torch.Tensor) and v.layout != torch.strided]
    if kept:
        return (f"torch would keep {kept[0]!r} as a sparse tensor in the optimizer's state, "
                "which optserve's state formats (export, import, snapshots) do not carry")
    return None


# ---------------------------------------------------------------------------- reading rows
#: the elements a row pull may always answer (64 MiB of float32), however small its session:
#: past it a pull answers at most as many elements as a whole pull of the session would
#: (rows repeat, so a few bytes of indices could otherwise ask for any number of bytes)
ROWS_FLOOR = 1 << 24


def check_rows(params: Mapping[str, torch.Tensor], rows: dict[str, torch.Tensor],
               field: str = "rows", *, sized: bool = True) -> None:
    """Rows asked of a session's parameters (``params``: its tensors, or stand-ins of their
    shapes): known names, parameters with rows, indices in range, and in all (``sized``) no
    more elements than :data:`ROWS_FLOOR` or the session's parameters hold. A shard of a
    sharded session is asked with ``sized`` False: its coordinator sized the pull against the
    whole session's parameters (:meth:`app.engine.shards.ShardedSession.pull_rows`)."""
    if not rows:
        raise Invalid("name at least one parameter and its rows", code="invalid_rows",
                      field=field)
    for name, idx in rows.items():
        p = params.get(name)
        if p is None:
            raise Invalid(f"unknown parameter {name!r:.80}", code="unknown_parameter",
                          field=f"{field}.{name}")
        if p.dim() == 0:
            raise Invalid(f"{name!r:.80} is a scalar: it has no rows", code="invalid_rows",
                          field=f"{field}.{name}")
        if idx.dim() != 1 or idx.dtype != torch.int64:
            raise Invalid("rows are a 1-D list of int64 row indices", code="invalid_rows",
                          field=f"{field}.{name}")
        if idx.numel():
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= p.shape[0]:
                bad = low if low < 0 else high
                raise Invalid(f"row {bad} is out of range for {name!r:.80}, which has "
                              f"{p.shape[0]} rows", code="index_out_of_range",
                              field=f"{field}.{name}")
    if not sized:
        return
    asked = sum(idx.numel() * math.prod(params[name].shape[1:]) for name, idx in rows.items())
    if asked <= ROWS_FLOOR:  # (the usual pull: the session's parameters are not counted)
        return
    limit = max(ROWS_FLOOR, sum(p.numel() for p in params.values()))
    if asked > limit:
        raise Invalid(f"these rows hold {asked} elements in all, more than a row pull answers "
                      f"({limit}: the session's parameters, or {ROWS_FLOOR} if more); ask "
                      "fewer rows at a time", code="rows_too_large", field=field, limit=limit)


def narrowed_answer(params: Tensors, dtype: torch.dtype) -> Tensors:
    """A step's answer that a host sent at full width (a sharded or Ray-hosted session's),
    narrowed to ``dtype`` as the embedded host narrows its own (:func:`pack` for whole
    parameters, :func:`touched` for rows: floating tensors wider than ``dtype``, by torch's
    cast)."""
    if not any(is_sparse(t) for t in params.values()):
        return pack(params, dtype)
    out: Tensors = {}
    for name, t in params.items():
        if is_sparse(t):
            values = t._values()
            out[name] = row_sparse(rows_of(t), values.to(narrowed_dtype(values, dtype)),
                                   t.shape)
        else:
            out[name] = t.to(narrowed_dtype(t, dtype))
    return out


def gather_rows(s: Session, rows: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                ) -> Tensors:
    """CPU row-sparse copies of the asked rows (in the order asked, repeats kept); narrowed to
    ``dtype`` where asked (``?params_dtype=``), as a step's touched rows are."""
    out: Tensors = {}
    for name, idx in rows.items():
        p = s.params[name]
        values = p.detach().index_select(0, idx.to(p.device)).to("cpu", narrowed_dtype(p, dtype))
        out[name] = row_sparse(idx.cpu(), values, p.shape)
    return out


#: the most rows a step's idempotency table entry keeps of the accumulated row-sparse
#: gradients it touched (:func:`touched_rows`): the table holds the last
#: ``idempotency_window`` entries (1,000 by default) in memory and in every snapshot, and
#: every step of the SDK's ``Client.step`` has a key. A parameter past it is kept as whole
TOUCHED_ROWS_KEPT = 1024


def touched_rows(total: Tensors, names: Iterable[str]) -> dict[str, str | None]:
    """What a step stepping ``total`` touches of each of ``names`` (JSON-ready, for its
    idempotency table entry): None for the whole parameter (a dense gradient, or rows past
    :data:`TOUCHED_ROWS_KEPT` in all: a retry then answers the whole parameter, a superset of
    the first answer), else its rows (each once, ascending) as base64 of int64
    little-endian."""
    out: dict[str, str | None] = {}
    budget = TOUCHED_ROWS_KEPT
    for name in names:
        g = total.get(name)
        if g is None:
            continue
        out[name] = None
        if is_sparse(g):
            rows = torch.unique(rows_of(g))
            if rows.numel() <= budget:
                budget -= rows.numel()
                out[name] = base64.b64encode(
                    rows.to("cpu", torch.int64).numpy().astype("<i8").tobytes()).decode()
    return out


def touched_again(s: Session, grads: Tensors, accumulated: dict[str, str | None] | None,
                  dtype: torch.dtype | None = None) -> Tensors:
    """A retried ``?return=touched`` step's answer: what the first answer held (:func:`touched`:
    the same parameters and rows, their values as the session holds them now), from the
    retry's gradients (the same as the step's: its fingerprint says so) and what the step
    touched of the gradients accumulated before it (:func:`touched_rows`, kept in the
    idempotency table)."""
    kept = accumulated or {}
    out: Tensors = {}
    for name, p in s.params.items():
        if name in kept:
            rows = kept[name]
            idx = (None if rows is None else torch.from_numpy(
                np.frombuffer(base64.b64decode(rows), dtype="<i8").astype(np.int64)))
        elif name in grads:
            g = grads[name]
            idx = torch.unique(rows_of(g)).cpu() if is_sparse(g) else None
        else:
            continue
        wire = narrowed_dtype(p, dtype)
        if idx is None:
            out[name] = p.detach().to("cpu", wire, copy=True)
        else:
            values = p.detach().index_select(0, idx.to(p.device)).to("cpu", wire)
            out[name] = row_sparse(idx, values, p.shape)
    return out


def touched(s: Session, total: Tensors, dtype: torch.dtype | None = None) -> Tensors:
    """What a step changed, for ``?return=touched``: the rows of each parameter stepped with a
    sparse gradient (each row once, in ascending order), every parameter stepped with a dense
    one whole; parameters without a gradient (which torch does not step) are left out.
    Narrowed to ``dtype`` where asked (``?params_dtype=``), as a whole answer is."""
    out: Tensors = {}
    for name, g in total.items():
        p = s.params[name]
        wire = narrowed_dtype(p, dtype)
        if is_sparse(g):
            idx = torch.unique(rows_of(g))
            values = p.detach().index_select(0, idx).to("cpu", wire)
            out[name] = row_sparse(idx.cpu(), values, p.shape)
        else:
            out[name] = p.detach().to("cpu", wire, copy=True)
    return out
