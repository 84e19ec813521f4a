"""``RemoteOptimizer.step(closure)`` on a session that takes no step scalars (a sharded one,
on either engine): the closure's loss, which the SDK sends along as the step's
``loss`` scalar unasked, must not fail the step. Values compared with in-process torch."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

import optserve
from optserve import APIStatusError


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


def _closure(params: list[torch.Tensor], opt: torch.optim.Optimizer | optserve.RemoteOptimizer,
             x: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = sum(((p * x[: p.numel()].view_as(p)) ** 2).sum() for p in params)
    assert isinstance(loss, torch.Tensor)
    loss.backward()
    return loss


def test_a_closures_loss_does_not_fail_steps_of_a_session_that_takes_no_scalars(
        client: optserve.Client) -> None:
    torch.manual_seed(0)
    a0, b0 = torch.randn(3, 2), torch.randn(5)
    sid = f"sharded-{uuid.uuid4().hex[:8]}"
    client.create_session("SGD", params={"a": a0, "b": b0}, id=sid, shards=2,
                          options={"lr": 0.05, "momentum": 0.9})
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    remote = optserve.RemoteOptimizer([("a", a), ("b", b)], "SGD", client, session_id=sid,
                                      worker="w0")
    la, lb = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    local = torch.optim.SGD([la, lb], lr=0.05, momentum=0.9)
    for i in range(3):
        x = torch.randn(6) + i
        got = remote.step(lambda x=x: _closure([a, b], remote, x))
        want = local.step(lambda x=x: _closure([la, lb], local, x))
        assert torch.equal(got, want)
        assert torch.equal(a.detach(), la.detach()) and torch.equal(b.detach(), lb.detach())
    pulled = client.get_params(sid).params
    assert torch.equal(torch.as_tensor(pulled["a"]), la.detach())
    assert torch.equal(torch.as_tensor(pulled["b"]), lb.detach())
    assert client.get_session(sid).step == 3
    # a scalar the caller asked to send is still sent, and refused (nothing applied)
    remote.record_scalars(loss=1.0)
    with pytest.raises(APIStatusError) as caught:
        remote.step(lambda: _closure([a, b], remote, torch.randn(6)))
    assert (caught.value.status_code, caught.value.code, caught.value.field) == (
        422, "not_supported_here", "scalars")
    assert client.get_session(sid).step == 3
