"""Gradients computed before an overwrite (``PUT .../params``) or a state import are refused by a
request naming their base version, whatever ``max_staleness`` says (409 ``stale_gradient`` with
``discarded_by``): async steps, sync pushes and sharded sessions, live, after a replay of the log
and after a snapshot. Pushes naming no base version are taken as before; records and snapshots
written before the check replay and load as they ran."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front, embedded_engine, persist
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.ops import Overwrite, Step
from app.engine.ops.shard import Bump
from app.engine.ray_host import op_from_wire, op_to_wire
from app.engine.session import Session
from app.errors import Conflict


def params0() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(6, generator=g), "b": torch.randn(3, generator=g)}


def grad(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) for n, t in params0().items()}


def spec(session_id: str, **ps_options: Any) -> CreateSpec:
    return CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in params0().items()})],
                      {"lr": 0.05}, id=session_id, ps_options=ps_options)


def refused(exc: BaseException, by: str, version: int, base: int, at: int) -> None:
    assert isinstance(exc, Conflict) and exc.code == "stale_gradient", exc
    assert exc.field == "base_version"
    assert (exc.extra["discarded_by"], exc.extra["current_version"], exc.extra["base_version"],
            exc.extra["replaced_version"]) == (by, version, base, at), exc.extra


def torch_run() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """In-process torch: a step on grad(1), the overwrite with ``ones``, a step on grad(2)
    (the push naming the overwrite's version), a step on grad(3) (naming none). The values
    after the overwrite's step, and at the end."""
    local = {n: t.clone() for n, t in params0().items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.05)

    def step(g: dict[str, torch.Tensor]) -> None:
        for n, p in local.items():
            p.grad = g[n].clone()
        opt.step()
    step(grad(1))
    with torch.no_grad():
        for p in local.values():
            p.fill_(1.0)
    step(grad(2))
    mid = {n: p.detach().clone() for n, p in local.items()}
    step(grad(3))
    return mid, {n: p.detach().clone() for n, p in local.items()}


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n


async def train(eng: Front, sid: str, worker: str | None) -> None:
    """step (base 0) -> overwrite (version 2) -> a push from version 1: refused, nothing
    changed -> a push from version 2 -> a push naming no version; then an import makes
    version 5 and a push from version 4 is refused."""
    mid, end = torch_run()
    await eng.step(sid, grad(1), return_params=False, base_version=0, worker=worker)
    ones = {n: torch.ones_like(t) for n, t in params0().items()}
    assert (await eng.overwrite(sid, ones)).version == 2
    with pytest.raises(Conflict) as err:
        await eng.step(sid, grad(9), return_params=False, base_version=1, worker=worker)
    refused(err.value, "overwrite", 2, 1, 2)
    got = await eng.pull(sid, None)
    assert got.version == 2
    same(got.params, ones)
    r = await eng.step(sid, grad(2), return_params=True, base_version=2, worker=worker)
    assert r.version == 3 and r.params is not None
    same(r.params, mid)
    r = await eng.step(sid, grad(3), return_params=True, worker=worker)  # names none: taken
    assert r.version == 4 and r.params is not None
    same(r.params, end)
    await eng.import_state(sid, (await eng.export_state(sid)).state_dict)
    with pytest.raises(Conflict) as err:
        await eng.step(sid, grad(9), return_params=False, base_version=4, worker=worker)
    refused(err.value, "import", 5, 4, 5)


async def still_refused(eng: Front, sid: str, worker: str | None) -> None:
    _, end = torch_run()
    for base, by, at in ((1, "import", 5), (4, "import", 5)):
        with pytest.raises(Conflict) as err:
            await eng.step(sid, grad(9), return_params=False, base_version=base, worker=worker)
        refused(err.value, by, 5, base, at)
    got = await eng.pull(sid, None)
    assert got.version == 5
    same(got.params, end)


@pytest.mark.parametrize("snapshot", [False, True], ids=["replayed", "from_snapshot"])
def test_a_push_from_before_an_overwrite_or_import_is_refused_whatever_max_staleness(
        tmp_path: Path, snapshot: bool) -> None:
    """No ``max_staleness``: an async step, a sync push (K=1) and a sharded session's step
    naming a base version from before the latest overwrite/import are 409s that change nothing;
    the same pushes from after it, and pushes naming no version, step as torch does. After a
    crash (the log replayed) or a graceful stop (the snapshot loaded) the refusal holds."""
    sessions: list[tuple[CreateSpec, str | None]] = [
        (spec("async"), None), (spec("sync", sync={"workers": 1}), "w1"),
        (CreateSpec("Adam", spec("sharded").groups, {"lr": 0.05}, id="sharded", shards=2),
         None)]

    async def live() -> None:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)
        await eng.start()
        for made, worker in sessions:
            await eng.create(made)
            assert made.id is not None
            await train(eng, made.id, worker)
        await eng.stop(snapshot=snapshot)

    async def again() -> None:
        eng = embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)
        await eng.start()
        try:
            for made, worker in sessions:
                assert made.id is not None
                await still_refused(eng, made.id, worker)
        finally:
            await eng.stop()
    asyncio.run(live())
    asyncio.run(again())


def test_records_and_snapshots_from_before_the_check_replay_as_they_ran() -> None:
    """A step record an older server logged (no ``refuse_replaced``) with a base version from
    before an overwrite replays; a request's step carries the flag in its tree (a log record,
    a Ray host's copy) and is refused; a snapshot without ``replaced`` loads (none known)."""
    s = Session.build("s", "SGD", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0}, None,
                      "reject", torch.device("cpu"))
    over = Overwrite({"x": torch.ones(2)})
    over.apply(s, over.check(s))
    assert s.replaced == (1, "overwrite")
    sent = op_from_wire(op_to_wire(Step({"x": torch.ones(2)}, 0, refuse_replaced=True)))
    assert isinstance(sent, Step) and sent.refuse_replaced
    with pytest.raises(Conflict) as err:
        sent.check(s)
    refused(err.value, "overwrite", 1, 0, 1)
    old = Step.from_tree({"grads": {"x": torch.ones(2)}, "base_version": 0})
    old.apply(s, old.check(s))
    assert s.version == 2 and s.params["x"].tolist() == [0.0, 0.0]

    tree = persist.decode_tree(b"".join(persist.encode_tree_parts(s.snapshot_tree(),
                                                                  persist.SNAPSHOT_KEY)),
                               persist.SNAPSHOT_KEY)
    assert tree["meta"]["replaced"] == [1, "overwrite"]
    assert Session.restore(tree, torch.device("cpu")).replaced == (1, "overwrite")
    del tree["meta"]["replaced"]  # written before the field existed
    assert Session.restore(tree, torch.device("cpu")).replaced is None

    # a shard none of whose parameters an overwrite names: its version rises, as an
    # overwrite's does, and so does what a base version must be at least
    Bump().apply(s, None)
    assert s.replaced == (3, "overwrite")
