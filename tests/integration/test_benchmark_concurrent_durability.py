"""``benchmarks/concurrent_durability.py`` end to end at N = 1e3 with 1 and 2 sessions stepped at
once (worker processes, a ``python -m app`` server): one row per K with positive rates, and
``ok`` in the bitwise column (each session's parameters equal in-process Adam stepping the same
gradient as many times as that session was stepped). No timing asserts. About 15 s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_concurrent_durability_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.concurrent_durability", "--n", "1e3", "--sessions",
         "1,2", "--seconds", "0.3", "--warmup", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines()
            if line.startswith("| ") and line[2:3].isdigit()]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"], proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        memory_rate, memory_ms, step_rate, step_ms, ratio, disk = (float(c) for c in cells[1:7])
        assert min(memory_rate, memory_ms, step_rate, step_ms, ratio, disk) > 0, row
        assert cells[7] == "ok", row
    assert "-m app" in proc.stdout  # the server's command line is printed
