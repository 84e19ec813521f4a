"""The curl examples (clients/curl) against a server with API keys, as the Docker Compose set-up
runs it (scripts/make-keys): each script sends ``OPTSERVE_API_KEY`` as ``Authorization: Bearer``
and passes (it checks its own values against in-process torch); the session seed.sh kept holds
what an in-process ``torch.optim.SGD`` with ``StepLR`` computes, bit for bit. Without the key
the scripts' first request was a 401."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import optserve
from tests.conftest import LiveServer, _test_settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
KEY = "curl-examples-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    with LiveServer(_test_settings(api_keys=f"{KEY}:default")).serving() as url:
        yield url


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The examples' expected values, computed once by this torch (scripts/test-clients does
    the same)."""
    out = tmp_path_factory.mktemp("reference") / "expected.json"
    with out.open("w") as f:
        subprocess.run([sys.executable, str(ROOT / "clients/js/test/make_reference.py")],
                       stdout=f, check=True, timeout=120)
    return out


def run_example(name: str, url: str, reference: Path,
                **env: str) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [str(ROOT / "clients" / "curl" / name)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OPTSERVE_BASE_URL": url, "OPTSERVE_API_KEY": KEY,
             "OPTSERVE_REFERENCE": str(reference), **env})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"{name}: OK" in p.stdout
    return p


@pytest.mark.parametrize("name", ["state.sh", "errors.sh"])
def test_a_curl_example_sends_the_api_key(keyed_url: str, reference: Path, name: str) -> None:
    run_example(name, keyed_url, reference)


def test_the_seed_session_a_keyed_run_kept_is_torchs(keyed_url: str, reference: Path) -> None:
    with optserve.Client(keyed_url, api_key=KEY) as client:
        before = {s.id for s in client.list_sessions()}
        run_example("seed.sh", keyed_url, reference, OPTSERVE_KEEP="1")
        (sid,) = {s.id for s in client.list_sessions()} - before
        got = client.get_params(sid)
        info = client.get_session(sid)
        client.delete_session(sid)

    x = torch.nn.Parameter(torch.tensor([2.0]))
    opt = torch.optim.SGD([x], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.1)
    for _ in range(10):
        x.grad = 8 * x.detach().clone()
        opt.step()
        sched.step()
    assert got.params["x"].dtype == torch.float32
    assert got.params["x"].view(torch.int32).tolist() == x.detach().view(torch.int32).tolist()
    assert info.step == 10
    assert list(info.lr) == sched.get_last_lr()
