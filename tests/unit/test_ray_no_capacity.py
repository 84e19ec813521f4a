"""A sharded create on a Ray cluster without room for all its shards' hosts: the host that
Ray cannot place is given up after ``host_start_timeout_s`` and the create is a 503
``no_capacity`` that leaves no session, no directory entry and no folder of that host (an
empty ``hosts/<name>/`` was left), nor the hosts started for its other shards (they stayed
up, empty); its retry under the same Idempotency-Key is answered the same while there is no
room, and makes the session once there is, as one create. A create that takes a host of its
shape that does not answer waits for it a bounded time."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from app.errors import NotFound, Unavailable
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import create_key, spec

ray_host = pytest.importorskip("app.engine.ray_host")
ray = pytest.importorskip("ray")

from tests.unit.test_ray_deletes import GRADS, Cluster, entries  # noqa: E402


class _Unplaced:
    """The handle of an actor Ray has no room to place: its calls never answer."""

    def __getattr__(self, method: str) -> Any:
        async def never(*args: Any) -> Any:
            await asyncio.Event().wait()
        return type("M", (), {"remote": staticmethod(never)})()


class _Full(Cluster):
    """The fake cluster, with room for ``room`` more host actors (``None``: any number). A
    placed host actor killed gives its room back."""

    def __init__(self, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__(data_dir, monkeypatch)
        self.room: int | None = None
        #: the host actors killed: those never placed, and those placed (``killed_placed``)
        self.killed: list[str] = []
        self.killed_placed: list[str] = []
        monkeypatch.setattr(ray, "kill", self.kill_actor)
        self.unplaced: dict[str, _Unplaced] = {}

    def kill_actor(self, handle: Any, no_restart: bool = True) -> None:
        for name, h in self.unplaced.items():
            if h is handle:
                self.killed.append(name)
                return
        name = next(n for n, h in self.actors.items() if h is handle)
        del self.actors[name]
        self.killed_placed.append(name)
        if self.room is not None:
            self.room += 1

    def options(self, **opts: Any) -> Any:
        placed = super().options(**opts)

        def remote(name: str, config: dict[str, Any]) -> Any:
            if name in self.actors or self.room is None:
                return placed.remote(name, config)
            if self.room == 0:
                return self.unplaced.setdefault(name, _Unplaced())
            self.room -= 1
            return placed.remote(name, config)
        return type("A", (), {"remote": staticmethod(remote)})()



async def two_fronts(cluster: Any) -> tuple[Any, Any, Any, Any]:
    """Two fronts A and B of ``cluster`` and their routers, A having made session "p1"."""
    a, b = cluster.front(), cluster.front()
    await a.create(spec(id="p1"))
    return a, b, a.router, b.router


def after_one_step() -> dict[str, torch.Tensor]:
    """``spec()``'s parameters after one ``torch.optim.SGD`` step (lr 0.1) of ``GRADS``: what
    every session these tests make and step once holds."""
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
    ref.step(GRADS)
    return ref.params

def test_a_sharded_create_without_room_leaves_nothing_and_its_retry_is_answered_alike(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host started for the other shard (placed, started, empty) is given up too: killed
    (its room back), its ``host.json`` and folder removed (it stayed up, empty, holding its
    room, until a retry took it)."""
    cluster = _Full(tmp_path, monkeypatch)
    key = create_key("k-s2")
    hosts = tmp_path / "hosts"

    def folders() -> list[str]:
        return sorted(p.name for p in hosts.iterdir())

    async def run() -> None:
        front = cluster.front()
        router = front.router
        router.options = dataclasses.replace(  # type: ignore[attr-defined]
            router.options, host_start_timeout_s=0.3)  # type: ignore[attr-defined]
        await front.create(spec(id="p1"))  # (one session per host: p1's host is full)
        (p1_host,) = folders()
        cluster.room = 1  # room for shard 0's new host, none for shard 1's
        for attempt in range(2):
            with pytest.raises(Unavailable) as err:
                await front.create(spec(2, id="s2"), idem=key)
            assert err.value.code == "no_capacity", err.value
            assert entries(front) == ["default~p1"]
            with pytest.raises(NotFound):
                await front.pull("s2", None)
            # only p1's host is left: the one Ray could not place went with its host.json
            # (its folder was left, empty), and so did shard 0's, started and empty (it was
            # left up, its folder and host.json kept)
            assert folders() == [p1_host]
            assert len(cluster.killed) == len(cluster.killed_placed) == attempt + 1
            assert cluster.room == 1  # (shard 0's room back)
        assert set(cluster.actors) == {p1_host}
        cluster.room = None  # room again: the retry makes it, once
        made = await front.create(spec(2, id="s2"), idem=key)
        assert made.id == "s2" and not made.replayed
        again = await front.create(spec(2, id="s2"), idem=key)
        assert again.replayed and again.id == "s2"
        await front.step("s2", GRADS, return_params=False)
        assert_tensors_equal(dict((await front.pull("s2", None)).params), after_one_step(),
                             "after the step")
        assert sorted(entries(front)) == ["default~p1", "default~s2"]
        assert len(folders()) == 3
        await cluster.kill()

    asyncio.run(run())


def test_a_create_cancelled_while_its_new_host_waits_for_room_leaves_no_host(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create cancelled while its new host waits for room (the server's shutdown cancels
    the requests still running after its grace period) gives that host up as its timeout
    does: killed, its ``host.json`` and folder removed. It was left waiting for room, with no
    session: a later create with no room picked it (a host of its shape that does not answer,
    as one starting again after a restart of the cluster) and waited for its start without
    bound, where it is a 503 ``no_capacity`` once its own new host is given up."""
    cluster = _Full(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "PLACE_PING_TIMEOUT_S", 0.2)
    hosts = tmp_path / "hosts"

    async def run() -> None:
        front = cluster.front()
        router = front.router
        router.options = dataclasses.replace(  # type: ignore[attr-defined]
            router.options, host_start_timeout_s=0.5)  # type: ignore[attr-defined]
        await front.create(spec(id="p1"))
        (p1_host,) = [p.name for p in hosts.iterdir()]
        cluster.room = 0
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
        cancelled = asyncio.create_task(front.create(spec(id="p2")))
        while not cluster.unplaced:
            await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert cluster.killed == list(cluster.unplaced)
        assert [p.name for p in hosts.iterdir()] == [p1_host]
        with pytest.raises(Unavailable) as err:
            await asyncio.wait_for(front.create(spec(id="p2")), 5.0)
        assert err.value.code == "no_capacity", err.value
        assert entries(front) == ["default~p1"] and [p.name for p in hosts.iterdir()] == [p1_host]
        cluster.room = None  # room again: made, as a new session
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 64.0})
        made = await front.create(spec(id="p2"))
        assert made.id == "p2" and not made.replayed
        await front.step("p2", GRADS, return_params=False)
        assert_tensors_equal(dict((await front.pull("p2", None)).params), after_one_step(),
                             "after the step")
        await cluster.kill()

    asyncio.run(run())


class _Waiting:
    """The handle of a host actor Ray has not placed again (after a restart of the cluster,
    with no room for it): its calls answer once it is placed (``placed`` set)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.placed = asyncio.Event()

    def __getattr__(self, method: str) -> Any:
        async def later(*args: Any) -> Any:
            await self.placed.wait()
            return await getattr(self.handle, method).remote(*args)
        return type("M", (), {"remote": staticmethod(later)})()


def test_a_create_waits_for_a_host_of_its_shape_that_does_not_answer_a_bounded_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the cluster has no room for a new host, a create takes a host of its shape that
    does not answer (not placed again after a restart of the cluster), its start waited for:
    up to ``host_start_timeout_s``, as a new host's, then 503 ``no_capacity`` with
    ``Retry-After`` and nothing made (no entry; that host left as it is: it holds a session).
    The create waited for it without bound, and every create of its shape behind it. Once the
    host is placed again, a create is made and both sessions step as torch.optim does."""
    cluster = _Full(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "PLACE_PING_TIMEOUT_S", 0.2)
    hosts = tmp_path / "hosts"
    ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})

    async def run() -> None:
        await cluster.front().create(spec(id="p1"))
        (h1,) = [p.name for p in hosts.iterdir()]
        await cluster.front().step("p1", GRADS, return_params=False)
        ref.step(GRADS)
        await cluster.kill()  # (a restart of the cluster: no room to place h1 again yet)
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
        front = cluster.front()
        router = front.router
        router.options = dataclasses.replace(  # type: ignore[attr-defined]
            router.options, host_start_timeout_s=0.3)  # type: ignore[attr-defined]
        # (its actor, as the front starts it again from its host.json, not placed)
        waiting = _Waiting(router._handle(h1))  # type: ignore[attr-defined]
        cluster.actors[h1] = waiting  # type: ignore[assignment]
        with pytest.raises(Unavailable) as err:
            await asyncio.wait_for(front.create(spec(id="p2")), 5.0)  # (was: no answer)
        assert err.value.code == "no_capacity" and h1 in err.value.detail, err.value
        assert err.value.retry_after == ray_host.NO_CAPACITY_RETRY_S
        assert entries(front) == ["default~p1"]
        assert [p.name for p in hosts.iterdir()] == [h1] and cluster.killed == []
        with pytest.raises(NotFound):
            await front.pull("p2", None)
        waiting.placed.set()  # (placed again, and room for another host)
        cluster.actors[h1] = waiting.handle
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 64.0})
        made = await front.create(spec(id="p2"))
        assert made.id == "p2" and not made.replayed
        await front.step("p2", GRADS, return_params=False)
        ref2 = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
        ref2.step(GRADS)
        await front.step("p1", GRADS, return_params=False)
        ref.step(GRADS)
        assert_tensors_equal(dict((await front.pull("p1", None)).params), ref.params, "p1")
        assert_tensors_equal(dict((await front.pull("p2", None)).params), ref2.params, "p2")
        await cluster.kill()

    asyncio.run(run())



def test_a_host_is_given_up_only_while_it_holds_and_makes_no_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A started host a placement gives up (``RayRouter._retire``) may have been picked through
    another front meanwhile: one that holds a session is kept (not killed, its files and
    session whole); one that holds none is killed, its folder removed, and a create that
    reaches it after the check (another front's) is 503 ``create_dropped`` with nothing
    made."""
    cluster = _Full(tmp_path, monkeypatch)
    hosts = tmp_path / "hosts"

    async def run() -> None:
        front = cluster.front()
        router: Any = front.router
        await front.create(spec(id="p1"))
        (h1,) = [p.name for p in hosts.iterdir()]
        empty = await router._new_host({"num_cpus": 1}, "pack")
        actor = cluster.actors[empty.name].actor  # (its handle goes with the kill)
        await router._retire([router._host(h1), empty])
        assert cluster.killed_placed == [empty.name]
        assert [p.name for p in hosts.iterdir()] == [h1]
        # a create through another front that placed its session there before the kill
        late = {"resources": {"num_cpus": 1}, "placement": "pack", "host": empty.name,
                "created_by": None, "made": "made-elsewhere"}
        assert router.directory.claim("default~late", late)
        with pytest.raises(Unavailable) as err:  # (a create that reached it after the check)
            await actor.create("default~late", ray_host.spec_to_wire(spec(id="late")), None,
                               "made-elsewhere")
        assert err.value.code == "create_dropped", err.value
        assert actor._host.embedded.keys() == []
        await front.step("p1", GRADS, return_params=False)
        assert_tensors_equal(dict((await front.pull("p1", None)).params), after_one_step(),
                             "p1")
        await cluster.kill()

    asyncio.run(run())


class _Dead:
    """A killed host actor, as its old handles find it: each call raises ActorDiedError."""

    def __getattr__(self, method: str) -> Any:
        async def died(*args: Any) -> Any:
            raise ray.exceptions.ActorDiedError()
        return died


class _Dying(_Full):
    """The fake cluster whose killed host actors are dead to the handles taken before."""

    def kill_actor(self, handle: Any, no_restart: bool = True) -> None:
        super().kill_actor(handle, no_restart)
        handle.actor = _Dead()


def test_a_host_given_up_by_one_front_is_not_started_again_by_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Front A gives up a host it started (``_retire``: killed, its host.json and folder
    removed). Front B had read that host.json (any placement reads them all) and pinged the
    host: its next placements of that shape do not start it again from its copy of the file
    (one did: the host came up again, empty, its folder made again, holding its room, and a
    create could be placed there). B's sessions go to hosts with their host.json, and step as
    torch.optim does."""
    cluster = _Dying(tmp_path, monkeypatch)
    hosts = tmp_path / "hosts"

    async def run() -> None:
        a, b, ra, rb = await two_fronts(cluster)
        shape = ra.options.resources
        empty = await ra._new_host(shape, "pack")
        # (B reads every host.json, placing a session of another shape, and pings the host)
        await b.create(dataclasses.replace(spec(id="q"), resources={"num_cpus": 2}))
        await rb._host(empty.name).call("ping", read=True)
        await ra._retire([empty])
        assert cluster.killed_placed == [empty.name]
        assert empty.name not in {p.name for p in hosts.iterdir()}
        for sid, placement in (("r", "spread"), ("s", "pack")):
            await b.create(dataclasses.replace(spec(id=sid), placement=placement))
            assert empty.name not in cluster.actors, sid  # (was: started again)
            assert empty.name not in {p.name for p in hosts.iterdir()}, sid
        assert all((p / "host.json").exists() for p in hosts.iterdir())
        assert len(list(hosts.iterdir())) == 4  # (p1's, q's, r's, s's)
        for sid in ("r", "s"):
            await b.step(sid, GRADS, return_params=False)
            assert_tensors_equal(dict((await b.pull(sid, None)).params), after_one_step(), sid)
        await cluster.kill()

    asyncio.run(run())


class _UnplacedDying:
    """The handle of an actor Ray has no room to place: its calls answer when it is killed,
    with ActorDiedError (as Ray fails the calls pending on an actor killed for good)."""

    def __init__(self) -> None:
        self.killed = asyncio.Event()

    def __getattr__(self, method: str) -> Any:
        async def until_killed(*args: Any) -> Any:
            await self.killed.wait()
            raise ray.exceptions.ActorDiedError()
        return type("M", (), {"remote": staticmethod(until_killed)})()


def test_a_create_waiting_for_a_host_given_up_meanwhile_is_placed_elsewhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Front B's create, with no room for a new host, waits for a host of its shape that does
    not answer (``_placed_again``): one front A started for its own create and gives up once
    its start timed out (killed, its host.json removed). B's create is placed on another host
    (room came back meanwhile), not answered 404 ``session_not_found`` for that host (nor is
    the host started again from B's copy of its host.json)."""
    cluster = _Dying(tmp_path, monkeypatch)
    monkeypatch.setattr(ray_host, "PLACE_PING_TIMEOUT_S", 0.2)
    hosts = tmp_path / "hosts"
    unplaced = _UnplacedDying()
    real_kill = cluster.kill_actor

    def kill(handle: Any, no_restart: bool = True) -> None:
        if handle is unplaced:
            unplaced.killed.set()
            cluster.killed.append("unplaced")
            return
        real_kill(handle, no_restart)
    monkeypatch.setattr(ray, "kill", kill)

    async def run() -> None:
        a, b, ra, rb = await two_fronts(cluster)  # (one session per host: p1's host is full)
        (h1,) = [p.name for p in hosts.iterdir()]
        ra.options = dataclasses.replace(ra.options, host_start_timeout_s=1.0)
        rb.options = dataclasses.replace(rb.options, host_start_timeout_s=30.0)
        monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 0.0})
        cluster.room = 0
        cluster.unplaced["__next__"] = unplaced  # (A's new host: never placed)
        real_options = cluster.options

        def options(**opts: Any) -> Any:
            if opts["name"] != h1 and "__next__" in cluster.unplaced:
                cluster.unplaced[opts["name"]] = cluster.unplaced.pop("__next__")
            return real_options(**opts)
        cluster.options = options  # type: ignore[method-assign]
        a_create = asyncio.ensure_future(a.create(spec(id="p2")))
        while len(list(hosts.iterdir())) < 2:  # (A's new host's host.json is written)
            await asyncio.sleep(0.01)
        waited = asyncio.Event()
        placed_again = rb._placed_again

        async def noted(name: str, resources: Any) -> None:
            waited.set()
            await placed_again(name, resources)
        rb._placed_again = noted
        b_create = asyncio.ensure_future(b.create(spec(id="p3")))
        await waited.wait()  # (B waits for A's new host)
        with pytest.raises(Unavailable) as err:
            await a_create
        assert err.value.code == "no_capacity", err.value
        assert cluster.killed == ["unplaced"]
        cluster.room = 1  # (room for one more host now)
        made = await asyncio.wait_for(b_create, 10.0)  # (was: 404 for A's given-up host)
        assert made.id == "p3"
        assert len(list(hosts.iterdir())) == 2  # (p1's and p3's: A's went)
        await b.step("p3", GRADS, return_params=False)
        assert_tensors_equal(dict((await a.pull("p3", None)).params), after_one_step(),
                             "p3")
        await cluster.kill()

    asyncio.run(run())


@pytest.mark.parametrize("keyed", [True, False], ids=["keyed", "unkeyed"])
@pytest.mark.parametrize("reached", ["before-the-kill", "after-the-kill"])
def test_a_create_that_lands_on_a_host_another_front_gave_up_is_create_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool, reached: str) -> None:
    """Front B places a create on an empty host that front A then gives up (``_retire``:
    marked, killed, its host.json and folder removed). Whether B's create reaches the host
    before the kill (the mark: 503 ``create_dropped``) or after it (the actor dead: it was 404
    ``session_not_found`` naming the host), the answer is 503 ``create_dropped``, no entry is
    left but a keyed one's (which its retry finishes), and the retry makes the session on
    another host, stepping as torch.optim does."""
    cluster = _Dying(tmp_path, monkeypatch)
    hosts = tmp_path / "hosts"

    async def run() -> None:
        a, b, ra, rb = await two_fronts(cluster)
        empty = await ra._new_host(ra.options.resources, "pack")
        dead: list[Any] = []
        real_place, real_kill = rb._place, cluster.kill_actor

        def kill(handle: Any, no_restart: bool = True) -> None:
            if reached == "after-the-kill":
                real_kill(handle, no_restart)
            else:  # (dead only after B's create reached it)
                _Full.kill_actor(cluster, handle, no_restart)
                dead.append(handle)
        monkeypatch.setattr(ray, "kill", kill)

        async def place(*args: Any) -> Any:
            chosen = await real_place(*args)
            assert [h.name for h in chosen] == [empty.name]
            await ra._retire([empty])  # (A gives it up before B's create reaches it)
            return chosen
        rb._place = place
        idem = create_key("late") if keyed else None
        with pytest.raises(Unavailable) as err:
            await b.create(spec(id="late"), idem=idem)
        assert err.value.code == "create_dropped", err.value
        assert sorted(entries(b)) == (["default~late", "default~p1"]
                                      if keyed and reached == "before-the-kill"
                                      else ["default~p1"])
        assert empty.name not in {p.name for p in hosts.iterdir()}
        for handle in dead:
            handle.actor = _Dead()
        rb._place = real_place
        made = await b.create(spec(id="late"), idem=idem)
        assert made.id == "late" and not made.replayed
        assert sorted(entries(b)) == ["default~late", "default~p1"]
        assert empty.name not in {p.name for p in hosts.iterdir()}
        assert empty.name not in cluster.actors
        await b.step("late", GRADS, return_params=False)
        assert_tensors_equal(dict((await a.pull("late", None)).params), after_one_step(),
                             "late")
        await cluster.kill()

    asyncio.run(run())
