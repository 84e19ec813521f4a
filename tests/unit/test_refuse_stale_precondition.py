"""``Front.refuse_stale``, the check a conditional change makes before its body is read: the
412 its operation would raise for a precondition the session is past (word for word, with
the same fields), and nothing where the operation's answer could be another or the
precondition may still hold: a version not reached yet, an operation on the session under
way, an idempotency key the session holds (its retry is answered from its record), a
sharded session (checked after the body)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
import torch

from app.config import Settings
from app.engine.factory import make_engine
from app.engine.front import Front
from app.engine.interface import IdemKey, session_key
from app.engine.ops import Expected
from app.errors import PreconditionFailed
from tests.torch_reference import Reference, assert_tensors_equal
from tests.unit.test_deleted_creates import spec

GRADS = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([1.0, 2.0, 3.0])}


def _at(version: int) -> Expected:
    return Expected(version, version_field="If-Match")


async def _refused_as_operation(front: Front, sid: str, expected: Expected) -> None:
    """``refuse_stale`` raises the 412 the option change itself raises, word for word."""
    with pytest.raises(PreconditionFailed) as early:
        await front.refuse_stale(sid, expected)
    with pytest.raises(PreconditionFailed) as late:
        await front.configure(sid, {"lr": 0.5}, expected=expected)
    assert (str(early.value), early.value.field, early.value.extra) == (
        str(late.value), late.value.field, late.value.extra)


def test_a_precondition_the_session_is_past_is_refused_as_its_operation_refuses_it() -> None:
    settings = Settings(device="cpu", warm_up=False,
                        data_dir=Path(tempfile.mkdtemp(prefix="optserve-test-")))

    async def run() -> None:
        front = make_engine(settings)
        await front.start()
        try:
            made = spec(id="s")
            await front.create(made)
            await front.step("s", GRADS, return_params=False, idem=IdemKey("k1", "step k1"))
            info = await front.describe("s")
            assert info.version == 1
            await _refused_as_operation(front, "s", _at(0))
            await _refused_as_operation(front, "s", Expected(None, version_field="If-Match",
                                                             weak=True))
            await _refused_as_operation(front, "s", Expected(None, info.revision - 1))
            # what may still hold, or holds: nothing here
            for expected in (_at(1), _at(7), Expected(0, others=(1,)),
                             Expected(None, info.revision)):
                await front.refuse_stale("s", expected)
            # a retry under a key the session holds: answered from its record after the body
            await front.refuse_stale("s", _at(0), idem_key="k1")
            with pytest.raises(PreconditionFailed):
                await front.refuse_stale("s", _at(0), idem_key="k2")
            # an operation on the session under way: what it moves may still be undone
            host = front.router.local.embedded  # type: ignore[attr-defined]
            async with host._lock(session_key("default", "s")):
                await front.refuse_stale("s", _at(0))
            # a settled sharded session: refused from the head too, as its operation refuses
            sharded = spec(2, id="t")
            await front.create(sharded)
            await front.step("t", GRADS, return_params=False)
            await _refused_as_operation(front, "t", _at(0))
            await front.refuse_stale("t", _at(1))
            # nothing was changed: the session holds torch's one step
            ref = Reference(torch.optim.SGD, [(spec().groups[0].params, {})], {"lr": 0.1})
            ref.step(GRADS)
            assert_tensors_equal((await front.pull("s", None)).params, ref.params)
        finally:
            await front.stop()
    asyncio.run(run())
