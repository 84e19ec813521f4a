"""FastAPI runs a plain ``def`` dependency (or endpoint) in its thread pool: a thread hop per
request for what is an attribute lookup. Every dependency and endpoint of the app is
``async def``, so a request reaches the engine without one (the step path's only thread hop is
the one to the device worker)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.main import create_app
from tests.conftest import _test_settings


def callables(dependant: Dependant) -> Iterator[Any]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from callables(sub)


def test_every_dependency_and_endpoint_is_async() -> None:
    app = create_app(_test_settings())
    sync = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            continue
        for call in callables(route.dependant):
            target = call if inspect.isfunction(call) else type(call).__call__
            if not (inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(target)):
                sync.append(f"{route.path} {getattr(call, '__name__', call)}")
    assert sync == [], sync
