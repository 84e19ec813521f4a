"""A delete reserve that cannot be made for a reason other than a full disk (the store's
background look retries it each second) logs its warning once while the failure repeats, and
again only after the reserve was whole in between."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest

from app.engine import delete_reserve
from app.engine.delete_reserve import DeleteReserve


def test_a_repeating_failure_is_warned_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    failing = {"on": True}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    monkeypatch.setattr(delete_reserve.os, "fsync", fsync)
    reserve = DeleteReserve(tmp_path, size=4096)
    caplog.set_level(logging.WARNING, logger=delete_reserve.log.name)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "delete reserve" in r.getMessage()]

    for _ in range(5):  # (five background looks)
        assert reserve.make() is False
        assert reserve.bytes_held() == 0  # (cut back to what it held: nothing)
    assert len(warnings()) == 1, warnings()
    assert os.strerror(errno.EIO) in warnings()[0]

    failing["on"] = False
    assert reserve.make() is True and reserve.bytes_held() == 4096

    reserve.path.unlink()  # (used by a delete, say) and the disk failing again
    failing["on"] = True
    assert reserve.make() is False
    assert reserve.make() is False
    assert len(warnings()) == 2, warnings()
