"""A server the tests start (``tests/forked_server.py``) runs the torch kernels of the test
process that compares it with in-process torch, also when the environment the test hands it
names no kernels: the suite run as ``ATEN_CPU_CAPABILITY=default`` (as a CPU without AVX2
runs it) on an AVX2 or AVX-512 machine gave a server started with such an environment the
CPU's best kernels, whose Adam rounds otherwise (a test that stepped a session of more than a
few values on it failed for want of bitwise equality, not for a fault of the server).

The test process here is a child python told ``ATEN_CPU_CAPABILITY=default`` (a choice every
CPU has); it starts a server with an environment that does not name it, both as a fork and as
a ``python -m app`` subprocess, steps Adam there and in-process, and compares them bitwise. On
a CPU whose best kernels are the default ones it checks only that the server serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import signal, socket, sys, tempfile, time
from pathlib import Path

import httpx, safetensors.torch, torch

from tests import forked_server

BINARY = "application/octet-stream"
tmp, repo = Path(sys.argv[1]), Path(sys.argv[2])
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
env = {"OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": str(port),  # no ATEN_CPU_CAPABILITY
       "OPTSERVE_DATA_DIR": str(tmp / "data"), "OPTSERVE_DEVICE": "cpu",
       "OPTSERVE_DURABILITY": "memory", "OPTSERVE_WARM_UP": "0"}
server = forked_server.start(env, repo, tmp / "server.log")
try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert server.poll() is None, (tmp / "server.log").read_text(errors="replace")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, (tmp / "server.log").read_text(errors="replace")
        time.sleep(0.1)
    n = 100_000  # (AVX-512 kernels round 1,666 of them otherwise after three Adam steps)
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(n, generator=gen)
    meta = {"id": "s", "optimizer": "Adam", "options": '{"lr": 0.01}'}
    r = httpx.post(f"{url}/v1/sessions", content=safetensors.torch.save({"p": p}, meta),
                   headers={"Content-Type": BINARY}, timeout=60)
    assert r.status_code == 201, r.text
    local = p.clone().requires_grad_()
    opt = torch.optim.Adam([local], lr=0.01)
    for _ in range(3):
        g = torch.randn(n, generator=gen)
        r = httpx.post(f"{url}/v1/sessions/s/step", content=safetensors.torch.save({"p": g}),
                       headers={"Content-Type": BINARY, "Accept": BINARY}, timeout=60)
        assert r.status_code == 200, r.text
        local.grad = g
        opt.step()
    got = safetensors.torch.load(r.content)["p"]
    differ = int((got.view(torch.int32) != local.detach().view(torch.int32)).sum())
    assert differ == 0, f"{differ} of {n} values differ from this process's torch"
finally:
    server.send_signal(signal.SIGTERM)  # (a graceful stop removes its socket directory)
    server.wait(60)
print("same")
"""


@pytest.mark.parametrize("fork", ["1", "0"], ids=["forked", "subprocess"])
def test_a_server_started_without_a_kernel_choice_runs_the_test_processs_kernels(
        tmp_path: Path, fork: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env.update(ATEN_CPU_CAPABILITY="default", OPTSERVE_TEST_FORK_SERVERS=fork,
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "clients" / "python")]))
    p = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(REPO)], env=env,
                       cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0 and p.stdout.strip().endswith("same"), p.stdout + p.stderr
