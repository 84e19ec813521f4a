"""Sharded sessions (``"shards": S``) on the embedded engine: every optimizer config of torch's
``optim_db`` that the service runs gives bitwise the parameters and state of the unsharded
session and of an in-process ``torch.optim`` run, for S = 2 and 3; every operation is all or
nothing over the shards (a refusal on one shard changes no shard; a shard that fails between
the two phases gets the operation later, exactly once).

The Ray engine runs the same coordinator over actor hosts (tests/integration/test_ray_cluster.py).
"""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine.host import EmbeddedHost, HostConfig
from app.engine.interface import IdemKey
from app.engine.ops import Operation, SchedulerStep, Step, UpdateParamGroup
from app.engine.router import Checked, InProcessHost
from app.engine.shards import ShardedSession, plan_layout, shard_key, split_state
from app.errors import Invalid, OptserveError, Unavailable
from tests.integration.test_conformance import CONFIGS
from tests.torch_reference import Reference, assert_tensors_equal, assert_trees_equal, to_wire

SHAPES = [{"weight": [4, 3], "bias": [4]}, {"emb": [6, 2], "scale": [3]}]
MUON_SHAPES = [{"weight": [4, 3], "proj": [3, 5]}, {"emb": [6, 2], "mat": [2, 2]}]
STEPS, MORE = 5, 3


def run(coro_fn: Callable[[Front], Awaitable[None]], *, snapshot: bool = True,
        **engine: Any) -> None:
    async def main() -> None:
        eng = embedded_engine("cpu", warm_up=False, **engine)
        await eng.start()
        try:
            await coro_fn(eng)
        finally:
            await eng.stop(snapshot=snapshot)
    asyncio.run(main())


def groups_of(cls: type[torch.optim.Optimizer], seed: int
              ) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = MUON_SHAPES if cls.__name__ == "Muon" else SHAPES
    return [({n: torch.randn(s, generator=gen) for n, s in g.items()}, {}) for g in shapes]


def spec_of(cls: type[torch.optim.Optimizer], groups: list[tuple[dict[str, torch.Tensor],
            dict[str, Any]]], kwargs: dict[str, Any], sid: str, shards: int) -> CreateSpec:
    return CreateSpec(cls.__name__, [GroupSpec({n: t.clone() for n, t in g.items()},
                                               to_wire(o)) for g, o in groups],
                      to_wire(kwargs), id=sid, shards=shards)


def grads_for(groups: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], gen: torch.Generator,
              k: int) -> dict[str, torch.Tensor]:
    out = {n: torch.randn(t.shape, generator=gen) for g, _ in groups for n, t in g.items()}
    if k == 2:  # a partial push: the last parameter has no gradient, torch skips it
        out.pop(list(out)[-1])
    return out


def without_names(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, "param_groups": [{k: v for k, v in g.items() if k != "param_names"}
                                   for g in sd["param_groups"]]}


@pytest.mark.parametrize(("cls", "oi"), CONFIGS)
def test_sharded_equals_unsharded_and_torch(cls: type[torch.optim.Optimizer], oi: Any) -> None:
    seed = sum(map(ord, f"{cls.__name__}{oi.desc}"))
    groups = groups_of(cls, seed)

    async def body(eng: Front) -> None:
        for s in (1, 2, 3):
            info = await eng.create(spec_of(cls, groups, oi.kwargs, f"s{s}", s))
            if s > 1:
                assert len(info.placement["shards"]) == s  # type: ignore[index]
        ref = Reference(cls, groups, oi.kwargs)
        gen = torch.Generator().manual_seed(seed + 1)
        for k in range(STEPS):
            grads = grads_for(groups, gen, k)
            outs = [await eng.step(f"s{s}", grads, return_params=True) for s in (1, 2, 3)]
            ref.step(grads)
            for s, out in zip((1, 2, 3), outs, strict=True):
                assert (out.version, out.step, out.lr) == (k + 1, k + 1, ref.lrs()), s
                assert out.params is not None
                assert_tensors_equal(dict(out.params), ref.params, f"S={s} step {k + 1}")
        exports = [(await eng.export_state(f"s{s}")).state_dict for s in (1, 2, 3)]
        for s, sd in zip((2, 3), exports[1:], strict=True):
            assert_trees_equal(sd, exports[0], f"export S={s}")
        assert_trees_equal(without_names(exports[0]), ref.optimizer.state_dict(), "export")
        # torch's own state_dict (no param_names) into fresh sharded sessions, then onwards
        local_sd = copy.deepcopy(ref.optimizer.state_dict())
        current = {n: p.detach().clone() for n, p in ref.params.items()}
        now = [({n: current[n] for n in g}, o) for g, o in groups]
        for s in (2, 3):
            await eng.create(spec_of(cls, now, oi.kwargs, f"i{s}", s))
            info = await eng.import_state(f"i{s}", copy.deepcopy(local_sd))
            assert info.version == 1
        for k in range(STEPS, STEPS + MORE):
            grads = grads_for(groups, gen, k)
            ref.step(grads)
            for sid in ("s2", "s3", "i2", "i3"):
                out = await eng.step(sid, grads, return_params=True)
                assert out.params is not None
                assert_tensors_equal(dict(out.params), ref.params, f"{sid} step {k + 1}")
        names = [list(ref.params)[-1], list(ref.params)[1]]
        pulled = await eng.pull("s3", names)
        assert list(pulled.params) == names
        assert_tensors_equal(dict(pulled.params), {n: ref.params[n] for n in names}, "pull")
    run(body)


def test_layout_is_balanced_by_size_and_deterministic() -> None:
    groups = [GroupSpec({"a": torch.zeros(100), "b": torch.zeros(10)}, {}),
              GroupSpec({"c": torch.zeros(60), "d": torch.zeros(50), "e": torch.zeros(1)}, {})]
    layout = plan_layout(groups, 2)
    assert layout.owner == {"a": 0, "c": 1, "d": 1, "b": 0, "e": 0}
    assert layout.groups == [["a", "b"], ["c", "d", "e"]]
    assert plan_layout(groups, 2) == layout
    with pytest.raises(Invalid, match="every shard needs at least one parameter"):
        plan_layout(groups, 6)


def test_state_split_maps_ids_by_position() -> None:
    groups = [GroupSpec({"a": torch.zeros(3), "b": torch.zeros(2)}, {}),
              GroupSpec({"c": torch.zeros(4)}, {})]
    layout = plan_layout(groups, 2)  # c (4) -> 0, a (3) -> 1, b (2) -> 1
    sd = {"state": {"0": {"x": 0}, "2": {"x": 2}, 1: {"x": 1}},
          "param_groups": [{"lr": 1, "params": [0, 1]}, {"lr": 2, "params": [2]}]}
    parts = split_state(sd, layout)
    assert parts[0] == ({"state": {0: {"x": 2}}, "param_groups": [
        {"lr": 1, "params": [], "param_names": []},
        {"lr": 2, "params": [0], "param_names": ["c"]}]}, [1])
    # each part in the state's order, with each entry's place in it (what orders the export)
    assert list(parts[1][0]["state"].items()) == [(0, {"x": 0}), (1, {"x": 1})]
    assert parts[1][1] == [0, 2]
    with pytest.raises(Invalid, match="group 0 has 1 parameters in the state but 2"):
        split_state({"state": {}, "param_groups": [{"params": [0]}, {"params": [1]}]}, layout)


# ----------------------------------------------------------------------------- all or nothing
async def shard_states(eng: Front, sid: str) -> list[Any]:
    """Every shard session's description and parameters, straight from the host."""
    router: Any = eng.router
    host: EmbeddedHost = router.local.embedded
    keys = sorted(k for k in host.keys() if k.startswith(f"default#{sid}~"))
    out = []
    for k in keys:
        info = await host.describe(k)
        params = await host.pull(k, None)
        out.append((info.version, info.step, info.lr, info.accumulated,
                    info.param_groups, {n: t.clone() for n, t in params.params.items()}))
    return out


def same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[:5] == y[:5]
        assert_tensors_equal(x[5], y[5], "shard parameters")


def test_refusal_on_one_shard_changes_no_shard() -> None:
    """lr 1e39 fits the empty group of one shard (checked as float64) but overflows the float32
    parameters of another: the whole change is refused and no shard changes; the same for a
    step whose non-finite gradient lives on one shard, and a step with an unknown name."""
    groups = [({"w": torch.ones(8), "v": torch.ones(7)}, {}), ({"u": torch.ones(2)}, {})]

    async def body(eng: Front) -> None:
        await eng.create(CreateSpec("SGD", [GroupSpec(g, o) for g, o in groups], {"lr": 0.1},
                                    id="x", shards=3))
        await eng.step("x", {"w": torch.ones(8), "u": torch.ones(2)}, return_params=False)
        await eng.push("x", {"v": torch.ones(7)})
        before = await shard_states(eng, "x")
        assert [len(s[4][1]["params"]) for s in before] == [0, 0, 1]  # empty groups
        cases: list[tuple[Callable[[], Awaitable[Any]], str]] = [
            (lambda: eng.update_param_group("x", 1, {"lr": 1e39}), "overflow"),
            (lambda: eng.step("x", {"w": torch.full((8,), math.nan), "u": torch.ones(2)},
                              return_params=False), "nonfinite_gradient"),
            (lambda: eng.step("x", {"u": torch.ones(2), "nope": torch.ones(1)},
                              return_params=False), "unknown_parameter"),
            (lambda: eng.step("x", {"u": torch.ones(3)}, return_params=False),
             "shape_mismatch"),
        ]
        for call, code in cases:
            with pytest.raises(Invalid) as caught:
                await call()
            assert code in caught.value.code or code in caught.value.detail, caught.value
            same(await shard_states(eng, "x"), before)
        info = await eng.describe("x")
        assert info.version == 1 and info.accumulated == ["v"]
    run(body)


def test_nonfinite_on_one_shard_skips_the_step_on_every_shard() -> None:
    groups = [({"w": torch.ones(8), "v": torch.ones(7), "u": torch.ones(2)}, {})]

    async def body(eng: Front) -> None:
        await eng.create(CreateSpec("Adam", [GroupSpec(g, o) for g, o in groups], {"lr": 0.1},
                                    id="x", shards=3, nonfinite="skip",
                                    scheduler={"name": "StepLR",
                                               "options": {"step_size": 1, "gamma": 0.5}}))
        await eng.push("x", {"w": torch.ones(8)})
        before = await shard_states(eng, "x")
        out = await eng.step("x", {"v": torch.full((7,), math.inf), "u": torch.ones(2)},
                             return_params=True, options={0: {"lr": 0.05}})
        assert out.skipped and out.nonfinite == ["v"] and out.version == 0
        after = await shard_states(eng, "x")
        for b, a in zip(before, after, strict=True):
            assert (a[0], a[1], a[3]) == (b[0], b[1], [])  # same version; accumulator cleared
            assert a[2] == [0.05]  # the step's option change was made everywhere
            assert_tensors_equal(a[5], b[5], "parameters")
        assert out.params is not None and set(out.params) == {"w", "v", "u"}
    run(body)


class Flaky(InProcessHost):
    """A shard's host that fails as a test says: refuses prepares, loses commits."""

    def __init__(self, host: EmbeddedHost, name: str) -> None:
        super().__init__(host, name)
        self.refuse_prepare = False
        self.drop_commits = 0
        self.commits = 0

    async def prepare(self, key: str, op: Operation, idem: IdemKey) -> Checked:
        if self.refuse_prepare:
            raise Invalid("this shard refuses", code="test_refusal")
        return await super().prepare(key, op, idem)

    async def commit(self, key: str, idem: IdemKey, op: Operation | None = None, *,
                     want_params: bool = False) -> Any:
        self.commits += 1
        if self.drop_commits:
            self.drop_commits -= 1
            self._prepared.clear()  # as if the host restarted: what it kept is gone
            raise Unavailable("the shard's host is restarting", code="host_restarting")
        return await super().commit(key, idem, op, want_params=want_params)


def two_flaky_shards(host: EmbeddedHost
                     ) -> tuple[list[Flaky], list[GroupSpec], Any, list[tuple[Any, str]]]:
    """Two shards of session ``t~s`` (parameters ``a``: 4 and ``b``: 3 floats) on flaky hosts
    over one embedded host: (hosts, groups, layout, (host, shard key) pairs)."""
    shards = [Flaky(host, f"h{i}") for i in range(2)]
    groups = [GroupSpec({"a": torch.ones(4), "b": torch.ones(3)}, {})]
    pairs: list[tuple[Any, str]] = [(h, shard_key("t~s", i, 2)) for i, h in enumerate(shards)]
    return shards, groups, plan_layout(groups, 2), pairs


async def sharded_step(session: ShardedSession, g: float, key: str) -> Any:
    """A step of ``t~s`` with every gradient value ``g``, under idempotency key ``key``."""
    return await session.step("t~s", {"a": torch.full((4,), g), "b": torch.full((3,), g)},
                              want_params=True, idem=IdemKey(key, "fp"))


def test_prepare_refused_anywhere_applies_nowhere_and_lost_commits_roll_forward(
        tmp_path: Path) -> None:
    async def body() -> None:
        host = EmbeddedHost(HostConfig("cpu", data_dir=tmp_path, durability="step",
                                       warm_up=False))
        await host.start()
        try:
            shards, groups, layout, pairs = two_flaky_shards(host)
            spec = CreateSpec("SGD", groups, {"lr": 0.5, "momentum": 0.9},
                              scheduler={"name": "StepLR",
                                         "options": {"step_size": 2, "gamma": 0.5}})
            session, _ = await ShardedSession.create("t~s", spec, layout, pairs,
                                                     commit_timeout_s=0.3)
            ref = torch.optim.SGD([p := torch.nn.Parameter(torch.ones(4)),
                                   q := torch.nn.Parameter(torch.ones(3))], lr=0.5, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(ref, 2, 0.5)

            def ref_step(g: float) -> None:
                p.grad, q.grad = torch.full((4,), g), torch.full((3,), g)
                ref.step()
                sched.step()

            async def step(g: float, key: str) -> Any:
                return await sharded_step(session, g, key)

            await step(1.0, "k1")
            ref_step(1.0)
            # a prepare refused on shard 1: nothing anywhere (the scheduler did not step)
            shards[1].refuse_prepare = True
            for op in (SchedulerStep(), UpdateParamGroup(0, {"lr": 0.1}), Step({})):
                with pytest.raises(Invalid, match="this shard refuses"):
                    await session.execute("t~s", op, idem=IdemKey("r", "fp"))
            shards[1].refuse_prepare = False
            info = await session.describe("t~s")
            assert (info.version, info.lr, info.scheduler["last_epoch"]) == (  # type: ignore[index]
                1, [0.5], 1)
            # shard 0's commit is lost twice: rolled forward within the timeout
            shards[0].drop_commits = 2
            out = await step(2.0, "k2")
            ref_step(2.0)
            assert out.version == 2 and shards[0].commits >= 3
            assert_tensors_equal(dict(out.params), {"a": p.detach(), "b": q.detach()}, "k2")
            # lost past the timeout: 503, the step stays committed; the retry with the same
            # key gets its answer, and it was applied exactly once
            shards[1].drop_commits = 1000
            with pytest.raises(Unavailable) as caught:
                await step(3.0, "k3")
            assert caught.value.code == "host_restarting"
            shards[1].drop_commits = 0
            ref_step(3.0)
            again = await step(3.0, "k3")
            assert again.version == 3  # completed before the retry's own phases: replayed
            assert_tensors_equal(dict(again.params), {"a": p.detach(), "b": q.detach()}, "k3")
            once_more = await step(3.0, "k3")
            assert once_more.replayed and once_more.version == 3
            # every shard's log replays to the same state after a restart
            await host.stop()
            host2 = EmbeddedHost(HostConfig("cpu", data_dir=tmp_path, durability="step",
                                            warm_up=False))
            await host2.start()
            try:
                again2 = ShardedSession("t~s", layout,
                                        [(InProcessHost(host2), k) for _, k in pairs])
                pulled = await again2.pull("t~s", None)
                assert pulled.version == 3
                assert_tensors_equal(dict(pulled.params), {"a": p.detach(), "b": q.detach()},
                                     "after restart")
            finally:
                await host2.stop()
        finally:
            if host._worker.alive():
                await host.stop()
    asyncio.run(body())


def test_a_coordinator_that_died_mid_commit_waits_for_the_retry(tmp_path: Path) -> None:
    """A step reached one shard only and its coordinator died (its pending commit is gone).
    Another client's step arriving first is refused with a retryable 503 (not taken out of
    service); the first client's retry, same key, completes its step on the other shard; the
    other step then goes through; every result is torch's. A disagreement nobody heals
    outlasts the grace and takes the session out of service."""
    async def body() -> None:
        host = EmbeddedHost(HostConfig("cpu", data_dir=tmp_path, durability="step",
                                       warm_up=False))
        await host.start()
        try:
            shards, groups, layout, pairs = two_flaky_shards(host)
            spec = CreateSpec("Adam", groups, {"lr": 0.1})
            first, _ = await ShardedSession.create("t~s", spec, layout, pairs,
                                                   commit_timeout_s=0.2)
            ref = torch.optim.Adam([p := torch.nn.Parameter(torch.ones(4)),
                                    q := torch.nn.Parameter(torch.ones(3))], lr=0.1)

            def ref_step(g: float) -> None:
                p.grad, q.grad = torch.full((4,), g), torch.full((3,), g)
                ref.step()

            step = sharded_step
            shards[0].drop_commits = 1000  # shard 0 never takes X's commit
            with pytest.raises(Unavailable) as caught:
                await step(first, 1.0, "x")
            assert caught.value.code == "host_restarting"
            shards[0].drop_commits = 0
            # the coordinator dies: a new one knows nothing of X
            again = ShardedSession("t~s", layout, pairs, commit_timeout_s=0.2)
            with pytest.raises(Unavailable) as caught:
                await step(again, 2.0, "y")  # another client's step comes first
            assert caught.value.code == "shards_out_of_step" and caught.value.retry_after
            out = await step(again, 1.0, "x")  # X's retry completes it on shard 0
            ref_step(1.0)
            assert out.version == 1
            assert_tensors_equal(dict(out.params), {"a": p.detach(), "b": q.detach()}, "x")
            out = await step(again, 2.0, "y")
            ref_step(2.0)
            assert out.version == 2
            assert_tensors_equal(dict(out.params), {"a": p.detach(), "b": q.detach()}, "y")
            # the same again, but X's client never retries: out of service after the grace
            shards[0].drop_commits = 1000
            with pytest.raises(Unavailable):
                await step(again, 3.0, "z")
            shards[0].drop_commits = 0
            third = ShardedSession("t~s", layout, pairs, commit_timeout_s=0.05)
            with pytest.raises(Unavailable) as caught:
                await third.describe("t~s")
            assert caught.value.code == "shards_out_of_step"
            await asyncio.sleep(0.15)
            with pytest.raises(Unavailable) as caught:
                await step(third, 4.0, "w")
            assert caught.value.code == "session_damaged"
        finally:
            await host.stop()
    asyncio.run(body())


def test_an_import_refused_by_a_shard_names_the_sessions_parameter_id() -> None:
    """A shard numbers its own parameters from 0: its refusal of an imported state named its
    own id (``state_dict.state.1.exp_avg`` for the session's parameter 3, ``s``); it
    names the client's id, as the unsharded session's refusal does."""
    groups = [{"w": torch.ones(6, 5), "b": torch.ones(6)}, {"e": torch.ones(9, 3),
                                                            "s": torch.ones(4)}]

    async def body(eng: Front) -> None:
        refusals = []
        for sid, shards in (("one", 1), ("two", 2)):
            await eng.create(CreateSpec("Adam", [GroupSpec(dict(g), {}) for g in groups],
                                        {"lr": 0.1}, id=sid, shards=shards))
            await eng.step(sid, {n: torch.ones_like(t) for g in groups for n, t in g.items()},
                           return_params=False)
        layout = (await eng.describe("two")).placement["shards"]
        assert [sh["params"] for sh in layout] == [["w", "s"], ["b", "e"]]
        sd = (await eng.export_state("one")).state_dict
        for sid in ("one", "two"):
            for broken in (lambda d: d["state"][3].update(exp_avg=torch.zeros(5)),
                           lambda d: d["state"][2].update(bogus=torch.zeros(1)),
                           lambda d: d["state"][3].update(step=torch.tensor(0.5))):
                bad = copy.deepcopy(sd)
                broken(bad)
                with pytest.raises(Invalid) as caught:
                    await eng.import_state(sid, bad)
                refusals.append((sid, caught.value.field, caught.value.detail))
        one = [(f, d) for sid, f, d in refusals if sid == "one"]
        two = [(f, d) for sid, f, d in refusals if sid == "two"]
        assert [f for f, _ in one] == ["state_dict.state.3.exp_avg", "state_dict.state.2",
                                       "state_dict.state.3.step"]
        assert two == one
    run(body)


def test_a_retried_overwrite_of_some_shards_is_answered() -> None:
    """``PUT .../params`` naming parameters of some shards only bumps the others' versions; a
    retry with the same Idempotency-Key (the SDK sends one with every call and retries 503s)
    was a 500 (the bumped shards answered the session's description): it is answered as the
    first time, and applies nothing again."""
    async def body(eng: Front) -> None:
        await eng.create(CreateSpec("SGD", [GroupSpec({"w": torch.ones(8), "v": torch.ones(7),
                                                       "u": torch.ones(2)}, {})], {"lr": 0.1},
                                    id="x", shards=3))
        key = IdemKey("put-1", "fp")
        first = await eng.overwrite("x", {"v": torch.full((7,), 2.0)}, idem=key)
        again = await eng.overwrite("x", {"v": torch.full((7,), 2.0)}, idem=key)
        assert again.replayed and (again.version, again.step) == (first.version, first.step)
        assert list(again.params) == ["v"] and torch.equal(again.params["v"], first.params["v"])
        info = await eng.describe("x")
        assert info.version == first.version == 1
    run(body)


def test_lbfgs_is_not_sharded() -> None:
    """A sharded LBFGS session was made, and every step of it was a 422 (it steps only through
    evaluations, which a sharded session does not offer): the create is the 422."""
    async def body(eng: Front) -> None:
        with pytest.raises(Invalid) as caught:
            await eng.create(CreateSpec("LBFGS", [GroupSpec({"a": torch.ones(2),
                                                             "b": torch.ones(2)}, {})],
                                        {"lr": 0.1}, id="l", shards=2))
        assert (caught.value.code, caught.value.field) == ("not_supported", "shards")
        assert await eng.list_sessions() == []
    run(body)


def test_sharded_create_is_all_or_nothing_and_sync_is_refused() -> None:
    async def body(eng: Front) -> None:
        bad = CreateSpec("SGD", [GroupSpec({"a": torch.ones(2)}, {}),
                                 GroupSpec({"b": torch.ones(2, dtype=torch.int32)}, {})],
                         {"lr": 0.1}, id="bad", shards=2)
        with pytest.raises(OptserveError):
            await eng.create(bad)
        router: Any = eng.router
        assert router.local.embedded.keys() == []
        with pytest.raises(Invalid, match="synchronous rounds"):
            await eng.create(CreateSpec("SGD", [GroupSpec({"a": torch.ones(2),
                                                           "b": torch.ones(2)}, {})],
                                        {"lr": 0.1}, id="s", shards=2,
                                        ps_options={"sync": {"workers": 2}}))
        assert await eng.list_sessions() == []
    run(body)


def test_shards_with_empty_groups_restore_from_snapshots(tmp_path: Path) -> None:
    """A shard whose part of a group is empty snapshots and restores like any session (the
    snapshot after every step, then a restart: the session goes on bitwise)."""
    groups = [({"w": torch.randn(8), "v": torch.randn(7)}, {}), ({"u": torch.randn(2)},
                                                                {"lr": 0.05})]
    ref = Reference(torch.optim.Adam, groups, {"lr": 0.1})
    gen = torch.Generator().manual_seed(3)
    grads = [{n: torch.randn(t.shape, generator=gen) for g, _ in groups for n, t in g.items()}
             for _ in range(4)]

    async def first(eng: Front) -> None:
        await eng.create(CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in g.items()}, o)
                                             for g, o in groups], {"lr": 0.1}, id="e",
                                    shards=3, durability="step"))
        for g in grads[:2]:
            await eng.step("e", g, return_params=False)

    async def second(eng: Front) -> None:
        out = None
        for g in grads[2:]:
            out = await eng.step("e", g, return_params=True)
        assert out is not None and out.version == 4 and out.params is not None
        assert_tensors_equal(dict(out.params), ref.params, "after the restart")
        assert (await eng.describe("e")).placement["shards"][0]["params"] == ["w"]  # type: ignore[index]

    for g in grads:
        ref.step(g)
    run(first, data_dir=tmp_path, durability="step", snapshot_every_steps=1)
    assert list(tmp_path.glob("sessions/default#e~shard*of3/snapshot.bin"))
    run(second, data_dir=tmp_path, durability="step", snapshot_every_steps=1)


@pytest.mark.parametrize("policy", ["allow", "skip"])
def test_a_sharded_steps_metrics_are_the_whole_sessions(policy: str) -> None:
    """A sharded step answers the session's metrics, not its first shard's: per group the
    norms over every shard's parameters (equal to the unsharded session's within float
    rounding), their ratio, the lr, and the non-finite values of every shard (a step the
    session skips answers none: its shards only skip)."""
    groups = groups_of(torch.optim.Adam, 7)

    async def body(eng: Front) -> None:
        for s in (1, 2, 3):
            await eng.create(CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in g.items()})
                                                 for g, _ in groups],
                                        {"lr": 0.01}, id=f"s{s}", shards=s, nonfinite=policy))
        gen = torch.Generator().manual_seed(8)
        for k in range(4):
            grads = grads_for(groups, gen, k)
            if k == 3:  # non-finite values in two parameters (on different shards for S > 1)
                grads["weight"][0, 0] = math.inf
                grads["emb"][1] = math.nan
            outs = [await eng.step(f"s{s}", grads, return_params=False) for s in (1, 2, 3)]
            whole = outs[0].metrics
            assert whole is not None
            assert whole["nonfinite"] == (3 if k == 3 else 0)
            if policy == "skip" and k == 3:  # a sharded session's skipped step: no metrics
                assert all(o.skipped and o.metrics is None for o in outs[1:])
                continue
            for s, out in zip((2, 3), outs[1:], strict=True):
                m = out.metrics
                assert m is not None and m["n"] == whole["n"], s
                assert m["nonfinite"] == whole["nonfinite"], (s, k)
                for gi, want in enumerate(whole["groups"]):
                    got = m["groups"][gi]
                    assert set(got) == set(want) and got["lr"] == want["lr"], (s, k, gi)
                    for key in ("grad_norm", "update_norm", "param_norm", "update_ratio"):
                        if key not in want:  # (a skipped step has none)
                            continue
                        if isinstance(want[key], dict):  # {"$float": ...}
                            assert got[key] == want[key], (s, k, gi, key)
                        else:
                            assert math.isclose(got[key], want[key], rel_tol=1e-6), \
                                (s, k, gi, key, got[key], want[key])
    run(body)


def test_a_keyed_delete_deletes_every_shard_and_its_retry_is_answered_after_a_restart(
        tmp_path: Path) -> None:
    """A sharded session deleted with an ``Idempotency-Key``: every shard goes, its files
    too. The shards share their tenant (``<tenant>#<id>``) and the delete's key, and the first
    shard's tombstone answered the others' deletes: they stayed on disk and in memory, came
    back at every start, and the id could never be made again (409 ``session_exists``).
    The delete's retry is answered live and after a restart (it was a 404: only the front
    kept the session's key, in memory), another request under its key is a 422; the id is made
    again and steps as torch does."""
    groups = [({"w": torch.randn(4, 3), "b": torch.randn(3)}, {})]
    gen = torch.Generator().manual_seed(5)
    g = {"w": torch.randn(4, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    key = IdemKey("del-d", "DELETE d")

    def make() -> CreateSpec:
        return CreateSpec("SGD", [GroupSpec({n: t.clone() for n, t in p.items()}, o)
                                  for p, o in groups], {"lr": 0.1}, id="d", shards=2,
                          durability="step")

    async def first(eng: Front) -> None:
        await eng.create(make())
        await eng.step("d", g, return_params=False)
        assert not await eng.delete("d", idem=key)
        assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == []
        assert await eng.delete("d", idem=key)  # (answered)

    async def second(eng: Front) -> None:
        assert await eng.delete("d", idem=key)
        with pytest.raises(Invalid) as reused:
            await eng.delete("other", idem=IdemKey("del-d", "DELETE other"))
        assert reused.value.code == "idempotency_key_reused"
        await eng.create(make())  # the id is free again
        await eng.step("d", g, return_params=False)
        assert [s.id for s in await eng.list_sessions()] == ["d"]
        ref = Reference(torch.optim.SGD, groups, {"lr": 0.1})
        ref.step(g)
        got = await eng.pull("d", None)
        assert got.version == 3  # (deleted at 1: made again at 2, app.engine.last_versions)
        assert_tensors_equal(dict(got.params), ref.params, "the session made again")

    run(first, data_dir=tmp_path, durability="step")
    run(second, data_dir=tmp_path, durability="step")


def test_an_adagrad_import_leaving_a_shard_only_empty_entries_loads_as_unsharded() -> None:
    """torch 2.13's Adagrad loads a state whose entries for some parameters are empty (``{}``)
    as long as its first entry is full, and makes those parameters' state afresh at their next
    step. A shard holding only such parameters got only empty entries, so its part began with
    one and was refused (422, where the unsharded session took it); it loads now, both
    sessions export the empty entries as torch does after the load (the shard left them out),
    and both step bitwise as an in-process Adagrad that loaded the same state. An empty first
    entry is still refused by both (torch raises KeyError 'step' half-loaded)."""
    groups = [({"w": torch.randn(4, 3), "b": torch.randn(4), "u": torch.randn(3)}, {})]
    gen = torch.Generator().manual_seed(11)
    grads = [{n: torch.randn(t.shape, generator=gen) for n, t in groups[0][0].items()}
             for _ in range(3)]
    ref = Reference(torch.optim.Adagrad, groups, {"lr": 0.1})
    ref.step(grads[0])
    full = ref.optimizer.state_dict()
    partial = {"state": {0: full["state"][0], 1: {}, 2: {}},
               "param_groups": full["param_groups"]}
    loaded = Reference(torch.optim.Adagrad, groups, {"lr": 0.1})
    loaded.optimizer.load_state_dict(copy.deepcopy(partial))
    just_loaded = copy.deepcopy(loaded.optimizer.state_dict())
    for g in grads[1:]:
        loaded.step(g)

    async def body(eng: Front) -> None:
        for sid, shards in (("one", 1), ("two", 2)):
            await eng.create(CreateSpec("Adagrad", [GroupSpec({n: t.clone() for n, t in
                                                               groups[0][0].items()}, {})],
                                        {"lr": 0.1}, id=sid, shards=shards))
        shard_params = [sh["params"] for sh in (await eng.describe("two")).placement["shards"]]
        assert shard_params == [["w"], ["b", "u"]]  # (shard 1 gets empty entries only)
        for sid in ("one", "two"):
            with pytest.raises(Invalid) as empty_first:
                await eng.import_state(sid, {**copy.deepcopy(partial),
                                             "state": {0: {}, 1: full["state"][0]}})
            assert (empty_first.value.code, empty_first.value.field) == \
                ("state_mismatch", "state_dict.state.0"), sid
            await eng.import_state(sid, copy.deepcopy(partial))
            # as torch's after its load: the empty entries listed (a shard of "two" holds
            # only those; it listed none of them until their next step)
            got = (await eng.export_state(sid)).state_dict
            assert list(map(int, got["state"])) == [0, 1, 2], sid
            assert_trees_equal(got["state"], just_loaded["state"], sid)
            out = None
            for g in grads[1:]:
                out = await eng.step(sid, g, return_params=True)
            assert out is not None and out.params is not None
            assert_tensors_equal(dict(out.params), loaded.params, sid)
            got = (await eng.export_state(sid)).state_dict
            assert_trees_equal(got["state"], loaded.optimizer.state_dict()["state"], sid)
    run(body)
