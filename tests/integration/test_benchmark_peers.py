"""``benchmarks/peers.py`` end to end at N = 1e3 (in-process, echo, optserve-binary as a lean
httpx client and as a ``safetensors.torch`` one, the same-host path through ``RemoteOptimizer``
(with its defaults, and without the session's metrics or the SDK's edit check),
``RemoteOptimizer`` over HTTP with bfloat16 gradients, torch RPC; 2 rounds): every system's
result must equal in-process torch bitwise. No timing asserts, so the optserve servers start
without their warm-up (``--server-env OPTSERVE_WARM_UP=0``: a second of CPU a server). About
35 s of CPU (ten processes import torch): 60-80 s at load 5 on a 2-core machine, up to 3 min
at load 10."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SYSTEMS = ["in-process", "echo", "torch-rpc", "optserve-binary", "optserve-binary-st",
           "optserve-shm", "optserve-shm-bare", "optserve-sdk-bf16"]


#: a peer whose own transport breaks now and then on a loaded 2-core machine (TensorPipe's
#: TCP connection: "EPIPE: broken pipe" in a step or at shutdown, seen once in a CI run)
FLAKY_PEERS = ("torch-rpc",)


def run_peers(out: Path, data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--sizes", "1e3", "--systems",
         ",".join(SYSTEMS), "--durability", "memory", "--rounds", "2", "--reps", "5",
         "--warmup", "2", "--spin", "0", "--case-spin", "0", "--json", str(out),
         "--server-env", "OPTSERVE_WARM_UP=0",
         "--data-dir", str(data)],
        cwd=REPO, capture_output=True, text=True, timeout=280)


def only_a_peers_pipe_broke(out: Path) -> bool:
    """The run failed only because a peer of :data:`FLAKY_PEERS` lost its own connection (its
    transport's broken pipe): nothing of optserve's, and worth one more run."""
    if not out.exists():
        return False
    record = orjson.loads(out.read_bytes())
    failures: list[str] = record["failures"]
    bad = [c["system"] for c in record["cells"] if c["check"] not in ("ok", "-")]
    return bool(failures) and all(
        f.split(":")[0] in FLAKY_PEERS and ("EPIPE" in f or "broken pipe" in f)
        for f in failures) and all(system in FLAKY_PEERS for system in bad)


def test_peers_smoke_bitwise(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = run_peers(out, tmp_path / "data")
    if proc.returncode != 0 and only_a_peers_pipe_broke(out):
        print("torch RPC's connection broke (not optserve's): running the benchmark again\n"
              + proc.stderr[-2000:])
        out = tmp_path / "peers-again.json"
        proc = run_peers(out, tmp_path / "data-again")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = orjson.loads(out.read_bytes())
    assert record["ok"] is True
    assert record["failures"] == []
    cells = {(c["system"], c["optimizer"]): c for c in record["cells"]}
    want = {f"{s}[memory]" if s.startswith("optserve") else s for s in SYSTEMS}
    assert {s for s, _ in cells} == want
    # the same-host systems stepped as asked: with the SDK's edit check, and without it
    assert record["facts"]["optserve-shm[memory]"]["detect_data_edits"] is True
    assert record["facts"]["optserve-shm-bare[memory]"]["detect_data_edits"] is False
    for system in want - {"in-process", "echo", "torch-rpc"}:  # (printed with each server)
        assert "OPTSERVE_WARM_UP=0" in record["facts"][system]["command"], system
    for (system, optimizer), cell in cells.items():
        assert cell["check"] == "ok", (system, optimizer, cell["check"])
        assert len(cell["samples_ms"]) == 2 * 5
        assert cell["steps"] == 2 + 2 * 5
    # the step table says ok in every system's cell
    table = proc.stdout.split("#### optserve durability `memory`")[1].split("####")[0]
    rows = [line for line in table.splitlines() if line.startswith(("| Adam", "| SGD"))]
    assert len(rows) == 2
    for row in rows:
        assert row.count(" ok |") == len(SYSTEMS), row
    # page faults per step, from /proc: a count for every worker, "worker / servers" where
    # the system has a server process
    for (system, _), cell in cells.items():
        usage = cell["usage"]
        assert usage["worker_faults"] >= 0 and usage["server_faults"] >= 0, system
    faults = proc.stdout.split("#### minor page faults per step")[1]
    rows = [line for line in faults.splitlines() if line.startswith(("| Adam", "| SGD"))]
    assert len(rows) == 2
    for row in rows:
        assert row.count(" / ") == len(SYSTEMS) - 1, row  # all but in-process have servers


def test_the_bfloat16_cells_step_bitwise(tmp_path: Path) -> None:
    """``optserve-bf16`` (the gradient narrowed into a kept buffer every step) and
    ``optserve-bf16-history`` (the same asking ``?metrics=history``) at 1e3: every step's
    parameters equal torch stepping the rounded gradients, bitwise (the benchmark's own check
    of the server's float32 parameters after the timed steps); and ``optserve-binary-history``
    (float32 gradients asking ``?metrics=history``) equal torch's float32 steps."""
    out = tmp_path / "bf16.json"
    systems = ["optserve-bf16", "optserve-bf16-history", "optserve-binary-history"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--sizes", "1e3", "--systems",
         ",".join(systems), "--durability", "memory", "--rounds", "2", "--reps", "3",
         "--warmup", "1", "--spin", "0", "--case-spin", "0", "--json", str(out),
         "--server-env", "OPTSERVE_WARM_UP=0",
         "--data-dir", str(tmp_path / "data")],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = orjson.loads(out.read_bytes())
    assert record["ok"] is True and record["failures"] == []
    cells = {(c["system"], c["optimizer"]): c for c in record["cells"]}
    assert {s for s, _ in cells} == {f"{s}[memory]" for s in systems}
    for key, cell in cells.items():
        assert cell["check"] == "ok", key
        assert cell["steps"] == 1 + 2 * 3, key
