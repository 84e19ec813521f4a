"""One engine factory: the settings say which engine, and everything it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app import data_dir_engine
from app.engine.chunked import DEFAULT_CHUNK
from app.engine.directory import Directory
from app.engine.front import Front, Limits
from app.engine.host import EmbeddedHost, HostConfig
from app.engine.interface import Durability, NonFinitePolicy
from app.engine.router import LocalRouter
from app.engine.store import Files
from app.engine.worker import Observer


def make_engine(settings: Any, observer: Observer | None = None) -> Front:
    """The engine ``settings`` (an :class:`app.config.Settings`) describe: ``embedded`` (every
    session in this process) or ``ray`` (sessions on Ray actor hosts, :mod:`app.engine.ray_host`;
    needs the ``ray`` extra). Either refuses a data directory that holds the other engine's
    sessions (:mod:`app.data_dir_engine`)."""
    data_dir_engine.claim(Path(settings.data_dir), settings.engine)
    if settings.engine == "ray":
        from app.engine.ray_host import ray_engine
        return ray_engine(settings)
    return embedded_engine(
        settings.device,
        torch_threads=settings.torch_threads,
        step_chunk=settings.step_chunk,
        default_nonfinite=settings.default_nonfinite,
        data_dir=settings.data_dir,
        durability=settings.durability,
        snapshot_every_steps=settings.snapshot_every_steps,
        snapshot_every_s=settings.snapshot_every_s,
        snapshot_every_mb=settings.snapshot_every_mb,
        max_open_logs=settings.max_open_logs,
        fsync_interval_s=settings.fsync_interval_ms / 1000,
        idempotency_window=settings.idempotency_window,
        evaluation_timeout_s=settings.evaluation_timeout_s,
        metrics=settings.metrics,
        history_steps=settings.history_steps,
        limits=Limits(settings.max_sessions, settings.max_session_elements,
                      max_session_params=settings.max_session_params),
        observer=observer,
        warm_up=settings.warm_up,
        data_dir_wait_s=settings.data_dir_wait_s,
        ready_min_free_bytes=settings.ready_min_free_bytes,
    )


def embedded_engine(
    device: str = "auto",
    *,
    torch_threads: int = 0,
    step_chunk: int = DEFAULT_CHUNK,
    default_nonfinite: NonFinitePolicy = "reject",
    data_dir: Path | None = None,
    durability: Durability = "memory",
    snapshot_every_steps: int = 1000,
    snapshot_every_s: float = 300.0,
    snapshot_every_mb: float = 1024.0,
    max_open_logs: int = 0,
    fsync_interval_s: float = 0.05,
    idempotency_window: int = 1000,
    evaluation_timeout_s: float = 60.0,
    metrics: bool = True,
    history_steps: int = 100_000,
    limits: Limits | None = None,
    observer: Observer | None = None,
    files: Files | None = None,
    warm_up: bool = True,
    data_dir_wait_s: float = 30.0,
    ready_min_free_bytes: int = 0,
) -> Front:
    """The embedded engine: sessions in this process, one worker thread for the device (a
    sharded session's shards too; their layouts in ``<data_dir>/directory``)."""
    host = EmbeddedHost(HostConfig(
        device=device, torch_threads=torch_threads, step_chunk=step_chunk,
        default_nonfinite=default_nonfinite,
        data_dir=data_dir, durability=durability, snapshot_every_steps=snapshot_every_steps,
        snapshot_every_s=snapshot_every_s, snapshot_every_mb=snapshot_every_mb,
        max_open_logs=max_open_logs,
        fsync_interval_s=fsync_interval_s, idempotency_window=idempotency_window, files=files,
        warm_up=warm_up, data_dir_wait_s=data_dir_wait_s,
        ready_min_free_bytes=ready_min_free_bytes,
        evaluation_timeout_s=evaluation_timeout_s, metrics=metrics,
        history_steps=history_steps), observer)
    directory = Directory(data_dir / "directory" if data_dir is not None else None)
    return Front(LocalRouter(host, directory), limits)
