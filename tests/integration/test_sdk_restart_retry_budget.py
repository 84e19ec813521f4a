"""A default ``optserve.Client()`` training loop lives through a server restart: the server is
killed with ``kill -9`` mid-training and started again a few seconds later on the same port
and data directory; the ``RemoteOptimizer.step()`` sent meanwhile is retried (connection
refused, with its ``Idempotency-Key``) within the client's default retry budget (60 s) until
the server answers, and the loop ends with the parameters bitwise equal to the same loop run
with ``torch.optim.Adam`` in this process. Over HTTP and over the same-host transport (the
default: its connection breaks with the server, and the step goes on once the server is back).

The client's retries before this change (0.5 s then 1 s: ``max_retries=2``) ran out while the
server was still starting, and ``step()`` raised ``APIConnectionError``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import optserve
from tests.integration.test_durability import Proc

pytestmark = pytest.mark.integration

STEPS = 12
KILL_AT = 5  # the server is killed after this many steps
DOWN_S = 3.0  # and started again this long after the kill (then its own start time)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    p = Proc(tmp_path_factory.mktemp("restart-budget") / "data")
    try:
        yield p.start()
    finally:
        p.stop()


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))


def train(m: nn.Module, opt: torch.optim.Optimizer, on_step: int = -1,
          at_step: threading.Thread | None = None) -> None:
    torch.manual_seed(1)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for i in range(STEPS):
        if i == on_step and at_step is not None:
            at_step.start()
            time.sleep(0.2)  # the kill lands before the step is sent
        opt.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        opt.step()


@pytest.mark.parametrize("transport", ["auto", "http"])
def test_a_default_client_loop_survives_a_kill9_restart(server: Proc, transport: str) -> None:
    local_model, remote_model = model(), model()
    train(local_model, torch.optim.Adam(local_model.parameters(), lr=0.01))

    restarted = threading.Event()
    failure: list[BaseException] = []

    def restart() -> None:
        try:
            server.kill9()
            time.sleep(DOWN_S)
            server.start()
            restarted.set()
        except BaseException as exc:  # (reported by the test below)
            failure.append(exc)

    pid = server.proc.pid if server.proc else None
    # the default retry settings: nothing passed but the URL and the transport
    with optserve.Client(server.url, transport=transport) as client:
        remote = optserve.RemoteOptimizer(remote_model.parameters(), "Adam", client, lr=0.01)
        killer = threading.Thread(target=restart)
        train(remote_model, remote, KILL_AT, killer)
        killer.join(300)
        assert not failure, failure
        assert restarted.is_set() and server.proc is not None and server.proc.pid != pid
        for (name, got), want in zip(remote_model.named_parameters(),
                                     local_model.parameters(), strict=True):
            assert got.dtype == want.dtype and torch.equal(got, want), name
        info = client.get_session(remote.session_id)
        assert (info.version, info.step) == (STEPS, STEPS)
        remote.close(delete_session=True)
