"""``python -m app``: run uvicorn with the settings from ``OPTSERVE_*``."""

from __future__ import annotations

import sys

import uvicorn

from app.config import get_settings


def main(argv: list[str]) -> None:
    settings = get_settings()
    uvicorn.run(
        "app.main:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=30,
    )
    del argv


if __name__ == "__main__":
    main(sys.argv[1:])
