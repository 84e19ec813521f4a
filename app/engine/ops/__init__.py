"""Operations as values: one typed value per mutation, with its validation, its ``apply`` and
its log record in one place (see :mod:`app.engine.ops.base`)."""

from app.engine.ops.base import (
    REGISTRY,
    ApplyFailed,
    Expected,
    Operation,
    apply_counted,
    decode,
    wire_tree,
)
from app.engine.ops.gradients import Push, Step, ZeroGrad
from app.engine.ops.lbfgs import LbfgsStep
from app.engine.ops.lifecycle import Configure, CreateSession
from app.engine.ops.params import AddParamGroup, Overwrite, UpdateParamGroup
from app.engine.ops.shard import Bump, SkipStep
from app.engine.ops.state import ImportState, SchedulerStep

__all__ = [
    "REGISTRY", "AddParamGroup", "ApplyFailed", "Bump", "Configure", "CreateSession", "Expected",
    "ImportState", "LbfgsStep", "Operation", "Overwrite", "Push", "SchedulerStep", "SkipStep",
    "Step", "UpdateParamGroup", "ZeroGrad", "apply_counted", "decode",
    "wire_tree",
]
