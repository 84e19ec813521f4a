"""One settings object, read from ``OPTSERVE_*`` environment variables (or ``.env``)."""

from __future__ import annotations

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
    torch_threads: int = Field(
        default=0, ge=0, description="torch intra-op threads on the worker (0: torch's default)"
    )
    default_nonfinite: Literal["reject", "skip", "allow"] = "reject"
    log_level: str = "info"


def get_settings() -> Settings:
    return Settings()
