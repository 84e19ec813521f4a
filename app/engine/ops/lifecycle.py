"""Operations that make a session or change how it is served: ``create`` and ``configure``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import ps
from app.engine.history import History, check_capacity
from app.engine.interface import CreateSpec, Durability, GroupSpec, NonFinitePolicy, SessionInfo
from app.engine.ops.base import Operation, register
from app.engine.option_values import (
    refuse_lbfgs_history,
    refuse_nonfinite_options,
    refuse_nonfinite_scheduler,
)
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
    #: the version the session starts at: past the last one of a session deleted under the
    #: same id (:mod:`app.engine.last_versions`), so no version is answered for two sessions'
    #: values; 0 in logs written before it was kept
    first_version: int = 0
    #: made by a request (:meth:`from_spec`), not read from the log: also refused what
    #: servers before its checks took (``Session.build``'s ``request``); never logged
    request: bool = field(default=False, compare=False)

    @classmethod
    def from_spec(cls, spec: CreateSpec, session_id: str, nonfinite: NonFinitePolicy,
                  durability: Durability, metrics: bool = True,
                  history: int = DEFAULT_HISTORY, first_version: int = 0) -> CreateSession:
        # (a request, not a record: checks records logged before them never met)
        ps.check_requested(spec.ps_options)
        ps.check_takes(spec.optimizer, ps.parse(spec.ps_options))
        if nonfinite != "allow":
            for i, group in enumerate(spec.groups):
                refuse_nonfinite_params(group.params, f"param_groups.{i}.params")
        # options: whatever the policy (it is about values, not options)
        refuse_nonfinite_options(spec.optimizer, spec.options, "options")
        refuse_lbfgs_history(spec.optimizer, spec.options, "options")
        for i, group in enumerate(spec.groups):
            refuse_nonfinite_options(spec.optimizer, group.options, f"param_groups.{i}")
            refuse_lbfgs_history(spec.optimizer, group.options, f"param_groups.{i}")
        refuse_nonfinite_scheduler(spec.scheduler)
        return cls(check_session_id(session_id), spec.optimizer, spec.groups, spec.options,
                   spec.scheduler, nonfinite, durability, spec.ps_options,
                   check_metrics(spec.metrics) if spec.metrics is not None else metrics,
                   check_capacity(spec.history) if spec.history is not None else history,
                   spec.empty_groups, first_version, request=True)

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
        if self.first_version:
            session.version = self.first_version
            # (gradients computed at an earlier version were computed on another session's
            # values: refused as those computed before an overwrite are)
            session.replaced = (self.first_version, "create")
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
        if self.first_version:
            out["first_version"] = self.first_version
        return out

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> CreateSession:
        groups = [GroupSpec(dict(g["params"]), dict(g["options"])) for g in tree["groups"]]
        return cls(str(tree["id"]), str(tree["optimizer"]), groups, dict(tree["options"]),
                   tree["scheduler"], tree["nonfinite"], tree["durability"], dict(tree["ps"]),
                   bool(tree.get("metrics", True)), int(tree.get("history", DEFAULT_HISTORY)),
                   bool(tree.get("empty_groups", False)), int(tree.get("first_version", 0)))


@dataclass
class ConfigurePlan:
    ps: ps.PsConfig
    metrics: bool
    history: int
    #: ``"scheduler": null``: the session's scheduler is removed
    drop_scheduler: bool = False


#: session options PATCH changes besides the parameter-server ones
SESSION_KEYS = ("metrics", "history", "scheduler")


def check_scheduler_removal(value: object) -> bool:
    """``"scheduler"`` in a PATCH: only ``null``, which removes the session's scheduler (a way
    out of a schedule that went where the session cannot follow:
    :mod:`app.engine.scheduler_writes`)."""
    if value is not None:
        raise Invalid("a session's scheduler is given at create; PATCH takes only "
                      "\"scheduler\": null, which removes it (the groups keep their lr, and the "
                      "keys it added, as torch's do when a scheduler is no longer stepped)",
                      code="invalid_option", field="scheduler")
    return True


def check_metrics(value: object) -> bool:
    if type(value) is not bool:
        raise Invalid("metrics must be true or false (per-step norms on the device)",
                      code="invalid_option", field="metrics")
    return value


@register
@dataclass
class Configure(Operation):
    """Change session options: parameter-server ones (``sync``, ``max_staleness``,
    ``staleness_lr``), ``metrics`` (per-step norms on or off), ``history`` (rows kept) and
    ``scheduler`` (``null``: remove it)."""

    kind = "configure"
    options: dict[str, Any]
    #: set by requests: also refuses what servers before it accepted (sync rounds on LBFGS).
    #: It travels with the operation (its record, a remote host's copy); records logged
    #: before this check existed lack it and replay as they ran
    request: bool = False
    #: set by requests: one that changes no option (``{}``, or the values the session has)
    #: is no revision (:meth:`changes`). Logged; records logged before it lack it and replay
    #: as they ran (each a revision)
    noop_kept: bool = False

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
        drop = "scheduler" in self.options and check_scheduler_removal(self.options["scheduler"])
        return ConfigurePlan(config, on, rows, drop)

    def changes(self, s: Session, plan: ConfigurePlan) -> bool:
        if not self.noop_kept:
            return True
        return (plan.ps != s.ps or plan.metrics != s.metrics_on
                or (not plan.metrics and s.metrics_layout is not None)
                or plan.history != s.history.capacity
                or (plan.drop_scheduler and (s.scheduler is not None
                                             or s.scheduler_spec is not None)))

    def apply(self, s: Session, plan: ConfigurePlan) -> SessionInfo:
        if plan.drop_scheduler:
            s.scheduler = s.scheduler_spec = None
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
        if self.noop_kept:
            tree["noop_kept"] = True
        return tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Configure:
        return cls(dict(tree["options"]), tree.get("request") is True,
                   tree.get("noop_kept") is True)
