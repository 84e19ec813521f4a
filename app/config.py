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
    evaluation_timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="how long an open LBFGS step waits for each evaluation before it is "
        "abandoned (the session unchanged); a step may ask for less or more with ?timeout_s=")
    log_level: str = "info"
    log_format: Literal["json", "text"] = Field(
        default="json", description="json: one JSON object per line, with request ids")


def get_settings() -> Settings:
    return Settings()
