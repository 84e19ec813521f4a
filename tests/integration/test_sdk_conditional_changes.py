"""The Python SDK's conditional changes against a real uvicorn server, sync and async:
``put_params``, ``configure_session``, ``add_param_group``, ``update_param_group``,
``scheduler_step`` and ``delete_session`` take ``base_version`` (sent as ``If-Match``) and
``base_revision``, as ``import_state`` does. One that names where the session was before
another change raises ``PreconditionFailedError`` and changes nothing (the session goes on
equal to an in-process ``torch.optim``); one that names where it is applies, equal to torch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture
def client(live_server: str) -> Iterator[optserve.Client]:
    with optserve.Client(live_server, max_retries=0) as c:
        yield c


class Twin:
    """A session and an in-process SGD with momentum (and a StepLR stepped by hand)."""

    def __init__(self, client: optserve.Client) -> None:
        g = torch.Generator().manual_seed(21)
        w = torch.randn(4, generator=g)
        self.client, self.sid = client, f"sdk-cc-{uuid.uuid4().hex[:8]}"
        self.params: dict[str, torch.Tensor] = {"w": w.clone()}
        self.opt = torch.optim.SGD([self.params["w"]], lr=0.1, momentum=0.9)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)
        client.create_session("SGD", {"w": w}, options={"lr": 0.1, "momentum": 0.9},
                              scheduler={"name": "StepLR",
                                         "options": {"step_size": 1, "gamma": 0.5},
                                         "step_on": "manual"}, id=self.sid)
        self.steps = 0

    def step(self) -> None:
        g = torch.Generator().manual_seed(90 + self.steps)
        self.steps += 1
        grads = {n: torch.randn(p.shape, generator=g) for n, p in self.params.items()}
        for n, p in self.params.items():
            p.grad = grads[n].clone()
        self.opt.step()
        out = self.client.step(self.sid, grads)
        assert out.params is not None
        for n, p in self.params.items():
            assert torch.equal(torch.as_tensor(out.params[n]), p), n

    def at(self) -> tuple[int, int]:
        info = self.client.get_session(self.sid)
        assert info.revision is not None
        return info.version, info.revision

    def same_as_torch(self) -> None:
        got = self.client.get_params(self.sid).params
        assert sorted(got) == sorted(self.params)
        for n, p in self.params.items():
            assert torch.equal(torch.as_tensor(got[n]), p), n
        sd = self.client.export_state(self.sid)
        mine = self.opt.state_dict()
        for pid, entry in mine["state"].items():
            assert torch.equal(torch.as_tensor(sd["state"][pid]["momentum_buffer"]),
                               entry["momentum_buffer"])
        assert [g["lr"] for g in sd["param_groups"]] == [g["lr"] for g in mine["param_groups"]]
        assert sd["scheduler"]["last_epoch"] == self.sched.last_epoch


def _put(t: Twin) -> None:
    with torch.no_grad():
        t.params["w"].copy_(torch.arange(4.0))


def _add(t: Twin) -> None:
    t.params["c"] = torch.ones(2)
    t.opt.add_param_group({"params": [t.params["c"]], "lr": 0.01})


#: name: (the call, given the two keyword arguments; what it does to the twin)
CALLS: dict[str, tuple[Callable[[Twin, dict[str, Any]], Any], Callable[[Twin], None]]] = {
    "put_params": (lambda t, kw: t.client.put_params(t.sid, {"w": torch.arange(4.0)}, **kw),
                   _put),
    "configure_session": (lambda t, kw: t.client.configure_session(t.sid, max_staleness=2,
                                                                   **kw),
                          lambda t: None),
    "add_param_group": (lambda t, kw: t.client.add_param_group(t.sid, {"c": torch.ones(2)},
                                                               lr=0.01, **kw), _add),
    "update_param_group": (lambda t, kw: t.client.update_param_group(t.sid, 0, lr=0.02, **kw),
                           lambda t: t.opt.param_groups[0].update(lr=0.02)),
    "scheduler_step": (lambda t, kw: t.client.scheduler_step(t.sid, **kw),
                       lambda t: t.sched.step()),
}


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("which", ["base_version", "base_revision"])
def test_a_conditional_change_applies_only_where_it_was_read(client: optserve.Client,
                                                             name: str, which: str) -> None:
    call, mirror = CALLS[name]
    twin = Twin(client)
    twin.step()
    version, revision = twin.at()
    twin.step()  # (another client: the version and the revision move)
    with pytest.raises(optserve.PreconditionFailedError) as refused:
        call(twin, {which: version if which == "base_version" else revision})
    assert refused.value.status_code == 412
    twin.same_as_torch()
    version, revision = twin.at()
    call(twin, {which: version if which == "base_version" else revision})
    mirror(twin)
    twin.same_as_torch()
    twin.step()
    twin.same_as_torch()


def test_a_conditional_delete_sync_and_async(client: optserve.Client, live_server: str
                                             ) -> None:
    twin = Twin(client)
    twin.step()
    version, revision = twin.at()
    client.update_param_group(twin.sid, 0, lr=0.05)  # (the revision moves, not the version)
    twin.opt.param_groups[0]["lr"] = 0.05
    with pytest.raises(optserve.PreconditionFailedError):
        client.delete_session(twin.sid, base_revision=revision)
    twin.same_as_torch()

    async def go() -> None:
        async with optserve.AsyncClient(live_server, max_retries=0) as c:
            with pytest.raises(optserve.PreconditionFailedError):
                await c.delete_session(twin.sid, base_version=version + 1)
            await c.update_param_group(twin.sid, 0, base_version=version, lr=0.04)
            await c.delete_session(twin.sid, base_version=version, base_revision=revision + 2)
    twin.opt.param_groups[0]["lr"] = 0.04
    asyncio.run(go())
    with pytest.raises(optserve.NotFoundError):
        client.get_session(twin.sid)


def test_a_precondition_that_is_no_version_is_refused_before_anything_is_sent(
        client: optserve.Client) -> None:
    for bad in (-1, 1.0, "3", True):
        with pytest.raises(ValueError, match="base_version"):
            client.put_params("any", {"w": torch.zeros(1)}, base_version=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="base_revision"):
            client.delete_session("any", base_revision=bad)  # type: ignore[arg-type]
