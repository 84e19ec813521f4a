"""``OPTSERVE_RAY_ADDRESS=local`` starts a cluster of the front's own, never one it finds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

ray_host = pytest.importorskip("app.engine.ray_host")


class _Started(Exception):
    """What the stand-in ``ray.init`` raises once it has recorded its call."""


def test_a_local_address_starts_a_new_cluster_even_beside_a_running_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init(address=None)`` joins the cluster ``RAY_ADDRESS`` or
    ``/tmp/ray/ray_current_cluster`` names (another server's, a test run's) where one runs on
    the machine: the front's host actors (detached) were made there, and stayed there, serving
    the data directory, after the front stopped (its stop only disconnects). ``"local"`` tells
    Ray to start a new one whatever runs beside it."""
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise _Started

    monkeypatch.setattr(ray_host.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_host.ray, "init", init)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # (a cluster already running)
    router = ray_host.RayRouter(ray_host.RayOptions(data_dir=tmp_path, address="local"))
    with pytest.raises(_Started):
        asyncio.run(router.start())
    assert [c["address"] for c in calls] == ["local"]
