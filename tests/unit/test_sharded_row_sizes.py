"""A sharded session's row pull is sized as the unsharded session's: against the whole
session's parameters (or ``ROWS_FLOOR``), not each shard's part against that shard's own.

In-process (the embedded engine, its shards on its one host), rows as the HTTP routes hand
them to the engine; every answer is compared with the parameters' values indexed by torch."""

from __future__ import annotations

import asyncio

import pytest
import torch

from app.engine import embedded_engine
from app.engine.interface import CreateSpec, GroupSpec
from app.engine.sparse import ROWS_FLOOR
from app.errors import Invalid


def spec(sid: str, params: dict[str, torch.Tensor], shards: int) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({n: t.clone() for n, t in params.items()})],
                      {"lr": 0.1}, id=sid, shards=shards)


def test_rows_over_the_floor_in_all_are_refused_though_each_shards_part_is_under_it() -> None:
    """Two tables of 4 rows on two shards, each asked ``ROWS_FLOOR // 2 + 1`` rows: each
    shard's part is under the floor, the pull is over it and over the session's 8 elements:
    422 ``rows_too_large`` naming ``rows`` with the unsharded session's ``limit`` and detail.
    Half as many rows are answered, as torch indexes them."""
    params = {"a": torch.arange(4.0).reshape(4, 1), "b": -torch.arange(4.0).reshape(4, 1)}
    half = ROWS_FLOOR // 2 + 1
    rows = {"a": torch.full((half,), 3, dtype=torch.int64),
            "b": torch.full((half,), 1, dtype=torch.int64)}

    async def run() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            await eng.create(spec("sharded", params, 2))
            await eng.create(spec("plain", params, 1))
            refusals = []
            for sid in ("sharded", "plain"):
                with pytest.raises(Invalid) as caught:
                    await eng.pull_rows(sid, rows)
                refusals.append(caught.value)
            for exc in refusals:
                assert (exc.code, exc.field) == ("rows_too_large", "rows")
            assert refusals[0].extra == refusals[1].extra and refusals[0].extra
            assert str(refusals[0]) == str(refusals[1])
            fewer = {n: idx[: half // 2] for n, idx in rows.items()}
            out = await eng.pull_rows("sharded", fewer)
            assert list(out.params) == ["a", "b"]
            for name, idx in fewer.items():
                got = out.params[name]
                assert torch.equal(got._indices()[0], idx)
                assert torch.equal(got._values(), params[name][idx])
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(run())


def test_rows_over_one_shards_size_are_answered_when_the_session_holds_as_many() -> None:
    """A 4-row table ``a`` on one shard, a long vector ``b`` (past ``ROWS_FLOOR``) on the
    other: ``ROWS_FLOOR + 1`` rows of ``a`` hold more than its shard does, but no more than
    the session: answered as the unsharded session answers them (the shard does not size its
    part against its own parameters)."""
    params = {"a": torch.arange(8.0).reshape(4, 2)[:, :1].contiguous(),
              "b": torch.zeros(ROWS_FLOOR + 8)}
    rows = {"a": torch.arange(ROWS_FLOOR + 1, dtype=torch.int64) % 4}

    async def run() -> None:
        eng = embedded_engine("cpu", warm_up=False)
        await eng.start()
        try:
            info = await eng.create(spec("sharded", params, 2))
            assert info.placement is not None
            assert [s["params"] for s in info.placement["shards"]] == [["b"], ["a"]]
            out = await eng.pull_rows("sharded", rows)
            got = out.params["a"]
            assert torch.equal(got._indices()[0], rows["a"])
            assert torch.equal(got._values(), params["a"][rows["a"]])
        finally:
            await eng.stop(snapshot=False)
    asyncio.run(run())
