"""Dependencies routes share: the engine and the settings, made once in the lifespan.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
a thread hop per dependency per request (three per step) for what is an attribute lookup."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from app.api.auth import tenant_of
from app.config import Settings
from app.engine.interface import Engine


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_tenant(request: Request) -> str:
    return tenant_of(request.scope)


EngineDep = Annotated[Engine, Depends(get_engine)]
TenantDep = Annotated[str, Depends(get_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

#: a pull's long poll (the whole parameters' and the rows'): until this version, for at most
#: ``wait_s`` seconds (finite: NaN and infinity are refused as such)
MinVersion = Annotated[int | None, Query(ge=0, description="long-poll until this version")]
WaitSeconds = Annotated[float, Query(ge=0, le=1e9, allow_inf_nan=False,
                                     description="long-poll for at most this long (capped at "
                                                 "60 s)")]
