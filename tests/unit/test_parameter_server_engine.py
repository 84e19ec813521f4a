"""Parameter-server mode in the engine, without HTTP: option parsing, the exact reduction, and
a crash (no snapshot on the way out) replayed from the log bitwise: sync rounds are logged as
single ``step`` records with the reduced gradients, staleness-scaled steps with their divisor,
option changes as ``configure`` records."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import Front, embedded_engine, persist, ps
from app.engine.idempotency import IdempotencyTable
from app.engine.interface import CreateSpec, GroupSpec, IdemKey
from app.engine.ops import Configure, ImportState, Overwrite, Step
from app.engine.store import read_log
from app.errors import Conflict, Invalid, NotFound


def test_parse_validates_and_merges() -> None:
    cfg = ps.parse({"sync": {"workers": 4}})
    assert cfg.sync == ps.SyncConfig(4, "mean", ps.DEFAULT_TIMEOUT_S, "fail")
    cfg = ps.parse({"sync": {"workers": 2, "timeout_s": 3}, "max_staleness": 0}, cfg)
    assert cfg.sync == ps.SyncConfig(2, "mean", 3.0, "fail") and cfg.max_staleness == 0
    assert ps.parse({"sync": None}, cfg).sync is None
    assert ps.parse(cfg.to_json()) == cfg
    bad: list[tuple[dict[str, Any], str]] = [
        ({"sync": {}}, "sync.workers"),
        ({"sync": {"workers": 0}}, "sync.workers"),
        ({"sync": {"workers": True}}, "sync.workers"),
        ({"sync": {"workers": 2, "reduce": "max"}}, "sync.reduce"),
        ({"sync": {"workers": 2, "timeout_s": 0}}, "sync.timeout_s"),
        ({"sync": {"workers": 2, "on_timeout": "wait"}}, "sync.on_timeout"),
        ({"sync": {"workers": 2, "k": 1}}, "sync.k"),
        ({"sync": 3}, "sync"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"staleness_lr": "sqrt"}, "staleness_lr"),
        ({"lr": 1}, "lr"),
    ]
    for obj, field in bad:
        with pytest.raises(Invalid) as err:
            ps.parse(obj)
        assert err.value.field == field, obj


def test_a_null_staleness_lr_is_refused_and_older_records_still_replay(tmp_path: Path) -> None:
    """``staleness_lr: null`` in a create or a PATCH was taken as ``"none"`` unsaid; it is a
    422 naming it now, nothing made or changed. A configure record an older server logged
    with it replays as it ran (``"none"``), and a create record's options parse so too."""
    async def go() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            null = CreateSpec("SGD", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0}, id="n",
                              ps_options={"staleness_lr": None})
            with pytest.raises(Invalid) as err:
                await eng.create(null)
            assert (err.value.code, err.value.field) == ("invalid_option", "staleness_lr")
            with pytest.raises(NotFound):
                await eng.describe("n")
            await eng.create(spec())
            before = await eng.describe("s")
            with pytest.raises(Invalid) as err:
                await eng.configure("s", {"max_staleness": 9, "staleness_lr": None})
            assert (err.value.code, err.value.field) == ("invalid_option", "staleness_lr")
            after = await eng.describe("s")
            assert (after.ps, after.version) == (before.ps, before.version)
            assert after.ps["staleness_lr"] == "inverse" and after.ps["max_staleness"] == 4
            # as an older server took it: straight to the host, logged
            host, key = await eng._host("default", "s")
            await host.execute(key, Configure({"staleness_lr": None}, request=True))
            assert (await eng.describe("s")).ps["staleness_lr"] == "none"
        finally:
            await eng.stop(snapshot=False)
        again = engine(tmp_path)
        await again.start()
        try:
            assert (await again.describe("s")).ps["staleness_lr"] == "none"
        finally:
            await again.stop()
    asyncio.run(go())
    assert ps.parse({"staleness_lr": None}).staleness_lr == "none"  # (a create record's)


def test_reduce_is_per_tensor_ordered_and_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    pushes = {w: {"a": torch.randn(1000, generator=g)} for w in ["w3", "w1", "w2", "w0"]}
    pushes["w1"]["b"] = torch.ones(2)
    pushes["w2"]["b"] = torch.full((2,), 3.0)
    out = ps.reduce(pushes, "mean")
    want = pushes["w0"]["a"].clone()
    for w in ["w1", "w2", "w3"]:
        want.add_(pushes[w]["a"])
    assert torch.equal(out["a"], want / 4)
    assert out["b"].tolist() == [2.0, 2.0]  # over the two that sent it
    shuffled = {w: pushes[w] for w in ["w2", "w0", "w3", "w1"]}
    assert torch.equal(ps.reduce(shuffled, "mean")["a"], out["a"])
    assert ps.reduce(pushes, "sum")["b"].tolist() == [4.0, 4.0]
    assert pushes["w1"]["b"].tolist() == [1.0, 1.0]  # inputs untouched


def engine(data: Path) -> Front:
    return embedded_engine("cpu", data_dir=data, durability="step")


def spec() -> CreateSpec:
    g = torch.Generator().manual_seed(0)
    return CreateSpec("Adam", [GroupSpec({"w": torch.randn(5, generator=g),
                                          "b": torch.randn(2, generator=g)})],
                      {"lr": 0.05}, id="s",
                      ps_options={"sync": {"workers": 3, "timeout_s": 30},
                                  "max_staleness": 4, "staleness_lr": "inverse"})


def grads(seed: int, names: tuple[str, ...] = ("w", "b")) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(5 if n == "w" else 2, generator=g) for n in names}


def test_rounds_and_scaled_steps_replay_bitwise_after_a_crash(tmp_path: Path) -> None:
    async def train(eng: Front) -> tuple[Any, dict[str, Any]]:
        await eng.create(spec())
        for r in range(3):  # full rounds, one worker sending only "w"
            results = await asyncio.gather(
                eng.step("s", grads(10 * r), return_params=True, worker="a"),
                eng.step("s", grads(10 * r + 1, ("w",)), return_params=False, worker="b"),
                eng.step("s", grads(10 * r + 2), return_params=True, worker="c"))
            assert [x.version for x in results] == [r + 1] * 3
            assert results[1].params is None and results[0].params is not None
        with pytest.raises(Conflict) as err:  # duplicate push while the round is open
            await asyncio.gather(eng.step("s", grads(1), return_params=False, worker="a"),
                                 eng.step("s", grads(2), return_params=False, worker="a"))
        assert err.value.code == "duplicate_push"
        await eng.configure("s", {"sync": {"workers": 1}})  # the open round ("a") completes
        await asyncio.sleep(0.05)
        await eng.configure("s", {"sync": None})
        stepped = await eng.step("s", grads(99), return_params=False, base_version=2)
        assert stepped.staleness == 2
        with pytest.raises(Conflict) as err:
            await eng.step("s", grads(98), return_params=False, base_version=0)
        assert err.value.code == "stale_gradient" and err.value.extra["current_version"] == 5
        return await eng.pull("s", None), await eng.describe("s")

    async def crash_and_restore() -> None:
        eng = engine(tmp_path)
        await eng.start()
        before, desc = await train(eng)
        await eng.stop(snapshot=False)  # no snapshot on disk: everything replays
        wal = tmp_path / "sessions" / "default~s" / "wal.bin"
        records = [persist.decode_record(r) for r in read_log(wal)[0]]
        ops = [r.op.kind for r in records]
        assert ops == ["create"] + ["step"] * 3 + ["configure", "step", "configure", "step"]
        last = records[-1].op
        assert isinstance(last, Step) and last.base_version == 2  # staleness 2: lr / 3
        first = records[1].op
        assert isinstance(first, Step) and set(first.grads) == {"w", "b"}  # reduced
        assert records[1].sync == {"workers": ["a", "b", "c"], "expected": 3, "partial": False}

        again = engine(tmp_path)
        await again.start()
        try:
            after, desc2 = await again.pull("s", None), await again.describe("s")
        finally:
            await again.stop()
        assert (after.version, after.step, after.lr) == (before.version, before.step,
                                                         before.lr) == (5, 5, [0.05])
        for n in before.params:
            assert torch.equal(after.params[n], before.params[n]), n
        assert desc2.ps["sync"] is None and desc.ps["sync"] is None
        assert (desc2.ps["max_staleness"], desc2.ps["staleness_lr"]) == (4, "inverse")
    asyncio.run(crash_and_restore())


def test_long_poll_and_not_modified_in_the_engine() -> None:
    async def go() -> None:
        eng = embedded_engine("cpu")
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0},
                                        id="s"))
            assert (await eng.pull("s", None, unless_versions=frozenset({0}))).not_modified
            poll = asyncio.create_task(eng.pull("s", ["x"], min_version=1, wait_s=10))
            await asyncio.sleep(0.05)
            assert not poll.done()
            await eng.step("s", {"x": torch.ones(2)}, return_params=False)
            got = await asyncio.wait_for(poll, 5)
            assert got.version == 1 and got.params["x"].tolist() == [-1.0, -1.0]
            with pytest.raises(Invalid):
                await eng.pull("s", ["nope"], unless_versions=frozenset({1}))
        finally:
            await eng.stop()
    asyncio.run(go())


async def _pending(eng: Front, session_id: str, n: int) -> None:
    """Until ``n`` workers have pushed to the session's open round."""
    for _ in range(500):
        if len((await eng.describe(session_id)).pending or []) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the round never reached {n} pushes")


def test_sync_turned_off_steps_the_open_round_as_it_was_configured() -> None:
    """``sync: null`` steps an open round with what it has: reduced with the round's own
    ``reduce`` (``sum`` here, not the default ``mean``), and ``expected`` is its K."""
    async def go() -> None:
        eng = embedded_engine("cpu")
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0},
                                        id="s", ps_options={"sync": {"workers": 3,
                                                                     "reduce": "sum"}}))
            pushes = [asyncio.create_task(eng.step("s", {"x": torch.full((2,), v)},
                                                   return_params=True, worker=w))
                      for w, v in (("a", 1.0), ("b", 2.0))]
            await _pending(eng, "s", 2)
            await eng.configure("s", {"sync": None})
            for done in await asyncio.gather(*pushes):
                assert done.sync == {"workers": ["a", "b"], "expected": 3, "partial": True}
                assert done.params is not None and done.params["x"].tolist() == [-3.0, -3.0]
        finally:
            await eng.stop()
    asyncio.run(go())


def test_the_table_keeps_every_key_of_the_latest_operation() -> None:
    table = IdempotencyTable(window=2)
    table.remember_all([("a", "fa"), ("b", "fb"), ("c", "fc")], {"version": 1})
    assert [table.lookup(k, f"f{k}") for k in "abc"] == [{"version": 1}] * 3
    again = IdempotencyTable.from_json(table.to_json(), window=2)  # a snapshot keeps them too
    assert again == table
    table.remember("d", "fd", {"version": 2})  # the window applies again from the next one
    assert len(table) == 2 and table.lookup("a", "fa") is None


def test_a_round_of_more_workers_than_the_window_is_applied_once() -> None:
    """Each worker's retry of a round's push (same key) is answered from the table, however
    small the window: the round answered one key per worker."""
    async def go() -> None:
        eng = embedded_engine("cpu", idempotency_window=2)
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0},
                                        id="s", ps_options={"sync": {"workers": 3,
                                                                     "timeout_s": 0.5}}))

            def push(w: str) -> Any:
                return eng.step("s", {"x": torch.ones(2)}, return_params=False, worker=w,
                                idem=IdemKey(f"key-{w}", f"push by {w}"))
            assert [r.version for r in await asyncio.gather(*map(push, "abc"))] == [1] * 3
            for w in "abc":
                again = await push(w)
                assert again.replayed and again.version == 1, w
            assert (await eng.describe("s")).version == 1
        finally:
            await eng.stop()
    asyncio.run(go())


def test_a_restart_keeps_as_many_keys_as_the_window(tmp_path: Path) -> None:
    """A window above the default (1000) holds across a restart that loads a snapshot and
    replays records after it: a key acknowledged within the window is not applied again."""
    async def go() -> None:
        first = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                idempotency_window=2000, snapshot_every_steps=1000,
                                warm_up=False)
        await first.start()
        await first.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(1)})], {"lr": 1.0},
                                      id="s"))
        for i in range(1010):  # a snapshot after 1000 records, then 10 records after it
            await first.step("s", {"x": torch.ones(1)}, return_params=False,
                             idem=IdemKey(f"k{i}", "step"))
        await first.stop(snapshot=False)
        again = embedded_engine("cpu", data_dir=tmp_path, durability="step",
                                idempotency_window=2000, warm_up=False)
        await again.start()
        try:
            retried = await again.step("s", {"x": torch.ones(1)}, return_params=False,
                                       idem=IdemKey("k0", "step"))
            assert retried.replayed and retried.version == 1
            assert (await again.describe("s")).version == 1010
        finally:
            await again.stop()
    asyncio.run(go())


def test_lbfgs_refuses_sync_rounds_it_would_never_hold() -> None:
    """An LBFGS step is an evaluation protocol with one client: a create or PATCH asking it
    for sync rounds is a 422 naming ``sync`` (it was taken and then ignored by every step)."""
    async def go() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            def lbfgs(**ps_options: Any) -> CreateSpec:
                return CreateSpec("LBFGS", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0},
                                  id="s", ps_options=ps_options)
            with pytest.raises(Invalid) as err:
                await eng.create(lbfgs(sync={"workers": 2}))
            assert err.value.field == "sync"
            await eng.create(lbfgs(max_staleness=1))
            with pytest.raises(Invalid) as err:
                await eng.configure("s", {"sync": {"workers": 2}})
            assert err.value.field == "sync"
            info = await eng.describe("s")
            assert info.ps["sync"] is None and info.ps["max_staleness"] == 1
            await eng.configure("s", {"sync": None, "max_staleness": 2})
        finally:
            await eng.stop()
    asyncio.run(go())


def test_a_refused_push_is_not_logged_as_a_lost_error() -> None:
    """A sync push refused at its check (no Idempotency-Key) is that worker's 4xx and nothing
    more: asyncio is not left a failed future to log as "exception was never retrieved"."""
    async def go() -> list[dict[str, Any]]:
        lost: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: lost.append(ctx))
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0},
                                        id="s", ps_options={"sync": {"workers": 2}}))
            try:
                await eng.step("s", {"x": torch.zeros(3)}, return_params=False, worker="a")
            except Invalid as exc:
                assert exc.field == "grads.x"
            else:
                raise AssertionError("a push of the wrong shape was taken")
        finally:
            await eng.stop()
        gc.collect()  # (nothing holds the push's future any more: asyncio would log it now)
        await asyncio.sleep(0)
        return lost
    assert asyncio.run(go()) == []


def test_lbfgs_sync_refusal_travels_with_the_operation() -> None:
    """The PATCH's refusal of sync rounds on LBFGS holds where the operation is sent as its
    tree (a Ray host's copy, a log record): ``Configure``'s request flag goes with it; a tree
    without it (a record logged before the check existed) still applies as it ran."""
    from app.engine.ops import Configure
    from app.engine.ray_host import op_from_wire, op_to_wire
    from app.engine.session import Session

    s = Session.build("s", "LBFGS", [GroupSpec({"x": torch.zeros(2)})], {"lr": 1.0}, None,
                      "reject", torch.device("cpu"))
    sent = op_from_wire(op_to_wire(Configure({"sync": {"workers": 2}}, request=True)))
    with pytest.raises(Invalid) as err:
        sent.check(s)
    assert err.value.field == "sync"
    old = Configure.from_tree({"options": {"sync": {"workers": 2}}})
    old.apply(s, old.check(s))
    assert s.ps.sync is not None and s.ps.sync.workers == 2


def test_overwrites_and_imports_discard_what_a_round_gathered_before_them(
        tmp_path: Path) -> None:
    """An overwrite refused at its check leaves the open round alone (it steps with all three
    pushes); a state import applied while two keyed pushes wait discards their round (409
    ``stale_gradient``, ``discarded_by: import``); an overwrite that got the session's lock
    before a full round's step discards that round, unstepped. Every discarded push's retry
    gets the same 409, also after a crash and restart (the keys travel in the discarding
    operation's record). Values are torch's: Adam stepped on the rounds that were applied,
    with the overwrite copied in."""
    g = {w: grads(60 + i) for i, w in enumerate("abc")}
    p0 = {n: t.clone() for n, t in spec().groups[0].params.items()}
    p1 = {n: torch.full_like(t, 0.5) for n, t in p0.items()}
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.05)
    for n, p in local.items():  # the one round applied, then the overwrite
        p.grad = g["a"][n].clone().add_(g["b"][n]).add_(g["c"][n]).div_(3)
    opt.step()
    with torch.no_grad():
        for n, p in local.items():
            p.copy_(p1[n])

    def key(w: str, tag: str) -> IdemKey:
        return IdemKey(f"{tag}-{w}", f"push {tag} by {w}")

    def discarded(exc: BaseException, by: str, version: int, base: int) -> None:
        assert isinstance(exc, Conflict) and exc.code == "stale_gradient", exc
        assert exc.field == "base_version"
        assert (exc.extra["discarded_by"], exc.extra["current_version"],
                exc.extra["base_version"]) == (by, version, base), exc.extra

    async def retries(eng: Front) -> None:
        for w, tag, by, version, base in (("a", "i", "import", 2, 1), ("b", "i", "import", 2, 1),
                                          ("a", "o", "overwrite", 3, 2),
                                          ("c", "o", "overwrite", 3, 2)):
            with pytest.raises(Conflict) as err:
                await eng.step("s", g[w], return_params=False, worker=w, idem=key(w, tag),
                               base_version=base if (w, tag) == ("a", "i") else None)
            discarded(err.value, by, version, base)
        assert (await eng.describe("s")).pending == []

    async def live() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(spec())

        def push(w: str, tag: str, base: int | None = None) -> asyncio.Task[Any]:
            return asyncio.create_task(eng.step("s", g[w], return_params=True, worker=w,
                                                idem=key(w, tag), base_version=base))
        first = [push("a", "r"), push("b", "r")]
        await _pending(eng, "s", 2)
        with pytest.raises(Invalid):  # refused at its check: the round goes on
            await eng.overwrite("s", {"w": torch.zeros(3)})
        assert (await eng.describe("s")).pending == ["a", "b"]
        first.append(push("c", "r"))
        assert [r.version for r in await asyncio.gather(*first)] == [1, 1, 1]

        waiting = [push("a", "i", base=1), push("b", "i")]
        await _pending(eng, "s", 2)
        await eng.import_state("s", (await eng.export_state("s")).state_dict)
        for task in waiting:
            with pytest.raises(Conflict) as err:
                await task
            discarded(err.value, "import", 2, 1)

        host, skey = await eng._host("default", "s")
        async with host.embedded._lock(skey):  # the overwrite gets the lock before the step
            over = asyncio.create_task(eng.overwrite("s", p1))
            await asyncio.sleep(0.05)
            full = [push(w, "o") for w in "abc"]
            for _ in range(500):  # the round closed; its step waits for the lock
                if (await eng.describe("s")).pending == [] and \
                        host.embedded._rounds._closing.get(skey):
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the round never closed")
        assert (await over).version == 3
        for task in full:
            with pytest.raises(Conflict) as err:
                await task
            discarded(err.value, "overwrite", 3, 2)
        await retries(eng)
        got = await eng.pull("s", None)
        assert got.version == 3
        for n in local:
            assert torch.equal(got.params[n], local[n]), n
        await eng.stop(snapshot=False)

    async def after_a_crash() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            await retries(eng)
            got = await eng.pull("s", None)
            assert got.version == 3
            for n in local:
                assert torch.equal(got.params[n], local[n]), n
        finally:
            await eng.stop()
    asyncio.run(live())
    records = [persist.decode_record(r)
               for r in read_log(tmp_path / "sessions" / "default~s" / "wal.bin")[0]]
    assert [r.op.kind for r in records] == ["create", "step", "import", "overwrite"]
    imported, overwrote = records[2].op, records[3].op
    assert isinstance(imported, ImportState) and isinstance(overwrote, Overwrite)
    assert [d.worker for d in imported.discarded] == ["a", "b"]
    assert [d.worker for d in overwrote.discarded] == ["a", "b", "c"]
    asyncio.run(after_a_crash())


@pytest.mark.parametrize("failure", ["round_timeout", "round_aborted"])
def test_a_push_whose_round_failed_joins_the_next_round_when_retried_with_its_key(
        tmp_path: Path, failure: str) -> None:
    """A round that times out (``on_timeout: fail``) or that a shutdown aborts changes nothing:
    its workers get the 409 and their keys are not recorded (a refusal is never kept), so a
    retry with the same key and gradients is a push like any other: it joins the next round,
    which steps once (torch's Adam on the mean of the two workers' gradients, from the
    unchanged parameters), and a further retry is answered from the table, not stepped again.
    The gradients are still those of the parameters the round would have stepped (nothing
    changed them); a retry naming its base version is checked against the session as any push
    is (``max_staleness``, an overwrite since)."""
    p0 = {n: t.clone() for n, t in spec().groups[0].params.items()}
    ga, gb = grads(71), grads(72)
    want = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.Adam(list(want.values()), lr=0.05)
    for n, p in want.items():
        p.grad = (ga[n] + gb[n]) / 2
    opt.step()

    def make() -> CreateSpec:
        made = spec()
        made.ps_options = {"sync": {"workers": 2, "timeout_s": 0.3 if failure == "round_timeout"
                                    else 30}}
        return made

    def push(eng: Front, w: str, g: dict[str, torch.Tensor]) -> Any:
        return eng.step("s", g, return_params=True, worker=w, idem=IdemKey(f"k-{w}", f"{w}"))

    async def retried(eng: Front) -> None:
        a, b = await asyncio.gather(push(eng, "a", ga), push(eng, "b", gb))
        assert a.version == b.version == 1 and not a.replayed
        assert a.sync == {"workers": ["a", "b"], "expected": 2, "partial": False}
        for n in want:
            assert torch.equal(a.params[n], want[n]), n
        again = await push(eng, "a", ga)
        assert again.replayed and again.version == 1
        assert (await eng.describe("s")).version == 1

    async def live() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(make())
        lone = asyncio.create_task(push(eng, "a", ga))
        await _pending(eng, "s", 1)
        if failure == "round_aborted":  # a shutdown: retried after the restart
            await eng.stop()
        with pytest.raises(Conflict) as err:
            await lone
        assert err.value.code == failure
        if failure == "round_timeout":  # retried live
            try:
                got = await eng.pull("s", None)
                assert got.version == 0
                for n in p0:
                    assert torch.equal(got.params[n], p0[n]), n
                await retried(eng)
            finally:
                await eng.stop()

    async def restarted() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            if failure == "round_aborted":
                await retried(eng)
            else:  # the step was logged: the retry is answered after a restart too
                again = await push(eng, "a", ga)
                assert again.replayed and again.version == 1
        finally:
            await eng.stop()
    asyncio.run(live())
    asyncio.run(restarted())



def test_a_push_checked_while_its_round_closed_joins_the_next_round() -> None:
    """Three workers push at once to rounds of two: the round closes with the first two while
    the third push is still being checked, at the version the closed round steps from. It is
    checked again once that round has stepped and joins the next round, which a fourth worker
    completes: no worker gets 409 ``stale_gradient`` (no push named a base version, nothing
    overwrote the parameters), neither the late push nor the one that completes its round.
    (Before, the next round held pushes checked at two versions and both its workers got the
    409.) Values are torch's SGD with momentum on the rounds' means, in the rounds' order."""
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(4, generator=g)
    sent = {w: torch.randn(4, generator=g) for w in "abcd"}

    async def go() -> None:
        eng = embedded_engine("cpu")
        await eng.start()
        try:
            await eng.create(CreateSpec("SGD", [GroupSpec({"x": p0.clone()})],
                                        {"lr": 0.1, "momentum": 0.9}, id="s",
                                        ps_options={"sync": {"workers": 2, "timeout_s": 30}}))

            def push(w: str) -> asyncio.Task[Any]:
                return asyncio.create_task(
                    eng.step("s", {"x": sent[w].clone()}, return_params=True, worker=w))
            first = {w: push(w) for w in "abc"}  # checked one after another
            done, _ = await asyncio.wait(first.values(), timeout=10,
                                         return_when=asyncio.FIRST_COMPLETED)
            one = done.pop().result()
            assert one.version == 1 and one.sync is not None
            rounds = [one.sync["workers"]]
            (late,) = [w for w in "abc" if w not in rounds[0]]
            await _pending(eng, "s", 1)
            second = await asyncio.wait_for(asyncio.gather(first[late], push("d")), 10)
            assert [r.version for r in second] == [2, 2]
            assert second[0].sync is not None
            rounds.append(second[0].sync["workers"])
            assert rounds[1] == sorted([late, "d"]), rounds
            x = torch.nn.Parameter(p0.clone())
            opt = torch.optim.SGD([x], lr=0.1, momentum=0.9)
            for members in rounds:
                total = sent[members[0]].clone()
                total.add_(sent[members[1]])
                x.grad = total / 2
                opt.step()
            for r in second:
                assert r.params is not None and torch.equal(r.params["x"], x.detach())
        finally:
            await eng.stop()
    asyncio.run(go())
