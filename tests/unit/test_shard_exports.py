"""A sharded session's state export is the unsharded session's, and torch's own
``state_dict()``, entry for entry and in torch's order, whatever the session's history: empty
entries an import gave (``{}``) stay until a step makes the state, lazily made states come in
the order torch made them (a step's new ones after the older ones), through restarts from the
log and from a snapshot; and both sessions step bitwise as torch after the same import.

The property test runs random sequences of operations (steps of some parameters, option
changes, scheduler steps, imports of torch's own state with entries left out, emptied or
reordered) against sharded and unsharded sessions and an in-process optimizer, and compares
every export with the other two.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec
from tests.torch_reference import (
    Reference,
    assert_tensors_equal,
    assert_trees_equal,
    build_scheduler,
)
from tests.unit.test_shards import run

SHARDS = (1, 2, 3)


def assert_same_order(got: Any, want: Any, path: str = "") -> None:
    """The same keys in the same order at every level (what a JSON export shows)."""
    if isinstance(want, dict):
        assert [str(k) for k in got] == [str(k) for k in want], f"{path}: key order"
        by_str = {str(k): v for k, v in got.items()}
        for k, v in want.items():
            assert_same_order(by_str[str(k)], v, f"{path}.{k}")
    elif isinstance(want, (list, tuple)) and not isinstance(want, torch.Tensor):
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_order(g, w, f"{path}.{i}")


def without_names(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, "param_groups": [{k: v for k, v in g.items() if k != "param_names"}
                                   for g in sd["param_groups"]]}


def assert_export_is_torchs(got: dict[str, Any], ref: Reference, what: str) -> None:
    want = ref.optimizer.state_dict()
    if ref.scheduler is not None:
        want = {**want, "scheduler": ref.scheduler.state_dict()}
    mine = without_names(got)
    assert_trees_equal(mine, want, what)
    assert_same_order(mine, want, what)


async def exports_agree(eng: Front, sids: list[str], ref: Reference, what: str) -> None:
    """Every session's export is the first one's (param_names included) and torch's."""
    exports = [(await eng.export_state(sid)).state_dict for sid in sids]
    for sid, sd in zip(sids, exports, strict=True):
        assert_trees_equal(sd, exports[0], f"{what}: {sid}")
        assert_same_order(sd, exports[0], f"{what}: {sid}")
    assert_export_is_torchs(exports[0], ref, what)


def groups_of(seed: int) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [{"w": [4, 3], "b": [4], "u": [3]}, {"emb": [5, 2], "s": [2]}]
    return [({n: torch.randn(s, generator=gen) for n, s in g.items()}, {}) for g in shapes]


def spec(name: str, groups: list[tuple[dict[str, torch.Tensor], dict[str, Any]]],
         kwargs: dict[str, Any], sid: str, shards: int,
         scheduler: dict[str, Any] | None = None, **more: Any) -> CreateSpec:
    return CreateSpec(name, [GroupSpec({n: t.clone() for n, t in g.items()}, dict(o))
                             for g, o in groups], dict(kwargs), scheduler=scheduler, id=sid,
                      shards=shards, **more)


# ---------------------------------------------------------------------- empty entries, restarts
OPTIMIZERS = [
    ("Adagrad", {"lr": 0.1}),  # its states made at construction
    ("Adam", {"lr": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
]


@pytest.mark.parametrize(("name", "kwargs"), OPTIMIZERS)
def test_an_import_with_empty_entries_exports_as_torch_after_restarts_and_steps(
        name: str, kwargs: dict[str, Any], tmp_path: Path) -> None:
    """A state import whose entries for some parameters are empty (``{}``; every parameter of
    shard 1 of 2, and of two of 3) and which leaves one out: every session exports what
    torch's ``state_dict()`` gives after its ``load_state_dict`` (the empty entries listed, in
    the import's order), after a restart from the log and after one from a snapshot, and after
    the next steps (one never steps ``emb``: its entry stays empty); the parameters are
    torch's bitwise at every step."""
    groups = groups_of(21)
    cls = getattr(torch.optim, name)
    names = [n for g, _ in groups for n in g]
    gen = torch.Generator().manual_seed(22)
    grads = [{n: torch.randn(t.shape, generator=gen) for g, _ in groups for n, t in g.items()}
             for _ in range(4)]
    ref = Reference(cls, groups, kwargs)
    ref.step(grads[0])
    full = ref.optimizer.state_dict()
    pid = {n: i for i, n in enumerate(names)}
    # w's full entry first (Adagrad cannot load an empty first one), the rest out of order
    partial = {"state": {pid["w"]: full["state"][pid["w"]], pid["emb"]: {}, pid["b"]: {},
                         pid["s"]: full["state"][pid["s"]], pid["u"]: {}},
               "param_groups": full["param_groups"]}
    ref.optimizer.load_state_dict(copy.deepcopy(partial))
    sids = [f"s{s}" for s in SHARDS]

    async def imported(eng: Front) -> None:
        for s, sid in zip(SHARDS, sids, strict=True):
            await eng.create(spec(name, groups, kwargs, sid, s, durability="step"))
        # S=2: shard 1's part begins with empty entries (s full after them); S=3: shard 1
        # gets only an empty entry, shard 2 begins with one
        for sid, want in (("s2", [["w", "u"], ["b", "emb", "s"]]),
                          ("s3", [["w"], ["emb"], ["b", "u", "s"]])):
            placed = (await eng.describe(sid)).placement["shards"]  # type: ignore[index]
            assert [sh["params"] for sh in placed] == want
        for sid in sids:
            out = await eng.step(sid, grads[0], return_params=False)
            assert out.version == 1
            await eng.import_state(sid, copy.deepcopy(partial))
        await exports_agree(eng, sids, ref, "after the import")

    async def restarted(eng: Front) -> None:
        await exports_agree(eng, sids, ref, "after a restart")

    async def stepped(eng: Front) -> None:
        for k, g in enumerate(grads[1:]):
            if k < 2:
                g = {n: t for n, t in g.items() if n != "emb"}
            ref.step(g)
            for sid in sids:
                out = await eng.step(sid, g, return_params=True)
                assert out.params is not None
                assert_tensors_equal(dict(out.params), ref.params, f"{sid} step {k + 2}")
            await exports_agree(eng, sids, ref, f"after step {k + 2}")

    engine = {"data_dir": tmp_path, "durability": "step"}
    run(imported, snapshot=False, **engine)  # (from the log)
    run(restarted, **engine)  # (then from the snapshot its stop wrote)
    assert list(tmp_path.glob("sessions/default#s2~shard1of2/snapshot.bin"))
    run(restarted, snapshot=False, **engine)
    run(stepped, **engine)


# ---------------------------------------------------------------------- the property test
def random_import(rng: random.Random, sd: dict[str, Any], eager: bool) -> dict[str, Any]:
    """torch's own state dict with some entries left out, some emptied, in a shuffled order
    (for Adagrad: a full entry first, as torch needs)."""
    items = list(sd["state"].items())
    rng.shuffle(items)
    state: dict[int, Any] = {}
    for pid, entry in items:
        roll = rng.random()
        if roll < 0.2:
            continue
        state[pid] = {} if roll < 0.45 else entry
    if eager:
        full = [p for p, e in state.items() if e]
        if not full:
            return copy.deepcopy(sd)
        first = full[0]
        state = {first: state[first], **{p: e for p, e in state.items() if p != first}}
    return copy.deepcopy({**sd, "state": state})


PROPERTY = [
    ("Adam", {"lr": 0.01}, {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}}),
    ("Adagrad", {"lr": 0.1}, None),
    ("SGD", {"lr": 0.1, "momentum": 0.9},
     {"name": "ExponentialLR", "options": {"gamma": 0.9}}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.5}, None),
]


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(("name", "kwargs", "scheduler"), PROPERTY)
def test_random_histories_export_the_same_sharded_unsharded_and_in_torch(
        name: str, kwargs: dict[str, Any], scheduler: dict[str, Any] | None, seed: int,
        tmp_path: Path) -> None:
    """Random operations, the same on 1, 2 and 3 shards and in process: steps of random
    subsets of the parameters (a parameter's state is made at its first step), option changes
    (PATCH of a group's lr), scheduler steps by hand, imports of torch's state with entries
    left out, emptied and reordered; after each, every export equals the others and torch's
    (keys, their order, tensors bitwise), and the parameters are torch's. Then a restart, and
    the same. (add_param_group is refused by sharded sessions: their layout is fixed.)"""
    rng = random.Random(f"{name}{seed}")
    groups = groups_of(seed)
    cls = getattr(torch.optim, name)
    names = [n for g, _ in groups for n in g]
    ref = Reference(cls, groups, kwargs)
    if scheduler is not None:
        ref.scheduler = build_scheduler(scheduler, ref.optimizer)
    sids = [f"s{s}" for s in SHARDS]
    gen = torch.Generator().manual_seed(seed)
    trace: list[str] = []

    async def ops(eng: Front, count: int) -> None:
        for k in range(count):
            roll = rng.random()
            if roll < 0.55:
                chosen = [n for n in names if rng.random() < 0.5]
                g = {n: torch.randn(ref.params[n].shape, generator=gen) for n in chosen}
                trace.append(f"step {chosen}")
                ref.step(g)
                for sid in sids:
                    out = await eng.step(sid, g, return_params=True)
                    assert out.params is not None
                    assert_tensors_equal(dict(out.params), ref.params, f"{sid} {trace}")
            elif roll < 0.7:
                index = rng.randrange(len(groups))
                lr = rng.choice([0.05, 0.02, 0.001])
                trace.append(f"patch {index} lr={lr}")
                ref.optimizer.param_groups[index]["lr"] = lr
                for sid in sids:
                    await eng.update_param_group(sid, index, {"lr": lr})
            elif roll < 0.8 and scheduler is not None:
                trace.append("scheduler step")
                ref.scheduler.step()
                for sid in sids:
                    await eng.scheduler_step(sid, None)
            else:
                sd = ref.optimizer.state_dict()
                if scheduler is not None:
                    sd["scheduler"] = ref.scheduler.state_dict()
                state = random_import(rng, sd, name == "Adagrad")
                trace.append(f"import {list(state['state'])}")
                ref.optimizer.load_state_dict(copy.deepcopy(
                    {k: v for k, v in state.items() if k != "scheduler"}))
                if scheduler is not None:
                    ref.scheduler.load_state_dict(copy.deepcopy(state["scheduler"]))
                for sid in sids:
                    await eng.import_state(sid, copy.deepcopy(state))
            await exports_agree(eng, sids, ref, f"after {trace}")

    async def first(eng: Front) -> None:
        for s, sid in zip(SHARDS, sids, strict=True):
            await eng.create(spec(name, groups, kwargs, sid, s, scheduler=scheduler,
                                  durability="step"))
        await exports_agree(eng, sids, ref, "after the create")
        await ops(eng, 12)

    async def second(eng: Front) -> None:
        await exports_agree(eng, sids, ref, f"after a restart, {trace}")
        await ops(eng, 6)

    run(first, snapshot=False, data_dir=tmp_path, durability="step")
    run(second, snapshot=False, data_dir=tmp_path, durability="step")
