"""Data directories written by older optserve commits, restored by this one.

Each ``tests/fixtures/old_data_dirs/<commit>/`` holds what that commit's server left after a
``kill -9`` (``stored/``: its snapshots, logs and directory entries in that commit's formats,
the first of them the store's first formats, ``OPTSNAP1``/``OPTR``) and what it had answered
before (``answers.json``: each session's parameters and state dict as JSON), written by
``make_fixture.py`` there. Restored here, every session is back exactly as acknowledged (the
same bits: stored values compared with stored answers, so no machine's arithmetic is the
truth), a deleted one stays deleted, nothing is refused, and each session steps on as an
in-process ``torch.optim`` loaded with the restored state steps on this machine."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front, embedded_engine
from app.errors import NotFound
from app.wire.tree import tree_from_json
from tests.torch_reference import assert_trees_equal

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "old_data_dirs"


def fixtures(engine: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "answers.json").is_file() and
                  json.loads((p / "answers.json").read_text()).get("engine", "embedded")
                  == engine)


COMMITS, RAY_COMMITS = fixtures("embedded"), fixtures("ray")
#: each scenario session's optimizer (and scheduler), as make_fixture.py made it
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "sharded": torch.optim.Adam,
              "keyed": torch.optim.RMSprop}


def test_there_are_fixtures_from_the_first_formats_on() -> None:
    assert len(COMMITS) >= 3 and len(RAY_COMMITS) >= 2
    first = FIXTURES / "4921d32" / "stored" / "sessions" / "default~adam"
    assert (first / "snapshot.bin").read_bytes()[:8] == b"OPTSNAP1"
    assert (first / "wal.bin").read_bytes()[:4] == b"OPTR"


@pytest.mark.parametrize("commit", COMMITS)
def test_an_older_data_directory_is_restored_as_it_was_acknowledged(tmp_path: Path,
                                                                     commit: str) -> None:
    answers = json.loads((FIXTURES / commit / "answers.json").read_text())
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / commit / "stored", data)

    async def run() -> None:
        eng: Front = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        try:
            await all_restored(eng, answers)
        finally:
            await eng.stop()
    asyncio.run(run())


@pytest.mark.parametrize("commit", RAY_COMMITS)
def test_an_older_ray_data_directory_is_restored_as_it_was_acknowledged(
        tmp_path: Path, commit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ray engine's layout (``directory/`` entries naming host actors, each host's
    sessions under ``hosts/<name>/``), restored by the real router and host actors in this
    process (``test_ray_deletes``' ``Cluster``): each host is started from its files when the
    front first needs it, as after a whole cluster's restart."""
    from tests.unit.test_ray_deletes import Cluster
    answers = json.loads((FIXTURES / commit / "answers.json").read_text())
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / commit / "stored", data)
    cluster = Cluster(data, monkeypatch)

    async def run() -> None:
        front = cluster.front()
        await front.start()
        try:
            await all_restored(front, answers)
        finally:
            await front.stop()
            await cluster.kill()
    asyncio.run(run())


async def all_restored(eng: Front, answers: dict[str, Any]) -> None:
    assert await eng.refused() == {}
    listed = sorted(info.id for info in await eng.list_sessions())
    assert listed == sorted(answers["sessions"])
    for sid in answers["deleted"]:
        with pytest.raises(NotFound):
            await eng.describe(sid)
    for sid, answer in answers["sessions"].items():
        await restored(eng, sid, answer)


async def restored(eng: Front, sid: str, answer: dict[str, Any]) -> None:
    params = await eng.pull(sid, None)
    told = answer["params"]
    assert (params.version, params.step) == (told["version"], told["step"]), sid
    assert_trees_equal(dict(params.params), tree_from_json(told["params"], "params"),
                       f"{sid} params")
    export = await eng.export_state(sid)
    state = export.state_dict
    old = tree_from_json(answer["state_dict"], "state_dict")
    assert_trees_equal(state["state"], old["state"], f"{sid} state")
    for i, (group, was) in enumerate(zip(state["param_groups"], old["param_groups"],
                                         strict=True)):
        for key, value in was.items():  # (options a later commit added: not in the old one)
            assert_trees_equal(group[key], value, f"{sid} param_groups[{i}].{key}")
    if "scheduler" in old:
        for key, value in old["scheduler"].items():
            assert_trees_equal(state["scheduler"][key], value, f"{sid} scheduler.{key}")

    # the next step, as torch takes it from the restored state on this machine
    names = [n for g in state["param_groups"] for n in g["param_names"]]
    local = {n: params.params[n].clone() for n in names}
    opt = OPTIMIZERS[sid]([{"params": [local[n] for n in g["param_names"]]}
                           for g in state["param_groups"]])
    opt.load_state_dict({"state": state["state"], "param_groups": state["param_groups"]})
    sched = None
    if state.get("scheduler") is not None:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        sched.load_state_dict(state["scheduler"])
    g = torch.Generator().manual_seed(5)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in local.items()}
    for n, p in local.items():
        p.grad = grads[n].clone()
    opt.step()
    if sched is not None:
        sched.step()
    out = await eng.step(sid, grads, return_params=True)
    assert out.version == told["version"] + 1, sid
    assert out.params is not None
    assert_trees_equal(dict(out.params), local, f"{sid} the next step")
