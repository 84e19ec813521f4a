"""Many more sessions than the server has file descriptors: ``python -m app`` (durability ``step``,
and ``interval``: its logs fsynced before the bound closes them) under ``RLIMIT_NOFILE`` = 100
(as ``prlimit --nofile=100``) holds 250 sessions, each created and stepped twice (JSON and
safetensors bodies in turn; the second time from 8 clients at once), every answer a 2xx whose
parameters equal an in-process ``torch.optim`` run bitwise. The store kept one descriptor per
session log for as long as the session existed: past 78 sessions every create and step was a 503
``out_of_file_descriptors``, for good. Now at most the bound's logs are open
(:func:`app.engine.store.default_open_logs`: 32 at this limit), seen in ``/proc/<pid>/fd``. Then
``kill -9`` and a restart under the same limit: every acknowledged step is there (each session's
version and parameters equal torch's), and one more step on each equals torch again. The bound's
own cases (reopen, fsync before close, a failed reopen): tests/unit/test_open_logs.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import safetensors.torch
import torch

from tests.integration.test_durability import BINARY, Proc
from tests.torch_reference import Reference, assert_tensors_equal, json_tensor, tensor_from_json

pytestmark = pytest.mark.integration

NOFILE = 100
#: the logs open at most at this limit, as the README's rule says: an eighth of it, at least 32
#: (:func:`app.engine.store.default_open_logs`)
BOUND = 32
#: clients stepping at once in the second round
THREADS = 8
SESSIONS = 250
OPTIONS = {"lr": 0.05, "momentum": 0.9}


def params_of(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"w": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)}


def grads_of(i: int, k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 * (k + 1) + i)
    return {"w": torch.randn(2, 3, generator=g), "b": torch.randn(4, generator=g)}


def open_logs(pid: int) -> int:
    """The session logs (``wal.bin``) the process has open now."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").endswith("/wal.bin")
        except FileNotFoundError:  # (closed meanwhile)
            pass
    return count


def step(c: httpx.Client, i: int, k: int) -> tuple[int, dict[str, torch.Tensor]]:
    """Step session ``i`` with its ``k``-th gradients, a safetensors body when ``i + k`` is
    odd, else JSON: (version, parameters) answered."""
    grads = grads_of(i, k)
    if (i + k) % 2:
        r = c.post(f"/v1/sessions/s{i}/step", content=safetensors.torch.save(grads),
                   headers={"Content-Type": BINARY, "Accept": BINARY})
        assert r.status_code == 200, r.text
        return int(r.headers["X-Optserve-Version"]), safetensors.torch.load(r.content)
    r = c.post(f"/v1/sessions/s{i}/step",
               json={"grads": {n: json_tensor(t) for n, t in grads.items()}})
    assert r.status_code == 200, r.text
    body = r.json()
    return body["version"], {n: tensor_from_json(t) for n, t in body["params"].items()}


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path / "data", nofile=NOFILE)
    try:
        yield p
    finally:
        p.stop()


@pytest.mark.parametrize("durability", ["step", "interval"])
def test_more_sessions_than_descriptors_step_and_survive_kill9(proc: Proc,
                                                               durability: str) -> None:
    proc.env["OPTSERVE_DURABILITY"] = durability
    refs = [Reference(torch.optim.SGD, [(params_of(i), {})], OPTIONS) for i in range(SESSIONS)]
    proc.start()
    assert proc.proc is not None
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        for i in range(SESSIONS):
            body = {"id": f"s{i}", "optimizer": "SGD", "options": OPTIONS,
                    "params": {n: json_tensor(t) for n, t in params_of(i).items()}}
            r = c.post("/v1/sessions", json=body)
            assert r.status_code == 201, (i, r.text)
        for i in range(SESSIONS):
            version, params = step(c, i, 0)
            refs[i].step(grads_of(i, 0))
            assert version == 1
            assert_tensors_equal(params, refs[i].params, f"s{i} step 0")
        assert open_logs(proc.proc.pid) <= BOUND
        assert len(c.get("/v1/sessions").json()["sessions"]) == SESSIONS

    # the second step of each from THREADS clients at once: logs closed and reopened while
    # others are written (a log in use is not closed, so the bound may be passed by as many)
    def second(i: int) -> tuple[int, dict[str, torch.Tensor]]:
        with httpx.Client(base_url=proc.url, timeout=60) as own:
            return step(own, i, 1)
    with ThreadPoolExecutor(THREADS) as pool:
        answers = list(pool.map(second, range(SESSIONS)))
    for i, (version, params) in enumerate(answers):
        refs[i].step(grads_of(i, 1))
        assert version == 2
        assert_tensors_equal(params, refs[i].params, f"s{i} step 1")
    assert open_logs(proc.proc.pid) <= BOUND + THREADS
    proc.kill9()
    proc.start()
    assert proc.proc is not None
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        for i in range(SESSIONS):
            r = c.get(f"/v1/sessions/s{i}/params", headers={"Accept": BINARY})
            assert r.status_code == 200, r.text
            assert int(r.headers["X-Optserve-Version"]) == 2
            assert_tensors_equal(safetensors.torch.load(r.content), refs[i].params,
                                 f"s{i} restored")
        for i in range(SESSIONS):
            version, params = step(c, i, 2)
            refs[i].step(grads_of(i, 2))
            assert version == 3
            assert_tensors_equal(params, refs[i].params, f"s{i} after the restart")
        assert open_logs(proc.proc.pid) <= BOUND
