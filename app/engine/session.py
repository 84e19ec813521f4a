"""One optimizer session: named parameters on the device, a real torch optimizer, an optional
scheduler and a gradient accumulator, plus what it needs to answer retries (its idempotency
table). Operations (:mod:`app.engine.ops`) change it; this module holds its construction, its
views, the checks operations share, and its snapshot form.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from app.engine import (
    chunked,
    creation_tokens,
    norm_pieces,
    optimizers,
    option_values,
    ps,
    schedulers,
    shared_options,
    sparse,
    state_dicts,
    state_order,
)
from app.engine.history import History
from app.engine.idempotency import IdempotencyTable
from app.engine.interface import (
    Durability,
    GroupSpec,
    NonFinitePolicy,
    SessionInfo,
    Tensors,
)
from app.errors import Conflict, Invalid
from app.wire.dtypes import DTYPE_NAMES
from app.wire.integers import INT64
from app.wire.safetensors_body import (
    BodyTensors,
    PackedTensors,
    header_entries,
    narrowed_dtype,
    pack,
    view_plan,
)

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME = 512
#: names the wire formats reserve (a safetensors header key; a sparse tensor's parts)
RESERVED_NAMES = frozenset({"__metadata__"})
#: history rows a session keeps unless told otherwise (OPTSERVE_HISTORY_STEPS)
DEFAULT_HISTORY = 100_000
#: the dtype option checks assume for a group without parameters (a shard of a sharded session
#: whose part of the group is empty): the widest, so it never refuses what a shard holding the
#: group's parameters accepts
EMPTY_GROUP_DTYPE = torch.float64


def check_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _ID_RE.fullmatch(session_id):
        raise Invalid("id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                      "starting with a letter or digit", code="invalid_id", field="id")
    return session_id


def check_param_name(name: object, field: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
        raise Invalid(f"a parameter name must be a string of 1-{MAX_NAME} characters",
                      code="invalid_name", field=field)
    if name in RESERVED_NAMES:
        raise Invalid(f"{name!r} is reserved by the wire formats; choose another parameter name",
                      code="invalid_name", field=field)
    return name


def lr_value(lr: Any) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


@dataclass
class TakenNorms:
    """L2 norms of gradients the non-finite check took (the per-step metrics reuse them): per
    run of dense tensors laid end to end, or per tensor, by their names in that order, the
    norms of its pieces (``norm_pieces.joined``: what the metrics take of a group's
    gradients)."""

    runs: dict[tuple[str, ...], list[torch.Tensor]] = field(default_factory=dict)
    #: the session's param groups' names, in order (the caller's): gradients that lie apart
    #: are normed per group, end to end in its order, as the metrics take them
    groups: Sequence[Sequence[str]] = ()


def _piece_norms(flat: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The norms of a (non-empty) run's pieces, and a 0-dim total that is finite only when
    they all are (or a finite overflow: only a suspect)."""
    if 0 < flat.numel() <= chunked.piece() and flat.dim() == 1 and flat.is_contiguous():
        parts = list(torch._foreach_norm([flat]))  # (its one piece: the run itself)
        return parts, parts[0]
    parts = norm_pieces.norms([flat])
    return parts, parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def _units(rest: list[str], dense: set[str], norms: TakenNorms | None) -> list[list[str]]:
    """The tensors the non-finite check reduces apart, in units of one reduction: with
    ``norms``, each group's dense ones end to end in the group's order (its metrics' pieces);
    the others one by one."""
    if norms is None or not norms.groups:
        return [[n] for n in rest]
    left = set(rest)
    units = []
    for names in norms.groups:
        unit = [n for n in names if n in left and n in dense]
        if unit:
            units.append(unit)
            left.difference_update(unit)
    return units + [[n] for n in rest if n in left]


def _adjacent_runs(placed: Iterable[list[tuple[int, int, str]]]
                   ) -> Iterator[list[tuple[int, int, str]]]:
    """Of each list of (data pointer, bytes, name), the runs of two or more laid end to end
    (each starting where the one before ends), in pointer order."""
    for entries in placed:
        if len(entries) < 2:
            continue
        entries.sort()
        run = [entries[0]]
        for entry in entries[1:]:
            if entry[0] == run[-1][0] + run[-1][1]:
                run.append(entry)
                continue
            if len(run) > 1:
                yield run
            run = [entry]
        if len(run) > 1:
            yield run


def _runs_finite(body: BodyTensors, norms: TakenNorms | None) -> bool:
    """Whether every value of ``body`` is finite, one reduction per run of its tensors laid end
    to end (as decoding cut them); with ``norms``, the norms of the runs' pieces are kept there
    as :meth:`Session.nonfinite_names` keeps them. False: some run is not (the full check then
    names the tensors)."""
    taken: list[tuple[tuple[str, ...], list[torch.Tensor]]] = []
    for flat, names in body.runs:
        if norms is not None and flat.is_floating_point():
            parts, total = _piece_norms(flat)
            taken.append((names, parts))
        else:
            total = flat.sum()
        if not math.isfinite(total.item()):
            return False
    if norms is not None:
        norms.runs.update(taken)
    return True


def stale_binding(name: str) -> Conflict:
    """409 ``binding_stale``: the buffers a same-host binding holds for ``name`` no longer fit
    the session's parameter of that name (the session was deleted and made again under its id
    since they were bound)."""
    return Conflict(f"the buffers bound for this session no longer fit its parameter "
                    f"{name!r:.80} (the session changed since they were bound): bind again",
                    code="binding_stale", field="binding")


class Session:
    def __init__(
        self,
        session_id: str,
        optimizer_name: str,
        cls: type[torch.optim.Optimizer],
        optimizer: torch.optim.Optimizer,
        params: dict[str, torch.Tensor],
        defaults: dict[str, Any],
        device: torch.device,
        nonfinite: NonFinitePolicy,
    ) -> None:
        self.id = session_id
        #: the id clients know the session by, as its paths name it (a shard's: its sharded
        #: session's; the host sets it): what a problem's detail names
        self.shown_id = session_id
        self.optimizer_name = optimizer_name
        self.cls = cls
        self.optimizer = optimizer
        self.params = params
        self.defaults = defaults
        self.device = device
        self.nonfinite: NonFinitePolicy = nonfinite
        self.scheduler: schedulers.Scheduler | None = None
        self.scheduler_spec: schedulers.SchedulerSpec | None = None
        self.accum: dict[str, torch.Tensor] = {}
        self.version = 0
        self.step_count = 0
        #: every change applied to the session, counted (each operation but a push or a
        #: zero_grad: steps, imports, overwrites, option changes, scheduler steps, ...): a
        #: conditional import names the one it was read at (``base_revision``)
        self.revision = 0
        #: restored from a snapshot written before revisions were counted (it holds none):
        #: its revision counts only what was logged after that snapshot. A sharded session's
        #: shards are put in step at start (:meth:`EmbeddedHost.align_old_revisions
        #: <app.engine.host.EmbeddedHost.align_old_revisions>`)
        self.revision_unknown = False
        #: minted with this object (a create or a restore; never stored): the state tag's
        #: second half (:mod:`app.engine.creation_tokens`)
        self.token = creation_tokens.minted()
        self.durability: Durability = "memory"
        self.ps = ps.PsConfig()  # parameter-server options (sync rounds, bounded staleness)
        #: the version the latest overwrite or state import left the session at, and which of
        #: the two it was (``overwrite``/``import``): gradients computed before it are refused
        #: by a request naming their base version (:func:`app.engine.ops.gradients.staleness_of`)
        self.replaced: tuple[int, str] | None = None
        self.idem = IdempotencyTable()
        #: the idempotency key of the create that made this session (tenant-wide retries)
        self.created_by: tuple[str, str] | None = None
        #: each group's options as the create or add_param_group gave them (a restore rebuilds
        #: with these, then loads the state: the running values may be ones torch's
        #: constructor refuses, e.g. an lr a scheduler drove below zero)
        self.group_spec_options: list[dict[str, Any]] = []
        #: per-step norms on the device (``"metrics": false`` on create or PATCH turns them off)
        self.metrics_on = True
        #: how the metrics copy and norm the parameters, with the buffer the update norm's copy
        #: reuses every step (made on the first step with metrics: app.engine.metrics.Layout)
        self.metrics_layout: Any = None
        #: per-step metrics, a bounded ring (app.engine.history)
        self.history = History(DEFAULT_HISTORY)
        #: client scalars pushed with /grads for the next step: name -> [sum, count]
        self.pending_scalars: dict[str, list[float]] = {}
        #: the header of the last body check_tensors passed whole, and the parameter tensors
        #: it was checked against (:meth:`known_body`)
        self.known_header: tuple[bytes, list[torch.Tensor]] | None = None
        #: how its parameters are copied out with one copy (:class:`BlockPlan`), kept
        self.block_plan: BlockPlan | None = None
        #: the parameters with no elements, for as many parameters as counted
        #: (:meth:`empty_params`)
        self._empty: tuple[int, list[str]] | None = None
        #: a shard's stamps on its optimizer's per-parameter states: name -> (the version when
        #: the state was made, its place among those made then); None for any other session
        #: (:mod:`app.engine.state_order`)
        self.state_order: dict[str, tuple[int, int]] | None = None
        self.seq = 0  # records logged for this session, ever (persistence)
        #: its parameters and optimizer state entries when last counted for the garbage
        #: collector's settler (``EmbeddedHost._settle``)
        self.settled_tensors = 0
        self.seq_at_snapshot = 0
        self.snapshot_time = 0.0

    # ----------------------------------------------------------------- construction
    @classmethod
    def build(
        cls_,
        session_id: str,
        optimizer_name: str,
        groups: list[GroupSpec],
        options: dict[str, Any],
        scheduler: dict[str, Any] | None,
        nonfinite: NonFinitePolicy,
        device: torch.device,
        *,
        allow_empty: bool = False,
        request: bool = False,
    ) -> Session:
        """Validate a create completely (torch's own checks on a throwaway first) and build the
        session; raises before anything exists. A group may have no parameters (torch takes
        one: a weight-decay split of a model without biases leaves one empty), the session
        needs some; ``allow_empty``: none at all (the shards of a sharded session keep every
        group, with the part of it they hold). ``request``: a create asked for now, not one
        replayed from the log, so also refused what servers before these checks took (the
        keys a scheduler puts in the groups: :func:`_check_scheduler_groups`)."""
        cls = optimizers.optimizer_class(optimizer_name)
        defaults = optimizers.normalize_options(cls, options, "options")
        if not groups:
            raise Invalid("give at least one param group with at least one parameter",
                          code="invalid_params", field="param_groups")
        group_opts: list[dict[str, Any]] = []
        seen: set[str] = set()
        dtypes = []
        for i, group in enumerate(groups):
            where = f"param_groups.{i}"
            group_opts.append(optimizers.normalize_options(cls, group.options, where))
            for name, t in group.params.items():
                check_param_name(name, f"{where}.params")
                if name in seen:
                    raise Invalid(f"parameter {name!r:.60} appears twice", code="invalid_params",
                                  field=f"{where}.params.{name}")
                seen.add(name)
                check_param_tensor(name, t, f"{where}.params.{name}")
            dtypes.append(group_dtype(group.params))
        if not seen and not allow_empty:  # (groups without parameters: torch takes them)
            raise Invalid("give at least one parameter (a param group may have none, as "
                          "torch's may, but not every group)", code="invalid_params",
                          field="param_groups.0.params" if len(groups) == 1 else "param_groups")
        base = {k: f"options.{k}" for k in defaults}
        given = [{k: f"param_groups.{i}.{k}" for k in g} for i, g in enumerate(group_opts)]
        fields = {k: v for f in (base, *given) for k, v in f.items()}
        for i, g in enumerate(group_opts):  # (named where the client gave it)
            optimizers.check_overflow(g, dtypes[i], f"param_groups.{i}", tensors=request)
            optimizers.check_overflow({k: v for k, v in defaults.items() if k not in g},
                                      dtypes[i], "options", tensors=request)
        optimizers.probe(cls, defaults, group_opts, dtypes, device, fields, group_fields={
            i: (mine, {**base, **mine}) for i, mine in enumerate(given)})
        sched_spec = schedulers.parse_spec(scheduler) if scheduler is not None else None
        if sched_spec is not None:
            def make_probe() -> torch.optim.Optimizer:
                tiny = []
                for opts, dtype in zip(group_opts, dtypes, strict=True):
                    t = torch.full((2, 2), 0.5, dtype=dtype, device=device)
                    t.grad = optimizers.probe_grad(cls, t, 0.25)
                    tiny.append({"params": [t], **optimizers.fresh(opts)})
                return cls(tiny, **optimizers.fresh(defaults))
            schedulers.probe(sched_spec, make_probe, "scheduler", check_built=(
                (lambda opt, sched: _check_scheduler_built(cls, opt, sched, scheduler, dtypes))
                if request else None), children=request)

        params = flat_block({n: t for g in groups for n, t in g.params.items()}, device)
        torch_groups = [torch_group([(n, params[n]) for n in group.params], opts)
                        for group, opts in zip(groups, group_opts, strict=True)]
        try:
            optimizer = cls(torch_groups, **defaults)
        except optimizers.TORCH_ERRORS as exc:
            raise Invalid(str(exc), code="invalid_option",
                          field=optimizers.blame(str(exc), fields, "options")) from None
        if request:
            optimizers.refuse_unwritable_ints(optimizer, defaults, fields)
            if cls is torch.optim.Muon:
                for g, dtype in zip(optimizer.param_groups, dtypes, strict=True):
                    why = optimizers.muon_lr_overflow(g, dtype)
                    if why is not None:
                        raise Invalid(why, code="option_overflow",
                                      field=fields.get("lr", "options.lr"))
        session = cls_(session_id, optimizer_name, cls, optimizer, params, defaults, device,
                       nonfinite)
        if sched_spec is not None:
            session.scheduler = schedulers.build(sched_spec, optimizer, "scheduler")
            session.scheduler_spec = sched_spec
        session.group_spec_options = [dict(g.options) for g in groups]
        return session

    # ----------------------------------------------------------------- views
    def names(self) -> list[str]:
        return [n for g in self.optimizer.param_groups for n in g["param_names"]]

    def lrs(self) -> list[float]:
        return [lr_value(g["lr"]) for g in self.optimizer.param_groups]

    def group_options(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in ("params", "param_names")}
                for g in self.optimizer.param_groups]

    def group_dtypes(self) -> list[torch.dtype]:
        return [g["params"][0].dtype if g["params"] else EMPTY_GROUP_DTYPE
                for g in self.optimizer.param_groups]

    def steps_scheduler(self) -> bool:
        """Whether every optimizer step also steps the scheduler."""
        return self.scheduler is not None and self.scheduler_spec is not None \
            and self.scheduler_spec.step_on == "optimizer"

    def describe(self) -> SessionInfo:
        groups = []
        for g in self.optimizer.param_groups:
            opts = {k: v for k, v in g.items() if k not in ("params", "param_names")}
            groups.append({**state_dicts.jsonable_options(opts), "params": list(g["param_names"])})
        sched = None
        if self.scheduler_spec is not None:
            sched = {**self.scheduler_spec.to_json(),
                     "last_epoch": getattr(self.scheduler, "last_epoch", None)}
        return SessionInfo(
            id=self.id, optimizer=self.optimizer_name, device=str(self.device),
            version=self.version, step=self.step_count, lr=self.lrs(),
            revision=self.revision, nonfinite=self.nonfinite, durability=self.durability,
            token=self.token, defaults=state_dicts.jsonable_options(self.optimizer.defaults),
            param_groups=groups,
            params={n: {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape)}
                    for n, p in self.params.items()},
            accumulated=sorted(self.accum), scheduler=sched, ps=self.ps.to_json(),
            metrics=self.metrics_on, history=self.history.capacity,
            shared_tensors=shared_options.shared_slots(self.optimizer) or None,
        )

    def memory_bytes(self) -> int:
        total = sum(p.numel() * p.element_size() for p in self.params.values())
        for a in self.accum.values():
            if a.layout != torch.strided:  # a sparse accumulator holds its indices and values
                total += a._indices().numel() * 8
                a = a._values()
            total += a.numel() * a.element_size()
        for st in list(self.optimizer.state.values()):
            total += sum(v.numel() * v.element_size() for v in st.values()
                         if isinstance(v, torch.Tensor))
        return total

    # ----------------------------------------------------------------- shared checks
    def check_tensors(self, tensors: Tensors, field: str, upcast: bool | None = None, *,
                      sparse_ok: bool = False) -> None:
        """Names, dtypes and shapes of tensors sent for this session's parameters (row-sparse
        gradients where ``sparse_ok``: see :mod:`app.engine.sparse`). With ``upcast``, a
        float16/bfloat16 tensor (dense, or a sparse one's values) is also accepted for a wider
        floating parameter (the caller asked for the widening: never a silent cast, never a
        narrowing); ``None``: the request could not have asked for it (its refusal does not
        suggest ``?upcast=true``)."""
        if self.known_body(tensors):
            return
        for name, t in tensors.items():
            p = self._named(name, field)
            if t.layout != torch.strided:
                if not sparse_ok:
                    raise Invalid(f"{name!r:.80} must be a dense tensor here (only gradients "
                                  "may be sparse)", code="invalid_tensor",
                                  field=f"{field}.{name}")
                sparse.check_sparse(name, p, t, field, bool(upcast) and widens(t.dtype, p.dtype))
                continue
            _check_dense(name, p, t.dtype, t.shape, field, upcast)
        self._learn_body(tensors)

    def refuse_entries(self, entries: Iterable[tuple[str, torch.dtype, Sequence[int]]],
                       field: str, upcast: bool | None = None) -> None:
        """The refusal :meth:`check_tensors` gives dense tensors of these names, dtypes and
        shapes, in this order (the first problem found), from a body's header alone: for a
        body naming more tensors than the session holds, which is refused before its tensors
        are made (one of its names is not a parameter's). Returns when none is found."""
        refuse_entries(self.params, entries, field, upcast)

    def _named(self, name: str, field: str) -> torch.Tensor:
        """The parameter ``name``; 422 ``unknown_parameter`` naming ``field.name`` when the
        session has none."""
        return _named(self.params, name, field)

    def known_body(self, tensors: Tensors) -> bool:
        """Whether ``tensors`` are a body's (:class:`BodyTensors`) whose header equals one this
        CPU session has checked whole, each tensor in its parameter's dtype, against the very
        parameter tensors it has now: then they pass :meth:`check_tensors` again, and
        :meth:`on_device` leaves them as they are (a client sends the same header with every
        step; 1,000 tensors: no longer ~0.7 ms of checks per step). Parameter tensors are
        replaced, never reshaped, when a session's parameters change."""
        known = self.known_header
        if known is None or not isinstance(tensors, BodyTensors) or tensors.header is None:
            return False
        header, params = known
        return (tensors.header == header and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params.values())))

    def _learn_body(self, tensors: Tensors) -> None:
        """After ``tensors`` passed :meth:`check_tensors`: remember their header when
        :meth:`known_body` may answer for it (a CPU session, no dtype to widen)."""
        if (isinstance(tensors, BodyTensors) and tensors.header is not None
                and self.device.type == "cpu"
                and all(t.dtype == self.params[n].dtype for n, t in tensors.items())):
            self.known_header = (tensors.header, list(self.params.values()))

    @staticmethod
    def nonfinite_names(tensors: Tensors, norms: TakenNorms | None = None) -> list[str]:
        """The names of the tensors holding a NaN or an infinity. With ``norms``, the check
        takes L2 norms of pieces (``torch._foreach_norm``) where it would take sums, and keeps
        them there: per run of dense tensors that tile one span, and of the others per group
        (``norms.groups``), end to end in its order; the per-step metrics then take none again
        for a group whose gradients are one such run or unit."""
        if not tensors:
            return []
        if isinstance(tensors, BodyTensors) and tensors.runs and _runs_finite(tensors, norms):
            return []
        # A sum is finite only when every element is (NaN and infinities propagate), and it
        # costs a fraction of isfinite().all() (no N-element mask; ~40x less on a CPU). A
        # non-finite sum may also be a finite overflow: those tensors get the exact test.
        # a sparse tensor's values are what it holds
        raw = tensors
        tensors = {n: t._values() if t.layout != torch.strided else t for n, t in tensors.items()}
        # Tensors laid end to end in one storage (the gradients of one request body) are
        # reduced as that one span: one reduction instead of one per tensor. Found by data
        # pointers (sorted per dtype and device, cut where one tensor does not start where
        # the one before ends), each run checked to lie inside its first tensor's storage.
        placed: dict[tuple[torch.dtype, torch.device], list[tuple[int, int, str]]] = {}
        for name, t in tensors.items():
            size = t.nbytes
            if size and t.is_contiguous():
                placed.setdefault((t.dtype, t.device), []).append((t.data_ptr(), size, name))
        suspects: list[str] = []
        checked: set[str] = set()
        for run in _adjacent_runs(placed.values()):
            first = tensors[run[0][2]]
            raw_span = norm_pieces.span_bytes(first, run[0][0],
                                              run[-1][0] + run[-1][1] - run[0][0])
            if raw_span is None:
                continue
            span = raw_span.view(first.dtype)
            group = [name for _, _, name in run]
            checked.update(group)
            if norms is not None and span.is_floating_point() and all(
                    raw[n].layout == torch.strided for n in group):
                parts, total = _piece_norms(span)
                norms.runs[tuple(group)] = parts
            else:
                total = span.sum()
            if not math.isfinite(total.item()):
                suspects.extend(group)
        rest = [n for n in tensors if n not in checked and tensors[n].numel()
                and (tensors[n].is_floating_point() or tensors[n].is_complex())]
        if rest:
            # the others in one call: a norm is finite only when every value is (an overflow
            # of the squares, from finite values past ~1e19, only makes it a suspect); with
            # ``norms``, the pieces of each group's end to end (the metrics' norms, kept)
            dense = {n for n in rest if raw[n].layout == torch.strided}
            units = _units(rest, dense, norms)
            cut = [norm_pieces.joined([tensors[n] for n in unit]) if norms is not None
                   else [tensors[unit[0]]] for unit in units]
            taken = torch._foreach_norm([p for ps in cut for p in ps])
            values = torch.stack(taken).cpu().tolist()  # one device-to-host copy
            at = 0
            for unit, ps in zip(units, cut, strict=True):
                if not all(map(math.isfinite, values[at:at + len(ps)])):
                    suspects.extend(unit)
                if norms is not None and dense.issuperset(unit):
                    norms.runs[tuple(unit)] = list(taken[at:at + len(ps)])
                at += len(ps)
        if not suspects:
            return []
        flags = torch.stack([torch.isfinite(tensors[n]).all() for n in suspects]).cpu().tolist()
        return [n for n, ok in zip(suspects, flags, strict=True) if not ok]

    def reject_nonfinite(self, bad: list[str], field: str, what: str = "gradient") -> None:
        raise Invalid(f"non-finite {what} values in {', '.join(map(repr, bad[:20]))}; "
                      "this session rejects them (nonfinite: reject)",
                      code=f"nonfinite_{what}", field=f"{field}.{bad[0]}", names=bad)

    def on_device(self, tensors: Tensors) -> Tensors:
        """The (checked) tensors on the session's device, each in its parameter's dtype (a
        widening the caller asked for happens here, once, on the device); row-sparse
        gradients at their parameter's shape. A :meth:`known_body`'s tensors: the same
        mapping."""
        if self.known_body(tensors):
            return tensors
        out = {}
        on_cpu = self.device.type == "cpu"
        for n, t in tensors.items():
            if t.layout != torch.strided:
                out[n] = sparse.fit(t, self.params[n])
                continue
            if not (on_cpu and t.is_cpu):  # (a CPU tensor for a CPU session stays as it is)
                # from pinned host memory (request bodies when the device is a GPU) the copy
                # is asynchronous; the step's kernels run after it on the same stream
                t = t.to(self.device,
                         non_blocking=self.device.type == "cuda" and t.is_pinned())
            dtype = self.params[n].dtype if n in self.params else t.dtype
            out[n] = t if t.dtype == dtype else t.to(dtype)
        return out

    def check_grads(self, grads: Tensors, upcast: bool = False) -> Tensors:
        """Gradients checked (names, dtypes, shapes, layouts the optimizer takes, the non-finite
        policy) and on the device; changes nothing."""
        self.check_tensors(grads, "grads", upcast, sparse_ok=True)
        sparse.check_optimizer_takes(self, grads)
        grads = self.on_device(grads)
        bad = self.nonfinite_names(grads)
        if bad and self.nonfinite == "reject":
            self.reject_nonfinite(bad, "grads")
        return grads

    def _scheduler_wrote_it(self) -> str:
        """What a refusal of a group's lr adds where the session has a scheduler (which may
        have written it, a server before the check of its writes took it, and writes the lr
        of each step after a PATCH from the one before)."""
        if self.scheduler is None:
            return ""
        return (f"; the session's {type(self.scheduler).__name__} may have written it and goes "
                "on from the lr a PATCH gives: if it takes the lr past that range again, "
                f"replace or remove it (PATCH /v1/sessions/{self.shown_id} with "
                "{\"scheduler\": ...} or {\"scheduler\": null})")

    def check_group_scalars(self, tensors: bool = False) -> None:
        """Every numeric group option must fit the dtype of the group's parameters (torch
        raises "value cannot be converted ... without overflow" mid-step otherwise);
        ``tensors``: a tensor ``lr`` by its value too. A group holds such a value only where a
        server before the checks that refuse it took it (a scheduler's step, replayed as it
        ran): the refusal says how to get the session stepping again."""
        for i, (group, dtype) in enumerate(zip(self.optimizer.param_groups,
                                               self.group_dtypes(), strict=True)):
            if self.cls is torch.optim.Muon:
                why = optimizers.muon_lr_overflow(group, dtype)
                if why is not None:
                    raise Invalid(f"{why}. Every step is refused until it is changed: PATCH "
                                  f".../param_groups/{i} with a smaller lr (or send it with "
                                  f"the step, \"param_groups\": {{\"{i}\": {{...}}}})"
                                  + self._scheduler_wrote_it(),
                                  code="option_overflow", field=f"param_groups.{i}.lr")
            # (every step: the groups themselves looked over first, the refusal's copy and
            # words made only for a group that has a value out of range)
            if optimizers.overflowing(group, dtype, tensors,
                                      optimizers.GROUP_LISTS_AND_NOT_IN_PARAMS_DTYPE) is None:
                continue
            g = {k: v for k, v in group.items() if k not in ("params", "param_names")}
            optimizers.check_overflow(
                g, dtype, f"param_groups.{i}", tensors,
                f". The group holds it (a server before this check took it, e.g. from a "
                f"scheduler's step) and every step is refused until it is changed: PATCH "
                f".../param_groups/{i} with a value in range (or send it with the step, "
                f"\"param_groups\": {{\"{i}\": {{...}}}}); if the scheduler would take it out "
                f"of range again, remove it (PATCH /v1/sessions/{self.shown_id} with "
                "{\"scheduler\": null})")

    def empty_params(self) -> list[str]:
        """The names of the parameters with no elements. Kept between steps (a walk of 100,000
        parameters is 15 ms): parameters are only ever added (a group), never reshaped."""
        if self._empty is None or self._empty[0] != len(self.params):
            self._empty = (len(self.params),
                           [n for n, p in self.params.items() if p.numel() == 0])
        return self._empty[1]

    def check_names(self, names: list[str] | None) -> None:
        if names is not None:
            for n in names:
                if n not in self.params:
                    raise Invalid(f"unknown parameter {n!r:.80}", code="unknown_parameter",
                                  field=f"names.{n}")

    def copy_params_into(self, dest: Tensors) -> Tensors:
        """Copy parameters into tensors the caller owns (same dtypes and shapes); on a CPU
        session with one torch call for all of them (1,000 small tensors: one call, not
        1,000)."""
        with torch.no_grad():
            if self.device.type == "cpu" and dest:
                torch._foreach_copy_(list(dest.values()), [self.params[n] for n in dest])
            else:
                for name, view in dest.items():
                    view.copy_(self.params[name])
        return dest

    def fits_answer(self, dest: Tensors, dtype: torch.dtype | None = None) -> bool:
        """Whether ``dest`` (views the caller owns, e.g. a spent request body) can take every
        parameter as :meth:`pack_params` would send it: the same names and shapes, and each
        in its parameter's dtype, or narrowed to ``dtype`` where that is narrower."""
        if dest.keys() != self.params.keys():
            return False
        # (without dtype: gradients checked in their parameters' dtypes and shapes)
        return dtype is None or self._misfit(dest, dest.keys(), dtype) is None

    def check_room(self, dest: Tensors, sent: Tensors | None = None) -> None:
        """Refuse (409 ``binding_stale``) views the caller holds for the parameters (a
        same-host binding's slots) that no longer fit them: a name the session lacks, another
        dtype or shape (the session was deleted and made again under the same id since they
        were made). Only the views no gradient of ``sent`` came in for are checked: a
        gradient's own view was checked with it. Called before anything is applied."""
        if sent is not None and len(dest) == len(sent) and dest.keys() == sent.keys():
            return
        name = self._misfit(dest, dest.keys() - (sent.keys() if sent is not None else set()))
        if name is not None:
            raise stale_binding(name)

    def _misfit(self, dest: Tensors, names: Iterable[str],
                dtype: torch.dtype | None = None) -> str | None:
        """The first of ``names`` whose view in ``dest`` cannot take its parameter as sent
        (no such parameter, another shape, or another dtype than the parameter's, narrowed to
        ``dtype`` where that is narrower); None when every one can."""
        for name in names:
            p, t = self.params.get(name), dest[name]
            if p is None:
                return name
            want = narrowed_dtype(p, dtype)
            if t.dtype != want or t.shape != p.shape:
                return name
        return None

    def pack_params(self, names: list[str] | None = None,
                    dtype: torch.dtype | None = None) -> PackedTensors:
        """CPU copies later steps cannot change, packed in one buffer (one copy in all, and
        none more to send them as safetensors); narrowed to ``dtype`` where asked (floating
        parameters only, never widened), in that same copy."""
        if names is None and dtype is None:
            plan = self.block_plan
            if plan is None or not plan.fits(self.params):
                plan = self.block_plan = BlockPlan.of(self.params)
            if plan is not None:
                return plan.pack()
        chosen = self.params if names is None else {n: self.params[n] for n in names}
        return pack(chosen, dtype)

    # ----------------------------------------------------------------- persistence
    def snapshot_tree(self) -> dict[str, Any]:
        """Everything needed to rebuild this session exactly (tensors by reference: encode it
        before anything else changes the session)."""
        sd: dict[str, Any] = dict(self.optimizer.state_dict())
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return {
            "meta": {
                "id": self.id,
                "optimizer": self.optimizer_name,
                "defaults": self.defaults,
                "groups": [list(g["param_names"]) for g in self.optimizer.param_groups],
                "scheduler": self.scheduler_spec.to_json() if self.scheduler_spec else None,
                "nonfinite": self.nonfinite,
                "durability": self.durability,
                "version": self.version,
                "step": self.step_count,
                "seq": self.seq,
                "revision": self.revision,
                "ps": self.ps.to_json(),
                "replaced": list(self.replaced) if self.replaced else None,
                "idempotency": self.idem.to_json(),
                "created_by": list(self.created_by) if self.created_by else None,
                "group_options": self.group_spec_options,
                # torch's load_state_dict adds keys to optimizer.defaults (differentiable):
                # a restore puts back exactly the keys the running optimizer had
                "defaults_keys": list(self.optimizer.defaults),
                # which option slots hold one tensor (a tensor lr given as the default is the
                # defaults' and every group's built from them): a restore links them again
                "shared_tensors": shared_options.shared_slots(self.optimizer),
                # LBFGS's ``t`` is its group's tensor lr after some steps, as torch holds it
                # (:class:`app.engine.ops.lbfgs.LbfgsPlan`): a restore makes it so again
                "lbfgs_t_is_lr": lbfgs_t_is_lr(self.optimizer),
                "metrics": self.metrics_on,
                "pending_scalars": self.pending_scalars,
                "state_order": state_order.to_json(self.state_order),
            },
            "history": self.history.to_tree(),
            "state_dict": sd,
            "params": dict(self.params),
            "accum": dict(self.accum),
        }

    @classmethod
    def restore(cls_, tree: dict[str, Any], device: torch.device) -> Session:
        """Rebuild a session from :meth:`snapshot_tree` (decoded)."""
        meta, sd = tree["meta"], tree["state_dict"]
        # Re-create with the options the groups were made with (validated then; the first
        # snapshot format lacks them: the defaults are as valid), then load the state dict,
        # which restores every group key exactly, whatever its running value.
        spec_options = meta.get("group_options") or [{} for _ in meta["groups"]]
        groups = [GroupSpec({n: tree["params"][n] for n in names}, dict(opts))
                  for names, opts in zip(meta["groups"], spec_options, strict=True)]
        session = cls_.build(meta["id"], meta["optimizer"], groups, meta["defaults"],
                             meta["scheduler"], meta["nonfinite"], device,
                             allow_empty=not all(meta["groups"]))
        # JSON keys are strings (torch's state ids are ints), JSON lists are tuples where the
        # constructor's default is one (betas, etas, ...)
        state = {int(k): v for k, v in sd["state"].items()}
        tuples = {k for k, v in optimizers.default_options(session.cls).items()
                  if isinstance(v, tuple)}
        saved_groups = [{k: tuple(v) if k in tuples and isinstance(v, list) else v
                         for k, v in g.items()} for g in sd["param_groups"]]
        state_dicts.load_optimizer_state(session.optimizer,
                                         {"state": state, "param_groups": saved_groups})
        state_dicts.own_lbfgs_memory(session.optimizer)
        keep_state_dtypes(session.optimizer, saved_groups, state)
        for group, names in zip(session.optimizer.param_groups, meta["groups"], strict=True):
            group["param_names"] = list(names)
        # (snapshots from before it lack the shared slots: their defaults' values still hold)
        shared_options.relink(session.optimizer, meta["defaults"],
                              meta.get("shared_tensors") or [])
        if meta.get("lbfgs_t_is_lr"):
            for kept in session.optimizer.state.values():
                if "t" in kept:
                    kept["t"] = session.optimizer.param_groups[0]["lr"]
        if meta.get("defaults_keys") is not None:
            keep = set(meta["defaults_keys"])
            for key in [k for k in session.optimizer.defaults if k not in keep]:
                del session.optimizer.defaults[key]
        if session.scheduler is not None and sd.get("scheduler") is not None:
            live = session.scheduler.state_dict()
            session.scheduler.load_state_dict(state_dicts.conform(live, sd["scheduler"]))
        session.durability = meta["durability"]
        session.version = int(meta["version"])
        session.step_count = int(meta["step"])
        session.seq = session.seq_at_snapshot = int(meta["seq"])
        # (snapshots from before it lack it: no client holds a revision those servers gave)
        session.revision = int(meta.get("revision", 0))
        session.revision_unknown = "revision" not in meta
        session.ps = ps.parse(meta.get("ps") or {})
        # (snapshots from before it lack it: no overwrite known, as those servers knew none)
        replaced = meta.get("replaced")
        session.replaced = (int(replaced[0]), str(replaced[1])) if replaced else None
        session.idem = IdempotencyTable.from_json(meta.get("idempotency"))
        created = meta.get("created_by")
        session.created_by = (str(created[0]), str(created[1])) if created else None
        session.accum = {n: t.to(device=device, copy=True) for n, t in tree["accum"].items()}
        session.metrics_on = bool(meta.get("metrics", True))
        session.state_order = state_order.from_json(meta.get("state_order"))
        session.pending_scalars = {str(k): [float(v[0]), float(v[1])]
                                   for k, v in (meta.get("pending_scalars") or {}).items()}
        # snapshots from before the history: an empty ring whose rows go on from the step count
        session.history = (History.from_tree(tree["history"]) if tree.get("history")
                           else History(DEFAULT_HISTORY, session.step_count + 1))
        return session


def lbfgs_t_is_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an LBFGS optimizer's ``t`` is its group's tensor lr itself (torch's ``t = lr``,
    kept by a live optimizer, not by a ``load_state_dict``, whose deep copy of the groups
    parts them)."""
    if not isinstance(optimizer, torch.optim.LBFGS) or not optimizer.param_groups:
        return False
    lr = optimizer.param_groups[0]["lr"]
    return isinstance(lr, torch.Tensor) and any(
        kept.get("t") is lr for kept in optimizer.state.values())


def keep_state_dtypes(optimizer: torch.optim.Optimizer, saved_groups: list[dict[str, Any]],
                      saved: dict[int, Any]) -> None:
    """Put back the dtypes a snapshot's state tensors had. torch's ``load_state_dict`` casts
    every floating state tensor but ``step`` to its parameter's dtype, so NAdam's float32
    ``mu_product`` (ASGD's ``eta`` and ``mu``) of a float64 or float16 parameter would come back
    in the parameter's dtype, and every later step would round otherwise than the session that
    never restarted."""
    ids = [pid for g in saved_groups for pid in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for pid, p in zip(ids, params, strict=True):
        if pid in saved and p in optimizer.state:
            optimizer.state[p] = _same_dtypes(optimizer.state[p], saved[pid])


def _same_dtypes(loaded: Any, saved: Any) -> Any:
    """``loaded`` with each tensor whose dtype differs from ``saved``'s replaced by the saved
    one (on the loaded one's device)."""
    if isinstance(loaded, torch.Tensor) and isinstance(saved, torch.Tensor):
        return loaded if loaded.dtype == saved.dtype else saved.to(device=loaded.device, copy=True)
    if isinstance(loaded, dict) and isinstance(saved, dict):
        return {k: _same_dtypes(v, saved[k]) if k in saved else v for k, v in loaded.items()}
    if isinstance(loaded, (list, tuple)) and isinstance(saved, (list, tuple)) \
            and len(loaded) == len(saved):
        return type(loaded)(_same_dtypes(a, b) for a, b in zip(loaded, saved, strict=True))
    return loaded


def group_dtype(params: Tensors) -> torch.dtype:
    """The dtype a param group's options are checked in: its first parameter's
    (:data:`EMPTY_GROUP_DTYPE` for a group without parameters)."""
    return next(iter(params.values())).dtype if params else EMPTY_GROUP_DTYPE


def torch_group(named: list[tuple[str, torch.Tensor]], options: dict[str, Any]
                ) -> dict[str, Any]:
    """A param group as torch takes it: named parameters and options. An empty one says it is
    named too (torch refuses to mix named and unnamed groups)."""
    return {"params": named, **options} if named else {"params": [], "param_names": [],
                                                         **options}


def flat_block(tensors: Tensors, device: torch.device) -> Tensors:
    """Copies of ``tensors`` on ``device`` as views into one buffer, laid out as :func:`pack`
    lays them out (widest dtype first): every parameter of a session is its own tensor to
    torch, and the whole session can be copied out at once (:class:`BlockPlan`). A 1-D
    parameter leaves the block when it first takes a row-sparse gradient
    (:func:`app.engine.sparse.own_storage`)."""
    order = sorted(tensors, key=lambda n: -tensors[n].element_size())
    total = sum(tensors[n].numel() * tensors[n].element_size() for n in order)
    block = torch.empty(total, dtype=torch.uint8, device=device)
    out: Tensors = {}
    pos = 0
    with torch.no_grad():
        for name in order:
            t = tensors[name].detach()
            n = t.numel() * t.element_size()
            view = block[pos:pos + n].view(t.dtype).view(t.shape)
            view.copy_(t)
            out[name] = view
            pos += n
    return {name: out[name] for name in tensors}


@dataclass
class BlockPlan:
    """How a session's parameters are copied out with one copy (:meth:`pack`), worked
    out once and kept (``Session.block_plan``) while the very same parameter tensors stay at
    the same addresses: then each answer is one copy under a header from kept entries, its
    views made only if something looks inside (1,000 tensors: no per-tensor checks, no
    header built and no views made per step)."""

    tensors: list[torch.Tensor]
    ptrs: list[int]
    #: the span they tile, as one flat uint8 view
    flat: torch.Tensor
    #: the views of the copy (:func:`app.wire.safetensors_body.view_plan`), and their
    #: header entries
    views: tuple[Any, ...]
    entries: bytes

    @classmethod
    def of(cls, params: Tensors) -> BlockPlan | None:
        """The plan, when ``params`` tile one :func:`flat_block` in :func:`pack`'s order; else
        None. The tiling is checked by data pointers (each tensor contiguous and starting where
        the one before ends, the whole span inside the first one's storage)."""
        if not params:
            return None
        names = list(params)
        tensors = list(params.values())
        sizes = [t.element_size() for t in tensors]
        order = (range(len(names)) if min(sizes) == max(sizes)
                 else sorted(range(len(names)), key=lambda i: -sizes[i]))  # stable: pack's
        first = next((tensors[i] for i in order if tensors[i].nbytes), None)
        if first is None:  # nothing to copy
            return None
        start = pos = first.data_ptr()
        for i in order:
            t = tensors[i]
            n = t.nbytes
            if n and (t.data_ptr() != pos or not t.is_contiguous()):  # (empty: ptr 0)
                return None
            pos += n
        flat = norm_pieces.span_bytes(first, start, pos - start)
        if flat is None:
            return None
        layout = [(names[i], tensors[i].dtype, tensors[i].shape) for i in order]
        return cls(tensors, [t.data_ptr() for t in tensors], flat,
                   view_plan(layout, [tensors[i].numel() for i in order]),
                   header_entries(layout))

    def fits(self, params: Tensors) -> bool:
        return (len(params) == len(self.tensors)
                and all(map(operator.is_, self.tensors, params.values()))
                and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs)

    def pack(self) -> PackedTensors:
        cuda = self.flat.is_cuda
        base = torch.empty(self.flat.numel(), dtype=torch.uint8, pin_memory=cuda)
        base.copy_(self.flat, non_blocking=cuda)
        if cuda:
            torch.cuda.current_stream().synchronize()
        return PackedTensors.deferred(base, self.views, self.entries)


_NARROW = (torch.float16, torch.bfloat16)


class Shaped(Protocol):
    """What the checks of a tensor sent for a parameter read of it: a parameter tensor, or
    its dtype and shape as a host sent them (:class:`app.engine.held_entries.HeldEntries`)."""

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def shape(self) -> Sequence[int]: ...


P = TypeVar("P", bound=Shaped)


def refuse_entries(params: Mapping[str, P], entries: Iterable[tuple[str, torch.dtype,
                                                                     Sequence[int]]],
                   field: str, upcast: bool | None = None) -> None:
    """:meth:`Session.refuse_entries` over ``params`` (a session's parameters, or their
    dtypes and shapes by name, in the session's order)."""
    for name, dtype, shape in entries:
        _check_dense(name, _named(params, name, field), dtype, shape, field, upcast)


def _named(params: Mapping[str, P], name: str, field: str) -> P:
    p = params.get(name)
    if p is None:
        raise Invalid(f"unknown parameter {name!r:.80}; this session has "
                      f"{', '.join(repr(n) for n in list(params)[:20])}",
                      code="unknown_parameter", field=f"{field}.{name}")
    return p


def _check_dense(name: str, p: Shaped, dtype: torch.dtype, shape: Sequence[int],
                 field: str, upcast: bool | None) -> None:
    """A dense tensor of ``dtype`` and ``shape`` sent for parameter ``p`` (``name``): 422
    ``dtype_mismatch`` (no silent casts; with ``upcast``, a float16/bfloat16 one for a wider
    floating parameter is taken) or ``shape_mismatch`` naming ``field.name``. The ``?upcast``
    hint goes only where the request could have asked for it (``upcast`` not ``None``: a
    step's or push's gradients; an LBFGS evaluation and ``PUT .../params`` take no
    ``?upcast``)."""
    if dtype != p.dtype and not (upcast and widens(dtype, p.dtype)):
        hint = (" (send ?upcast=true to widen float16/bfloat16 gradients)"
                if widens(dtype, p.dtype) and upcast is not None else
                " (no silent casts: a parameter keeps the dtype its session holds it in; a "
                "model converted with .to(dtype) after its optimizer was made needs a new "
                "session)" if field == "params" else " (no silent casts)")
        raise Invalid(f"{name!r:.80} is {DTYPE_NAMES[p.dtype]} but the tensor sent is "
                      f"{DTYPE_NAMES.get(dtype, str(dtype))}{hint}",
                      code="dtype_mismatch", field=f"{field}.{name}")
    if tuple(shape) != tuple(p.shape):
        raise Invalid(f"{name!r:.80} has shape {list(p.shape)} but the tensor sent has "
                      f"{list(shape)}", code="shape_mismatch", field=f"{field}.{name}")


def widens(sent: torch.dtype, param: torch.dtype) -> bool:
    """A float16/bfloat16 tensor for a float32/float64 parameter (an exact widening)."""
    return sent in _NARROW and param in (torch.float32, torch.float64)


def refuse_nonfinite_params(params: Tensors, where: str) -> None:
    """422 ``nonfinite_parameter`` for parameter values a session that does not allow
    non-finite values is given (a create's, an added group's: ``PUT .../params`` refuses
    the same), naming the first (``where``: the field the names are under)."""
    bad = Session.nonfinite_names(params)
    if bad:
        raise Invalid(f"non-finite values in {', '.join(map(repr, bad[:20]))}; this session "
                      "does not allow them (nonfinite: allow would)",
                      code="nonfinite_parameter", field=f"{where}.{bad[0]}", names=bad)


def check_param_tensor(name: str, t: torch.Tensor, field: str) -> None:
    """A parameter the client sends: a floating, finite-size, plain (strided CPU) tensor."""
    if t.layout != torch.strided or t.device.type != "cpu":
        raise Invalid(f"{name!r:.60} must be a dense tensor", code="invalid_tensor", field=field)
    if not t.is_floating_point():
        raise Invalid(f"parameters must be floating point, {name!r:.60} is "
                      f"{DTYPE_NAMES.get(t.dtype, str(t.dtype))}",
                      code="invalid_dtype", field=field)


#: the scheduler options a group key a scheduler sets comes from, when not its own name
_SCHEDULER_KEY_SOURCES = {"momentum": ("max_momentum",), "betas": ("max_momentum",),
                          "lr": ("base_lr", "max_lr"), "initial_lr": ("base_lr", "max_lr")}


#: the scheduler options an integer a scheduler keeps comes from, when not its own name
_SCHEDULER_STATE_SOURCES = {"total_steps": ("epochs", "steps_per_epoch"),
                            "end_step": ("total_steps", "epochs", "steps_per_epoch"),
                            "min_lrs": ("min_lr",), "T_i": ("T_0",),
                            "base_lrs": ("base_lr",), "max_lrs": ("max_lr",),
                            "base_momentums": ("base_momentum",),
                            "max_momentums": ("max_momentum",)}


def _check_scheduler_built(cls: type[torch.optim.Optimizer], opt: torch.optim.Optimizer,
                           sched: Any, spec: Any, dtypes: list[torch.dtype]) -> None:
    """A scheduler built at create, on a throwaway: 422 for a key it put in the groups
    (``base_momentum``, ``max_momentum``, the ``momentum`` or ``betas`` it made of them, an
    ``lr``) out of range, as a step, a PATCH and an import refuse them
    (:func:`option_values.check_scheduler_group_keys`, and :func:`optimizers.check_overflow`
    against the group's dtype), and for an integer in its state past int64 (OneCycleLR's
    ``total_steps`` of ``epochs * steps_per_epoch``: no state export, JSON or torch, could
    write it), naming the scheduler option it came from. Taken at create, every step after
    was refused for a field no step sends, the session's own export was refused by its
    import, or the export was a 500."""
    fields = _scheduler_option_fields(spec, "scheduler")
    for key, value in _ints(sched.state_dict()):
        if not INT64[0] <= value <= INT64[1]:
            found = [fields[k] for k in (key, *_SCHEDULER_STATE_SOURCES.get(key, ()))
                     if k in fields]
            raise Invalid(f"{key} would be {value}, past int64", code="invalid_option",
                          field=found[0] if found else "scheduler.options")
    restart = schedulers.restart_past_int64(sched.state_dict(), "scheduler")
    if restart is not None:  # (named as the option: its place in the spec)
        restart.field = re.sub(r"\._schedulers\.(\d+)", r".options.schedulers.\1",
                               (restart.field or "scheduler.T_mult")
                               ).replace(".T_mult", ".options.T_mult")
        raise restart
    for g, dtype in zip(opt.param_groups, dtypes, strict=True):
        keys = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        try:
            option_values.check_scheduler_group_keys(cls, keys, "")
            optimizers.check_overflow(keys, dtype, "", tensors=True)
        except Invalid as exc:
            key = (exc.field or "").lstrip(".").split(".")[0]
            found = [fields[k] for k in (key, *_SCHEDULER_KEY_SOURCES.get(key, ()))
                     if k in fields]
            exc.field = found[0] if found else "scheduler.options"
            # (a guess from where the key comes from: the probe tries the options one by one)
            exc.guessed = True
            raise


def _ints(tree: Any, key: str = "") -> Iterator[tuple[str, int]]:
    """Every int in a state tree, with the key it is under; an int key with the key of its
    dict (MultiStepLR's milestones are a ``Counter``'s keys: one past int64 made an export
    that no import takes)."""
    stack: list[tuple[Any, str]] = [(tree, key)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, dict):
            yield from ((at, k) for k in node if type(k) is int)
            stack.extend((v, str(k)) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, at) for v in node)
        elif type(node) is int:
            yield at, node


def _scheduler_option_fields(spec: Any, where: str) -> dict[str, str]:
    """Each option of a scheduler spec (nested ones too) by name: where it is, the first
    place it is given."""
    out: dict[str, str] = {}
    stack = [(spec, where)]
    while stack:
        node, at = stack.pop(0)
        options = node.get("options") if isinstance(node, dict) else None
        if not isinstance(options, dict):
            continue
        for key, value in options.items():
            if key == "schedulers" and isinstance(value, list):
                stack.extend((child, f"{at}.options.schedulers.{i}")
                             for i, child in enumerate(value))
            else:
                out.setdefault(key, f"{at}.options.{key}")
    return out
