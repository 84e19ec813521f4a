"""``benchmarks/ab.py`` end to end at N = 1e3, the current tree against itself (two servers):
a binary step and a 2-worker sync round over JSON. The table must have one row per server
with a positive median, 2 timed runs each (4 reps less 2 warm-up) and ``ok`` in the bitwise
column. No timing asserts, so the servers start without their warm-up (``OPTSERVE_WARM_UP=0``
through ``--env``: loading every optimizer's kernels is a second of CPU a start, and nothing
here is timed). About 10 s a case (two servers start and import torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("extra", [["--body", "binary", "--pause-s", "0.1"],
                                   ["--body", "json", "--workers", "2"]],
                         ids=["binary-paused", "json-2-workers"])
def test_ab_smoke(extra: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ab", "--trees", ".", ".", "--n", "1e3", "--reps",
         "4", "--env", "OPTSERVE_WARM_UP=0", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| a: ", "| b: "))]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        tree, commit, median, p90, runs, bitwise = (c.strip() for c in row.strip("|").split("|"))
        assert tree.endswith(": .")
        assert float(median) > 0 and float(p90) >= float(median), row
        assert runs == "2", row
        assert bitwise == "ok", row
    assert "b / a = " in proc.stdout
    assert proc.stdout.count("-m app`") == 2  # each server's command line is printed
    assert proc.stdout.count("OPTSERVE_WARM_UP=0") >= 2, proc.stdout  # (--env: both servers)
    assert ("0.1 s pause after each rep" in proc.stdout) == ("--pause-s" in extra)
