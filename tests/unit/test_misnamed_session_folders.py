"""A session folder copied or renamed by hand is refused at start, not served as another id.

The store names a session's folder ``<tenant>~<id>``, and its files hold the id it was created
with. A folder copied to ``default~b`` (or ``default~a copy``) was served under its folder's
name with the original's id: ``GET /v1/sessions`` listed ``a`` twice, and ``b``'s steps were
answered for a session that called itself ``a``. Now such a folder is refused (``/readyz``
lists it with the reason, its files are left alone, its id stays taken) and the rest served;
named back, it is served again."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

from app.engine import CreateSpec, GroupSpec
from app.errors import Conflict, NotFound
from tests.stored_files import stored_files
from tests.torch_reference import assert_tensors_equal
from tests.unit.test_shards_after_restart import GRAD, PARAMS, engine, stepped


def test_a_copied_or_renamed_session_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    async def made() -> None:
        eng = engine(tmp_path)
        await eng.start()
        await eng.create(CreateSpec("Adam", [GroupSpec({n: t.clone() for n, t in PARAMS.items()})],
                                    {"lr": 0.1}, id="a"))
        await eng.step("a", GRAD, return_params=False)
        await eng.stop()

    asyncio.run(made())
    sessions = tmp_path / "sessions"
    for copy in ("default~b", "default~a copy", "default~"):
        shutil.copytree(sessions / "default~a", sessions / copy)
    copies = stored_files(sessions)

    async def restarted(steps: int) -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert [s.id for s in await eng.list_sessions()] == ["a"]
            refused = await eng.refused()
            assert sorted(refused) == ["", "a copy", "b"]
            assert refused["b"].startswith("its folder 'default~b' holds session 'a' "
                                           "(copied or renamed by hand?)"), refused["b"]
            with pytest.raises(NotFound):
                await eng.pull("b", None)
            with pytest.raises(Conflict) as taken:
                await eng.create(CreateSpec("SGD", [GroupSpec({"x": torch.ones(1)})],
                                            {"lr": 0.1}, id="b"))
            assert taken.value.code == "session_exists"
            out = await eng.pull("a", None)
            assert out.version == steps
            assert_tensors_equal(out.params, stepped(steps))
            await eng.step("a", GRAD, return_params=False)
        finally:
            await eng.stop()

    asyncio.run(restarted(1))
    after = stored_files(sessions)
    assert {p: b for p, b in after.items() if p.parent.name != "default~a"} == {
        p: b for p, b in copies.items() if p.parent.name != "default~a"}
    # renamed: the original's folder moved to another id is refused too, the id left free
    (sessions / "default~a").rename(sessions / "default~c")

    async def renamed() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert await eng.list_sessions() == []
            assert sorted(await eng.refused()) == ["", "a copy", "b", "c"]
        finally:
            await eng.stop()

    asyncio.run(renamed())
    # named back, and the copies moved away: served where it was, equal to torch
    (sessions / "default~c").rename(sessions / "default~a")
    for copy in ("default~b", "default~a copy", "default~"):
        shutil.rmtree(sessions / copy)

    async def named_back() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            assert await eng.refused() == {}
            out = await eng.pull("a", None)
            assert out.version == 2
            assert_tensors_equal(out.params, stepped(2))
        finally:
            await eng.stop()

    asyncio.run(named_back())
