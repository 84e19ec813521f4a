"""What the embedded session host (:class:`~app.engine.host.EmbeddedHost`) shares with its
parts (:mod:`app.engine.host_restore`, :mod:`app.engine.host_upkeep`,
:mod:`app.engine.host_shard_hooks`): its settings, device and worker, its store, the sessions
it serves and the ones out of service. The host makes it once; every part holds the same
objects (never copies), and none of them is ever replaced."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from app.engine.session import Session
from app.engine.store import Store
from app.engine.worker import DeviceWorker
from app.errors import Unavailable

if TYPE_CHECKING:
    from app.engine.host import HostConfig


@dataclass
class Damage:
    """Why a session is out of service, and when it may next be restored from its store
    (monotonic seconds; None: it keeps nothing on disk to restore it from)."""

    reason: str
    retry_at: float | None

    def error(self, session_id: str) -> Unavailable:
        """The 503 ``session_damaged`` that every operation on it gets meanwhile."""
        shown = f"session {session_id!r:.140} is out of service: {self.reason}"
        if self.retry_at is None:
            return Unavailable(f"{shown}; it cannot be restored: delete it",
                               code="session_damaged", retry_after=None)
        wait = float(math.ceil(max(self.retry_at - time.monotonic(), 0.0)))
        return Unavailable(f"{shown}; it is restored from its store at its first use after "
                           f"{wait:.0f} s, once the store works again (or delete it)",
                           code="session_damaged", retry_after=wait)


@dataclass(eq=False)
class HostState:
    """The host's settings, device, device worker and store (None: it keeps nothing on
    disk), the sessions it serves by key, and those out of service (by key: why, and when
    they are next restored)."""

    config: HostConfig
    device: torch.device
    worker: DeviceWorker
    store: Store | None
    sessions: dict[str, Session]
    damaged: dict[str, Damage]
