"""``RemoteOptimizer.state`` with several workers on one session: a read never shows a state
older than the newest session version the worker has learned from any answer (its own steps,
pulls, ``state_dict()``), and reads while that has not moved make no request."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import torch

import optserve

pytestmark = pytest.mark.integration


@pytest.fixture
def worker_client(live_server: str) -> Iterator[tuple[optserve.Client, list[str]]]:
    log: list[str] = []
    hook = lambda r: log.append(f"{r.method} {r.url.path.rsplit('/', 1)[-1]}")  # noqa: E731
    with httpx.Client(event_hooks={"request": [hook]}) as http, \
            optserve.Client(live_server, http_client=http, transport="http",
                            max_retries=0) as client:
        yield client, log


def grad(k: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(200 + k)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.randn(2, generator=g)}


def test_a_worker_sees_the_state_of_the_newest_version_it_knows(
        live_server: str, worker_client: tuple[optserve.Client, list[str]]) -> None:
    """Workers A and B of one async Adam session. After B steps, A's ``state_dict()`` shows
    the new version: A's ``opt.state`` read next is that state too (its very tensors, no
    fetch), torch's after both steps (not the one A fetched before). A pull that finds
    nothing new fetches nothing again; one after B's next step fetches once. Each time the
    state equals an in-process Adam's given the same gradients in the same order, bit for
    bit."""
    client_a, log = worker_client
    init = {"w": torch.randn(3, 2, generator=torch.Generator().manual_seed(1)),
            "b": torch.zeros(2)}
    master = {n: t.clone().requires_grad_() for n, t in init.items()}
    local = torch.optim.Adam(master.values(), lr=1e-2)

    def local_step(k: int) -> None:
        for name, g in grad(k).items():
            master[name].grad = g
        local.step()

    def local_state() -> dict[str, dict[str, torch.Tensor]]:
        return {n: {k: v.clone() for k, v in local.state[p].items()} for n, p in master.items()}

    def assert_state(opt: optserve.RemoteOptimizer, params: dict[str, torch.Tensor],
                     at: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
        assert len(opt.state) == 2
        for name, p in params.items():
            want = (at or local_state())[name]
            assert opt.state[p].keys() == want.keys()
            for key, value in want.items():
                assert torch.equal(opt.state[p][key], value), (name, key)

    with optserve.Client(live_server, transport="http", max_retries=0) as client_b:
        sid = client_b.create_session("Adam", init, options={"lr": 1e-2}).id
        params_a = {n: t.clone() for n, t in init.items()}
        params_b = {n: t.clone() for n, t in init.items()}
        a = optserve.RemoteOptimizer(list(params_a.items()), client=client_a, session_id=sid,
                                     worker="a")
        b = optserve.RemoteOptimizer(list(params_b.items()), client=client_b, session_id=sid,
                                     worker="b")
        for k, opt, params in ((0, a, params_a), (1, b, params_b)):
            for name, g in grad(k).items():
                params[name].grad = g
            opt.step()
            local_step(k)
            if opt is a:
                assert_state(a, params_a)  # (fetched at A's step: version 1)
        exported = a.state_dict()  # version 2: B stepped
        log.clear()
        assert_state(a, params_a)
        assert log == []  # (the state state_dict() exported is opt.state's: no fetch)
        for name, p in params_a.items():
            assert a.state[p]["exp_avg"] is exported["state"][
                list(params_a).index(name)]["exp_avg"]
        a.pull_params()  # nothing new since the state A holds: no fetch when read
        assert_state(a, params_a)
        assert log == ["GET params"]
        at_2 = local_state()
        for name, g in grad(2).items():
            params_b[name].grad = g
        b.step()
        local_step(2)
        assert_state(a, params_a, at_2)  # A has not learned of it: no request per read
        assert log == ["GET params"]
        a.pull_params()
        assert a.version == 3
        assert_state(a, params_a)
        assert log == ["GET params", "GET params", "GET state_dict"]
        for name, p in params_a.items():
            assert torch.equal(p, master[name].detach())
        client_b.delete_session(sid)
