"""Small data directories written by older commits (``tests/fixtures/upgrade/<case>/``:
``stored/`` as that commit's server left it, ``inputs.json`` the acknowledged requests that
made it), restored by this one. Expected values come from in-process torch at test time,
from those inputs: nothing computed elsewhere is the truth."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from app.engine import Front, embedded_engine
from tests.torch_reference import assert_trees_equal

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upgrade"


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_a_sharded_session_with_a_shard_snapshotted_before_revisions_is_restored_whole(
        tmp_path: Path) -> None:
    """c938206 (before revisions were counted) snapshotted one shard of a sharded SGD session
    (create, step and a push of one parameter's gradient: three logged updates) and left the
    other with its log only. Its snapshot holds no revision, while the other shard's log replay
    counts the step: the shards' revisions differed ([0, 1]), the session was missing from the
    listing and every read of it a 503 shards_out_of_step, until it went out of service."""
    case = FIXTURES / "c938206-sharded-push"
    inputs: dict[str, Any] = json.loads((case / "inputs.json").read_text())
    data = tmp_path / "data"
    shutil.copytree(case / "stored", data)

    made = inputs["create"]
    local = {n: _tensor(v) for n, v in made["params"].items()}
    opt = torch.optim.SGD([local["u"], local["v"]], **made["options"])
    for n, p in local.items():
        p.grad = _tensor(inputs["step"][n])
    opt.step()
    acknowledged = {n: p.detach().clone() for n, p in local.items()}
    pushed = {n: _tensor(v) for n, v in inputs["push"].items()}
    nxt = {"u": _tensor([0.5, -1.0, 2.0]), "v": _tensor([-3.0, 0.25])}
    for n, p in local.items():
        p.grad = nxt[n] + pushed[n] if n in pushed else nxt[n].clone()
    opt.step()

    async def run() -> None:
        eng: Front = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        try:
            assert await eng.refused() == {}
            assert [info.id for info in await eng.list_sessions()] == ["sh"]
            params = await eng.pull("sh", None)
            assert (params.version, params.step) == (1, 1)
            assert_trees_equal(dict(params.params), acknowledged, "restored")
            out = await eng.step("sh", nxt, return_params=True)
            assert out.version == 2 and out.params is not None
            assert_trees_equal(dict(out.params), dict(local), "the next step")
        finally:
            await eng.stop()
    asyncio.run(run())

    async def again() -> None:  # (and so after the next restart, from what it wrote)
        eng: Front = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        try:
            assert await eng.refused() == {}
            params = await eng.pull("sh", None)
            assert params.version == 2
            assert_trees_equal(dict(params.params), dict(local), "after a second restart")
        finally:
            await eng.stop()
    asyncio.run(again())
