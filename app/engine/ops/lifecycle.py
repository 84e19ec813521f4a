"""Operations that make a session or change how it is served: ``create`` and ``configure``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import ps
from app.engine.history import History, check_capacity
from app.engine.interface import CreateSpec, Durability, GroupSpec, NonFinitePolicy, SessionInfo
from app.engine.ops.base import Operation, register
from app.engine.option_values import refuse_nonfinite_options, refuse_nonfinite_scheduler
from app.engine.session import (
    DEFAULT_HISTORY,
    Session,
    check_session_id,
    refuse_nonfinite_params,
)
from app.errors import Invalid


@register
@dataclass
class CreateSession(Operation):
    """A new session, with its id, policies and durability already resolved (the record holds
    exactly what was built)."""

    kind = "create"
    id: str
    optimizer: str
    groups: list[GroupSpec]
    options: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] | None = None
    nonfinite: NonFinitePolicy = "reject"
    durability: Durability = "memory"
    ps_options: dict[str, Any] = field(default_factory=dict)
    #: per-step norms on the device (the history keeps the rest either way)
    metrics: bool = True
    #: history rows kept
    history: int = DEFAULT_HISTORY
    #: a shard of a sharded session: groups may hold none of its parameters
    empty_groups: bool = False
    #: made by a request (:meth:`from_spec`), not read from the log: also refused what
    #: servers before its checks took (``Session.build``'s ``request``); never logged
    request: bool = field(default=False, compare=False)

    @classmethod
    def from_spec(cls, spec: CreateSpec, session_id: str, nonfinite: NonFinitePolicy,
                  durability: Durability, metrics: bool = True,
                  history: int = DEFAULT_HISTORY) -> CreateSession:
        # (a request, not a record: checks records logged before them never met)
        ps.check_takes(spec.optimizer, ps.parse(spec.ps_options))
        if nonfinite != "allow":
            for i, group in enumerate(spec.groups):
                refuse_nonfinite_params(group.params, f"param_groups.{i}.params")
        # options: whatever the policy (it is about values, not options)
        refuse_nonfinite_options(spec.optimizer, spec.options, "options")
        for i, group in enumerate(spec.groups):
            refuse_nonfinite_options(spec.optimizer, group.options, f"param_groups.{i}")
        refuse_nonfinite_scheduler(spec.scheduler)
        return cls(check_session_id(session_id), spec.optimizer, spec.groups, spec.options,
                   spec.scheduler, nonfinite, durability, spec.ps_options,
                   check_metrics(spec.metrics) if spec.metrics is not None else metrics,
                   check_capacity(spec.history) if spec.history is not None else history,
                   spec.empty_groups, request=True)

    def build(self, device: torch.device) -> Session:
        """Validate everything and build the session (nothing exists until it is returned)."""
        config = ps.parse(self.ps_options)
        session = Session.build(self.id, self.optimizer, self.groups, self.options,
                                self.scheduler, self.nonfinite, device,
                                allow_empty=self.empty_groups, request=self.request)
        session.ps = config
        session.durability = self.durability
        session.metrics_on = self.metrics
        session.history = History(self.history)
        return session

    def apply(self, s: Session, plan: Any) -> SessionInfo:  # pragma: no cover - see build
        raise TypeError("a create builds its session: use build()")

    def to_tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "optimizer": self.optimizer,
                               "groups": [{"params": g.params, "options": g.options}
                                          for g in self.groups],
                               "options": self.options, "scheduler": self.scheduler,
                               "nonfinite": self.nonfinite, "durability": self.durability,
                               "ps": self.ps_options, "metrics": self.metrics,
                               "history": self.history}
        if self.empty_groups:
            out["empty_groups"] = True
        return out

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> CreateSession:
        groups = [GroupSpec(dict(g["params"]), dict(g["options"])) for g in tree["groups"]]
        return cls(str(tree["id"]), str(tree["optimizer"]), groups, dict(tree["options"]),
                   tree["scheduler"], tree["nonfinite"], tree["durability"], dict(tree["ps"]),
                   bool(tree.get("metrics", True)), int(tree.get("history", DEFAULT_HISTORY)),
                   bool(tree.get("empty_groups", False)))


@dataclass
class ConfigurePlan:
    ps: ps.PsConfig
    metrics: bool
    history: int


#: session options PATCH changes besides the parameter-server ones
SESSION_KEYS = ("metrics", "history")


def check_metrics(value: object) -> bool:
    if type(value) is not bool:
        raise Invalid("metrics must be true or false (per-step norms on the device)",
                      code="invalid_option", field="metrics")
    return value


@register
@dataclass
class Configure(Operation):
    """Change session options: parameter-server ones (``sync``, ``max_staleness``,
    ``staleness_lr``), ``metrics`` (per-step norms on or off) and ``history`` (rows kept)."""

    kind = "configure"
    options: dict[str, Any]
    #: set by requests: also refuses what servers before it accepted (sync rounds on LBFGS).
    #: It travels with the operation (its record, a remote host's copy); records logged
    #: before this check existed lack it and replay as they ran
    request: bool = False

    def check(self, s: Session) -> ConfigurePlan:
        unknown = sorted(set(self.options) - set(ps.PS_KEYS) - set(SESSION_KEYS))
        if unknown:
            raise Invalid(f"unknown field {unknown[0]!r:.60}; expected "
                          f"{[*ps.PS_KEYS, *SESSION_KEYS]}", code="unknown_field",
                          field=unknown[0])
        config = ps.parse({k: v for k, v in self.options.items() if k in ps.PS_KEYS}, s.ps)
        if self.request and "sync" in self.options:
            ps.check_takes(s.optimizer_name, config)
        on = (check_metrics(self.options["metrics"]) if "metrics" in self.options
              else s.metrics_on)
        rows = (check_capacity(self.options["history"]) if "history" in self.options
                else s.history.capacity)
        return ConfigurePlan(config, on, rows)

    def apply(self, s: Session, plan: ConfigurePlan) -> SessionInfo:
        s.ps = plan.ps
        s.metrics_on = plan.metrics
        if not plan.metrics:
            s.metrics_layout = None
        if plan.history != s.history.capacity:
            s.history.resize(plan.history)
        return s.describe()

    def to_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {"options": self.options}
        if self.request:
            tree["request"] = True
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Configure:
        return cls(dict(tree["options"]), tree.get("request") is True)
