"""A coordinator made anew undoes an operation that reached some shards of its session only
(``EmbeddedHost.undo_last_live``) on a shard that its host serves: its log is live, so the undo
reads it as a live log is read (only its good length: a record a failed cut left past it is no
part of the log) and cuts the operation's record, not what lies past the good length."""

from __future__ import annotations

import errno
from pathlib import Path

from app.engine.interface import IdemKey
from app.errors import Unavailable
from tests.unit.test_store_faults import KEY, SID, FaultyFiles, Pair, engine, run


def test_undo_on_a_live_log_with_a_whole_record_past_its_good_length(tmp_path: Path) -> None:
    """A keyed step (the operation a crash cut between shards' commits), then a step whose
    record is written whole but neither cut nor spoiled (its fsync, truncate and header
    zeroing fail: the log awaits repair with that record past its good length). Undone live,
    the session equals a twin that never took the keyed step, takes the next step to the same
    bits, and a restart on the same directory holds it too (before, the undo cut the record
    past the good length and left the keyed step's: the next record took its sequence number
    and the restart refused the session)."""
    files = FaultyFiles()

    async def go() -> None:
        pair = Pair(engine(tmp_path, files, "step"))
        await pair.start()
        await pair.step()
        host = pair.eng.router.local.embedded  # type: ignore[attr-defined]
        want = host.cut_tip(KEY)[:2]
        await pair.eng.step(SID, pair.grads(99), return_params=False,
                            idem=IdemKey("cut-op", "fp"))
        files.arm("fsync", errno.EIO)
        cut = files.arm("ftruncate", errno.EIO)
        spoil = files.arm("pwritev", errno.EIO, skip=1)  # (the record's own write goes)
        refused = await pair.refused_step()
        assert isinstance(refused, Unavailable) and (cut.hits, spoil.hits) == (1, 1)
        assert await host.undo_last_live(KEY, "cut-op", want)
        assert host.cut_tip(KEY)[:2] == want
        await pair.assert_goes_on(tmp_path)
    run(go())
