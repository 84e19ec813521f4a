"""Per-step metrics, computed on the session's device in the step's own pass.

Per param group: the gradient norm (of the gradient the optimizer stepped with: pushed plus
accumulated), the update norm ``||theta_after - theta_before||``, the parameter norm (after the
step), their ratio ``update_norm / param_norm``, and the lr the update used (after this step's
option changes and a staleness divisor, before the scheduler stepped). Per step: how many
non-finite gradient values there were (a skipped step's, or those a ``nonfinite: allow`` session
let through), and for parameter-server steps the staleness or the workers of the round.

Every norm is torch's L2 norm in the tensor's own dtype (``torch._foreach_norm``, as
``torch.nn.utils.clip_grad_norm_`` takes them; asking torch to accumulate in float64 instead
costs ~13x more on a CPU), of pieces of ``chunked.NORM_PIECE`` elements at fixed offsets: for
the gradient norm, of a group's gradients end to end in the group's order
(``norm_pieces.joined``: the same bits whether they came apart, as from a JSON body, or laid
end to end, as in a binary body and the log record a restart replays), and for the update and
parameter norms from the start of what is normed (a group's span of the flat block, a run of
adjacent tensors, a tensor). torch's float32 norm sums in float32 (off by ~4e-4 for 1e7
values), the pieces keep it to ~1e-7, and they make the values independent of how the step
chunks a parameter. The norms of all groups come back to the host in one device-to-host
copy (a small CPU session's few norms are read one by one, :func:`_one_piece_norms`: the same
exact values), and each group's norm is ``sqrt(sum of its parts' squared norms)`` in Python floats
(as ``clip_grad_norm_`` combines them).

The update norm needs the parameters as they were before the step: a copy of the session's flat
parameter block in a buffer the session keeps and reuses (when they tile one, as they do unless
a param group was added; else :func:`before_step` clones each tensor), and :func:`after_step`
subtracts in place and takes the norms. For a step whose norms go into its answer, parameters
the step takes in chunks (``app/engine/chunked.py``: large CPU ones) stay out of that copy:
the chunked step copies and subtracts each chunk while it is in the cache
(``chunked.Watch``) and norms its pieces, so a session keeps no second copy of its large
parameters. The copy for the next step is taken right after this one, on the device worker
once this step's answer has been handed over (``worker.after_job``), so that it runs while
the answer goes out, not on the next step's critical path; it is tagged
with the session's version, and :func:`before_step` copies again unless that is still the
session's version (every operation that changes parameter values bumps it; a session restored
after a failure is a new object with a new layout). Steps that run inline on the event loop's
thread (small sessions) take it on the loop's next turn (``app.after_answer.later``): after
their answer is written, before the loop reads another request. The copy, the subtraction
and the norms are the whole cost (``benchmarks/metrics_cost.py``); sessions created with
``"metrics": false`` skip them (their rows keep lr, scalars and the rest). A step whose
answer need not carry them (``?metrics=history``; ``RemoteOptimizer`` asks so through shared
memory) records its row with NaN norms and takes the subtraction and the norms after the
answer too (:func:`after_answer`), filling them into the row before any later operation on
the session.

Nothing here may fail a step: :func:`before_step` runs before ``optimizer.step()`` and
:func:`after_step` after it succeeded; each catches its own errors and the step then simply
carries no norms (logged once per session).
"""

from __future__ import annotations

import itertools
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from app.after_answer import later
from app.engine import chunked, norm_pieces
from app.engine.history import SCALARS_PREFIX
from app.engine.interface import json_float
from app.engine.worker import after_job
from app.errors import Invalid

if TYPE_CHECKING:
    from app.engine.session import Session, TakenNorms

log = logging.getLogger("optserve.engine")
_F64 = torch.float64
#: client scalars a step may carry
MAX_SCALARS = 16
MAX_SCALAR_NAME = 64
#: distinct client scalar names a session's history keeps a column for (each column holds a
#: value per row of the ring: 0.8 MB at the default 100,000 rows; a name per step would
#: otherwise grow the session, its snapshots and a history answer without bound)
MAX_SCALAR_NAMES = 128
#: the per-group norms a probe gives (beside ``lr``)
NORMS = ("grad_norm", "update_norm", "param_norm", "update_ratio")
#: where a step's norms go (``?metrics=``, the same-host message's ``metrics``): into the
#: answer and the history, or only into the history (taken after the answer)
SHOWN = ("answer", "history")


@dataclass
class Probe:
    """What :func:`before_step` keeps across ``optimizer.step()``."""

    #: per group, the indexes of its pieces in ``after`` and ``before``
    groups: list[list[int]]
    #: norms (0-d, on the device) whose squares sum to a group's squared gradient norm: of the
    #: pieces of its gradients end to end (``norm_pieces.joined``)
    grad_parts: list[torch.Tensor]
    #: the group each of ``grad_parts`` belongs to
    grad_owner: list[int]
    #: the live parameters and copies of them as they were before the step, in pieces: runs of
    #: adjacent tensors of the session's flat block (a group's whole span, as a rule), or
    #: tensors
    after: list[torch.Tensor]
    before: list[torch.Tensor]
    #: the layout whose scratch ``before`` views (its copy for the next step is taken after
    #: this one: :func:`take_ahead`); None when ``before`` are clones
    layout: Layout | None = None
    #: large parameters (``Layout.big``), normed piece by piece (the same values whichever
    #: way they are taken), each with its group: those the step
    #: leaves unchanged (no gradient), their values' norms only; those compared with a copy
    #: (group, parameter, copy: a layout's buffer or a clone)
    unchanged: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    copied: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    #: the chunked step's norms of the others (``chunked.Watch``), and per parameter (by id)
    #: its group
    watch: chunked.Watch | None = None
    watch_owner: dict[int, int] = field(default_factory=dict)


@dataclass
class StepMetrics:
    """One step's metrics: the step answer's ``metrics`` object and the history row."""

    groups: list[dict[str, float]]
    nonfinite: int = 0
    skipped: bool = False
    staleness: int | None = None
    workers: list[str] | None = None
    scalars: dict[str, float] = field(default_factory=dict)
    time: float = 0.0
    n: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": self.n, "time": self.time,
            "groups": [{k: json_float(v) for k, v in g.items()} for g in self.groups],
            "nonfinite": self.nonfinite,
        }
        if self.staleness is not None:
            out["staleness"] = self.staleness
        if self.workers is not None:
            out["workers"] = self.workers
        if self.scalars:
            out["scalars"] = {k: json_float(v) for k, v in self.scalars.items()}
        return out

    def row(self, step: int, version: int) -> dict[str, float]:
        """The history row (without ``n``, which the ring assigns)."""
        row: dict[str, float] = {"step": step, "version": version, "time": self.time,
                                 "skipped": 1.0 if self.skipped else 0.0,
                                 "nonfinite": self.nonfinite}
        if self.staleness is not None:
            row["staleness"] = self.staleness
        if self.workers is not None:
            row["workers"] = len(self.workers)
        row.update(group_columns(self.groups))
        for k, v in self.scalars.items():
            row[SCALARS_PREFIX + k] = v
        return row


@dataclass
class Layout:
    """How a session's parameters are copied and normed, worked out once and kept on the
    session (``Session.metrics_layout``) until its parameters change: the per-step Python work
    of a small session is then a few torch calls."""

    #: per group, the parameter names (as the optimizer's groups list them)
    names: list[list[str]]
    #: the parameters themselves and their data pointers (a tensor replaced or re-pointed makes
    #: a new layout)
    params: list[torch.Tensor]
    ptrs: list[int]
    #: per group, the indexes of its tensors in ``params``
    groups: list[list[int]]
    after: list[torch.Tensor]
    before: list[torch.Tensor]
    #: the copy per step: ``dst.copy_(src)`` for each pair, ``dst`` in ``scratch`` (None: one
    #: clone per tensor instead)
    copies: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    scratch: torch.Tensor | None = None
    #: per group, its names as a set and as a tuple (a step with a gradient for each: no
    #: per-name lookups)
    sets: list[frozenset[str]] = field(default_factory=list)
    tuples: list[tuple[str, ...]] = field(default_factory=list)
    #: the session version whose parameters ``scratch`` holds (:func:`take_ahead`); None when
    #: it holds anything else
    taken_at: int | None = None
    #: the parameters ``chunked`` may step in chunks (``chunked.may_chunk``), outside
    #: ``after`` and ``before``: (group, tensor, name) each; a step whose norms go into its
    #: answer takes their update norms in the chunked step itself (``chunked.Watch``), so no
    #: copy of them is kept
    big: list[tuple[int, torch.Tensor, str]] = field(default_factory=list)
    #: copies of ``big`` (one each) for steps whose norms are taken after the answer
    #: (``?metrics=history``), which take none of that work on the step's path: made by the
    #: first such step, copied ahead with the rest, dropped by a step that answers its norms
    big_before: list[torch.Tensor] | None = None
    #: ``chunked.settings()`` when ``big`` was worked out
    chunking: tuple[int, int] = (0, 0)
    #: per run of ``before`` (a layout that copies, without ``big``, whose every run is one
    #: norm piece): its group. :func:`_norms_into` then takes the norms in one pass of a few
    #: torch calls (:func:`_one_piece_norms`); None otherwise
    one_piece: list[int] | None = None

    def fits(self, s: Session, names: list[list[str]]) -> bool:
        if names != self.names or self.chunking != chunked.settings():
            return False
        params = s.params
        return (all(map(operator.is_, map(params.__getitem__, itertools.chain(*names)),
                        self.params))
                and list(map(torch.Tensor.data_ptr, self.params)) == self.ptrs)


def _layout(s: Session, names: list[list[str]]) -> Layout:
    """The parameters' layout (see :class:`Layout`).

    Parameters the step may take in chunks (``big``) stay out of the copy: the chunked step
    takes their norms, piece by piece (:class:`Probe`). When the others tile one storage (the
    session's flat block), they come as runs of adjacent tensors of one group and dtype (one
    per group in a flat block of one dtype), each one piece, copied into a scratch buffer the
    layout keeps (allocated once, reused every step: a fresh 40 MB block per step at 1e7
    parameters cost more in page faults than the copy itself); the norms then take a handful
    of torch calls, not three per tensor (1,000 small tensors: ~10 ms less per step). Else one
    clone per tensor, every step."""
    params = [s.params[n] for g in names for n in g]
    groups, i = [], 0
    for g in names:
        groups.append(list(range(i, i + len(g))))
        i += len(g)
    out = Layout(names, params, [p.data_ptr() for p in params], groups, params, [],
                 sets=[frozenset(g) for g in names], tuples=[tuple(g) for g in names],
                 chunking=chunked.settings())
    large = {i for i, p in enumerate(params)
             if chunked.may_chunk(s.optimizer, s.optimizer_name, p)}
    if large:
        flat = [n for g in names for n in g]
        out.big = [(gi, params[i], flat[i]) for gi, members in enumerate(groups)
                   for i in members if i in large]
        groups = [[i for i in members if i not in large] for members in groups]
        out.after = [params[i] for members in groups for i in members]
        index = {i: k for k, i in enumerate(i for members in groups for i in members)}
        out.groups = [[index[i] for i in members] for members in groups]
    kept = [i for members in groups for i in members]
    if not kept:
        out.copies = [] if large else None  # (only the large ones', for norms after answers)
        return out
    storage = params[kept[0]].untyped_storage()
    ptr = storage.data_ptr()
    spans: dict[int, tuple[int, int]] = {}
    for i in kept:
        p = params[i]
        if p.untyped_storage().data_ptr() != ptr or not p.is_contiguous():
            return out
        spans[i] = (int(p.storage_offset()) * p.element_size(), p.numel() * p.element_size())
    lo = min(a for a, _ in spans.values())
    hi = max(a + n for a, n in spans.values())
    span = torch.empty(0, dtype=torch.uint8, device=params[kept[0]].device).set_(
        storage, lo, (hi - lo,), (1,))
    alone = {i for i in kept if chunked.may_ever_chunk(s.optimizer_name, params[i])}
    return _runs(out, params, spans, groups, span, lo, alone)


def _runs(out: Layout, params: list[torch.Tensor], spans: dict[int, tuple[int, int]],
          groups: list[list[int]], span: torch.Tensor, lo: int, alone: set[int]) -> Layout:
    """``out`` with the parameters of ``groups`` (indexes into ``params``, whose byte ranges
    in ``span``'s storage are ``spans``) as runs: adjacent tensors of one group and dtype, one
    piece each, copied into a scratch of their size (views of a larger storage copy only
    their own bytes). Those in ``alone`` (another step chunk would chunk them) are runs of
    their own: normed in the pieces a chunked step takes."""
    runs: list[tuple[int, int, int, torch.dtype]] = []  # (group, start, end, dtype)
    last = -1
    for gi, members in enumerate(groups):
        for i in members:
            a, n = spans[i]
            dtype = params[i].dtype
            if (runs and runs[-1][0] == gi and runs[-1][2] == a and runs[-1][3] == dtype
                    and i not in alone and last not in alone):
                runs[-1] = (gi, runs[-1][1], a + n, dtype)
            else:
                runs.append((gi, a, a + n, dtype))
            last = i
    starts, total = [], 0
    for _, a, b, _ in runs:
        starts.append(total)
        total += -(-(b - a) // 16) * 16  # each run's copy aligned for any dtype
    raw = torch.empty(total, dtype=torch.uint8, device=span.device)
    out.scratch, out.copies, out.after, out.before = raw, [], [], []
    out.groups = [[] for _ in groups]
    for (gi, a, b, dtype), start in zip(runs, starts, strict=True):
        src, dst = span[a - lo:b - lo], raw[start:start + b - a]
        out.copies.append((dst, src))
        out.groups[gi].append(len(out.after))
        out.after.append(src.view(dtype))
        out.before.append(dst.view(dtype))
    if not out.big and all(b.numel() <= min(chunked.piece(), FUSED) for b in out.before):
        out.one_piece = [0] * len(out.before)
        for gi, members in enumerate(out.groups):
            for i in members:
                out.one_piece[i] = gi
    return out


def before_step(s: Session, grads: dict[str, torch.Tensor],
                known: TakenNorms | None = None, splits: list[chunked.Split] | None = None,
                answered: bool = True) -> Probe | None:
    """Gradient norms and a copy of the parameters, before ``optimizer.step()``; None when the
    session's metrics are off (or this fails: the step goes on without norms). ``known``:
    norms the non-finite check already took (of the pieces of a gradient, or of a run of
    gradients laid end to end: a group's when its gradients are that run), not taken again.
    ``splits``: the parameters the step takes in chunks (``chunked.plan``); the probe's
    ``watch`` is for the step to fill when the norms go into the answer (``answered``). Norms
    taken after the answer (``?metrics=history``) come from a copy of every parameter
    instead: the step then does none of that work, and its answer goes out sooner."""
    if not s.metrics_on:
        return None
    try:
        with torch.no_grad():
            names = [g["param_names"] for g in s.optimizer.param_groups]
            layout = s.metrics_layout
            if not isinstance(layout, Layout) or not layout.fits(s, names):
                layout = s.metrics_layout = _layout(s, names)
            if (layout.big and layout.copies is not None
                    and (layout.big_before is None) != answered):
                # a copy of the large parameters for norms after the answer, or none
                layout.big_before = (None if answered else
                                     [torch.empty_like(p) for _, p, _ in layout.big])
                layout.taken_at = None
            runs = known.runs if known is not None else {}
            parts: list[torch.Tensor] = []
            owner: list[int] = []
            todo: list[torch.Tensor] = []
            todo_owner: list[int] = []
            for gi, group_names in enumerate(names):
                present = (layout.tuples[gi] if grads.keys() >= layout.sets[gi]
                           else tuple(n for n in group_names if grads.get(n) is not None))
                taken = runs.get(present)  # the check's, when they were laid so
                if taken is not None:
                    parts.extend(taken)
                    owner.extend([gi] * len(taken))
                    continue
                # a row-sparse gradient's norm is its rows' once duplicates are summed (the
                # gradient the optimizer steps with): its coalesced values
                cut = norm_pieces.joined([grads[n].coalesce()._values()
                                          if grads[n].layout != torch.strided else grads[n]
                                          for n in present])
                todo.extend(cut)
                todo_owner.extend([gi] * len(cut))
            if todo:
                parts.extend(torch._foreach_norm(todo))
                owner.extend(todo_owner)
            if layout.copies is not None:
                if layout.taken_at != s.version:
                    _copy(layout)
                layout.taken_at = None  # the step's subtraction overwrites it
                probe = Probe(layout.groups, parts, owner, layout.after, layout.before,
                              layout)
            else:
                before = [p.detach().clone() for p in layout.after]
                probe = Probe(layout.groups, parts, owner, layout.after, before)
            if layout.big:
                _sort_big(probe, layout, grads, splits or [])
            return probe
    except Exception as exc:  # noqa: BLE001 - metrics never fail a step
        _warn(s, exc)
        return None


def _sort_big(probe: Probe, layout: Layout, grads: dict[str, torch.Tensor],
              splits: list[chunked.Split]) -> None:
    """The large parameters into ``probe``: one without a gradient (unchanged) for its norm
    only; one the step takes in chunks to its watch when the norms go into the answer; the
    others compared with a copy: the layout's (norms after the answer), else a clone (a step
    that takes the parameter whole after all: its gradient or its state of another form)."""
    watched = {id(sp.param) for sp in splits} if layout.big_before is None else set()
    for j, (gi, p, name) in enumerate(layout.big):
        if grads.get(name) is None:
            probe.unchanged.append((gi, p))
        elif id(p) in watched:
            probe.watch_owner[id(p)] = gi
        elif layout.big_before is not None:  # (made only for a layout that copies)
            probe.copied.append((gi, p, layout.big_before[j]))
        else:
            probe.copied.append((gi, p, p.detach().clone()))
    if probe.watch_owner:
        probe.watch = chunked.Watch()


def after_step(s: Session, probe: Probe | None, lrs: list[float], nonfinite: int
               ) -> list[dict[str, float]]:
    """Per group: lr, and with a probe the norms (one device-to-host copy for all of them)."""
    groups: list[dict[str, float]] = [{"lr": lr} for lr in lrs]
    if probe is not None and _norms_into(s, probe, groups):
        layout = probe.layout
        # (an inline step, on the event loop's thread: once its answer is written)
        if layout is not None and not after_job(lambda: take_ahead(s, layout)):
            later(take_ahead, s, layout)
    return groups


def group_columns(groups: list[dict[str, float]]) -> dict[str, float]:
    """Per-group values as history columns: ``{"lr.0": ..., "grad_norm.1": ...}``."""
    return {f"{k}.{i}": v for i, g in enumerate(groups) for k, v in g.items()}


def pending(lrs: list[float]) -> list[dict[str, float]]:
    """Per group: lr, and NaN for the norms :func:`after_answer` fills in later (the row has
    their columns from the start)."""
    return [{"lr": lr, **dict.fromkeys(NORMS, math.nan)} for lr in lrs]


def after_answer(s: Session, probe: Probe, lrs: list[float], n: int | None) -> None:
    """The norms of a step whose answer does not carry them (``?metrics=history``): taken on
    the device worker once the answer has been handed over (``worker.after_job``: before any
    later operation, a history query included, so that no one sees the row without them),
    then written into the step's history row ``n`` (None: it has none), and the copy for the
    next step is taken. A step that runs inline (a small session, on the event loop's thread)
    takes them now. The values are those :func:`after_step` would take: the same tensors
    (nothing changes the parameters before the next job), the same torch calls."""

    def finish() -> None:
        groups: list[dict[str, float]] = [{"lr": lr} for lr in lrs]
        if _norms_into(s, probe, groups, refill=True) and n is not None:
            s.history.fill(n, group_columns(groups))
        if deferred and probe.layout is not None:
            take_ahead(s, probe.layout)

    deferred = after_job(finish)
    if not deferred:
        finish()


#: tensors of more elements than this (16 MiB of float32: with its copy, past a CPU's L3
#: cache) are subtracted, normed and refilled chunk by chunk (:func:`_in_chunks`): each
#: chunk's passes then run in the cache, not from memory. Smaller ones stay in the cache
#: anyway, and there the chunks' own calls cost more than they save
FUSED = 1 << 22
#: the chunk :func:`_in_chunks` takes: 1 MiB of float32 per tensor, as the chunked step's
#: (chunks of :data:`FUSED` elements, 16 MiB per tensor, left the cache between their passes)
FUSED_CHUNK = chunked.DEFAULT_CHUNK


def _norms_into(s: Session, probe: Probe, groups: list[dict[str, float]],
                refill: bool = False) -> bool:
    """Subtract in place and take the norms into ``groups``; False (logged once) on failure.

    ``refill`` (norms taken after the answer, :func:`after_answer`, which would then take the
    copy for the next step): when ``probe`` compares with its layout's buffers (the session's
    current layout), they are refilled with the parameters as they are now, the copy
    :func:`take_ahead` would take, as each is done with: tensors past :data:`FUSED` chunk by
    chunk, each chunk's subtraction, norms and copy while it is in the cache (three passes over
    memory where the subtraction, the norms and the copy took seven), and the layout is then
    tagged as taken at the session's version. Norms that go into the answer leave the copy to
    :func:`take_ahead`, after the answer. The same torch calls on the same pieces: the same
    values."""
    layout = probe.layout
    refill = (refill and layout is not None and layout is s.metrics_layout
              and layout.copies is not None)
    try:
        if (layout is not None and layout.one_piece is not None
                and probe.before is layout.before and probe.watch is None
                and not probe.copied and not probe.unchanged):
            _one_piece_norms(s, probe, layout.one_piece, groups, refill)
            return True
        with torch.no_grad():
            large = {i for i, b in enumerate(probe.before) if b.numel() > FUSED}
            small = [i for i in range(len(probe.before)) if i not in large]
            if small:
                torch._foreach_sub_([probe.before[i] for i in small],
                                    [probe.after[i] for i in small])
            tensors: list[torch.Tensor] = []
            #: per norm taken: its group, and whether it is an update's norm
            tail: list[tuple[int, bool]] = []
            taken: list[torch.Tensor] = []  # norms taken chunk by chunk, and theirs
            taken_tail: list[tuple[int, bool]] = []

            def add(ts: list[torch.Tensor], gi: int, update: bool) -> None:
                tensors.extend(ts)
                tail.extend([(gi, update)] * len(ts))

            def chunks(before: torch.Tensor, after: torch.Tensor, gi: int, fill: bool) -> None:
                update, values = _in_chunks(before, after, fill)
                taken.extend(update)
                taken.extend(values)
                taken_tail.extend([(gi, True)] * len(update) + [(gi, False)] * len(values))
            for gi, members in enumerate(probe.groups):
                for i in members:
                    if i in large:
                        chunks(probe.before[i], probe.after[i], gi, refill)
                    else:
                        add(chunked.pieces(probe.before[i]), gi, True)
                        add(chunked.pieces(probe.after[i]), gi, False)
            kept = {id(t) for t in layout.big_before or ()} if refill and layout else set()
            for gi, p, before in probe.copied:
                chunks(before, p, gi, id(before) in kept)  # (a clone is not kept)
            spans: list[tuple[int, torch.Tensor, int, int]] = []  # unchanged: their values'
            for gi, p in probe.unchanged:
                start = len(tail)
                add(chunked.pieces(p), gi, False)
                spans.append((gi, p, start, len(tail)))
            if probe.watch is not None and probe.watch.failed:
                raise RuntimeError("the chunked step could not take its norms")
            norms = list(torch._foreach_norm(tensors)) if tensors else []
            norms.extend(taken)
            tail.extend(taken_tail)
            if refill and small:  # (the norms above are taken: on a GPU, in stream order)
                torch._foreach_copy_([probe.before[i] for i in small],
                                     [probe.after[i] for i in small])
            if probe.watch is not None:  # the chunked step's, piece by piece
                for got, update in ((probe.watch.update, True), (probe.watch.param, False)):
                    for pid, gi in probe.watch_owner.items():
                        norms.extend(got[pid])
                        tail.extend([(gi, update)] * len(got[pid]))
            every = [*probe.grad_parts, *norms]
            if len({t.dtype for t in every}) > 1:
                every = [t.to(_F64) for t in every]
            # float32 norms become Python floats exactly (no float64 tensor needed)
            values = torch.stack(every).cpu().tolist() if every else []
        if refill and layout is not None:
            # every buffer take_ahead fills holds the parameters now: the runs and the copies
            # of the large parameters the step changed were refilled above, those of the ones
            # it left unchanged were not touched (before_step made every copy current)
            layout.taken_at = s.version
        k = len(probe.grad_parts)
        squares: list[list[float]] = [[] for _ in groups]
        for v, gi in zip(values, probe.grad_owner, strict=False):
            squares[gi].append(v * v)
        updates: list[list[float]] = [[] for _ in groups]
        params: list[list[float]] = [[] for _ in groups]
        rest = values[k:]
        for v, (gi, update) in zip(rest, tail, strict=True):
            (updates if update else params)[gi].append(v * v)
        for gi, p, start, end in spans:
            if not all(map(math.isfinite, rest[start:end])) and not bool(torch.isfinite(p).all()):
                updates[gi].append(math.nan)  # after - before: NaN where a value is not finite
        for gi, out in enumerate(groups):
            _put(out, math.sqrt(math.fsum(squares[gi])), math.sqrt(math.fsum(updates[gi])),
                 math.sqrt(math.fsum(params[gi])))
        return True
    except Exception as exc:  # noqa: BLE001 - metrics never fail a step
        _warn(s, exc)
        return False


def _one_piece_norms(s: Session, probe: Probe, owner: list[int],
                     groups: list[dict[str, float]], refill: bool) -> None:
    """:func:`_norms_into` for a probe of its layout's runs only, each one norm piece (a small
    session): the same torch calls on the same tensors (a run's one piece is the run itself),
    without the per-tensor work of cutting pieces. ``owner``: each run's group. A group's norm
    is the ``fsum`` of its parts' squares, whatever their order: the same values."""
    before, after = probe.before, probe.after
    with torch.no_grad():
        torch._foreach_sub_(before, after)
        every = [*probe.grad_parts, *torch._foreach_norm([*before, *after])]
        if not every or every[0].device.type == "cpu":
            # (each norm's value as a Python float, exactly, whatever its float dtype: what
            # the stack's copy gives, without it)
            values = [t.item() for t in every]
        else:  # (one device-to-host copy)
            if len({t.dtype for t in every}) > 1:
                every = [t.to(_F64) for t in every]
            values = torch.stack(every).cpu().tolist()
        if refill:  # (the norms above are taken: on a GPU, in stream order)
            torch._foreach_copy_(before, after)
    if refill:
        assert probe.layout is not None
        probe.layout.taken_at = s.version
    k, n = len(probe.grad_parts), len(before)
    squares: list[list[float]] = [[] for _ in groups]
    for v, gi in zip(values, probe.grad_owner, strict=False):
        squares[gi].append(v * v)
    updates: list[list[float]] = [[] for _ in groups]
    params: list[list[float]] = [[] for _ in groups]
    for i, gi in enumerate(owner):
        u, p = values[k + i], values[k + n + i]
        updates[gi].append(u * u)
        params[gi].append(p * p)
    for gi, out in enumerate(groups):
        _put(out, math.sqrt(math.fsum(squares[gi])), math.sqrt(math.fsum(updates[gi])),
             math.sqrt(math.fsum(params[gi])))


def _in_chunks(before: torch.Tensor, after: torch.Tensor, refill: bool
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``before -= after`` and the norms of the pieces (``chunked.pieces``) of the update and
    of ``after``, chunk by chunk (each a whole number of pieces from the start, so its pieces
    are the tensor's); with ``refill``, each chunk of ``before`` gets ``after``'s values once
    normed (what :func:`take_ahead` copies)."""
    b, a = before.reshape(-1), after.reshape(-1)
    step = max(1, FUSED_CHUNK // chunked.piece()) * chunked.piece()
    if not (b.is_contiguous() and a.is_contiguous()) or b.data_ptr() == a.data_ptr():
        step = max(1, b.numel())  # (whole, as the one-piece path: pieces() copies strided values)
    update_norms: list[torch.Tensor] = []
    value_norms: list[torch.Tensor] = []
    for start in range(0, b.numel(), step):
        bc, ac = b[start:start + step], a[start:start + step]
        bc.sub_(ac)
        update, values = chunked.pieces(bc), chunked.pieces(ac)
        norms = torch._foreach_norm([*update, *values])
        update_norms.extend(norms[:len(update)])
        value_norms.extend(norms[len(update):])
        if refill:
            bc.copy_(ac)
    return update_norms, value_norms


def _put(out: dict[str, float], g_norm: float, u_norm: float, p_norm: float) -> None:
    out["grad_norm"] = g_norm
    out["update_norm"] = u_norm
    out["param_norm"] = p_norm
    out["update_ratio"] = _ratio(u_norm, p_norm)


def take_ahead(s: Session, layout: Layout) -> None:
    """Copy the parameters into ``layout``'s scratch for the next step's update norm, tagged
    with the session's version (nothing when the session has another layout by now, or its
    metrics are off)."""
    if (s.metrics_layout is not layout or not s.metrics_on
            or layout.taken_at == s.version):  # (a replay defers one per step it applies)
        return
    try:
        copy_ahead(layout)
        layout.taken_at = s.version
    except Exception as exc:  # noqa: BLE001 - metrics never fail a step
        layout.taken_at = None
        _warn(s, exc)


def copy_ahead(layout: Layout) -> None:
    """The copy :func:`take_ahead` takes."""
    _copy(layout)


def _copy(layout: Layout) -> None:
    if torch.is_grad_enabled():
        with torch.no_grad():
            _copy_now(layout)
    else:  # (before_step's own no_grad: not entered twice)
        _copy_now(layout)


def _copy_now(layout: Layout) -> None:
    assert layout.copies is not None
    for dst, src in layout.copies:
        dst.copy_(src)
    if layout.big_before is not None:
        for copy, (_, p, _) in zip(layout.big_before, layout.big, strict=True):
            copy.copy_(p)


def count_nonfinite(tensors: list[torch.Tensor]) -> int:
    """Non-finite values in ``tensors`` (those already known to hold some)."""
    if not tensors:
        return 0
    try:
        with torch.no_grad():
            return int(torch.stack([(~torch.isfinite(t)).sum() for t in tensors]).sum().item())
    except Exception:  # noqa: BLE001 - metrics never fail a step
        return 0


def merged(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """A sharded step's ``metrics`` from its shards' (``StepMetrics.to_json`` each; the shards
    step in lockstep, so ``n``, the lrs, staleness and scalars agree): per group, each norm the
    square root of the sum of the shards' squares (a shard holding none of a group's
    parameters gives 0), its ratio again, and the shards' non-finite counts added. Equal to
    the unsharded session's within float rounding (each shard's norm was rounded once more).
    None when a shard gave none."""
    if not parts or any(p is None for p in parts):
        return None
    first = parts[0]
    assert first is not None
    out = dict(first)
    out["nonfinite"] = sum(int(p["nonfinite"]) for p in parts if p is not None)
    groups = []
    for gi, g in enumerate(first["groups"]):
        group = dict(g)
        if "grad_norm" in g:
            norms = [math.sqrt(math.fsum(_read(p["groups"][gi][k]) ** 2 for p in parts
                                         if p is not None))
                     for k in ("grad_norm", "update_norm", "param_norm")]
            group.update(zip(("grad_norm", "update_norm", "param_norm"),
                             map(json_float, norms), strict=True))
            group["update_ratio"] = json_float(_ratio(norms[1], norms[2]))
        groups.append(group)
    out["groups"] = groups
    return out


def _read(x: Any) -> float:
    """A metrics value as ``json_float`` wrote it: a float, or ``{"$float": "inf"}``."""
    return float(x["$float"]) if isinstance(x, dict) else float(x)


def _ratio(update: float, param: float) -> float:
    if param > 0 or math.isnan(param):
        return update / param if param > 0 else math.nan
    return 0.0 if update == 0 else math.inf


def _warn(s: Session, exc: Exception) -> None:
    if not getattr(s, "_metrics_warned", False):
        s._metrics_warned = True  # type: ignore[attr-defined]
        log.warning("metrics of session %s could not be computed (the steps go on without "
                    "them): %s: %s", s.id, type(exc).__name__, exc)


def mean_scalars(parts: list[dict[str, float]]) -> dict[str, float]:
    """Several pushes' scalars for one step: per name, the mean of the values sent."""
    sums: dict[str, list[float]] = {}
    for part in parts:
        for k, v in part.items():
            sums.setdefault(k, []).append(v)
    return {k: math.fsum(vs) / len(vs) for k, vs in sums.items()}


def check_scalar_names(s: Session, scalars: dict[str, float] | None,
                       field: str = "scalars", gathered: frozenset[str] = frozenset()) -> None:
    """422 ``invalid_scalars`` when ``scalars`` would bring the session's distinct scalar
    names (its history's columns and those pushed for the next step; ``gathered``: those of
    the pushes a sync round holds for it) past :data:`MAX_SCALAR_NAMES`; names it has already
    are always taken."""
    if not scalars or all(s.history.has(SCALARS_PREFIX + name) or name in s.pending_scalars
                          or name in gathered for name in scalars):
        return  # (names it has: the usual step, not a scan of every column)
    known = {name[len(SCALARS_PREFIX):] for name in s.history.fields
             if name.startswith(SCALARS_PREFIX)}
    known.update(s.pending_scalars)
    known.update(gathered)
    new = [name for name in scalars if name not in known]
    if len(known) + len(new) > MAX_SCALAR_NAMES:
        raise Invalid(f"this session keeps at most {MAX_SCALAR_NAMES} distinct scalar names "
                      f"and has {len(known)}: {new[0]!r} would be another (its history keeps "
                      "a column per name; send a value per step under the same names, e.g. "
                      "loss, not loss_<step>); nothing was applied", code="invalid_scalars",
                      field=f"{field}.{new[0]}", limit=MAX_SCALAR_NAMES)


_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./:-")


def check_scalars(obj: object, field: str = "scalars",
                  session: Session | None = None) -> dict[str, float]:
    """A client's scalars for a step: ``{name: number}``, at most :data:`MAX_SCALARS`, names of
    1-64 letters, digits and ``_ . / : -`` (starting with a letter or ``_``), finite numbers;
    with ``session``, new names only while it has room (:func:`check_scalar_names`)."""
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise Invalid("scalars must be an object of numbers, e.g. {\"loss\": 0.25}",
                      code="invalid_scalars", field=field)
    if len(obj) > MAX_SCALARS:
        raise Invalid(f"at most {MAX_SCALARS} scalars per step, got {len(obj)}",
                      code="invalid_scalars", field=field, limit=MAX_SCALARS)
    out: dict[str, float] = {}
    for name, value in obj.items():
        if not (isinstance(name, str) and 0 < len(name) <= MAX_SCALAR_NAME
                and set(name) <= _NAME_OK and (name[0].isalpha() or name[0] == "_")):
            raise Invalid(f"scalar name {str(name)!r:.80} must be 1-{MAX_SCALAR_NAME} letters, "
                          "digits or '_./:-', starting with a letter or '_'",
                          code="invalid_scalars", field=f"{field}.{str(name)[:80]}")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise Invalid(f"scalar {name!r} must be a finite number", code="invalid_scalars",
                          field=f"{field}.{name}")
        out[name] = float(value)
    if session is not None:
        check_scalar_names(session, out, field)
    return out
