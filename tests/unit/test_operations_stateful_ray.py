"""The random operation sequences of :mod:`tests.unit.test_operations_stateful` on the Ray
engine: the engine under test is a Ray front (``RayRouter`` behind ``Front``) over host actors
that run their real code in this process (``test_ray_deletes``' ``Cluster``): every operation
crosses the host's wire form (``wire_tree``, ``op_to_wire``, the tensors' wire forms) and runs
in the host's embedded engine, its store under ``hosts/<name>/``. A crash stops every host
without a snapshot (a ``kill -9`` of the actors) and the next front starts them again from
their files; a graceful restart snapshots first. The twin (the embedded engine in memory) and
the mirror (in-process ``torch.optim``) are the other machine's, and so is the check after
every rule: bitwise agreement of parameters, state dict and description.

A bounded run in CI (a few machines, each with every scheduler); a longer one::

    OPTSERVE_STATEFUL_EXAMPLES=60 OPTSERVE_STATEFUL_SEED=3 .venv/bin/python -m pytest \\
        tests/unit/test_operations_stateful_ray.py
"""

from __future__ import annotations

import zlib
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from app.config import Settings
from app.engine import Front, persist
from app.engine.ops import Step
from app.engine.store import frame_record
from tests.unit import test_operations_stateful as base

ray_host = pytest.importorskip("app.engine.ray_host")
pytest.importorskip("ray")

from tests.unit.test_ray_deletes import Cluster  # noqa: E402

#: the machines the CI run takes, (optimizer, shards), every scheduler with each: one of each
#: kind of state (momentum buffers, two moments, per-element step sizes, row-sparse steps),
#: and sessions sharded over two hosts (a coordinator's two phases, a shard's files each)
MACHINES = [("SGD", 1), ("Adam", 1), ("Rprop", 1), ("Adagrad", 1), ("Adam", 2), ("SGD", 2)]


class RaySessionMachine(base.SessionMachine):
    storage_faults = False  # (the hosts' stores take the real file system calls)

    def __init__(self) -> None:
        super().__init__()
        self.patches = pytest.MonkeyPatch()
        self.cluster = Cluster(self.dir, self.patches)

    def _start_engine(self) -> Front:
        """A new front over the same data directory and the hosts still running (a front is
        never started here: that would join a real Ray cluster)."""
        settings = Settings(engine="ray", data_dir=self.dir, device="cpu", warm_up=False,
                            durability="step", snapshot_every_steps=4)
        router = ray_host.RayRouter(ray_host.ray_options(settings))
        router._actor = self.cluster
        return Front(router)

    def teardown(self) -> None:
        try:
            base.run(self.loop, self.cluster.kill())
        finally:
            self.patches.undo()
            super().teardown()

    def snapshot(self, eng: Front) -> dict[str, Any]:
        out = super().snapshot(eng)
        out["info"].pop("placement", None)  # (where the Ray engine put it: not the twin's)
        return out

    @rule(torn=st.booleans())
    def crash(self, torn: bool) -> None:
        """Every host actor dies without a snapshot (its files are what it leaves; a torn,
        never acknowledged record at the end of the session's log when ``torn``); the next
        front starts them again from their files."""
        assert self.engine is not None and self.mirror is not None
        base.run(self.loop, self.cluster.kill())
        if torn:
            # (the session's log, or its first shard's: the only session in this directory)
            wal = sorted(self.dir.glob("hosts/*/sessions/*/wal.bin"))[0]
            g = {n: base.seeded(tuple(p.shape), 4242) for n, p in self.mirror.params.items()}
            record = frame_record(persist.encode_record(persist.Record(Step(g), 10**6, 10**6,
                                                                       [])))
            with open(wal, "ab") as f:
                f.write(record[: len(record) // 2])
        self.engine = self._start_engine()
        assert base.run(self.loop, self.engine.refused()) == {}
        base.STATS["ray restart crash" + (" torn" if torn else "")] += 1

    @rule()
    def graceful_restart(self) -> None:
        """Every host snapshots its sessions and stops (a cluster's orderly shutdown)."""
        assert self.engine is not None
        for handle in list(self.cluster.actors.values()):
            base.run(self.loop, handle.actor.snapshot_and_stop())
        self.cluster.actors.clear()
        self.engine = self._start_engine()
        assert base.run(self.loop, self.engine.refused()) == {}
        base.STATS["ray restart graceful"] += 1


def _machine(optimizer: str, shards: int) -> type[RaySessionMachine]:
    class Machine(RaySessionMachine):
        optimizer_choices = [optimizer]
        scheduler_choices = list(base.SCHEDULERS)
    Machine.shards = shards
    Machine.TestCase.settings = settings(
        max_examples=3 * base.EXAMPLES, stateful_step_count=base.STEPS, deadline=None,
        derandomize=True, suppress_health_check=list(HealthCheck))
    return seed(zlib.crc32(repr(("ray", optimizer, shards, base.SEED)).encode()))(Machine)


@pytest.mark.parametrize(("optimizer", "shards"), MACHINES,
                         ids=[f"{o}-{s}-shard{'s' if s > 1 else ''}" for o, s in MACHINES])
def test_random_operations_on_the_ray_engine(optimizer: str, shards: int) -> None:
    before = base.STATS["checks"]
    torch.manual_seed(0)
    _machine(optimizer, shards).TestCase().runTest()
    assert base.STATS["checks"] > before
