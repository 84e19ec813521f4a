"""The app factory: ``create_app(settings)`` builds the ASGI app; one engine, made in the
lifespan.

Nothing is built at import time. ``python -m app`` (``scripts/serve``, the Docker image) reads
the settings, refuses a bad one with one line and exit code 2, then serves
``create_app(settings)``. Under another ASGI server use the factory:
``uvicorn --factory app.main:create_app`` (settings from the environment; a bad one also ends
the process with one line and exit code 2; a data directory another server holds, with one
line too, and uvicorn's exit code for a failed startup, 3: :mod:`app.startup_refusal`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from app import __version__, startup_refusal
from app.api import (
    docs_pages,
    evaluations,
    history,
    meta,
    openapi_docs,
    problems,
    rows,
    sessions,
    ui,
)
from app.api.auth import AuthMiddleware, parse_keys
from app.api.body_memory import BodyMemory, BodyMemoryRelease, bound
from app.api.connection_cap import ConnectionSlots, default_limit
from app.api.cors import ProblemCORSMiddleware
from app.api.encoded_slash import EncodedSlash
from app.api.request_head_checks import RequestHeadChecks
from app.api.step_lane import StepLane
from app.config import (
    EXIT_CONFIG,
    ConfigError,
    Settings,
    load_settings,
    metrics_readers,
    warn_misspelt_settings,
)
from app.engine import DEFAULT_TENANT, Front, make_engine
from app.engine.data_dir_lock import DataDirInUse
from app.observability import Metrics, RequestContextMiddleware
from app.runtime import tune_allocator
from app.transport.local import LocalTransport

#: what a browser page on an allowed origin may send and read (OPTSERVE_CORS_ORIGINS)
CORS_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Accept", "Idempotency-Key", "If-Match",
                        "If-None-Match", "X-Optserve-Worker", "X-Request-Id"]
CORS_EXPOSED_HEADERS = ["ETag", "X-Optserve-Version", "X-Optserve-Step", "X-Optserve-Revision",
                        "X-Optserve-State-Tag", "X-Request-Id", "Location", "Retry-After",
                        "Idempotent-Replayed"]


def exit_on_config_error(exc: ConfigError) -> None:
    """One line on stderr and exit code 2 (what ``python -m app`` does too)."""
    print(f"optserve: invalid configuration: {exc}", file=sys.stderr)
    raise SystemExit(EXIT_CONFIG)


async def _restored(engine: Front, settings: Settings) -> str:
    """What the start restored and from where, for its log line: a server started from another
    working directory than usual (``OPTSERVE_DATA_DIR`` is ``./data`` by default) shows a
    directory the operator did not expect, and no sessions."""
    where = Path(settings.data_dir).resolve()
    if settings.engine == "ray":
        return f"sessions on the Ray cluster, data in {where}"
    status = await engine.status()
    refused = (f", {len(status.refused)} refused (GET /readyz lists them)"
               if status.refused else "")
    return (f"{status.sessions} stored session(s) restored from {where}{refused} "
            f"(durability {settings.durability})")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for ``settings``. Without them (``uvicorn --factory app.main:create_app``) they
    come from the environment, and a bad one ends the process: one line, exit code 2. With
    them, a bad API key configuration raises :class:`ConfigError`."""
    from_environment = settings is None
    try:
        settings = settings if settings is not None else load_settings()
        if from_environment:  # (uvicorn --factory: python -m app warns in its own start)
            warn_misspelt_settings(logging.getLogger("optserve"))
        keys = parse_keys(settings.api_keys, settings.api_keys_file)
        metrics_tenants = metrics_readers(settings, keys)
    except ConfigError as exc:
        if not from_environment:
            raise
        exit_on_config_error(exc)
        raise  # not reached
    metrics = Metrics(per_session=not keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        tune_allocator()
        engine = make_engine(settings, observer=metrics.observe_worker)
        try:
            await engine.start()
        except DataDirInUse as exc:
            app.state.startup_problem = str(exc)  # python -m app prints it last
            if from_environment:  # uvicorn --factory: said here, its traceback left out
                startup_refusal.say(str(exc))
            raise
        app.state.engine = engine
        app.state.settings = settings
        app.state.metrics = metrics
        app.state.pin_bodies = engine.device.startswith("cuda")
        local = None
        # (the Ray engine's sessions live in other processes, often on other machines)
        if settings.local_transport and settings.engine == "embedded":
            local = LocalTransport(engine, keys, DEFAULT_TENANT, settings.local_dir,
                                   slots=app.state.connections,
                                   max_bindings=settings.max_bindings,
                                   max_binding_bytes=settings.max_binding_mb << 20)
            local.start(asyncio.get_running_loop())
        app.state.local_transport = local
        logging.getLogger("optserve").info("optserve ready on device %s: %s", engine.device,
                                           await _restored(engine, settings))
        try:
            yield
        finally:
            if local is not None:
                local.stop()
            await engine.stop()

    app = FastAPI(
        title="optserve",
        version=__version__,
        summary="PyTorch's torch.optim as a network service",
        lifespan=lifespan,
        docs_url=None,  # self-hosted below (app/static): no CDN
        redoc_url=None,
        # a path with a trailing '/' is a 404 naming the path without it (problems.py), not
        # a 307 to it: a client that does not follow redirects (curl, curl -f) took the 307
        # of a POST .../step/ for an answer and exited 0 with nothing done, and the
        # Location was built from the request's Host (http:// behind a TLS proxy)
        redirect_slashes=False,
    )
    if from_environment:
        logging.getLogger(startup_refusal.UVICORN_LOG).addFilter(
            startup_refusal.StartupRefusal(app))
    app.state.connections = ConnectionSlots(settings.max_connections or default_limit())
    app.state.body_memory = BodyMemory(bound(settings.max_bodies_mb,
                                             int(settings.max_body_mb * 1024 * 1024)))
    problems.install(app)
    openapi_docs.install(app)
    docs_pages.install(app)
    ui.install(app)
    app.add_middleware(StepLane, owner=app)  # innermost: inside auth and request context
    app.add_middleware(EncodedSlash)  # (before the step's lane, which reads the path too)
    app.add_middleware(BodyMemoryRelease)  # (around every endpoint, the step's lane too)
    app.add_middleware(AuthMiddleware, keys=keys, metrics_tenants=metrics_tenants)
    origins = settings.cors_origin_list()
    if origins:  # outside auth: preflights need no key, and 401s carry the CORS headers too
        app.add_middleware(ProblemCORSMiddleware, allow_origins=origins, allow_methods=CORS_METHODS,
                           allow_headers=CORS_REQUEST_HEADERS,
                           expose_headers=CORS_EXPOSED_HEADERS, max_age=600)
    # a missing, repeated or invalid Host and every CONNECT are refused before auth, CORS or
    # a route runs (inside the request context: the problem carries its request_id)
    app.add_middleware(RequestHeadChecks)
    # outermost: every answer, a preflight's the CORS middleware gives itself too, carries
    # X-Request-Id (and a refused preflight's problem+json its request_id)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(meta.router)
    app.include_router(sessions.router)
    app.include_router(rows.router)
    app.include_router(evaluations.router)
    app.include_router(history.router)
    return app
