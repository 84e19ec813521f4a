"""What the data directory held for a session beside its own files (a sharded session's entry in
``directory/``: the host's ``written_again`` hooks), written again after the directory was
removed while the server ran, is retried when writing it fails (a full disk just then).

Before, a failed hook was logged and forgotten: the session's own folder was there again, so
neither the maintenance nor the next operation looked again, and a restart answered 404 for
the sharded session, its shards on disk. Now the session is owed its hooks: the maintenance,
the stop and its next operation (refused, 503, nothing applied, while they fail) try again.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine import CreateSpec, Front, GroupSpec, embedded_engine
from app.engine.interface import IdemKey
from app.errors import Unavailable
from tests.torch_reference import Reference, assert_tensors_equal

OPTIONS = {"lr": 0.1, "momentum": 0.9}


def params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"u": torch.randn(5, generator=gen), "v": torch.randn(3, generator=gen)}


def grads(k: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + k)
    return {"u": torch.randn(5, generator=gen), "v": torch.randn(3, generator=gen)}


def remove(data: Path) -> None:
    """``rm -rf`` of the data directory, in one step (moved aside, then removed)."""
    aside = data.with_name(data.name + ".removed")
    data.rename(aside)
    shutil.rmtree(aside)


def failing_claims(eng: Front, times: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The router's directory refuses its next ``times`` claims as a full disk would; the
    keys it refused."""
    directory: Any = eng.router.directory  # type: ignore[attr-defined]
    claim = directory.claim
    refused: list[str] = []

    def full(key: str, entry: dict[str, Any]) -> bool:
        if len(refused) < times:
            refused.append(key)
            raise OSError(28, "No space left on device")
        return bool(claim(key, entry))
    monkeypatch.setattr(directory, "claim", full)
    return refused


async def made(eng: Front, ref: Reference) -> None:
    """The sharded session ``sh`` made (two shards) and stepped once, as ``ref``."""
    await eng.create(CreateSpec("SGD", [GroupSpec(params(), {})], dict(OPTIONS), id="sh",
                                shards=2))
    result = await eng.step("sh", grads(1), return_params=True)
    ref.step(grads(1))
    assert result.params is not None
    assert_tensors_equal(result.params, ref.params, "the first step")


def restored(data: Path, ref: Reference, k: int) -> None:
    """A new engine on ``data`` holds the sharded session as ``ref`` and steps on as torch."""
    async def main() -> None:
        eng = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
        await eng.start()
        try:
            result = await eng.step("sh", grads(k), return_params=True)
            ref.step(grads(k))
            assert result.params is not None
            assert_tensors_equal(result.params, ref.params, "the step after the restart")
        finally:
            await eng.stop()
    asyncio.run(main())


def test_a_stop_retries_what_it_failed_to_write_again(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The directory removed, then a stop: writing each shard's files again runs the hook
    that writes the session's entry; both tries fail (a full disk), and the stop tries
    again before it ends."""
    data = tmp_path / "data"
    ref = Reference(torch.optim.SGD, [(params(), {})], OPTIONS)
    eng = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
    refused: list[list[str]] = []

    async def main() -> None:
        await eng.start()
        try:
            await made(eng, ref)
            remove(data)
            refused.append(failing_claims(eng, 2, monkeypatch))
        finally:
            await eng.stop()
    asyncio.run(main())
    assert refused == [["default~sh", "default~sh"]]
    assert (data / "directory" / "default~sh").exists()
    restored(data, ref, 2)


def test_an_operation_waits_for_what_its_session_is_owed(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """The directory removed, then a step: each shard writes its files again first, and the
    session's entry with them. While that entry cannot be written no shard applies the step
    (acknowledged, it would be lost to a restart): the coordinator rolls it forward, and past
    its commit timeout the client gets 503 ``host_restarting`` (committed, pending); once the
    disk is freed, the client's retry with the same key writes the entry and gets the step's
    answer, applied once."""
    data = tmp_path / "data"
    ref = Reference(torch.optim.SGD, [(params(), {})], OPTIONS)
    eng = embedded_engine("cpu", data_dir=data, durability="step", warm_up=False)
    key = IdemKey("step-2", "fp")

    async def main() -> None:
        await eng.start()
        try:
            await made(eng, ref)
            sharded: Any = eng.router._sharded["default~sh"]  # type: ignore[attr-defined]
            sharded.commit_timeout_s = 1.0  # (30 s by default: the roll-forward's patience)
            remove(data)
            refused = failing_claims(eng, 10**9, monkeypatch)  # (a disk that stays full)
            with pytest.raises(Unavailable) as caught:
                await eng.step("sh", grads(2), return_params=True, idem=key)
            assert caught.value.code == "host_restarting"
            assert refused and not (data / "directory" / "default~sh").exists()
            monkeypatch.undo()  # (the disk freed)
            answer = await eng.step("sh", grads(2), return_params=True, idem=key)
            ref.step(grads(2))
            assert answer.params is not None
            assert_tensors_equal(answer.params, ref.params, "the step, once written again")
            assert (data / "directory" / "default~sh").exists()
        finally:
            await eng.stop()
    asyncio.run(main())
    restored(data, ref, 3)
