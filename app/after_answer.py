"""Bookkeeping a request's answer need not wait for, run on the event loop's next turn.

A step's metrics (its outcome's counter, its phases' and its device time's histograms) were
counted before its answer was written: each a lock and a walk of the buckets in
``prometheus_client``, together a few hundredths of a millisecond of the answer's latency at
1,000 parameters. :func:`later` runs them once the task that asked has let go of the loop: for
a step, after its answer is written (nothing on the step's path waits between the count and
the write). Callbacks the loop runs come before it reads the next request from any
connection, so a ``GET /metrics`` sent after an answer was read counts that request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def later(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` on the running event loop's next turn; now, on a thread without a running
    loop (a device worker's)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        fn(*args)
        return
    loop.call_soon(fn, *args)
