"""Operations that make a session or change how it is served: ``create`` and ``configure``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from app.engine import ps
from app.engine.interface import CreateSpec, Durability, GroupSpec, NonFinitePolicy, SessionInfo
from app.engine.ops.base import Operation, register
from app.engine.session import Session, check_session_id


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
    #: a shard of a sharded session: groups may hold none of its parameters
    empty_groups: bool = False

    @classmethod
    def from_spec(cls, spec: CreateSpec, session_id: str, nonfinite: NonFinitePolicy,
                  durability: Durability) -> CreateSession:
        return cls(check_session_id(session_id), spec.optimizer, spec.groups, spec.options,
                   spec.scheduler, nonfinite, durability, spec.ps_options, spec.empty_groups)

    def build(self, device: torch.device) -> Session:
        """Validate everything and build the session (nothing exists until it is returned)."""
        config = ps.parse(self.ps_options)
        session = Session.build(self.id, self.optimizer, self.groups, self.options,
                                self.scheduler, self.nonfinite, device,
                                allow_empty=self.empty_groups)
        session.ps = config
        session.durability = self.durability
        return session

    def apply(self, s: Session, plan: Any) -> SessionInfo:  # pragma: no cover - see build
        raise TypeError("a create builds its session: use build()")

    def to_tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "optimizer": self.optimizer,
                               "groups": [{"params": g.params, "options": g.options}
                                          for g in self.groups],
                               "options": self.options, "scheduler": self.scheduler,
                               "nonfinite": self.nonfinite, "durability": self.durability,
                               "ps": self.ps_options}
        if self.empty_groups:
            out["empty_groups"] = True
        return out

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> CreateSession:
        groups = [GroupSpec(dict(g["params"]), dict(g["options"])) for g in tree["groups"]]
        return cls(str(tree["id"]), str(tree["optimizer"]), groups, dict(tree["options"]),
                   tree["scheduler"], tree["nonfinite"], tree["durability"], dict(tree["ps"]),
                   bool(tree.get("empty_groups", False)))


@register
@dataclass
class Configure(Operation):
    """Change parameter-server options (``sync``, ``max_staleness``, ``staleness_lr``)."""

    kind = "configure"
    options: dict[str, Any]

    def check(self, s: Session) -> ps.PsConfig:
        return ps.parse(self.options, s.ps)

    def apply(self, s: Session, plan: ps.PsConfig) -> SessionInfo:
        s.ps = plan
        return s.describe()

    def to_tree(self) -> dict[str, Any]:
        return {"options": self.options}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Configure:
        return cls(dict(tree["options"]))
