"""An LBFGS session whose history was read back from its snapshot (after a graceful restart or
a ``kill -9``) steps on bitwise as torch's ``LBFGS`` that never stopped.

torch's CPU ``Tensor.dot`` (MKL's sdot) rounds by where its vectors start in memory: the same
values a few bytes off a 64-byte boundary can give another last bit. LBFGS dots its curvature
history (``old_dirs``, ``old_stps``) at every iteration, and tensors decoded from a snapshot are
views at whatever offset their bytes had there, where torch's own tensors
(and a session that never restarted) are fresh, aligned allocations. Each case steps a real
server (``python -m app``) and an in-process ``torch.optim.LBFGS`` with the same closure and
compares the parameters and the exported state after every step.
"""

from __future__ import annotations

import signal

import httpx
import pytest
import torch

from tests.integration import test_durability as durability
from tests.integration.test_durability import Proc
from tests.torch_reference import (
    assert_tensors_equal,
    assert_trees_equal,
    from_wire,
    json_tensor,
    tensor_from_json,
)

pytestmark = pytest.mark.integration

N = 33  # long enough for MKL's dot to round by the vectors' alignment
OPTIONS = {"lr": 0.5, "max_iter": 4, "history_size": 3}
TARGET = torch.linspace(-1, 1, N)
COEF = torch.linspace(0.5, 2, N)


def closure_values(w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The loss and gradient at ``w`` (elementwise and sums only: no dot of its own)."""
    d = w - TARGET
    return float((COEF * d * d).sum() + 0.05 * (d ** 4).sum()), 2 * COEF * d + 0.2 * d ** 3


class Local:
    """The in-process torch LBFGS stepped with the same closure."""

    def __init__(self, w0: torch.Tensor) -> None:
        self.w = w0.clone()
        self.opt = torch.optim.LBFGS([self.w], **OPTIONS)  # type: ignore[arg-type]

    def step(self) -> None:
        def closure() -> torch.Tensor:
            loss, g = closure_values(self.w.detach())
            self.w.grad = g
            return torch.tensor(loss, dtype=torch.float64)
        self.opt.step(closure)
        self.w.grad = None


def server_step(c: httpx.Client, sid: str) -> None:
    r = c.post(f"/v1/sessions/{sid}/step", json={})
    while r.status_code == 200 and r.json().get("needs") == "evaluation":
        question = r.json()
        loss, g = closure_values(tensor_from_json(question["params"]["w"]))
        r = c.post(f"/v1/sessions/{sid}/step/{question['evaluation']}",
                   json={"loss": loss, "grads": {"w": json_tensor(g)}})
    assert r.status_code == 200, r.text


def assert_alike(c: httpx.Client, sid: str, local: Local, what: str) -> None:
    r = c.get(f"/v1/sessions/{sid}/params", params={"encoding": "b64"})
    assert r.status_code == 200, r.text
    assert_tensors_equal({"w": tensor_from_json(r.json()["params"]["w"])},
                         {"w": local.w.detach()}, f"{what}: params")
    r = c.get(f"/v1/sessions/{sid}/state_dict", params={"encoding": "b64"})
    assert r.status_code == 200, r.text
    assert_trees_equal(from_wire(r.json())["state"], local.opt.state_dict()["state"], what)


def create(c: httpx.Client, sid: str, w0: torch.Tensor) -> None:
    r = c.post("/v1/sessions", json={"id": sid, "optimizer": "LBFGS", "options": OPTIONS,
                                      "params": {"w": json_tensor(w0)}})
    assert r.status_code == 201, r.text


def w_start(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed))


proc = durability.proc  # (a server process of its own data directory, stopped after)


def restart(proc: Proc, how: str) -> None:
    """Stop the server by ``kill -9`` (``"kill9"``: nothing snapshotted) or SIGTERM (every
    session snapshotted, exit 0), then start it again on its data directory."""
    if how == "kill9":
        proc.kill9()
    else:
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    proc.start()


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_steps_after_a_restore_from_the_snapshot_match_torch(proc: Proc, how: str) -> None:
    # kill -9: a snapshot after every step, so the restart reads the history from one
    proc.start(**({"OPTSERVE_SNAPSHOT_EVERY_STEPS": "1"} if how == "kill9" else {}))
    local = Local(w_start(3))
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        create(c, "lb", w_start(3))
        for i in range(4):
            server_step(c, "lb")
            local.step()
            assert_alike(c, "lb", local, f"before the restart, step {i + 1}")
    restart(proc, how)
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert_alike(c, "lb", local, "restored")
        for i in range(5):
            server_step(c, "lb")
            local.step()
            assert_alike(c, "lb", local, f"after the restart ({how}), step {i + 1}")
