"""Shared fixtures: an in-process app client and a live uvicorn server on 127.0.0.1."""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app


def _test_settings(**overrides: object) -> Settings:
    """CPU, a 64 MB body limit and a fresh data directory of its own."""
    values: dict[str, object] = {"device": "cpu", "max_body_mb": 64.0,
                                 "data_dir": Path(tempfile.mkdtemp(prefix="optserve-test-"))}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class LiveServer:
    """uvicorn.Server running in a thread, as httpx's own test suite does."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def live_server() -> Iterator[str]:
    """Base URL of a real uvicorn server on 127.0.0.1 (CPU device), shared by the session."""
    server = LiveServer(_test_settings())
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        yield client


@pytest.fixture
def app_client() -> Iterator[TestClient]:
    """The app in-process (no sockets), lifespan included."""
    with TestClient(create_app(_test_settings())) as client:
        yield client
