"""Operations only the shards of a sharded session receive (:mod:`app.engine.shards`).

A sharded session keeps every shard at the same version and step. Two whole-session
operations leave some shards with nothing of their own to do, yet every shard must do the
same thing to its counters and group options:

- ``skip_step``: the session skips a step (a non-finite gradient under ``nonfinite: skip``,
  found on any shard): every shard makes the step's option changes, clears its accumulated
  gradients and keeps its version, exactly what a skipped ``step`` does;
- ``bump``: an overwrite of parameters that all live on other shards: the version rises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.engine import shared_options
from app.engine.interface import ParamsResult, StepResult
from app.engine.ops.base import Operation, register
from app.engine.ops.params import changed_groups, check_group_changes
from app.engine.session import Session


@register
@dataclass
class SkipStep(Operation):
    """A skipped step: the option changes sent with it, the accumulator cleared."""

    kind = "skip_step"
    options: dict[int, dict[str, Any]] | None = None

    def check(self, s: Session) -> dict[int, dict[str, Any]]:
        self.options = changed_groups(len(s.optimizer.param_groups), self.options)
        return check_group_changes(s, self.options) if self.options else {}

    def apply(self, s: Session, plan: dict[int, dict[str, Any]]) -> StepResult:
        shared_options.apply_changes(s.optimizer.param_groups, plan)
        s.accum.clear()
        return StepResult(s.version, s.step_count, s.lrs(), skipped=True)

    def revised(self, result: Any) -> bool:
        return bool(self.options)

    def to_tree(self) -> dict[str, Any]:
        return {"options": {str(i): o for i, o in self.options.items()}} if self.options else {}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> SkipStep:
        options = tree.get("options")
        return cls({int(i): dict(o) for i, o in options.items()} if options else None)


@register
@dataclass
class Bump(Operation):
    """The version of a shard none of whose parameters an overwrite names."""

    kind = "bump"
    bumps_version = True

    def apply(self, s: Session, plan: Any) -> ParamsResult:
        s.version += 1
        s.replaced = (s.version, "overwrite")  # (the overwrite's, on its other shards)
        return ParamsResult(s.version, s.step_count, s.lrs(), {})

    def to_tree(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Bump:
        return cls()
