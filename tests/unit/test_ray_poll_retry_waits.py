"""A long poll through a Ray front whose host restarts waits what is left of its ``wait_s``,
not all of it again (:meth:`RayHost.call <app.engine.ray_host.RayHost.call>`'s ``wait_at``):
a ``wait_s=6`` poll whose host was killed at 4 s answered at 13 s. Without a cluster: a
handle whose first call of each method meets a restarting actor (Ray's ``RayActorError``),
recording the arguments every call was sent with."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.code_version import code_version

ray_host = pytest.importorskip("app.engine.ray_host")
ray_exceptions = pytest.importorskip("ray.exceptions")


class _Method:
    def __init__(self, handle: RestartingHandle, name: str) -> None:
        self.handle, self.name = handle, name

    async def remote(self, *args: Any) -> Any:
        if self.name == "code_version":
            return code_version()
        self.handle.sent.append((self.name, args))
        if len(self.handle.sent) == 1:
            await asyncio.sleep(0.3)  # the wait runs a while, then the actor dies
            raise ray_exceptions.RayActorError()
        return self.handle.answer


class RestartingHandle:
    """Its actor dies during the first call; the second is answered ``answer``."""

    answer: Any = {"answered": True}

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def test_a_retried_poll_waits_what_is_left_of_its_wait() -> None:
    handle = RestartingHandle()
    host = ray_host.RayHost(handle, "host-1")
    answer = asyncio.run(host.call("pull", "k", None, 5, 6.0, frozenset(), None, read=True,
                                   wait_at=(3,)))
    assert answer == RestartingHandle.answer
    (first, first_args), (second, second_args) = handle.sent
    assert first == second == "pull"
    assert first_args == ("k", None, 5, 6.0, frozenset(), None)
    assert second_args[:3] == first_args[:3] and second_args[4:] == first_args[4:]
    # 0.3 s in the dead call and 0.1 s before the retry have passed: what is left, not 6 s
    assert 0.0 < second_args[3] <= 6.0 - 0.4


def test_a_wait_that_ran_out_is_retried_as_no_wait() -> None:
    handle = RestartingHandle()
    host = ray_host.RayHost(handle, "host-1")
    asyncio.run(host.call("pull", "k", None, 5, 0.2, frozenset(), None, read=True,
                          wait_at=(3,)))
    assert handle.sent[1][1][3] == 0.0


def test_a_sharded_poll_counts_its_wait_down_inside_the_coordinators_arguments() -> None:
    """A sharded session's pull and row pull go to its coordinator as ``coordinate(key, entry,
    method, args)``: the wait inside ``args`` is counted down."""
    for method, call in (("pull", lambda s: s.pull("k", ["a"], min_version=5, wait_s=6.0)),
                         ("pull_rows", lambda s: s.pull_rows("k", {}, min_version=5,
                                                             wait_s=6.0))):
        handle = RestartingHandle()
        handle.answer = {"params": {}, "version": 5}
        sharded = ray_host.RemoteSharded(ray_host.RayHost(handle, "host-1"), "k", {"shards": 2})
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ray_host, "result_from_wire", lambda wire: wire)
            asyncio.run(call(sharded))
        (_, first_args), (_, second_args) = handle.sent
        assert first_args[2] == second_args[2] == method
        assert first_args[3][2] == 6.0
        assert 0.0 < second_args[3][2] <= 6.0 - 0.4
        assert second_args[3][:2] == first_args[3][:2] and second_args[3][3:] == first_args[3][3:]
