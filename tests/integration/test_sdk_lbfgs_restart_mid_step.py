"""``RemoteOptimizer`` LBFGS through a server restart in the middle of a step's evaluations.

The restarted server holds no open step (nothing of it was applied: docs/protocol.md, "Other
evaluations of a step the restart interrupted are 404 ... open a new step"). The SDK's next
evaluation got that 404 ``evaluation_not_found`` and ``opt.step(closure)`` raised it: a training
loop that survives any other restart (the SDK retries every call across one) stopped here. Now
the SDK opens the step again from the session's values, and the model and the session equal
torch's ``LBFGS`` step for step, bitwise. Real ``python -m app``, ``kill -9``, durability
``step``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import optserve
from tests.integration.test_durability import Proc
from tests.torch_reference import assert_tensors_equal

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path / "data").start()
    try:
        yield p
    finally:
        p.stop()


def test_an_lbfgs_step_whose_server_restarts_between_evaluations_is_opened_again(
        server: Proc) -> None:
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(20, 3), torch.nn.Linear(20, 3)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(16, 20), torch.randn(16, 3)
    options = {"lr": 0.5, "max_iter": 4, "history_size": 4}
    calls = [0]
    restart_at: list[int] = []

    def closure(m: torch.nn.Module, o: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            calls[0] += 1
            if calls[0] in restart_at:  # at a point the line search tries: the step is open
                server.kill9()
                server.start()
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return run

    with optserve.Client(server.url, timeout=300, transport="http") as client:
        opt = optserve.RemoteOptimizer(model.parameters(), "LBFGS", client=client, **options)
        ref = torch.optim.LBFGS(twin.parameters(), **options)  # type: ignore[arg-type]
        for k in range(3):
            calls[0] = 0
            restart_at[:] = [2] if k == 1 else []
            opt.step(closure(model, opt))
            if k == 1:
                assert calls[0] > 2  # the restart came in the middle of the step
            ref.step(closure(twin, ref))
            got = {n: p.detach() for n, p in model.named_parameters()}
            want = {n: p.detach() for n, p in twin.named_parameters()}
            assert_tensors_equal(got, want, f"the model after step {k + 1}")
            held = client.get_params(opt.session_id).params
            assert_tensors_equal({n: torch.as_tensor(held[str(i)]) for i, n in
                                  enumerate(want)}, want, f"the session after step {k + 1}")
        assert client.get_session(opt.session_id).step == 3
        opt.close(delete_session=True)
