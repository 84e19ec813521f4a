"""The Ray engine's placement keeps the room of a host that is down for its sessions, also from
a create of another resource shape, without a cluster (the fakes of ``test_ray_deletes``: host
actors running their real code in this process; Ray's free and total resources, and which host
answers, set by the test).

A create of a shape no host has needs a new host. Where Ray's free room for it is that of a
host of the deployment which holds sessions and is not placed (restarting), the create is a
503 ``no_capacity`` and starts nothing (was: the new host took that room, and the down host
could never be placed again, its sessions a 503 for good). Once that host is placed again the
create starts its new host (which waits for room where there is none: an autoscaler's cue), and
the down host's session steps as torch.optim does. A down host that holds no session keeps
no room (an operator may stop it to give its room back).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine.interface import CreateSpec, GroupSpec
from app.errors import Unavailable
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_ray_deletes import GRADS, Cluster, entries_of

ray = pytest.importorskip("ray")
ray_host = pytest.importorskip("app.engine.ray_host")

ONE_CPU = {"num_cpus": 1}
#: another shape, on the same CPUs
ONE_CPU_AND_MEMORY = {"num_cpus": 1, "memory": 1000}


def spec(sid: str, resources: dict[str, Any]) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({"a": torch.ones(2), "b": torch.zeros(3)})],
                      {"lr": 0.1}, id=sid, resources=resources)


def _two_cpu_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                     ) -> tuple[Any, dict[str, float], set[str]]:
    """A fake cluster of two CPUs: Ray's free room (``free``, to be changed by the test) and
    the hosts not placed now (``down``: every call to them a 503 ``host_restarting``)."""
    cluster = Cluster(tmp_path, monkeypatch)
    total = {"CPU": 2.0, "memory": 1e12}
    free = dict(total)
    monkeypatch.setattr(ray, "available_resources", lambda: dict(free))
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(total))
    down: set[str] = set()
    call = ray_host.RayHost.call

    async def unplaced(self: Any, method: str, *args: Any, **kw: Any) -> Any:
        if self.name in down:
            raise Unavailable(f"{self.name} is restarting", code="host_restarting")
        return await call(self, method, *args, **kw)
    monkeypatch.setattr(ray_host.RayHost, "call", unplaced)
    return cluster, free, down


async def _a_host_each(front: Any, free: dict[str, float]) -> list[str]:
    """Sessions ``a`` and ``b`` of one CPU made through ``front``, each on a host of its own
    (Ray's free CPU counted down): their hosts' names."""
    hosts = []
    for sid in ("a", "b"):
        await front.create(spec(sid, ONE_CPU))
        hosts.append(entries_of(front, sid)["host"])
        free["CPU"] -= 1
    return hosts


def test_a_create_of_a_new_shape_leaves_a_down_hosts_room(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster, free, down = _two_cpu_cluster(tmp_path, monkeypatch)
    ref = Reference(torch.optim.SGD, [(spec("b", ONE_CPU).groups[0].params, {})], {"lr": 0.1})

    async def go() -> None:
        front = cluster.front()
        hosts = await _a_host_each(front, free)
        assert len(set(hosts)) == 2  # (one session per host)
        await front.step("b", GRADS, return_params=False)
        ref.step(GRADS)
        down.add(hosts[1])  # its process died: Ray restarts it, its CPU free meanwhile
        free["CPU"] += 1
        with pytest.raises(Unavailable) as err:
            await front.create(spec("c", ONE_CPU_AND_MEMORY))
        assert err.value.code == "no_capacity" and hosts[1] in err.value.detail, err.value
        assert err.value.retry_after == ray_host.DOWN_HOSTS_RETRY_S
        assert sorted(p.parent.name for p in (tmp_path / "hosts").glob("*/host.json")) == \
            sorted(hosts)  # no host was started for it
        down.clear()  # placed again, on its own room
        free["CPU"] -= 1
        await front.create(spec("c", ONE_CPU_AND_MEMORY))  # a new host (Ray: it waits)
        assert entries_of(front, "c")["host"] not in hosts
        await front.step("b", GRADS, return_params=False)
        ref.step(GRADS)
        assert_tensors_equal(dict((await front.pull("b", None)).params), ref.params, "b")
    try:
        asyncio.run(go())
    finally:
        asyncio.run(cluster.kill())


def test_the_room_of_a_down_host_without_sessions_is_anyones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host whose sessions were all deleted, then stopped (``ray.kill`` to give its room
    back, as docs/cluster.md says) and not answering: a create of another shape takes its
    room (a new host), as before."""
    cluster, free, down = _two_cpu_cluster(tmp_path, monkeypatch)

    async def go() -> None:
        front = cluster.front()
        hosts = await _a_host_each(front, free)
        await front.delete("b")
        down.add(hosts[1])
        free["CPU"] += 1
        await front.create(spec("c", ONE_CPU_AND_MEMORY))
        assert entries_of(front, "c")["host"] not in hosts
        ref = Reference(torch.optim.SGD, [(spec("c", ONE_CPU).groups[0].params, {})],
                        {"lr": 0.1})
        await front.step("c", GRADS, return_params=False)
        ref.step(GRADS)
        assert_tensors_equal(dict((await front.pull("c", None)).params), ref.params, "c")
    try:
        asyncio.run(go())
    finally:
        asyncio.run(cluster.kill())
