"""``python -m app`` passes ``OPTSERVE_GC_FREEZE_SESSIONS`` on to the collector policy
(:mod:`app.gc_settle`), and ``/metrics`` shows it: on by default, a session of 12,000
parameters leaves the cyclic collector's walks as it is made (``optserve_gc_frozen_objects``
grows by at least its parameters); with ``OPTSERVE_GC_FREEZE_SESSIONS=0`` it does not grow
(nothing made after the start is frozen). Either way the session steps as torch does. Servers
are real ``python -m app`` processes (forked: ``tests/forked_server.py``); the policy is not
turned on in-process."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from tests.integration.test_durability import Proc
from tests.integration.test_many_bindings_few_descriptors import gauge

pytestmark = pytest.mark.integration

N = 12_000  # one-element parameters: past gc_settle.SETTLE_TENSORS (10,000)
LR = 0.1


@pytest.mark.parametrize("setting", [None, "0"], ids=["default", "off"])
def test_sessions_are_frozen_by_default_and_not_with_the_setting_off(
        tmp_path: Path, setting: str | None) -> None:
    env = {"OPTSERVE_DURABILITY": "memory"}
    if setting is not None:
        env["OPTSERVE_GC_FREEZE_SESSIONS"] = setting
    proc = Proc(tmp_path / "data", env=env).start()
    try:
        url = proc.url
        started = gauge(url, "optserve_gc_frozen_objects")
        assert started > 0  # (the server's modules, frozen at its start either way)
        p0 = torch.linspace(-1.0, 1.0, N)
        params = {f"p{i}": {"dtype": "float32", "shape": [1], "data": [p0[i].item()]}
                  for i in range(N)}
        made = httpx.post(f"{url}/v1/sessions", json={
            "id": "many", "optimizer": "SGD", "options": {"lr": LR}, "params": params},
            timeout=120)
        assert made.status_code == 201, made.text
        frozen = gauge(url, "optserve_gc_frozen_objects")
        if setting is None:
            assert frozen - started >= N, (started, frozen)
        else:  # (frozen objects freed since the start leave the count: it may shrink)
            assert frozen - started < N // 10, (started, frozen)
        grads = {f"p{i}": {"dtype": "float32", "shape": [1], "data": [0.5 + i / N]}
                 for i in range(N)}
        stepped = httpx.post(f"{url}/v1/sessions/many/step", json={"grads": grads}, timeout=120)
        assert stepped.status_code == 200, stepped.text
        got = stepped.json()["params"]
        ws = [torch.nn.Parameter(p0[i:i + 1].clone()) for i in range(N)]
        for i, w in enumerate(ws):
            w.grad = torch.tensor([0.5 + i / N])
        torch.optim.SGD(ws, lr=LR).step()
        for i, w in enumerate(ws):
            assert torch.equal(torch.tensor(got[f"p{i}"]["data"], dtype=torch.float32),
                               w.detach()), i
        assert gauge(url, "optserve_gc_sweeps_total") == 0  # (a sweep waits for an idle minute)
    finally:
        proc.stop()
