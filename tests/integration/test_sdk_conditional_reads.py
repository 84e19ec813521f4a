"""The Python SDK's conditional reads against a real uvicorn server, sync and async:
``get_session``, ``get_params`` and ``export_state`` take ``at_version`` (sent as
``If-Match``). At the session's version they answer as without it, equal to an in-process
``torch.optim``; at another, ``PreconditionFailedError`` with the current version."""

from __future__ import annotations

import asyncio

import pytest
import torch

import optserve
from tests.integration.test_sdk_conditional_changes import Twin, client  # noqa: F401

pytestmark = pytest.mark.integration


def same_state(twin: Twin, sd: dict[str, object]) -> None:
    mine = twin.opt.state_dict()
    state = sd["state"]
    assert isinstance(state, dict)
    for pid, entry in mine["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(state[pid][key]), value), (pid, key)


def test_reads_at_a_version(client: optserve.Client) -> None:  # noqa: F811 - the fixture
    twin = Twin(client)
    twin.step()
    twin.step()
    assert client.get_session(twin.sid, at_version=2).version == 2
    got = client.get_params(twin.sid, at_version=2)
    assert got.version == 2 and torch.equal(torch.as_tensor(got.params["w"]), twin.params["w"])
    for fmt in ("safetensors", "json"):
        same_state(twin, client.export_state(twin.sid, fmt, at_version=2))
    for read in (lambda: client.get_session(twin.sid, at_version=1),
                 lambda: client.get_params(twin.sid, at_version=3),
                 lambda: client.export_state(twin.sid, at_version=1)):
        with pytest.raises(optserve.PreconditionFailedError) as err:
            read()
        assert err.value.status_code == 412 and err.value.problem["current_version"] == 2
    for bad in (-1, 1.0, True, "2"):
        with pytest.raises(ValueError, match="at_version"):
            client.get_session(twin.sid, at_version=bad)  # type: ignore[arg-type]


def test_async_reads_at_a_version(client: optserve.Client, live_server: str  # noqa: F811
                                  ) -> None:
    twin = Twin(client)
    twin.step()

    async def run() -> None:
        async with optserve.AsyncClient(live_server, max_retries=0) as ac:
            assert (await ac.get_session(twin.sid, at_version=1)).version == 1
            got = await ac.get_params(twin.sid, at_version=1)
            assert torch.equal(torch.as_tensor(got.params["w"]), twin.params["w"])
            same_state(twin, await ac.export_state(twin.sid, at_version=1))
            with pytest.raises(optserve.PreconditionFailedError):
                await ac.export_state(twin.sid, at_version=0)
    asyncio.run(run())


def test_a_refused_state_read_says_where_the_session_is(client: optserve.Client  # noqa: F811
                                                         ) -> None:
    """``export_state(at_version=)`` refused (a step came between) raises a
    ``PreconditionFailedError`` that carries the session's state tag now, in the form
    ``StateExport.tag`` holds (the 412's ``X-Optserve-State-Tag``), with its version, step and
    revision: an export read before and equal to that tag is the state now (a conditional read
    of it is a 304, the very tensors), one read before the step is not; sync and async."""
    twin = Twin(client)
    twin.step()
    before = client.export_state_if_changed(twin.sid)
    twin.step()
    now = client.export_state_if_changed(twin.sid)
    info = client.get_session(twin.sid)
    assert now.tag is not None and now.tag != before.tag
    for fmt in ("safetensors", "json"):
        with pytest.raises(optserve.PreconditionFailedError) as err:
            client.export_state(twin.sid, fmt, at_version=1)
        exc = err.value
        assert (exc.current_version, exc.current_step, exc.current_revision) == (
            2, info.step, info.revision)
        assert exc.current_state_tag == now.tag != before.tag
    again = client.export_state_if_changed(twin.sid, now)
    assert again.not_modified and again.tag == exc.current_state_tag
    same_state(twin, again.state_dict)

    async def run() -> None:
        async with optserve.AsyncClient(client.base_url, max_retries=0) as ac:
            with pytest.raises(optserve.PreconditionFailedError) as aerr:
                await ac.export_state(twin.sid, at_version=1)
            assert aerr.value.current_state_tag == now.tag
            assert aerr.value.current_version == 2
    asyncio.run(run())
    # a change's refusal (no state read) names no state tag, the rest as the server gives it
    with pytest.raises(optserve.PreconditionFailedError) as changed:
        client.update_param_group(twin.sid, 0, lr=0.5, base_version=1)
    assert (changed.value.current_version, changed.value.current_state_tag) == (2, None)
