"""``Client.export_state_if_changed`` and ``AsyncClient.export_state_if_changed`` against a
real uvicorn server: a state read again with the :class:`optserve.StateExport` read before is
sent with its state tag (``If-None-Match: "r<revision>.<token>"``, the ``X-Optserve-State-Tag`` it
was read with) and, while nothing changed the session, answered 304
and served from that export (the same tensors, a tree of its own); an lr change, a step, a
tensor of it changed in place, another session's or format's export: read whole. Every state
is compared with an in-process ``torch.optim`` run's, and the answers' statuses are recorded
by an httpx event hook on the client's own connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

import httpx
import pytest
import torch

import optserve

pytestmark = pytest.mark.integration

Format = Literal["safetensors", "json", "torch"]
Export = Callable[[str, "optserve.StateExport | None", Format],
                 Awaitable[optserve.StateExport]]


class Twin:
    """A session and an in-process ``torch.optim.Adam`` given the same gradients."""

    def __init__(self, client: optserve.Client) -> None:
        torch.manual_seed(0)
        params = {"w": torch.randn(3, 4), "b": torch.randn(4)}
        self.client = client
        self.local = {k: v.clone().requires_grad_() for k, v in params.items()}
        self.opt = torch.optim.Adam(self.local.values(), lr=0.01)
        self.sid = client.create_session("Adam", params, options={"lr": 0.01}).id

    def step(self) -> None:
        grads = {k: torch.randn_like(v) for k, v in self.local.items()}
        self.client.step(self.sid, grads, return_params=False)
        for k, p in self.local.items():
            p.grad = grads[k].clone()
        self.opt.step()

    def lr(self, lr: float) -> None:
        self.client.update_param_group(self.sid, 0, lr=lr)
        self.opt.param_groups[0]["lr"] = lr

    def assert_torchs(self, got: optserve.StateExport) -> None:
        """``got`` holds the local optimizer's state and options, bit for bit."""
        mine = self.opt.state_dict()
        assert set(got.state_dict["state"]) == set(mine["state"])
        for pid, entry in mine["state"].items():
            assert set(got.state_dict["state"][pid]) == set(entry), pid
            for key, value in entry.items():
                theirs = torch.as_tensor(got.state_dict["state"][pid][key])
                assert theirs.dtype == value.dtype and torch.equal(theirs, value), (pid, key)
        assert got.state_dict["param_groups"][0]["lr"] == mine["param_groups"][0]["lr"]
        assert got.state_dict["param_groups"][0]["params"] == mine["param_groups"][0]["params"]


async def scenario(twin: Twin, export: Export, statuses: list[int], fmt: Format) -> None:
    """The reads and what each must answer; ``statuses``: the state reads' answers so far."""
    twin.step()
    twin.step()
    first = await export(twin.sid, None, fmt)
    assert not first.not_modified and first.version == 2 and first.revision is not None
    assert first.tag is not None and first.tag.startswith(f'"r{first.revision}.')
    twin.assert_torchs(first)
    second = await export(twin.sid, first, fmt)
    assert statuses == [200, 304]
    assert second.not_modified and (second.version, second.revision, second.tag) == (
        2, first.revision, first.tag)
    twin.assert_torchs(second)
    assert second.state_dict is not first.state_dict
    assert second.state_dict["state"][0] is not first.state_dict["state"][0]
    assert second.state_dict["state"][0]["exp_avg"] is first.state_dict["state"][0]["exp_avg"]
    # the tree handed out is the caller's: what it does to it is not served again
    first.state_dict["state"].clear()
    first.state_dict["param_groups"][0]["lr"] = 1.0
    third = await export(twin.sid, first, fmt)
    assert statuses == [200, 304, 304]
    twin.assert_torchs(third)
    # another session's export, or one in another format: read whole
    other = Twin(twin.client)
    other.step()
    other.step()
    other_first = await export(other.sid, None, fmt)
    assert other_first.revision == first.revision  # (a revision tag alone: a 304 there)
    assert other_first.tag != first.tag
    statuses.clear()
    other.assert_torchs(await export(other.sid, first, fmt))
    twin.assert_torchs(await export(twin.sid, other_first, fmt))
    twin.assert_torchs(await export(twin.sid, first, "torch"))
    assert statuses == [200, 200, 200]
    # a tensor changed in place: read whole, torch's values in new tensors
    statuses.clear()
    with torch.no_grad():
        third.state_dict["state"][0]["exp_avg"].mul_(2.0)
    fourth = await export(twin.sid, third, fmt)
    assert statuses == [200] and not fourth.not_modified
    twin.assert_torchs(fourth)
    # an option change (no new version, a new revision), then a step: whole, then 304
    twin.lr(0.05)
    fifth = await export(twin.sid, fourth, fmt)
    assert (fifth.version, fifth.not_modified) == (2, False) and fifth.revision != first.revision
    twin.assert_torchs(fifth)
    twin.step()
    sixth = await export(twin.sid, fifth, fmt)
    twin.assert_torchs(sixth)
    twin.assert_torchs(await export(twin.sid, sixth, fmt))
    assert statuses == [200, 200, 200, 304]
    twin.client.delete_session(twin.sid)
    twin.client.delete_session(other.sid)


@pytest.mark.parametrize("fmt", ["safetensors", "json"])
def test_sync_export_if_changed_is_a_304_until_the_session_changes(live_server: str,
                                                                   fmt: Format) -> None:
    statuses: list[int] = []

    def record(response: httpx.Response) -> None:
        if response.request.method == "GET" and response.url.path.endswith("/state_dict"):
            statuses.append(response.status_code)

    with httpx.Client(event_hooks={"response": [record]}, timeout=60) as http, \
            optserve.Client(live_server, max_retries=0, http_client=http) as c:
        async def export(sid: str, last: optserve.StateExport | None, fmt: Format
                         ) -> optserve.StateExport:
            return c.export_state_if_changed(sid, last, format=fmt)

        asyncio.run(scenario(Twin(c), export, statuses, fmt))


@pytest.mark.parametrize("fmt", ["safetensors", "json"])
def test_async_export_if_changed_is_a_304_until_the_session_changes(live_server: str,
                                                                    fmt: Format) -> None:
    statuses: list[int] = []

    async def record(response: httpx.Response) -> None:
        if response.request.method == "GET" and response.url.path.endswith("/state_dict"):
            statuses.append(response.status_code)

    async def run(c: optserve.Client) -> None:
        async with httpx.AsyncClient(event_hooks={"response": [record]}, timeout=60) as http, \
                optserve.AsyncClient(live_server, max_retries=0, http_client=http) as ac:
            async def export(sid: str, last: optserve.StateExport | None, fmt: Format
                             ) -> optserve.StateExport:
                return await ac.export_state_if_changed(sid, last, format=fmt)

            await scenario(Twin(c), export, statuses, fmt)

    with optserve.Client(live_server, max_retries=0) as c:
        asyncio.run(run(c))
