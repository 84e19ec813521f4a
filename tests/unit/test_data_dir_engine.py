"""A data directory belongs to one engine (:mod:`app.data_dir_engine`).

The embedded engine started on a Ray engine's data directory failed to start on its first plain
entry, and before that deleted the entry of every sharded Ray session sorted ahead of it (it
took each for one of its own whose shards were gone): the Ray engine then no longer knew those
sessions. The Ray engine started on an embedded one served none of its sessions (404, "host
local is gone"). Now the server refuses to start either on the other's directory, before it
reads or writes anything there; the directory's own engine then serves every session as it was.
The Ray side is the real router and host actors, in this process (``tests.unit.test_ray_deletes``'s
``Cluster``: the layout a Ray deployment writes)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.data_dir_engine import ENGINE_FILE, DataDirOfAnotherEngine, claim, owners
from app.engine import CreateSpec, Front, GroupSpec, make_engine
from tests.stored_files import stored_files
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_ray_deletes import Cluster

PARAMS = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([1.0, 2.0])}
GRAD = {"a": torch.tensor([0.25, 1.0, -0.5]), "b": torch.tensor([-1.0, 0.5])}


def spec(sid: str, shards: int) -> CreateSpec:
    return CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in PARAMS.items()})],
                      {"lr": 0.1}, id=sid, shards=shards)


def stepped_once() -> dict[str, torch.Tensor]:
    ref = Reference(torch.optim.Adam, [(PARAMS, {})], {"lr": 0.1})
    ref.step(GRAD)
    return ref.params


def settings(data_dir: Path, engine: str) -> Settings:
    return Settings(engine=engine, data_dir=data_dir, device="cpu", warm_up=False)  # type: ignore[arg-type]


async def make_two(front: Front) -> None:
    """A plain session and a sharded one (sorted ahead of it), each stepped once."""
    await front.create(spec("plain", 1))
    await front.create(spec("a-sharded", 2))
    for sid in ("plain", "a-sharded"):
        await front.step(sid, GRAD, return_params=False)


async def assert_both_served(front: Front) -> None:
    expected = stepped_once()
    for sid in ("plain", "a-sharded"):
        out = await front.pull(sid, None)
        assert out.version == 1, sid
        assert_tensors_equal(out.params, expected)


def run_on(make: Callable[[], Front], stop: Callable[[Front], Awaitable[None]],
           work: Callable[[Front], Awaitable[None]]) -> None:
    """``work`` on a front ``make`` gives, started, then ``stop``."""
    async def run() -> None:
        front = make()
        await front.start()
        try:
            await work(front)
        finally:
            await stop(front)

    asyncio.run(run())


def test_the_embedded_engine_refuses_a_ray_data_dir_and_leaves_it_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = Cluster(tmp_path, monkeypatch)

    async def killed(front: Front) -> None:
        await cluster.kill()

    run_on(cluster.front, killed, make_two)
    assert owners(tmp_path) == {"ray"}  # (told by its layout: the router made no file)
    before = stored_files(tmp_path)
    with pytest.raises(DataDirOfAnotherEngine) as refused:
        make_engine(settings(tmp_path, "embedded"))
    message = str(refused.value)
    assert "holds the ray engine's sessions" in message
    assert "runs the embedded engine (OPTSERVE_ENGINE=embedded)" in message
    assert stored_files(tmp_path) == before  # the sharded session's entry included

    run_on(cluster.front, killed, assert_both_served)
    claim(tmp_path, "ray")  # what a Ray front's start does: noted, and still refused
    assert (tmp_path / ENGINE_FILE).read_text() == "ray\n"
    with pytest.raises(DataDirOfAnotherEngine):
        make_engine(settings(tmp_path, "embedded"))


def test_the_ray_engine_refuses_an_embedded_data_dir_and_leaves_it_whole(
        tmp_path: Path) -> None:
    def embedded() -> Front:
        return make_engine(settings(tmp_path, "embedded"))

    run_on(embedded, Front.stop, make_two)
    assert (tmp_path / ENGINE_FILE).read_text() == "embedded\n"
    for noted in (True, False):  # noted in its file, then told by its layout
        if not noted:
            (tmp_path / ENGINE_FILE).unlink()
        before = stored_files(tmp_path)
        with pytest.raises(DataDirOfAnotherEngine) as refused:
            make_engine(settings(tmp_path, "ray"))  # before Ray is reached
        assert "holds the embedded engine's sessions" in str(refused.value)
        assert stored_files(tmp_path) == before

    run_on(embedded, Front.stop, assert_both_served)


def test_what_a_directory_without_its_file_is_told_by(tmp_path: Path) -> None:
    assert owners(tmp_path / "missing") == set()
    assert owners(tmp_path) == set()
    (tmp_path / "sessions" / ".deleted-x").mkdir(parents=True)  # a delete's leftover only
    (tmp_path / "directory").mkdir()
    assert owners(tmp_path) == set()
    claim(tmp_path, "ray")  # nothing of either: taken, and noted
    assert owners(tmp_path) == {"ray"}
    (tmp_path / ENGINE_FILE).unlink()
    (tmp_path / "tombstones.jsonl").write_text("")
    assert owners(tmp_path) == {"embedded"}
    (tmp_path / "hosts" / "h-1").mkdir(parents=True)
    assert owners(tmp_path) == {"embedded", "ray"}
    for engine, other in (("embedded", "ray"), ("ray", "embedded")):
        with pytest.raises(DataDirOfAnotherEngine, match=f"holds the {other} engine's"):
            claim(tmp_path, engine)
    assert not (tmp_path / ENGINE_FILE).exists()
    # moved over by hand: the file says whose it is now
    (tmp_path / ENGINE_FILE).write_text("embedded\n")
    assert owners(tmp_path) == {"embedded"}
    claim(tmp_path, "embedded")
    (tmp_path / ENGINE_FILE).write_text("rey\n")
    with pytest.raises(DataDirOfAnotherEngine, match="names the engine 'rey', not one of "
                       "embedded, ray"):
        claim(tmp_path, "ray")
