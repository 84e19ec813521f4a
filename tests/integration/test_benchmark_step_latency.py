"""``benchmarks/step_latency.py`` end to end at N = 1e3 (the SDK beside the echo route that
``benchmarks/bench_app.py`` adds to the app, and an in-process step): it runs and prints a row
per optimizer with finite figures. No timing asserts, so no CPU spins before the cases (4 s
of CPU taken from the tests beside it)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_step_latency_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_latency", "--sizes", "1e3", "--rounds", "1",
         "--json-max-n", "1e3", "--spin", "0", "--case-spin", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| Adam", "| SGD"))]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "1e3"
        local, echo, binary = (float(c) for c in cells[2:5])
        assert all(math.isfinite(x) and x > 0 for x in (local, echo, binary)), row
