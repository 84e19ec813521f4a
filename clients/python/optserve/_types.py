"""Result types. Tensors are ``torch.Tensor`` (CPU) when torch is importable, else numpy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._tensors import Tensor, options_from_wire

__all__ = [
    "SessionInfo",
    "ParamGroupInfo",
    "ParamInfo",
    "StepResult",
    "EvaluationRequest",
    "ParamsResult",
    "VersionInfo",
    "SchedulerStepResult",
    "OptimizerInfo",
    "SchedulerInfo",
]


@dataclass(frozen=True)
class ParamInfo:
    """A parameter's dtype name and shape as the server holds it."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ParamGroupInfo:
    """One param group: its parameter names (in order) and its options (``lr``, ...)."""

    params: list[str]
    options: dict[str, Any]

    @property
    def lr(self) -> Any:
        return self.options.get("lr")


def _shared_slots(value: object) -> list[list[tuple[str | int, str]]]:
    """A description's ``shared_tensors``: the well-formed slots of each list that has two or
    more (servers before it send none)."""
    out: list[list[tuple[str | int, str]]] = []
    for slots in value if isinstance(value, list) else []:
        kept: list[tuple[str | int, str]] = [
            (slot[0], slot[1]) for slot in (slots if isinstance(slots, list) else [])
            if isinstance(slot, list) and len(slot) == 2 and isinstance(slot[1], str)
            and (slot[0] == "defaults" or type(slot[0]) is int)]
        if len(kept) > 1:
            out.append(kept)
    return out


@dataclass(frozen=True)
class SessionInfo:
    """A session's description (``POST /v1/sessions``, ``GET /v1/sessions/{id}``).

    ``defaults`` and each group's ``options`` are decoded as torch holds them (``betas``
    is a tuple, infinities are floats, tensor options are tensors).
    """

    id: str
    optimizer: str
    device: str
    version: int
    step: int
    defaults: dict[str, Any]
    param_groups: list[ParamGroupInfo]
    scheduler: dict[str, Any] | None
    lr: list[float] = field(default_factory=list)
    params: dict[str, ParamInfo] = field(default_factory=dict)
    nonfinite: str | None = None
    accumulated: list[str] = field(default_factory=list)
    #: sync rounds: ``{"workers": K, "reduce", "timeout_s", "on_timeout", "pending": [ids]}``
    sync: dict[str, Any] | None = None
    max_staleness: int | None = None
    staleness_lr: str | None = None
    #: per-step norms on the server's device; rows of history the session keeps
    metrics: bool | None = None
    history: int | None = None
    #: ``"step"``, ``"interval"`` or ``"memory"``: how far a step must reach before its answer
    durability: str | None = None
    #: the session's change counter (every step, import, overwrite, option change, scheduler
    #: step...; not pushes): what ``import_state(..., base_revision=)`` names
    revision: int | None = None
    #: the option slots that hold one tensor object on the server, one list per tensor held by
    #: more than one: ``("defaults", key)`` or ``(group index, key)`` (a tensor lr given as the
    #: default is the defaults' and every group's built from them, as in torch)
    shared_tensors: list[list[tuple[str | int, str]]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def param_names(self) -> list[str]:
        """Every parameter name, in torch's order (groups in order, params in order)."""
        return [n for g in self.param_groups for n in g.params]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SessionInfo:
        groups = []
        for g in obj.get("param_groups") or []:
            names = [str(n) for n in g.get("params", [])]
            options = options_from_wire({k: v for k, v in g.items() if k != "params"})
            groups.append(ParamGroupInfo(params=names, options=options))
        params = {
            str(name): ParamInfo(str(p.get("dtype")), tuple(p.get("shape", ())))
            for name, p in (obj.get("params") or {}).items()
            if isinstance(p, dict)
        }
        lr = obj.get("lr")
        if not isinstance(lr, list):
            lr = [g.options.get("lr") for g in groups]
        return cls(
            id=str(obj["id"]),
            optimizer=str(obj["optimizer"]),
            device=str(obj.get("device", "")),
            version=int(obj.get("version", 0)),
            step=int(obj.get("step", 0)),
            defaults=options_from_wire(obj.get("defaults") or {}),
            param_groups=groups,
            scheduler=obj.get("scheduler"),
            lr=list(lr),
            params=params,
            nonfinite=obj.get("nonfinite"),
            accumulated=list(obj.get("accumulated") or []),
            sync=obj.get("sync"),
            max_staleness=obj.get("max_staleness"),
            staleness_lr=obj.get("staleness_lr"),
            metrics=obj.get("metrics"),
            history=obj.get("history"),
            durability=obj.get("durability"),
            revision=obj.get("revision") if type(obj.get("revision")) is int else None,
            shared_tensors=_shared_slots(obj.get("shared_tensors")),
            raw=obj,
        )


@dataclass(frozen=True)
class StepResult:
    """``POST .../step``: the new version and step count, per-group learning rates after the
    step (and its scheduler step), whether it was skipped (non-finite gradient under the
    ``skip`` policy), which gradients were non-finite, and the updated parameters (``None``
    when asked for ``return_params=False``). Parameter-server extras: ``sync`` for a step of
    a synchronous round (``{"workers": [ids that contributed], "expected": K, "partial":
    bool}``), ``staleness`` for an async push that named its base version."""

    version: int
    step: int
    lr: list[float]
    skipped: bool
    params: dict[str, Tensor] | None
    nonfinite: list[str] = field(default_factory=list)
    sync: dict[str, Any] | None = None
    staleness: int | None = None
    #: the answer to a retry the server had already applied (nothing was applied again)
    replayed: bool = False
    #: the version ``params`` belong to (a replayed answer carries the current parameters)
    params_version: int | None = None
    #: an LBFGS step: its first evaluation's loss (what torch's ``step`` returns) and how many
    #: evaluations it took
    loss: float | None = None
    evaluations: int | None = None
    #: this step's metrics: ``{"n", "time", "groups": [{"lr", "grad_norm", "update_norm",
    #: "param_norm", "update_ratio"}, ...], "nonfinite", "staleness"?, "workers"?,
    #: "scalars"?}`` (non-finite values as floats)
    metrics: dict[str, Any] | None = None

    @property
    def params_at(self) -> int:
        """The session version of ``params``."""
        return self.version if self.params_version is None else self.params_version


@dataclass(frozen=True)
class EvaluationRequest:
    """An open LBFGS step's question: post the loss and gradients at ``params`` to
    :meth:`optserve.Client.evaluate` with ``evaluation`` (``evaluations`` are answered so
    far; the session is still at ``version``, ``step``; the step is abandoned when no answer
    comes within ``timeout_s``)."""

    step_id: str
    evaluation: str
    evaluations: int
    version: int
    step: int
    params: dict[str, Tensor]
    timeout_s: float = 0.0


@dataclass(frozen=True)
class ParamsResult:
    """``GET``/``PUT .../params``: parameters with the version and step they belong to."""

    version: int
    step: int
    params: dict[str, Tensor]
    lr: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class VersionInfo:
    """The session's version and step after a call that returns no tensors."""

    version: int
    step: int


@dataclass(frozen=True)
class SchedulerStepResult:
    """``POST .../scheduler/step``: learning rates after the scheduler step."""

    lr: list[float]
    version: int | None = None
    step: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class OptimizerInfo:
    """An entry of ``GET /v1/optimizers``: a ``torch.optim`` class and its default options."""

    name: str
    defaults: dict[str, Any]


@dataclass(frozen=True)
class SchedulerInfo:
    """An entry of ``GET /v1/schedulers``: a ``torch.optim.lr_scheduler`` class, its default
    options, the options it requires, and whether it steps with the optimizer by default."""

    name: str
    defaults: dict[str, Any]
    required: list[str] = field(default_factory=list)
    default_step_on: str = "optimizer"


def _untag(value: Any) -> Any:
    """``{"$float": "inf"}`` to the float; anything else as it is."""
    if isinstance(value, dict) and set(value) == {"$float"}:
        return float(value["$float"])
    if isinstance(value, dict):
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


@dataclass(frozen=True)
class History:
    """``GET .../history``: per-step metrics, columnar. ``columns[name]`` is a list with one
    value per row (``None`` where the row has none); with ``points`` every column ``X`` comes
    as ``X.min`` and ``X.max`` per bucket of consecutive rows. ``first``/``last``: the oldest
    and newest row number (``n``) the session still keeps."""

    id: str
    capacity: int
    first: int | None
    last: int | None
    rows: int
    points: int | None
    fields: list[str]
    columns: dict[str, list[Any]]

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> History:
        return cls(id=str(obj["id"]), capacity=int(obj["capacity"]), first=obj.get("first"),
                   last=obj.get("last"), rows=int(obj["rows"]), points=obj.get("points"),
                   fields=list(obj["fields"]),
                   columns={k: _untag(v) for k, v in obj["columns"].items()})
