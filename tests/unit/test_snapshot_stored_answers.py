"""A session's idempotency table goes into its snapshots with every answer it keeps. An answer
that describes the session (add or change a group, import, configure) holds its options as
JSON tensors where ``lr`` is a tensor; kept as such, their values were numpy arrays, which no
snapshot could hold: the count-triggered snapshot after an acknowledged step failed that step,
and a clean stop failed before it reached the other sessions. (A create's key is kept apart, as
the key that made the session; its retries are covered here all the same.)

Each keyed operation below runs on a session with a tensor ``lr`` (defaults and groups, and the
scheduler's ``initial_lr``), then the engine is killed (the log only), restarted, stopped
cleanly (a snapshot), restarted from that snapshot, stepped with a snapshot after every record
and killed again: at each restart the session equals torch doing the same (params, state,
groups, scheduler, defaults, bitwise) and a retry of the key is answered as the first time,
byte for byte in JSON."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy
import orjson
import pytest
import torch

from app.engine import Front, GroupSpec, embedded_engine, persist
from app.engine.idempotency import IdempotencyTable
from app.engine.interface import IdemKey, StepResult
from app.engine.session import Session
from app.engine.store import read_log
from app.wire.tree import tree_to_json
from tests.unit.test_tensor_lr_aliasing import PARAMS, SID, Twin, check, grads, seeded

GROUPS = [["w", "b"], ["h"]]
SCHED = "StepLR"
KEY = IdemKey("the-key", "the-fingerprint")
#: the keyed operation of each test: the engine's call and, the first time, torch doing the same
Keyed = Callable[[Front, Twin, dict[str, Any]], Awaitable[Any]]


def engine(data: Path, every: int = 1000) -> Front:
    return embedded_engine("cpu", data_dir=data, durability="step", snapshot_every_steps=every)


async def create(eng: Front, twin: Twin, _: dict[str, Any]) -> Any:
    return await eng.create(twin.spec(SCHED, GROUPS), idem=KEY)


async def add_group(eng: Front, twin: Twin, _: dict[str, Any]) -> Any:
    lr = torch.tensor(0.005)
    out = await eng.add_param_group(SID, GroupSpec({"x": seeded(PARAMS["x"], 3)},
                                                   {"lr": lr.clone()}), idem=KEY)
    if not twin.opt.param_groups[-1]["param_names"] == ["x"]:  # (not on a retry)
        twin.opt.add_param_group({"params": [("x", twin.params["x"])], "lr": lr})
    return out


async def update_group(eng: Front, twin: Twin, _: dict[str, Any]) -> Any:
    out = await eng.update_param_group(SID, 1, {"lr": torch.tensor(0.02)}, idem=KEY)
    twin.opt.param_groups[1]["lr"] = torch.tensor(0.02)
    return out


async def import_state(eng: Front, twin: Twin, saved: dict[str, Any]) -> Any:
    out = await eng.import_state(SID, copy.deepcopy(saved["state"]), idem=KEY)
    if saved.get("imported"):  # (a retry is answered, not applied)
        return out
    saved["imported"] = True
    mine = copy.deepcopy(saved["state"])
    twin.opt.load_state_dict({"state": mine["state"], "param_groups": mine["param_groups"]})
    twin.sched.load_state_dict(mine["scheduler"])
    return out


async def configure(eng: Front, twin: Twin, _: dict[str, Any]) -> Any:
    return await eng.configure(SID, {"max_staleness": 4}, idem=KEY)


async def step(eng: Front, twin: Twin, saved: dict[str, Any]) -> Any:
    out = await eng.step(SID, grads(9, twin.names()), return_params=False, idem=KEY)
    if not saved.get("stepped"):  # (a retry is answered, not applied)
        saved["stepped"] = True
        twin.step(9)
    return out


async def scheduler_step(eng: Front, twin: Twin, saved: dict[str, Any]) -> Any:
    out = await eng.scheduler_step(SID, None, idem=KEY)
    if not saved.get("scheduled"):
        saved["scheduled"] = True
        twin.sched.step()
    return out


KEYED: dict[str, Keyed] = {f.__name__: f for f in (
    create, add_group, update_group, import_state, configure, step, scheduler_step)}


def wire(answer: Any) -> bytes:
    """The answer's JSON body as the routes write it, but for what a retry adds: its
    ``replayed`` flag, and a step's ``params_version`` (the version of the parameters it
    returns, the session's now)."""
    body = dict(answer.scalars() if isinstance(answer, StepResult) else answer.to_json())
    body.pop("replayed", None)
    body.pop("params_version", None)
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


@pytest.mark.parametrize("op", list(KEYED))
def test_a_kept_answer_with_a_tensor_lr_is_snapshotted_and_replayed_alike(
        tmp_path: Path, op: str) -> None:
    keyed = KEYED[op]
    session_dir = tmp_path / "sessions" / f"default~{SID}"
    saved: dict[str, Any] = {}
    twin = Twin(SCHED, GROUPS)

    async def retry(eng: Front, first: bytes, when: str) -> None:
        assert wire(await keyed(eng, twin, saved)) == first, when

    async def go() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            if op != "create":
                await eng.create(twin.spec(SCHED, GROUPS))
                for k in range(2):
                    await eng.step(SID, grads(k, twin.names()), return_params=False)
                    twin.step(k)
                    if k == 0:
                        saved["state"] = (await eng.export_state(SID)).state_dict
            first = wire(await keyed(eng, twin, saved))
            await retry(eng, first, "live")
            await check(eng, twin, "live")
        finally:
            await eng.stop(snapshot=False)  # kill -9: the log holds everything
        assert not (session_dir / "snapshot.bin").exists()

        eng = engine(tmp_path)  # the log replayed: the key's answer rebuilt from its record
        await eng.start()
        try:
            await retry(eng, first, "replayed from the log")
            await check(eng, twin, "replayed from the log")
        except BaseException:
            await eng.stop(snapshot=False)
            raise
        await eng.stop()  # a clean stop: a snapshot with the key's answer in it
        assert (session_dir / "snapshot.bin").exists()
        assert read_log(session_dir / "wal.bin")[0] == []

        eng = engine(tmp_path, every=1)  # the snapshot restored; a snapshot after each step
        await eng.start()
        try:
            await retry(eng, first, "restored from the snapshot")
            await check(eng, twin, "restored from the snapshot")
            for k in range(2, 4):
                await eng.step(SID, grads(k, twin.names()), return_params=False)
                twin.step(k)
            assert read_log(session_dir / "wal.bin")[0] == []  # each step snapshotted
        finally:
            await eng.stop(snapshot=False)

        eng = engine(tmp_path)  # from the snapshot the last step made
        await eng.start()
        try:
            await check(eng, twin, "restored after the steps")
            if op not in ("step", "scheduler_step"):  # (their answer is the session now)
                return
            await retry(eng, first, "restored after the steps")
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(go())


def test_a_snapshot_that_fails_fails_neither_the_step_nor_the_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever makes one session's snapshot fail (here a tree its encoder refuses), the step
    that made it due is answered and a stop snapshots the other sessions; the failure is
    logged, and the failed session comes back from its log."""
    real = Session.snapshot_tree

    def broken(self: Session) -> dict[str, Any]:
        tree = real(self)
        if self.id == "bad":
            tree["meta"]["unencodable"] = object()
        return tree
    monkeypatch.setattr(Session, "snapshot_tree", broken)
    twins = {sid: Twin(SCHED, GROUPS) for sid in ("bad", "good")}

    async def go() -> None:
        eng = engine(tmp_path, every=2)
        await eng.start()
        try:
            for sid, twin in twins.items():
                spec = twin.spec(SCHED, GROUPS)
                spec.id = sid
                await eng.create(spec)
            for k in range(3):  # the first step is the second record: a snapshot is due
                for sid, twin in twins.items():
                    out = await eng.step(sid, grads(k, twin.names()), return_params=False)
                    twin.step(k)
                    assert (out.version, out.step) == (k + 1, k + 1)
        except BaseException:
            await eng.stop(snapshot=False)
            raise
        with caplog.at_level(logging.ERROR, logger="app.engine.host"):
            await eng.stop()  # "bad" fails again; "good" is snapshotted all the same
        failed = [r for r in caplog.records if "snapshot of default~bad failed" in r.message]
        assert failed and all(r.exc_info is not None for r in failed)
        assert not any("default~good" in r.message for r in caplog.records)
        bad, good = (tmp_path / "sessions" / f"default~{sid}" for sid in ("bad", "good"))
        assert not (bad / "snapshot.bin").exists() and len(read_log(bad / "wal.bin")[0]) == 4
        assert (good / "snapshot.bin").exists() and read_log(good / "wal.bin")[0] == []

        monkeypatch.setattr(Session, "snapshot_tree", real)
        eng = engine(tmp_path)
        await eng.start()
        try:
            for sid, twin in twins.items():
                await check_session(eng, twin, sid)
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(go())


async def check_session(eng: Front, twin: Twin, sid: str) -> None:
    got = (await eng.pull(sid, None)).params
    for name in twin.names():
        assert torch.equal(got[name], twin.params[name]), (sid, name)
    sd = (await eng.export_state(sid)).state_dict
    want = twin.opt.state_dict()
    for i, st in want["state"].items():
        for k, v in st.items():
            assert torch.equal(sd["state"][i][k], v), (sid, i, k)
    assert sd["scheduler"]["last_epoch"] == twin.sched.last_epoch


def test_kept_answers_are_plain_json_that_a_snapshot_keeps() -> None:
    """Whatever an answer holds that the wire writes (tensors of each dtype, numpy arrays and
    numbers, non-finite values), the table keeps the JSON values the wire wrote, byte for byte,
    detached from the tensors (a later in-place change is not in the answer), and a snapshot's
    encoding gives them back as they were."""
    lr = torch.tensor(0.01)
    tensors: dict[str, Any] = {
        "lr": lr, "tensors": [torch.tensor([1.5, -0.0], dtype=d) for d in
                              (torch.float16, torch.bfloat16, torch.float32, torch.float64)],
        "ints": torch.arange(3), "flags": torch.tensor([True, False]),
        "nonfinite": torch.tensor([float("nan"), float("inf"), 1.0]),
    }
    others: dict[str, Any] = {
        "numpy": {"f32": numpy.array([0.1, 1e-7], dtype=numpy.float32),
                  "f16": numpy.array([0.1], dtype=numpy.float16), "i64": numpy.int64(7),
                  "f64": numpy.float64(0.3)},
        "tag": {"$float": "nan"}, "tuple": (1, 2.5), "none": None,
    }
    answer = {**tensors, **others}
    want = orjson.dumps({**tree_to_json(tensors), **others},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    table = IdempotencyTable()
    table.remember("k", "fp", answer)
    lr.fill_(0.5)
    kept = table.lookup("k", "fp")
    assert orjson.dumps(kept) == want  # (no numpy option needed: plain JSON)
    tree = persist.decode_tree(persist.encode_tree({"meta": {"idempotency": table.to_json()}},
                                                   persist.SNAPSHOT_KEY), persist.SNAPSHOT_KEY)
    restored = IdempotencyTable.from_json(tree["meta"]["idempotency"])
    assert restored == table
    assert orjson.dumps(restored.lookup("k", "fp")) == want
