"""``optserve watch ID``: a session's per-step metrics as live terminal plots (plotext, the
SDK's optional ``watch`` extra: ``pip install './clients/python[watch]'``).

Each frame asks the server for the session's whole history downsampled to about one bucket
per two terminal columns (``GET .../history?points=``; every column as its min and max per
bucket, so a spike in a long run still shows) and draws the curves the web page at ``/ui``
draws: lr, gradient norm, update norm and the update/parameter ratio per group, the client's
scalars (loss, ...), skipped steps and non-finite values, parameter norms, and steps per second.
"""

from __future__ import annotations

import math
import shutil
import sys
import textwrap
import time
from typing import Any, TextIO

from ._client import Client
from ._constants import WATCH_HINT
from ._types import History

FIELDS = ["n", "time", "skipped", "nonfinite", "lr", "grad_norm", "update_norm", "param_norm",
          "update_ratio", "scalars"]
#: (title, column family or fields, log scale)
CHARTS: list[tuple[str, str | tuple[str, ...], bool]] = [
    ("learning rate", "lr", False),
    ("gradient norm", "grad_norm", True),
    ("update norm", "update_norm", True),
    ("update / parameter norm", "update_ratio", True),
    ("client scalars", "scalars", False),
    ("skipped steps, non-finite values", ("skipped", "nonfinite"), False),
    ("parameter norm", "param_norm", True),
    ("steps per second", "rate", False),
]


class WatchUnavailable(Exception):
    """plotext is not installed."""


def _plotext() -> Any:
    try:
        import plotext
    except ImportError:
        raise WatchUnavailable(f"optserve watch draws with plotext: {WATCH_HINT}") from None
    return plotext


def rate(n: list[Any], t: list[Any]) -> list[float | None]:
    """Steps per second over a window of about 2% of the points (as the web page does)."""
    k = max(1, round(len(n) / 50))
    out: list[float | None] = []
    for i in range(len(n)):
        j = max(0, i - k)
        dt = (t[i] or 0) - (t[j] or 0)
        out.append((n[i] - n[j]) / dt if i > 0 and dt > 0 else None)
    return out


def _series(h: History, what: str | tuple[str, ...]) -> list[tuple[str, list[Any], list[Any]]]:
    """(label, max values, min values) per curve of one chart."""
    cols = h.columns
    if what == "rate":
        values = rate(cols.get("n.max", []), cols.get("time.max", []))
        return [("steps/s", values, values)]
    names = [f for f in what] if isinstance(what, tuple) else \
        [f.removesuffix(".max") for f in h.fields
         if f.startswith(what + ".") and f.endswith(".max")]
    out = []
    for name in names:
        if f"{name}.max" not in cols:
            continue
        label = name.split(".", 1)[1] if "." in name else name
        if what in ("lr", "grad_norm", "update_norm", "param_norm", "update_ratio"):
            label = f"group {label}"
        out.append((label, cols[f"{name}.max"], cols[f"{name}.min"]))
    return out


def _usable(v: Any, log: bool) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)


#: the charts kept first where not all fit (those with data before those without)
PRIORITY = ["client scalars", "learning rate", "gradient norm", "update / parameter norm",
            "update norm", "skipped steps, non-finite values", "parameter norm",
            "steps per second"]
#: the fewest terminal rows and columns a chart is drawn in: its title, frame and x labels take
#: 4 rows, and fewer than 10 left a curve one or two rows
MIN_CHART_ROWS = 10
MIN_CHART_COLS = 38


def fit(width: int, height: int, has_data: list[bool]) -> tuple[list[int], int]:
    """Which charts (indexes into :data:`CHARTS`, in its order) a ``width`` x ``height``
    terminal shows, and in how many columns: each chart at least :data:`MIN_CHART_COLS` x
    :data:`MIN_CHART_ROWS` (three lines kept: the title and a note of those left out); where
    not all fit, those with data first, in :data:`PRIORITY` order."""
    cols = 2 if width >= 2 * MIN_CHART_COLS else 1
    room = max(1, (height - 3) // MIN_CHART_ROWS) * cols
    if room >= len(CHARTS):
        return list(range(len(CHARTS))), cols
    order = sorted(range(len(CHARTS)),
                   key=lambda i: (not has_data[i], PRIORITY.index(CHARTS[i][0])))
    return sorted(order[:room]), cols


def _curves(h: History, x: list[Any], what: str | tuple[str, ...], log: bool
            ) -> list[tuple[str | None, list[Any], list[Any]]]:
    """(label, or None for a curve of bucket minimums, x values, y values) per curve of one
    chart, only the points it can draw."""
    out: list[tuple[str | None, list[Any], list[Any]]] = []
    for label, highs, lows in _series(h, what):
        # one row per bucket: min and max are the same curve
        same = all(a == b for a, b in zip(highs, lows, strict=False))
        for values, named in ((highs, True),) if same else ((highs, True), (lows, False)):
            pts = [(a, b) for a, b in zip(x, values, strict=False) if _usable(b, log)]
            if pts:
                out.append((label if named else None, [a for a, _ in pts], [b for _, b in pts]))
    return out


def render(h: History, title: str, width: int, height: int, color: bool = False) -> str:
    """One frame: a title line and a grid of plots, ``width`` x ``height`` cells. A terminal
    too small for every chart at :data:`MIN_CHART_ROWS` rows shows fewer (:func:`fit`), and
    a line names those left out."""
    plt = _plotext()
    x = h.columns.get("n.max", [])
    curves = [_curves(h, x, what, log) for _, what, log in CHARTS]
    shown, cols = fit(width, height, [bool(c) for c in curves])
    left_out = [CHARTS[i][0] for i in range(len(CHARTS)) if i not in shown]
    note = textwrap.wrap(f"not shown ({height} rows; a taller terminal shows them): "
                         + "; ".join(left_out), max(width, 20)) if left_out else []
    rows = math.ceil(len(shown) / cols)
    fig = plt.figure
    fig.clear()
    head = textwrap.wrap(title, max(width, 20))  # (a long one: on two lines, not cut)
    fig.plot_size(width, max(rows * MIN_CHART_ROWS, height - len(head) - len(note)))
    fig.subplots(rows, cols)
    for k, i in enumerate(shown):
        name, _, log = CHARTS[i]
        p = fig.subplot(k // cols + 1, k % cols + 1)
        plotted: set[float] = set()
        for label, xs, ys in curves[i]:
            plotted.update(ys)
            s = p.signal(xs, ys)
            s.lines()
            if label is not None:
                s.label(label)
            p.draw(s)
        p.title(name if curves[i] else f"{name} (no data)")
        if len(plotted) == 1:
            # a flat series (a constant lr): plotext widens its range to value ± 1 and labels
            # ticks of that (a constant 0.1 read -1.0); one tick, labelled with the value
            (v,) = plotted
            half = abs(v) / 2 or 1.0
            p.ruler("y").lim(v - half, v + half)
            p.ruler("y").ticks([v], [f"{v:.4g}"])
        elif log and plotted:
            # a log scale needs a range: plotext widens a flat one to value ± 1 and takes the
            # log of that (a ValueError at or below 1: a first step's update ratio)
            p.ruler("y").scale("log")
    out: str = fig.build().string(colorless=not color)
    return "\n".join([*head, *note, out])


def headline(sid: str, h: History, latest: History | None = None) -> str:
    """The title line; ``latest``: the newest row itself (the plotted buckets are min/max
    over several rows)."""
    cols = h.columns
    parts = [f"optserve watch {sid}", f"{h.rows} steps"]
    if h.last is not None:
        parts.append(f"last n {h.last}")
    for name, values in sorted((latest.columns if latest else {}).items()):
        if name.startswith("scalars.") and values and isinstance(values[-1], (int, float)):
            parts.append(f"{name.removeprefix('scalars.')} {values[-1]:.4g}")
    steps = [v for v in rate(cols.get("n.max", []), cols.get("time.max", [])) if v]
    if steps:
        parts.append(f"{steps[-1]:.1f} steps/s")
    skipped = sum(1 for v in cols.get("skipped.max", []) if v)
    if skipped:
        parts.append(f"skipped steps in {skipped} buckets")
    return " · ".join(parts)


def watch(client: Client, sid: str, *, interval: float = 1.0, frames: int = 0,
          out: TextIO | None = None, color: bool | None = None,
          size: tuple[int, int] | None = None) -> int:
    """Draw ``frames`` frames (0: until Ctrl-C), one every ``interval`` seconds."""
    _plotext()
    stream = out or sys.stdout
    tty = stream.isatty()
    color = tty if color is None else color
    drawn = 0
    try:
        while True:
            width, height = size or shutil.get_terminal_size((120, 40))
            h = client.history(sid, fields=FIELDS, points=max(10, (width - 20) // 4))
            latest = (client.history(sid, since=h.last - 1, fields=["scalars"])
                      if h.last else None)
            frame = render(h, headline(sid, h, latest), width, height, color)
            if tty:
                stream.write("\x1b[H\x1b[2J")
            stream.write(frame + "\n")
            stream.flush()
            drawn += 1
            if frames and drawn >= frames:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
