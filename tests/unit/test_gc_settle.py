"""Sessions' long-lived objects kept out of the cyclic collector's walks (:mod:`app.gc_settle`):
what freezing relies on (a deleted session is freed by reference counting alone: no cycle holds
any of its objects), what it does (a create and a first step freeze, later steps do not), that
a sweep frees what a freeze trapped, and that create/step/delete cycles with freezing on leave
no memory behind. Results are the same as torch's in-process ones."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from app.engine import host as host_module
from app.engine.host import EmbeddedHost, HostConfig
from app.engine.interface import CreateSpec, GroupSpec
from app.gc_settle import Settler

#: optimizers and schedulers whose deleted sessions must leave no cyclic garbage (the kinds
#: whose objects differ: plain state, LBFGS's closure-driven state, Adagrad's state made at
#: construction, schedulers that wrap the optimizer's step or keep their own state)
KINDS: list[tuple[str, dict[str, Any], dict[str, Any] | None]] = [
    ("Adam", {"lr": 1e-3}, None),
    ("SGD", {"lr": 0.1, "momentum": 0.9}, None),
    ("Adagrad", {"lr": 0.1}, None),
    ("LBFGS", {"lr": 1.0}, None),
    ("Adam", {"lr": 1e-3}, {"name": "StepLR", "options": {"step_size": 1}}),
    ("SGD", {"lr": 0.1}, {"name": "OneCycleLR", "options": {"max_lr": 0.1, "total_steps": 50}}),
    ("SGD", {"lr": 0.1}, {"name": "ReduceLROnPlateau", "options": {}}),
    ("Adam", {"lr": 1e-3}, {"name": "CosineAnnealingWarmRestarts", "options": {"T_0": 3}}),
]


def params_of(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(4, generator=g) for i in range(n)}


@pytest.fixture
def settler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Settler]:
    """A settler of the host's, on, freezing once 100 tensors gathered; what it froze is
    unfrozen after the test (a test process freezes nothing of its own). No host sweeps it but
    where a test asks for it: a host another module of this process left running (a server
    of the whole session's) looks the settler up when its idle minute is up, and swept this
    one in the middle of a test that counts no sweep (seen under ``-n 2``)."""
    assert gc.get_freeze_count() == 0
    s = Settler(settle_tensors=100)
    s.enable()
    monkeypatch.setattr(host_module, "SWEEP_IDLE_POLLS", 10**9)
    monkeypatch.setattr(host_module, "SWEEP_AFTER_S", float("inf"))
    monkeypatch.setattr(host_module, "settler", s)
    try:
        yield s
    finally:
        gc.unfreeze()


def tracked_ids() -> set[int]:
    """The objects the collector walks (``gc.get_objects`` leaves frozen ones out)."""
    return {id(o) for o in gc.get_objects()}


@pytest.mark.parametrize(("optimizer", "options", "scheduler"), KINDS)
def test_a_deleted_session_is_freed_without_the_collector(
        optimizer: str, options: dict[str, Any], scheduler: dict[str, Any] | None) -> None:
    """With the collector off, a deleted session's parameters, optimizer, scheduler and the
    session itself are gone as soon as the delete returns: reference counting frees them, so
    freezing them (which hides them from the collector only) cannot keep them. (The second
    session of its kind: the first optimizer a process makes imports parts of torch lazily, and
    that import leaves a cycle of frames holding the first session, once.)"""
    async def main() -> list[weakref.ref[Any]]:
        host = EmbeddedHost(HostConfig(device="cpu", warm_up=False))
        await host.start()
        try:
            for _ in range(2):
                refs = await one_session(host)
            return refs
        finally:
            await host.stop()

    async def one_session(host: EmbeddedHost) -> list[weakref.ref[Any]]:
        await host.create("t~s", CreateSpec(optimizer, [GroupSpec(params_of(30, 1))],
                                            dict(options), scheduler=scheduler))
        s = host._sessions["t~s"]
        refs: list[weakref.ref[Any]] = [
            weakref.ref(s), weakref.ref(s.optimizer),
            weakref.ref(s.optimizer.param_groups[0]["params"][0])]
        if s.scheduler is not None:
            refs.append(weakref.ref(s.scheduler))
        del s
        if optimizer != "LBFGS":  # (its steps evaluate a closure: not a plain step)
            for k in range(3):
                await host.step("t~s", params_of(30, 10 + k), want_params=True)
        await host.delete("t~s")
        await asyncio.sleep(0)
        return refs

    gc.collect()
    gc.disable()
    try:
        refs = asyncio.run(main())
        assert [r() is None for r in refs] == [True] * len(refs)
    finally:
        gc.enable()


def test_the_settler_freezes_once_enough_gathered_and_a_sweep_frees_what_it_trapped(
        ) -> None:
    """Below its count nothing is frozen; at it, everything tracked is. A cycle that became
    garbage while frozen survives a full collection, and the sweep frees it."""
    s = Settler(settle_tensors=10)
    assert s.grew(50) is False and gc.get_freeze_count() == 0  # (off until enabled)
    s.enable()
    try:
        class Node:
            pass
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        assert s.grew(6) is False and id(a) in tracked_ids()
        assert s.sweep() is False  # (nothing frozen yet)
        assert s.grew(4) is True and s.freezes == 1
        assert id(a) not in tracked_ids() and gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert gone() is not None  # trapped: frozen cyclic garbage
        assert s.sweep() is True and s.sweeps == 1 and s.freezes == 0
        assert gone() is None
        assert gc.get_freeze_count() > 0  # (what lives is frozen again)
        assert s.sweep() is False  # (no freeze since)
    finally:
        gc.unfreeze()


def test_a_create_and_a_first_step_freeze_and_later_steps_do_not(
        settler: Settler, monkeypatch: pytest.MonkeyPatch) -> None:
    """A create of 100 parameters freezes them; its first Adam step (100 new state entries)
    freezes again, its later steps (no new ones) do not; the host idle long enough sweeps
    once (its polls shortened here). The parameters equal torch's in-process Adam on the same
    gradients."""
    monkeypatch.setattr(host_module, "POLL_S", 0.01)
    # no sweep until the steps are done: on a loaded machine 3 idle polls can pass between
    # the create and the first step, and a sweep there resets the freezes counted
    monkeypatch.setattr(host_module, "SWEEP_IDLE_POLLS", 10**9)
    init = params_of(100, 2)
    local = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    opt = torch.optim.Adam(list(local.values()), lr=1e-2)

    async def main() -> None:
        host = EmbeddedHost(HostConfig(device="cpu"))  # (its warm-up: as the server's)
        await host.start()
        try:
            await host.create("t~s", CreateSpec("Adam", [GroupSpec(
                {n: t.clone() for n, t in init.items()})], {"lr": 1e-2}))
            assert settler.freezes == 1
            p = host._sessions["t~s"].optimizer.param_groups[0]["params"][0]
            assert id(p) not in tracked_ids()
            for k in range(3):
                grads = params_of(100, 20 + k)
                result = await host.step("t~s", grads, want_params=True)
                assert settler.freezes == 2  # (the first step's state; then none)
                for n, t in local.items():
                    t.grad = grads[n]
                opt.step()
            state = host._sessions["t~s"].optimizer.state[p]
            assert id(state["exp_avg"]) not in tracked_ids()
            got = result.params
            assert got is not None
            for n, t in local.items():
                assert torch.equal(got[n], t.detach()), n
            monkeypatch.setattr(host_module, "SWEEP_IDLE_POLLS", 3)
            for _ in range(2000):  # (the idle loop's polls, shortened)
                if settler.sweeps:
                    break
                await asyncio.sleep(0.005)
            assert settler.sweeps == 1 and settler.freezes == 0
            assert id(p) not in tracked_ids()  # (frozen again after the sweep)
        finally:
            await host.stop()

    asyncio.run(main())


def test_create_step_delete_cycles_with_freezing_leave_no_memory(settler: Settler) -> None:
    """Sessions of 300 parameters created, stepped twice and deleted 24 times over, each
    create and first step freezing: after every delete the session's parameters, optimizer
    and state are gone (no sweep ran), and neither the memory Python allocated (tracemalloc)
    nor the frozen objects grow from the 4th cycle to the 24th by a fraction of what one
    session holds."""
    async def main() -> None:
        host = EmbeddedHost(HostConfig(device="cpu"))  # (its warm-up: as the server's)
        await host.start()
        # traced from here: the warm-up's allocations are no cycle's (traced, the warm-up
        # took 5 s of CPU of the test's 7)
        tracemalloc.start()
        try:
            traced: list[int] = []
            frozen: list[int] = []
            held = 0
            for cycle in range(24):
                before = tracemalloc.get_traced_memory()[0]
                await host.create("t~s", CreateSpec("Adam", [GroupSpec(params_of(300, cycle))],
                                                    {"lr": 1e-3}))
                for k in range(2):
                    await host.step("t~s", params_of(300, 100 + k), want_params=True)
                s = host._sessions["t~s"]
                p = s.optimizer.param_groups[0]["params"][0]
                refs: list[weakref.ref[Any]] = [weakref.ref(s), weakref.ref(s.optimizer),
                                                weakref.ref(p),
                                                weakref.ref(s.optimizer.state[p]["exp_avg"])]
                held = max(held, tracemalloc.get_traced_memory()[0] - before)
                del s, p
                await host.delete("t~s")
                await asyncio.sleep(0)
                assert [r() is None for r in refs] == [True] * 4, cycle
                traced.append(tracemalloc.get_traced_memory()[0])
                frozen.append(gc.get_freeze_count())
            assert settler.freezes >= 24 and settler.sweeps == 0
            assert held > 0
            assert traced[-1] - traced[3] < held / 4, (traced, held)
            assert frozen[-1] - frozen[3] < 300, frozen  # (one session: 1,500 objects)
        finally:
            tracemalloc.stop()
            await host.stop()

    asyncio.run(main())


def test_a_host_that_never_rests_sweeps_once_a_freeze_is_overdue(
        settler: Settler, monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients step all the time, so the host is never idle for its sweep: a cycle that was
    garbage-to-be when a create froze everything is still freed, by the sweep that falls due
    ``SWEEP_AFTER_S`` after that freeze (shortened here; the idle sweep put out of reach),
    while the steps go on. The session's parameters equal torch's in-process Adam."""
    monkeypatch.setattr(host_module, "POLL_S", 0.01)
    monkeypatch.setattr(host_module, "SWEEP_IDLE_POLLS", 10**9)
    monkeypatch.setattr(host_module, "SWEEP_AFTER_S", 0.5)
    init = params_of(100, 3)
    local = {n: t.clone().requires_grad_(True) for n, t in init.items()}
    opt = torch.optim.Adam(list(local.values()), lr=1e-2)

    class Node:
        pass

    async def main() -> None:
        host = EmbeddedHost(HostConfig(device="cpu"))
        await host.start()
        try:
            a, b = Node(), Node()
            a.other, b.other = b, a  # type: ignore[attr-defined]
            gone = weakref.ref(a)
            await host.create("t~s", CreateSpec("Adam", [GroupSpec(
                {n: t.clone() for n, t in init.items()})], {"lr": 1e-2}))
            assert settler.freezes == 1 and id(a) not in tracked_ids()
            del a, b
            gc.collect()
            assert gone() is not None  # (trapped by the create's freeze)
            result = None
            for k in range(10_000):  # (never idle: a step every few milliseconds)
                grads = params_of(100, 40 + k % 50)
                result = await host.step("t~s", grads, want_params=True)
                for n, t in local.items():
                    t.grad = grads[n]
                opt.step()
                if settler.sweeps and k >= 3:
                    break
                await asyncio.sleep(0.002)
            assert settler.sweeps == 1, "no sweep while the host was busy"
            assert gone() is None
            assert result is not None and result.params is not None
            for n, t in local.items():
                assert torch.equal(result.params[n], t.detach()), n
        finally:
            await host.stop()

    asyncio.run(main())


def test_overdue_counts_from_the_first_freeze_a_sweep_did_not_follow(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``overdue`` is False before any freeze and after a sweep, and True once the first
    unswept freeze is ``after_s`` old (a later freeze does not restart the count)."""
    now = [100.0]
    monkeypatch.setattr("app.gc_settle.time.monotonic", lambda: now[0])
    s = Settler(settle_tensors=1)
    s.enable()
    try:
        assert s.overdue(5.0) is False
        assert s.grew(1) is True
        now[0] += 3.0
        assert s.grew(1) is True and s.overdue(5.0) is False
        now[0] += 2.0
        assert s.overdue(5.0) is True
        assert s.sweep() is True and s.overdue(5.0) is False and s.overdue(0.0) is False
        assert s.grew(1) is True and s.overdue(5.0) is False
        now[0] += 5.0
        assert s.overdue(5.0) is True
    finally:
        gc.unfreeze()


def test_metrics_count_the_sweeps(app_client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``/metrics`` gives the settler's sweeps as the counter ``optserve_gc_sweeps_total``: 0
    before any, then each sweep once (scraped twice in between: not counted twice)."""
    from app.api import meta
    s = Settler(settle_tensors=1)
    s.enable()
    monkeypatch.setattr(meta, "settler", s)

    def sweeps() -> float:
        text = app_client.get("/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith("optserve_gc_sweeps_total ")]
        assert len(lines) == 1, text
        return float(lines[0].split()[1])

    try:
        assert sweeps() == 0
        for expected in (1, 2):
            assert s.grew(1) is True and s.sweep() is True
            assert sweeps() == expected
            assert sweeps() == expected
    finally:
        gc.unfreeze()
