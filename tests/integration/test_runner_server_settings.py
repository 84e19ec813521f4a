"""The suite's servers take only the settings their tests give them: ``OPTSERVE_*`` server
settings in the environment the suite runs in (a machine's own ``OPTSERVE_API_KEYS`` or
``OPTSERVE_DURABILITY``) are unset for the run, and the run's header names them. Before, every
server a test started read them: with keys there every request was a 401."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import test_runner_home as runner_home

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_server_settings_where_the_suite_runs_are_not_its_servers(tmp_path: Path) -> None:
    env = {**os.environ, "OPTSERVE_API_KEYS": "k" * 24, "OPTSERVE_DURABILITY": "step",
           "OPTSERVE_MAX_BODY_MB": "0.001"}
    # a run's -n or -x is not this run's; its plugins are the suite's
    env["PYTEST_ADDOPTS"] = runner_home.SUITE_PLUGINS
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",  # (not -q: the header)
         "tests/integration/test_http_basics.py::test_seed_example_sgd_on_4x_squared",
         "tests/integration/test_http_basics.py::test_return_none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert ("server settings in the environment, unset for the suite's servers: "
            "OPTSERVE_API_KEYS, OPTSERVE_DURABILITY, OPTSERVE_MAX_BODY_MB") in p.stdout, p.stdout
    assert "2 passed" in p.stdout, p.stdout
