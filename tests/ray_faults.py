"""Ray host actors with a fault injected inside them, for tests: a front's monkeypatch reaches
its own process only, while a sharded session's coordinator calls its shards' hosts from the
host actor of its first shard. A test starts its hosts as one of these
(``monkeypatch.setattr(ray_host, "_actor_class", ...)`` before its front starts); Ray's
workers import this module by name (the repository root is on their path, as for ``app``)."""

from __future__ import annotations

import time
from typing import Any

import ray

from app.engine.ray_host import READ_RETRY_S, HostActor
from app.engine.shards import RevisionTip
from app.errors import Unavailable

#: how long :class:`RevisionTipFailsOnce` fails: a read's retries, and 2 s more
FAILS_FOR_S = READ_RETRY_S + 2.0


class RevisionTipFailsOnce(HostActor):
    """A host whose :meth:`revision_tip` asked through its actor (another host's coordinator
    asking this one's shard) fails as a host restarting does (503 ``host_restarting``) from
    the first ask until :data:`FAILS_FOR_S` later: past the retries of a read
    (:data:`~app.engine.ray_host.READ_RETRY_S`), so that the coordinator's first alignment
    fails, once. Later asks are answered."""

    def __init__(self, name: str, config: dict[str, Any]) -> None:
        super().__init__(name, config)
        self.failing_until: float | None = None
        self.failures = 0

    async def revision_tip(self, key: str) -> RevisionTip:
        now = time.monotonic()
        if self.failing_until is None:
            self.failing_until = now + FAILS_FOR_S
        if now < self.failing_until:
            self.failures += 1
            raise Unavailable(f"the session's host ({self.name}) is restarting",
                              code="host_restarting", retry_after=1.0)
        return await super().revision_tip(key)

    async def revision_tip_failures(self) -> int:
        """How many asks failed (the test checks that the failure was injected)."""
        return self.failures


def revision_tip_fails_once() -> Any:
    """The actor class :func:`app.engine.ray_host._actor_class` makes, of
    :class:`RevisionTipFailsOnce`."""
    return ray.remote(max_restarts=-1, max_task_retries=0)(RevisionTipFailsOnce)
