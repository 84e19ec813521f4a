"""A dependency-free progress bar for the command-line tool's downloads and uploads.

:func:`render` is a pure function (tested on its own); :class:`ProgressBar` redraws it on one
terminal line (``\\r``) at most every ``interval`` seconds and ends the line when closed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["ProgressBar", "format_bytes", "format_duration", "render", "should_show"]

#: Below this many bytes a transfer is quick enough that a bar would only flicker.
DEFAULT_THRESHOLD = 1 << 20

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; bytes below 1 KiB are shown whole (``"512 B"``)."""
    value = float(max(n, 0))
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1:15"``; ``3725`` -> ``"1:02:05"``."""
    total = max(int(seconds + 0.5), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render(label: str, done: int, total: int | None, elapsed: float, width: int = 80) -> str:
    """One line, at most ``width`` characters, describing a transfer.

    With a known ``total``: ``label  42% [#########-----------] 4.2 MiB/10.0 MiB 3.1 MiB/s
    ETA 0:02``; without one (no ``Content-Length``): ``label 4.2 MiB 3.1 MiB/s``. The bar
    shrinks to fit ``width`` and is dropped when there is no room for it.
    """
    rate = done / elapsed if elapsed > 0 else 0.0
    speed = f"{format_bytes(rate)}/s"
    if total is None or total <= 0:
        line = f"{label} {format_bytes(done)} {speed}"
        return line[:width]
    frac = min(max(done / total, 0.0), 1.0)
    if done >= total:
        tail = f"{format_bytes(done)} {speed} in {format_duration(elapsed)}"
    else:
        eta = format_duration((total - done) / rate) if rate > 0 else "--:--"
        tail = f"{format_bytes(done)}/{format_bytes(total)} {speed} ETA {eta}"
    head = f"{label} {frac * 100:3.0f}%"
    room = width - len(head) - len(tail) - 4  # two spaces and the brackets
    if room < 5:
        return f"{head} {tail}"[:width]
    bar_width = min(room, 40)
    filled = int(frac * bar_width)
    return f"{head} [{'#' * filled}{'-' * (bar_width - filled)}] {tail}"


def should_show(mode: str, stream: TextIO, total: int | None,
                threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Whether to draw a bar: ``mode`` is ``"always"``, ``"never"`` or ``"auto"`` (only on a
    terminal, and only for transfers of unknown size or of at least ``threshold`` bytes)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and (total is None or total >= threshold)


class ProgressBar:
    """Draws :func:`render` on ``stream``; a no-op when ``enabled`` is false."""

    def __init__(
        self,
        label: str,
        total: int | None,
        stream: TextIO,
        *,
        enabled: bool = True,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        width: int | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.stream = stream
        self.enabled = enabled
        self.interval = interval
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_draw: float | None = None
        self._width = width
        self._closed = False

    def _columns(self) -> int:
        if self._width is not None:
            return self._width
        return max(shutil.get_terminal_size((80, 24)).columns - 1, 20)

    def _draw(self, final: bool = False) -> None:
        now = self._clock()
        line = render(self.label, self.done, self.total, now - self._start, self._columns())
        self.stream.write("\r" + line.ljust(self._columns()) + ("\n" if final else ""))
        self.stream.flush()
        self._last_draw = now

    def update(self, n: int) -> None:
        """Count ``n`` more bytes and redraw if ``interval`` has passed since the last draw."""
        self.done += n
        if not self.enabled or self._closed:
            return
        if self._last_draw is None or self._clock() - self._last_draw >= self.interval:
            self._draw()

    def close(self, success: bool = True) -> None:
        """Draw the final state (when ``success``) and end the line; idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if success:
            self._draw(final=True)
        elif self._last_draw is not None:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(success=exc_type is None)
