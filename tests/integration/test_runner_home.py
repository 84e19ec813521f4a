"""The suite where its user's home cannot be written (a CI user's read-only or missing home):
the Ray engine's tests that start their own cluster (``ray.init()``, outside the ``ray``
suite) failed, Ray 2.60 saving a token for its token authentication into ``~/.ray``; the
suite's loopback test clusters run without it (``RAY_AUTH_MODE=disabled``, unless the
environment says otherwise), and nothing of the suite's goes into the home."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
#: the plugins scripts/test loads for its runs, named (its PYTEST_ADDOPTS less xdist): a child
#: pytest that found them through their packages' entry points would rewrite the asserts of
#: every module of schemathesis, hypothesis and anyio as it imports them (2-3 s of CPU each
#: child, where PYTHONDONTWRITEBYTECODE is set)
SUITE_PLUGINS = ("--disable-plugin-autoload -p timeout -p anyio.pytest_plugin -p hypothesispytest "
                 "-p schemathesis.pytest.plugin")


def test_a_ray_engine_test_runs_where_home_cannot_be_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.write_text("")  # a file: nothing can be made in it, whoever runs this (root too)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "PYTEST_ADDOPTS")}
    env["HOME"] = str(home)
    runs_a_ray_engine_test(env)


def runs_a_ray_engine_test(env: dict[str, str]) -> None:
    """One of the suite's tests that start a Ray cluster of their own (``ray.init()``), run in
    a pytest of its own under ``env`` (with the suite's plugins): it passes."""
    env = {**env, "PYTEST_ADDOPTS": SUITE_PLUGINS}
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/test_data_dir_engine.py::"
         "test_the_embedded_engine_refuses_a_ray_data_dir_and_leaves_it_whole"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 passed" in p.stdout, p.stdout
