"""The ASGI entry point (``app.main:app``): one engine, made in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import evaluations, meta, openapi_docs, problems, rows, sessions
from app.api.auth import AuthMiddleware, parse_keys
from app.config import Settings, get_settings
from app.engine import make_engine
from app.observability import Metrics, RequestContextMiddleware
from app.runtime import tune_allocator


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    keys = parse_keys(settings.api_keys, settings.api_keys_file)
    metrics = Metrics(per_session=not keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tune_allocator()
        engine = make_engine(settings, observer=metrics.observe_worker)
        await engine.start()
        app.state.engine = engine
        app.state.settings = settings
        app.state.metrics = metrics
        logging.getLogger("optserve").info("optserve ready on device %s", engine.device)
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(
        title="optserve",
        version=__version__,
        summary="PyTorch's torch.optim as a network service",
        lifespan=lifespan,
    )
    problems.install(app)
    openapi_docs.install(app)
    app.add_middleware(AuthMiddleware, keys=keys)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(meta.router)
    app.include_router(sessions.router)
    app.include_router(rows.router)
    app.include_router(evaluations.router)
    return app


app = create_app()
