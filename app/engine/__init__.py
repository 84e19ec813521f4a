"""The engine: optimizer sessions, knowing nothing of HTTP."""

from app.engine.factory import embedded_engine, make_engine
from app.engine.front import DEFAULT_TENANT, Front, Limits
from app.engine.interface import (
    CreateSpec,
    Engine,
    GroupSpec,
    IdemKey,
    ParamsResult,
    SessionInfo,
    StepResult,
)

__all__ = ["DEFAULT_TENANT", "CreateSpec", "Engine", "Front", "GroupSpec", "IdemKey", "Limits",
           "ParamsResult", "SessionInfo", "StepResult", "embedded_engine", "make_engine"]
