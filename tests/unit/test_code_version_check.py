"""A Ray front checks that each host actor runs its own optserve commit before its first call
to it (:meth:`RayHost._check_version <app.engine.ray_host.RayHost._check_version>`), without a
cluster: fronts over host actors running their real code in this process
(:mod:`tests.unit.test_ray_deletes`). A host of another commit, or one from before the check
(its handle has no ``code_version``), is a 503 ``host_version_mismatch`` and is asked nothing;
the front logs it once; a host replaced meanwhile is served."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from app.code_version import code_version
from app.engine.history import HistoryQuery
from app.errors import Invalid, Unavailable
from tests.unit.test_deleted_creates import spec
from tests.unit.test_ray_deletes import AsTorch, Cluster, Handle, entries_of

ray_host = pytest.importorskip("app.engine.ray_host")

OTHER = "0123456789abcdef"


def test_the_code_version_is_a_digest_of_the_source_made_once() -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", code_version())
    code_version.cache_clear()
    first = code_version()
    assert code_version() is first
    assert code_version.cache_info().hits >= 1 and code_version.cache_info().misses == 1


class OlderHandle(Handle):
    """The handle of a host actor from before the check: no ``code_version`` method (Ray's
    handle raises AttributeError for a method its actor's class lacks). ``dead``: its actor
    was killed (every call raises Ray's ActorDiedError)."""

    dead = False
    asked: list[str]

    def __getattr__(self, method: str) -> Any:
        if method == "code_version":
            raise AttributeError(method)
        self.__dict__.setdefault("asked", []).append(method)
        if self.dead:
            raise ActorDiedError()
        return super().__getattr__(method)


async def made_and_stepped(cluster: Cluster, sid: str) -> tuple[Any, AsTorch, str]:
    """A session ``sid`` made through a new front and stepped once, beside its torch twin: the
    front, the twin and the session's host."""
    first = cluster.front()
    s = spec(id=sid)
    await first.create(s)
    torch_twin = AsTorch(s)
    await torch_twin.step(first, sid)
    return first, torch_twin, entries_of(first, sid)["host"]


async def host_version(actor: Any) -> str:
    """The hosts' code version (in this process, beside fronts whose version is patched)."""
    return code_version()


def mismatch(exc: BaseException, host: str) -> None:
    assert isinstance(exc, Unavailable) and exc.code == "host_version_mismatch", exc
    assert exc.retry_after == ray_host.VERSION_RECHECK_S
    assert host in exc.detail and "one commit" in exc.detail and "docs/cluster.md" in exc.detail


def test_a_front_of_another_commit_is_refused_and_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A session made and stepped through a front; then a front whose code version is another
    gets 503 ``host_version_mismatch`` for a read and a step (logged once, though it asks again
    each time here), and the session is as it was: the first front (checked once, before its
    first call) reads it and steps it as torch. Once the second front's code is the host's, it
    is served too."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        try:
            first, torch_twin, host = await made_and_stepped(cluster, "v")
            monkeypatch.setattr(ray_host.HostActor, "code_version", host_version)
            monkeypatch.setattr(ray_host, "code_version", lambda: OTHER)  # (the fronts')
            monkeypatch.setattr(ray_host, "VERSION_RECHECK_S", 0.0)  # (asked every time)
            other = cluster.front()
            caplog.clear()
            with caplog.at_level(logging.ERROR, "optserve.ray"):
                for _ in range(2):
                    with pytest.raises(Unavailable) as read:
                        await other.describe("v")
                    mismatch(read.value, host)
                    with pytest.raises(Unavailable) as step:
                        await other.step("v", torch_twin.grads, return_params=False)
                    mismatch(step.value, host)
            logged = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(logged) == 1, logged
            assert host in logged[0].getMessage() and OTHER in logged[0].getMessage()
            assert code_version() in logged[0].getMessage()
            assert (await first.describe("v")).version == 1
            await torch_twin.step(first, "v")  # (checked already: not asked again)
            monkeypatch.setattr(ray_host, "code_version", code_version)
            await torch_twin.step(other, "v")
            assert (await other.describe("v")).version == 3
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_host_actor_from_before_the_check_is_refused_until_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host actor whose handle has no ``code_version`` (an older commit's) is a 503
    ``host_version_mismatch`` for every call, and asked nothing but whether it lives (its
    ``ping``, so that one killed is seen); once an operator killed it, the front takes the
    host started again (this commit's) and serves the session as it was."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        try:
            _, torch_twin, host = await made_and_stepped(cluster, "old")
            older = cluster.actors[host] = OlderHandle(cluster.actors[host].actor)
            monkeypatch.setattr(ray_host, "VERSION_RECHECK_S", 0.0)
            front = cluster.front()
            for _ in range(2):
                with pytest.raises(Unavailable) as read:
                    await front.describe("old")
                mismatch(read.value, host)
                assert "before versions" in read.value.detail
                with pytest.raises(Unavailable) as step:
                    await front.step("old", torch_twin.grads, return_params=False)
                mismatch(step.value, host)
            assert set(older.asked) == {"ping"}, older.asked
            older.dead = True  # (ray.kill: the next front's call starts it again)
            cluster.actors[host] = Handle(older.actor)
            assert (await front.describe("old")).version == 1
            await torch_twin.step(front, "old")
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_a_sharded_sessions_history_and_scalars_from_another_commit_are_refused_as_any_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded session's ``GET .../history`` and a step carrying scalars are refused by the
    front itself (422 ``not_supported_here``), without calling the host: through a front of
    another commit they are 503 ``host_version_mismatch``, as every other call there is (they
    were the 422, a refusal of this front's commit). Through the host's commit's front they are
    the 422 still, and the session, untouched, steps as torch."""
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        try:
            first = cluster.front()
            s = spec(2, id="sh")
            await first.create(s)
            torch_twin = AsTorch(s)
            await torch_twin.step(first, "sh")
            host = entries_of(first, "sh")["shards"][0]  # (its coordinator's)
            monkeypatch.setattr(ray_host.HostActor, "code_version", host_version)
            monkeypatch.setattr(ray_host, "code_version", lambda: OTHER)  # (the fronts')
            other = cluster.front()
            for _ in range(2):
                with pytest.raises(Unavailable) as history:
                    await other.history("sh", HistoryQuery())
                mismatch(history.value, host)
                with pytest.raises(Unavailable) as step:
                    await other.step("sh", torch_twin.grads, return_params=False,
                                     scalars={"loss": 0.5})
                mismatch(step.value, host)
            monkeypatch.setattr(ray_host, "code_version", code_version)
            for front in (first, cluster.front()):
                with pytest.raises(Invalid) as refused:
                    await front.history("sh", HistoryQuery())
                assert (refused.value.code, refused.value.field) == (
                    "not_supported_here", "history")
                with pytest.raises(Invalid) as refused:
                    await front.step("sh", torch_twin.grads, return_params=False,
                                     scalars={"loss": 0.5})
                assert (refused.value.code, refused.value.field) == (
                    "not_supported_here", "scalars")
            assert (await first.describe("sh")).version == 1
            await torch_twin.step(first, "sh")
        finally:
            await cluster.kill()
    asyncio.run(run())
