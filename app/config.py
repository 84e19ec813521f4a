"""One settings object, read from ``OPTSERVE_*`` environment variables (or ``.env``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob has a default that works on a laptop with no GPU."""

    model_config = SettingsConfigDict(env_prefix="OPTSERVE_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = Field(
        default="auto", description="auto | cpu | cuda | cuda:N (auto: cuda when available)"
    )
    max_body_mb: float = Field(default=512.0, gt=0, description="largest accepted request body")
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="408 when a request body stalls this long (no bytes)"
    )
    torch_threads: int = Field(
        default=0, ge=0, description="torch intra-op threads on the worker (0: torch's default)"
    )
    default_nonfinite: Literal["reject", "skip", "allow"] = "reject"
    data_dir: Path = Field(default=Path("data"), description="where sessions are persisted")
    durability: Literal["step", "interval", "memory"] = Field(
        default="step",
        description="default for sessions: step (fsync before acknowledging), interval "
        "(fsync every fsync_interval_ms), memory (no disk)",
    )
    fsync_interval_ms: float = Field(default=50.0, gt=0, le=60_000)
    snapshot_every_steps: int = Field(default=1000, ge=1)
    snapshot_every_s: float = Field(default=300.0, gt=0)
    api_keys: str = Field(default="", description="key:tenant pairs, comma-separated")
    api_keys_file: Path | None = Field(default=None, description="file of key:tenant lines")
    allow_open: bool = Field(default=False, description="allow a non-loopback bind without keys")
    max_sessions: int = Field(default=0, ge=0, description="per tenant; 0 = unlimited")
    max_session_elements: int = Field(default=0, ge=0, description="0 = unlimited")
    idempotency_window: int = Field(
        default=1000, ge=1, le=1_000_000,
        description="Idempotency-Key answers each session remembers (its last N keys)")
    engine: Literal["embedded", "ray"] = Field(
        default="embedded", description="embedded: sessions in this process; ray: sessions on "
        "Ray actor hosts (pip install optserve-server[ray]; docs/cluster.md)")
    ray_address: str = Field(
        default="local", description="the Ray cluster: local (start one in this process), "
        "auto, or HOST:PORT of its GCS")
    ray_namespace: str = Field(default="optserve", min_length=1, max_length=64,
                               description="Ray namespace of the host actors")
    ray_resources: str = Field(
        default='{"num_cpus": 1}', description="what a session host asks Ray for, unless the "
        "create says: JSON {num_cpus, num_gpus, memory, resources: {custom: n}}")
    ray_placement: Literal["pack", "spread"] = Field(
        default="spread", description="choosing a host for a new session: pack (fill hosts) "
        "or spread (one more host while the cluster has room)")
    ray_sessions_per_host: int = Field(default=0, ge=0,
                                       description="sessions per host actor (0: no limit)")
    ray_host_start_timeout_s: float = Field(
        default=120.0, gt=0, description="503 when Ray cannot start a host this fast (no room)")
    ray_commit_timeout_s: float = Field(
        default=30.0, gt=0, description="how long a sharded operation waits for a restarting "
        "shard host before answering 503 (it completes later)")
    warm_up: bool = Field(default=True, description="load torch's kernels for every optimizer "
                          "before readiness (the first request does not pay for them)")
    log_level: str = "info"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line, with request ids")


def get_settings() -> Settings:
    return Settings()
