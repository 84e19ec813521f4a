"""Dependencies routes share: the engine and the settings, made once in the lifespan."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import tenant_of
from app.config import Settings
from app.engine.interface import Engine


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_tenant(request: Request) -> str:
    return tenant_of(request.scope)


EngineDep = Annotated[Engine, Depends(get_engine)]
TenantDep = Annotated[str, Depends(get_tenant)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
