"""The engine: optimizer sessions, knowing nothing of HTTP."""

from app.engine.embedded import EmbeddedEngine
from app.engine.interface import CreateSpec, Engine, GroupSpec, ParamsResult, StepResult

__all__ = ["CreateSpec", "EmbeddedEngine", "Engine", "GroupSpec", "ParamsResult", "StepResult"]
