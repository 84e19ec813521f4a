"""Data directories written by older optserve commits, restored by this one.

Each ``tests/fixtures/old_data_dirs/<commit>/`` holds what that commit's server left after a
``kill -9`` (``stored/``: its snapshots, logs and directory entries in that commit's formats,
the first of them the store's first formats, ``OPTSNAP1``/``OPTR``) and what it had answered
before (``answers.json``: each session's parameters and state dict as JSON), written by
``make_fixture.py`` there. Restored here, every session is back as acknowledged (the version,
step, options and scheduler the older server answered), a deleted one stays deleted, nothing is
refused, and each session steps on as an in-process ``torch.optim`` loaded with the restored
state steps on this machine.

The values are compared with an in-process ``torch.optim`` run of the same requests on this
machine (``make_fixture.scenario``'s, recorded without a server): the crash left the steps in
the logs, and a restore replays them with this machine's kernels. On the machine that wrote a
fixture that run is the older server's answers (``answers.json``), bit for bit; on a CPU whose
torch kernels round otherwise (``ATEN_CPU_CAPABILITY=default`` here already does, in the last
bit of an Adam ``exp_avg``) the replayed steps take that CPU's arithmetic, as torch itself
would there."""

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
from tests.fixtures.old_data_dirs import make_fixture
from tests.torch_reference import assert_trees_equal

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "old_data_dirs"


def fixtures(engine: str) -> list[str]:
    return sorted(p.name for p in FIXTURES.iterdir() if (p / "answers.json").is_file() and
                  json.loads((p / "answers.json").read_text()).get("engine", "embedded")
                  == engine)


COMMITS, RAY_COMMITS = fixtures("embedded"), fixtures("ray")
#: each scenario session's optimizer (and scheduler), as make_fixture.py made it
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "sharded": torch.optim.Adam,
              "keyed": torch.optim.RMSprop, "deleted": torch.optim.SGD}


class _Answered:
    status_code = 200

    def raise_for_status(self) -> None:
        return None


class _Recorder:
    """Stands in for ``make_fixture.scenario``'s HTTP client: records its requests."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    def post(self, path: str, json: dict[str, Any], **_: Any) -> _Answered:  # noqa: A002
        self.requests.append(("POST", path, json))
        return _Answered()

    def delete(self, path: str, **_: Any) -> _Answered:
        self.requests.append(("DELETE", path, {}))
        return _Answered()


def _tensor(t: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(t["data"], dtype=torch.float32).reshape(t["shape"])


class Local:
    """One scenario session run in process: its parameters (in the create's order), its
    ``torch.optim`` optimizer and its scheduler, stepped as the server steps a session
    (``optimizer.step()``, then the scheduler's ``step()``)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.params = {n: _tensor(t) for n, t in body["params"].items()}
        self.opt = OPTIMIZERS[body["id"]](list(self.params.values()),
                                          **body.get("options", {}))
        spec = body.get("scheduler")
        self.sched = (getattr(torch.optim.lr_scheduler, spec["name"])(self.opt,
                                                                     **spec["options"])
                      if spec is not None else None)

    def step(self, grads: dict[str, Any]) -> None:
        for n, p in self.params.items():
            p.grad = _tensor(grads[n]) if n in grads else None
        self.opt.step()
        if self.sched is not None:
            self.sched.step()


def in_process() -> dict[str, Local]:
    """``make_fixture.scenario``'s sessions, run by in-process torch on this machine."""
    recorder = _Recorder()
    make_fixture.scenario(recorder)  # type: ignore[arg-type]
    out: dict[str, Local] = {}
    for method, path, body in recorder.requests:
        parts = path.strip("/").split("/")  # v1/sessions[/<id>[/step]]
        if method == "POST" and len(parts) == 2:
            out[body["id"]] = Local(body)
        elif method == "POST" and parts[-1] == "step":
            out[parts[2]].step(body["grads"])
        elif method == "DELETE":
            out.pop(parts[2])
    return out


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
    runs = in_process()
    for sid, answer in answers["sessions"].items():
        await restored(eng, sid, answer, runs[sid])


async def restored(eng: Front, sid: str, answer: dict[str, Any], run: Local) -> None:
    params = await eng.pull(sid, None)
    told = answer["params"]
    assert (params.version, params.step) == (told["version"], told["step"]), sid
    assert_trees_equal(dict(params.params), run.params, f"{sid} params")
    export = await eng.export_state(sid)
    state = export.state_dict
    old = tree_from_json(answer["state_dict"], "state_dict")
    assert sorted(map(str, state["state"])) == sorted(map(str, old["state"])), sid
    assert_trees_equal(state["state"], run.opt.state_dict()["state"], f"{sid} state")
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
