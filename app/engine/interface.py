"""The engine interface: plain data and CPU tensors in and out, no state outside it.

The routes talk to an :class:`Engine` (the front: tenancy, limits, readiness) and get typed
results back; the front drives session hosts (in-process, or Ray actors) with operation values
(:mod:`app.engine.ops`). Nothing here may assume a session lives in the caller's process.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from app.errors import NotFound

if TYPE_CHECKING:
    from app.engine.answer_stream import AnswerStream
    from app.engine.history import HistoryQuery, HistoryResult
    from app.engine.ops.base import Expected

NonFinitePolicy = Literal["reject", "skip", "allow"]
Durability = Literal["step", "interval", "memory"]
Tensors = dict[str, torch.Tensor]
#: what a step answers with: every parameter, none, or (``"touched"``) the rows of each
#: parameter stepped with a row-sparse gradient plus the parameters stepped with dense ones
ReturnParams = bool | Literal["touched"]
#: a safetensors header's tensor entries: name -> (dtype, shape, numel), in header order
HeaderEntries = Mapping[str, tuple[torch.dtype, tuple[int, ...], int]]


#: the operations whose body of named tensors may be refused from its entries: a step
#: (``POST .../step``), a push (``POST .../grads``), an overwrite (``PUT .../params``)
EntriesOp = Literal["step", "push", "overwrite"]


@dataclass(frozen=True)
class EntriesRefusal:
    """How a session refuses a step's, a push's or an overwrite's body from its header's
    tensor entries, before its tensors are made (:meth:`Engine.entries_refusal`)."""

    #: how many parameters the session holds now (a body naming more is refused)
    held: Callable[[], int]
    #: the refusal of such a body's entries, whether it asked for ``upcast``, and its
    #: ``scalars`` as sent (unchecked; None: none): the answer the operation would give once
    #: its tensors were made; returns where it finds none, or where that answer could be
    #: another (then the body is decoded whole and the operation answers)
    refuse: Callable[[HeaderEntries, bool, object], None]
    #: whether a body with ``scalars`` is refused from its entries too (False: a sharded
    #: session, which refuses any ``scalars`` before it looks at the gradients' names)
    scalars: bool = True
    #: what ``refuse`` needs where it raises :class:`EntriesUnknown` (None: it never does):
    #: awaited, then the body's entries are looked at again (a Ray host's answer,
    #: :class:`app.engine.held_entries.HeldEntries`, asked only for a body naming more
    #: tensors than ``held`` says: ``held`` may be a count known before, never above the
    #: session's)
    ready: Callable[[], Awaitable[None]] | None = None


class EntriesUnknown(Exception):
    """Raised by ``EntriesRefusal.refuse`` that cannot say before ``EntriesRefusal.ready`` was
    awaited (the refusal's host is asked only then)."""


def session_key(tenant: str, session_id: str) -> str:
    """The key a host stores a session under (also its directory name): ``tenant~id``."""
    return f"{tenant}~{session_id}"


def split_key(key: str) -> tuple[str, str]:
    """(tenant, session id) of a session key."""
    tenant, _, session_id = key.partition("~")
    return tenant, session_id


def no_session(key: str) -> NotFound:
    """The 404 of a session key nothing holds (its id, as the request named it)."""
    return NotFound(f"no session {split_key(key)[1]!r:.140}", code="session_not_found",
                    field="session_id")


def json_float(x: float) -> float | dict[str, str]:
    """A float for JSON: finite as is, else the service's ``{"$float": "inf"}`` encoding."""
    if math.isfinite(x):
        return x
    return {"$float": "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")}


def json_floats(xs: list[float]) -> list[Any]:
    return [json_float(x) for x in xs]


@dataclass
class GroupSpec:
    """One param group: named CPU tensors plus the group's own options (JSON values)."""

    params: Tensors
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CreateSpec:
    optimizer: str
    groups: list[GroupSpec]
    options: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    id: str | None = None
    nonfinite: NonFinitePolicy | None = None
    durability: Durability | None = None
    #: parameter-server options (``sync``, ``max_staleness``, ``staleness_lr``), as JSON values
    ps_options: dict[str, Any] = field(default_factory=dict)
    #: per-step norms on the device (None: the server's default)
    metrics: bool | None = None
    #: history rows kept (None: the server's default)
    history: int | None = None
    #: split the parameters over this many session hosts (:mod:`app.engine.shards`)
    shards: int = 1
    #: what the session's host must offer (Ray engine: ``num_cpus``, ``num_gpus``, ``memory``,
    #: custom ``resources``), as JSON values; None: the server's default
    resources: dict[str, Any] | None = None
    #: how to choose the host among those that offer ``resources``: ``pack`` or ``spread``
    placement: str | None = None
    #: a shard of a sharded session: groups may hold none of its parameters
    empty_groups: bool = False
    #: the version the session starts at, as its router decided it (the Ray engine's, from
    #: the directory's last version of the id: :mod:`app.engine.last_versions`; every shard of
    #: a sharded session gets the same); None: the host's own (the embedded engine's)
    first_version: int | None = None


@dataclass(frozen=True)
class IdemKey:
    """A request's ``Idempotency-Key`` and the fingerprint of the request that carried it (a
    repeat of the key must carry the same fingerprint)."""

    key: str
    fingerprint: str = ""
    #: the fingerprints older servers kept for the same request (their records and snapshots
    #: hold those): a table entry under one of them is this request too. Not compared: two
    #: requests are the same when their fingerprints are
    legacy: tuple[str, ...] = field(default=(), compare=False)


@dataclass
class SessionInfo:
    """A session's description, JSON-ready (``to_json``)."""

    id: str
    optimizer: str
    device: str
    version: int
    step: int
    lr: list[float]
    #: the session's change counter (:attr:`app.engine.session.Session.revision`)
    revision: int
    nonfinite: str
    durability: str
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]
    params: dict[str, dict[str, Any]]
    accumulated: list[str]
    scheduler: dict[str, Any] | None
    ps: dict[str, Any]
    #: per-step norms on or off, and the history's capacity
    metrics: bool = True
    history: int = 0
    #: workers that have pushed to the open sync round (sync sessions only)
    pending: list[str] | None = None
    replayed: bool = False
    #: where the session lives (engines that place sessions: host, resources, shards)
    placement: dict[str, Any] | None = None
    #: the option slots that hold one tensor object (``["defaults", key]`` or ``[group index,
    #: key]``), one list per tensor held by more than one
    #: (:func:`app.engine.shared_options.shared_slots`): a tensor lr given as the default is the
    #: defaults' and every group's built from them, as in torch. None when there are none
    shared_tensors: list[list[list[Any]]] | None = None
    #: an added param group's answer (``POST .../param_groups``, its replays too): the new
    #: group's index, for the answer's ``Location``; not in the description
    added_group: int | None = None
    #: the session object's creation token (:mod:`app.engine.creation_tokens`): with the
    #: revision, the state tag ``"r<revision>.<token>"``; not in the description, and not
    #: compared (a restore mints another for the same session)
    token: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id, "optimizer": self.optimizer, "device": self.device,
            "version": self.version, "step": self.step, "lr": json_floats(self.lr),
            "revision": self.revision, "nonfinite": self.nonfinite, "durability": self.durability,
            "defaults": self.defaults, "param_groups": self.param_groups,
            "params": self.params, "accumulated": self.accumulated,
            "scheduler": self.scheduler, **self.ps,
            "metrics": self.metrics, "history": self.history,
        }
        if self.pending is not None and isinstance(out.get("sync"), dict):
            out["sync"] = {**out["sync"], "pending": self.pending}
        if self.placement is not None:
            out["placement"] = self.placement
        if self.shared_tensors:
            out["shared_tensors"] = self.shared_tensors
        if self.replayed:  # a repeated Idempotency-Key's answer says so, as every other does
            out["replayed"] = True
        return out


@dataclass
class StepResult:
    version: int
    step: int
    lr: list[float]
    skipped: bool = False
    nonfinite: list[str] = field(default_factory=list)
    params: Tensors | None = None
    #: sync rounds: ``{"workers": [ids that contributed], "expected": K, "partial": bool}``
    sync: dict[str, Any] | None = None
    #: async pushes that named their base version: how many versions old they were
    staleness: int | None = None
    #: the answer to a repeated idempotency key (nothing was applied again)
    replayed: bool = False
    #: a replayed answer's params are the current ones; this is their version
    params_version: int | None = None
    #: an LBFGS step: its first evaluation's loss (what torch's ``step`` returns) and how many
    #: evaluations it took
    loss: float | None = None
    evaluations: int | None = None
    #: the step's metrics (app.engine.metrics.StepMetrics.to_json), JSON-ready
    metrics: dict[str, Any] | None = None

    @property
    def tag_version(self) -> int:
        """The version the answer's ``ETag`` names: its parameters' (``params_version`` for a
        replayed answer carrying the current ones), else the step's."""
        if self.params is not None and self.params_version is not None:
            return self.params_version
        return self.version

    def scalars(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "step": self.step,
                               "lr": json_floats(self.lr), "skipped": self.skipped}
        if self.loss is not None:
            out["loss"] = json_float(self.loss)
        if self.evaluations is not None:
            out["evaluations"] = self.evaluations
        if self.metrics is not None:
            out["metrics"] = self.metrics
        if self.nonfinite:
            out["nonfinite"] = self.nonfinite
        if self.sync is not None:
            out["sync"] = self.sync
        if self.staleness is not None:
            out["staleness"] = self.staleness
        if self.replayed:
            out["replayed"] = True
        if self.params_version is not None and self.params_version != self.version:
            out["params_version"] = self.params_version
        return out


@dataclass
class Evaluation:
    """One closure call's answer in an LBFGS step: the loss and the gradients at the parameters
    it was asked at (a parameter left out has no gradient: torch's LBFGS counts it as zeros)."""

    loss: float
    grads: Tensors


@dataclass
class EvaluationRequest:
    """An LBFGS step waiting for the client: the loss and gradients at ``params`` are needed
    (post them to evaluation ``evaluation``); ``evaluations`` have been answered so far. The
    session is still at ``version`` / ``step``."""

    step_id: str
    evaluation: str
    evaluations: int
    version: int
    step: int
    params: Tensors
    timeout_s: float

    def scalars(self) -> dict[str, Any]:
        return {"needs": "evaluation", "step_id": self.step_id, "evaluation": self.evaluation,
                "evaluations": self.evaluations, "version": self.version, "step": self.step,
                "timeout_s": self.timeout_s}


class EveryVersion(frozenset[int]):
    """A pull's ``unless_versions`` for ``If-None-Match: *``: it holds every version (RFC
    9110: ``*`` is false whenever the resource exists), so the pull answers ``not_modified``
    whatever its version; empty otherwise (no version to wait past)."""

    def __contains__(self, item: object) -> bool:
        return True

    def __reduce__(self) -> tuple[type[EveryVersion], tuple[()]]:
        return (EveryVersion, ())


#: :class:`EveryVersion`'s one value
EVERY_VERSION = EveryVersion()


@dataclass
class ParamsResult:
    version: int
    step: int
    lr: list[float]
    params: Tensors
    #: the caller already holds this version (``If-None-Match``): ``params`` is empty
    not_modified: bool = False
    replayed: bool = False

    def scalars(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "step": self.step,
                               "lr": json_floats(self.lr)}
        if self.replayed:
            out["replayed"] = True
        return out


@dataclass
class GradsResult:
    """The answer to a push (``/grads``) or ``zero_grad``."""

    version: int
    step: int
    accumulated: list[str]
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "step": self.step,
                               "accumulated": self.accumulated}
        if self.replayed:
            out["replayed"] = True
        return out


@dataclass
class SchedulerResult:
    version: int
    step: int
    lr: list[float]
    last_epoch: int | None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "step": self.step,
                               "lr": json_floats(self.lr), "last_epoch": self.last_epoch}
        if self.replayed:
            out["replayed"] = True
        return out


@dataclass
class StateExport:
    state_dict: dict[str, Any]
    version: int
    step: int
    revision: int = 0
    #: a shard's stamps on its states (:mod:`app.engine.state_order`): how its sharded
    #: session orders every shard's states as torch would; None for any other session
    state_order: dict[str, tuple[int, int]] | None = None
    #: the creation token of the session it is of (:attr:`SessionInfo.token`)
    token: str = ""


@dataclass
class EngineStatus:
    """Whether a session host (or the engine as a whole) takes operations, and why not."""

    ready: bool
    reason: str | None
    device: str
    sessions: int
    memory_bytes: int
    #: stored sessions refused at start, by session key, with the reason
    refused: dict[str, str] = field(default_factory=dict)


class Engine(Protocol):
    device: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def status(self, *, memory: bool = ...) -> EngineStatus: ...
    async def refused(self, *, tenant: str = ...) -> dict[str, str]: ...

    async def create(self, spec: CreateSpec, *, tenant: str = ...,
                     idem: IdemKey | None = ...) -> SessionInfo: ...
    async def describe(self, session_id: str, *, tenant: str = ...) -> SessionInfo: ...
    async def describe_layout(self, session_id: str, *, tenant: str = ...) -> SessionInfo: ...
    async def list_sessions(self, *, tenant: str = ...) -> list[SessionInfo]: ...
    async def delete(self, session_id: str, *, tenant: str = ...,
                     idem: IdemKey | None = ..., expected: Expected | None = ...) -> bool:
        """True when a repeated idempotency key was answered (the session was gone)."""

    async def step(
        self, session_id: str, grads: Tensors, *, return_params: ReturnParams,
        worker: str | None = ..., base_version: int | None = ..., tenant: str = ...,
        idem: IdemKey | None = ..., options: dict[int, dict[str, Any]] | None = ...,
        params_into: Tensors | None = ..., upcast: bool = ...,
        params_dtype: torch.dtype | None = ..., scalars: dict[str, Any] | None = ...,
        answer_metrics: bool = ..., into_seen: bool = ..., answer: AnswerStream | None = ...,
    ) -> StepResult: ...
    async def uses_evaluations(self, session_id: str, *, tenant: str = ...) -> bool:
        """Whether a step on the session opens an evaluation step (LBFGS); the 404 of
        :meth:`refuse_unknown` for a session nothing holds."""
    async def refuse_unknown(self, session_id: str, *, tenant: str = ...,
                             evaluation: bool = ...) -> None:
        """The 404 of a session nothing holds, from where its key routes alone, before its
        request's body is read; returns where the session may exist (the operation then
        looks it up again, as it always does). ``evaluation``: also the 422
        ``not_supported_here`` of an LBFGS evaluation on a session that cannot have one."""
    async def refuse_stale(self, session_id: str, expected: Expected | None, *,
                           tenant: str = ..., idem_key: str | None = ...,
                           sharded: bool = ...) -> None:
        """The 412 of a change's precondition that can no longer hold, before its request's
        body is read, as the operation's own check gives it (the operation checks again);
        ``sharded``: of a sharded session too (not for an operation a sharded session
        refuses whatever its body, add_param_group)."""
    async def entries_refusal(self, session_id: str, *, tenant: str = ...,
                              idem_key: str | None = ..., worker: str | None = ...,
                              op: EntriesOp = ..., expected: Expected | None = ...
                              ) -> EntriesRefusal | None:
        """What refuses a body of ``op`` (a step by default) naming more tensors than the
        session holds from its header alone, with the answer the operation would give
        (``expected``: an overwrite's precondition; None: no such check here)."""
    async def open_evaluation_step(
        self, session_id: str, first: Evaluation | None, *, return_params: ReturnParams,
        tenant: str = ...,
        idem: IdemKey | None = ..., timeout_s: float | None = ...,
    ) -> EvaluationRequest | StepResult: ...
    async def evaluate(self, session_id: str, eval_id: str, ev: Evaluation, fingerprint: str, *,
                       tenant: str = ...) -> EvaluationRequest | StepResult: ...
    async def abandon_step(self, session_id: str, step_id: str, *, tenant: str = ...
                           ) -> str: ...
    async def configure(self, session_id: str, options: dict[str, Any], *, tenant: str = ...,
                        idem: IdemKey | None = ..., expected: Expected | None = ...
                        ) -> SessionInfo: ...
    async def push(self, session_id: str, grads: Tensors, *, tenant: str = ...,
                   idem: IdemKey | None = ..., upcast: bool = ...,
                   scalars: dict[str, Any] | None = ...) -> GradsResult: ...
    async def history(self, session_id: str, query: HistoryQuery, *,
                      tenant: str = ...) -> HistoryResult: ...
    async def zero_grad(self, session_id: str, *, tenant: str = ...,
                        idem: IdemKey | None = ...) -> GradsResult: ...
    async def pull(
        self, session_id: str, names: list[str] | None, *, min_version: int | None = ...,
        wait_s: float = ..., unless_versions: frozenset[int] = ..., tenant: str = ...,
        params_into: Tensors | None = ..., params_dtype: torch.dtype | None = ...,
    ) -> ParamsResult: ...
    async def pull_rows(
        self, session_id: str, rows: dict[str, torch.Tensor], *, min_version: int | None = ...,
        wait_s: float = ..., unless_versions: frozenset[int] = ..., tenant: str = ...,
        params_dtype: torch.dtype | None = ...,
    ) -> ParamsResult: ...
    async def overwrite(self, session_id: str, params: Tensors, *, tenant: str = ...,
                        idem: IdemKey | None = ..., expected: Expected | None = ...
                        ) -> ParamsResult: ...

    async def add_param_group(self, session_id: str, group: GroupSpec, *, tenant: str = ...,
                              idem: IdemKey | None = ..., expected: Expected | None = ...
                              ) -> SessionInfo: ...
    async def update_param_group(
        self, session_id: str, index: int, options: dict[str, Any], *, tenant: str = ...,
        idem: IdemKey | None = ..., expected: Expected | None = ...,
    ) -> SessionInfo: ...
    async def scheduler_step(self, session_id: str, metric: float | None, *,
                             tenant: str = ..., idem: IdemKey | None = ...,
                             expected: Expected | None = ...) -> SchedulerResult: ...

    async def export_state(self, session_id: str, *, tenant: str = ...) -> StateExport: ...
    async def import_state(self, session_id: str, state: dict[str, Any], *, tenant: str = ...,
                           idem: IdemKey | None = ..., expected: Expected | None = ...
                           ) -> SessionInfo:
        """``expected``: as every change that takes it, import only if the session is still
        at that version and/or revision (412 ``precondition_failed`` otherwise, nothing
        changed)."""
