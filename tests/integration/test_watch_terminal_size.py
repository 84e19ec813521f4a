"""``optserve watch`` in a small terminal and a tall one, as a real subprocess against a live
server. At 24x80 each of the eight charts had one row for its curve, and a flat series (a
constant lr) had its one y label of its range widened to value ± 1 (-1.1 for an lr of 0.1).
Now each chart takes at least ``MIN_CHART_ROWS`` rows: 24 rows show four (loss and lr first)
and name the four left out; 60 rows show all eight; a flat series is labelled with its value."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import optserve
from optserve._watch import CHARTS
from tests.integration.test_cli import cli, new_id, ok, out

pytestmark = pytest.mark.integration

LR = 0.1
STEPS = 30
#: the fewest rows a chart takes, frame and labels included (``optserve._watch``'s bound)
MIN_CHART_ROWS = 10


@pytest.fixture
def session(live_server: str) -> Any:
    """An SGD session of one group at a constant lr, stepped with a falling loss."""
    with optserve.Client(live_server, max_retries=0) as client:
        sid = new_id("watchsize")
        g = torch.Generator().manual_seed(5)
        client.create_session("SGD", {"w": torch.randn(8, generator=g)},
                              options={"lr": LR, "momentum": 0.9}, id=sid)
        for k in range(STEPS):
            client.step(sid, {"w": torch.randn(8, generator=g)}, return_params=False,
                        scalars={"loss": 1.0 / (k + 1)})
        yield sid


def frame(url: str, sid: str, rows: int) -> list[str]:
    p = ok(cli("watch", sid, "--frames", "1", "--interval", "0.1", "--color", "never",
               url=url, env={"COLUMNS": "80", "LINES": str(rows)}))
    lines = out(p).rstrip("\n").split("\n")
    assert lines[0].startswith(f"optserve watch {sid} · {STEPS} steps"), lines[0]
    return lines


def titles(lines: list[str]) -> list[str]:
    """The chart titles drawn (the lines above the charts' frames), in order."""
    above_frames = [line for line, below in zip(lines, lines[1:], strict=False)
                    if below.lstrip().startswith("┌")]
    return [part for line in above_frames for part in re.split(r"\s{2,}", line.strip())]


def chart_heights(lines: list[str]) -> list[int]:
    """The rows of each row of charts, from its frame's top line to its bottom one."""
    tops = [i for i, line in enumerate(lines) if line.lstrip().startswith("┌")]
    bottoms = [i for i, line in enumerate(lines) if line.lstrip().startswith("└")]
    assert len(tops) == len(bottoms) and tops, lines
    return [b - t + 1 for t, b in zip(tops, bottoms, strict=True)]


def y_labels(lines: list[str], title: str) -> list[str]:
    """The y-axis labels of the chart in the left column under ``title``."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(title))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("└"))
    return [m.group(1) for line in lines[start + 2:end]
            if (m := re.match(r"\s*([^\s┤│]+)┤", line))]


def test_a_24_row_terminal_shows_fewer_taller_charts_and_names_the_rest(
        live_server: str, session: str) -> None:
    lines = frame(live_server, session, 24)
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines), "\n".join(lines)
    shown = titles(lines)
    assert shown == ["learning rate", "gradient norm", "update / parameter norm",
                     "client scalars"], "\n".join(lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("not shown (24 rows"))
    note = " ".join(lines[start:start + 3])
    for name in ("update norm", "skipped steps, non-finite values", "parameter norm",
                 "steps per second"):
        assert name in note, (name, note)
    # each chart has room for its curve: its frame and at least 6 rows inside
    assert all(h >= MIN_CHART_ROWS - 2 for h in chart_heights(lines)), "\n".join(lines)
    # the constant lr is labelled with its value, not with plotext's widened range
    assert y_labels(lines, "learning rate") == [f"{LR:g}"], "\n".join(lines)


def test_a_60_row_terminal_shows_every_chart(live_server: str, session: str) -> None:
    lines = frame(live_server, session, 60)
    assert len(lines) <= 60, "\n".join(lines)
    assert set(titles(lines)) == {name for name, _, _ in CHARTS}, "\n".join(lines)
    assert not any("not shown" in line for line in lines)
    assert all(h >= MIN_CHART_ROWS for h in chart_heights(lines)), "\n".join(lines)
    assert y_labels(lines, "learning rate") == [f"{LR:g}"], "\n".join(lines)
