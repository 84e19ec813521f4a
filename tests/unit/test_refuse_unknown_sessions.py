"""``Front.refuse_unknown``, the look-up a request with a body makes before its body is read:
the 404 its operation would raise, for a session nothing holds, and nothing for one that may
exist. On the Ray engine (fronts over host actors running their real code in this process,
``test_ray_deletes``' ``Cluster``) it reads the directory alone: a front that never reached a
session's hosts finds a plain and a sharded session made through another front without asking
any host, and a session deleted through another front, whose entry this front still holds, is
left to its operation's 404. On the embedded engine it finds what the operation finds."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.factory import make_engine
from app.engine.front import Front
from app.errors import NotFound
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import spec

pytest.importorskip("app.engine.ray_host")
pytest.importorskip("ray")

from tests.unit.test_ray_deletes import Cluster  # noqa: E402

GRADS = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}


async def assert_refused_as_read(front: Front, sid: str, tenant: str = "default") -> None:
    """``refuse_unknown`` raises the 404 a read of ``sid`` raises, word for word."""
    with pytest.raises(NotFound) as early:
        await front.refuse_unknown(sid, tenant=tenant)
    with pytest.raises(NotFound) as read:
        await front.describe(sid, tenant=tenant)
    assert (early.value.code, early.value.field, str(early.value)) == (
        "session_not_found", "session_id", str(read.value))


def stepped() -> dict[str, torch.Tensor]:
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
    ref.step(GRADS)
    return ref.params


def test_a_ray_front_looks_in_the_directory_only(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = Cluster(tmp_path, monkeypatch)

    async def run() -> None:
        try:
            maker = cluster.front()
            for sid, shards in (("plain", 1), ("sharded", 2)):
                made = spec(shards)
                made.id = sid
                await maker.create(made)
            other = cluster.front()  # (another front, or this one started again)
            for sid in ("plain", "sharded"):
                await other.refuse_unknown(sid)
            assert other.router._hosts == {}  # type: ignore[attr-defined]  # (none asked)
            await assert_refused_as_read(other, "nope")
            for sid in ("plain", "sharded"):  # (and the operations find them)
                out = await other.step(sid, GRADS, return_params=True)
                assert out.params is not None
                assert_tensors_equal(dict(out.params), stepped(), sid)
            # deleted through the front that made it: this front's entry is its copy, so the
            # look-up lets the request on, and its operation answers the 404
            await maker.delete("plain")
            await other.refuse_unknown("plain")
            with pytest.raises(NotFound) as late:
                await other.step("plain", GRADS, return_params=False)
            assert late.value.code == "session_not_found"
            # a front that reads the directory anew refuses it early
            await assert_refused_as_read(cluster.front(), "plain")
        finally:
            await cluster.kill()
    asyncio.run(run())


def test_the_embedded_engine_refuses_what_its_operations_do_not_find() -> None:
    settings = Settings(device="cpu", warm_up=False,
                        data_dir=Path(tempfile.mkdtemp(prefix="optserve-test-")))

    async def run() -> None:
        front = make_engine(settings)
        await front.start()
        try:
            await assert_refused_as_read(front, "nope")
            for sid, shards in (("plain", 1), ("sharded", 2)):
                made = spec(shards)
                made.id = sid
                await front.create(made)
                await front.refuse_unknown(sid)
            await front.delete("plain")
            await assert_refused_as_read(front, "plain")
            # another tenant's session is not this tenant's
            await assert_refused_as_read(front, "sharded", tenant="t2")
            await front.refuse_unknown("sharded")
            await front.delete("sharded")
            await assert_refused_as_read(front, "sharded")
        finally:
            await front.stop()
    asyncio.run(run())
