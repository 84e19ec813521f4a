"""Sessions' long-lived objects kept out of the cyclic garbage collector's walks (the server
process only: :func:`app.runtime.settle_gc` turns it on unless
``OPTSERVE_GC_FREEZE_SESSIONS=0``).

A session of 100,000 one-element Adam parameters holds about 900,000 objects the collector
tracks (each parameter, and once stepped its state: a dict and three tensors). Every full
(generation 2) collection walked them all, 0.13-0.25 s of CPU holding the interpreter lock
(up to 0.9 s of wall time on a loaded machine), so every other request (any tenant's,
``/healthz`` too) waited that long; a many-tensor step's own temporaries trigger one every
step or two. :class:`Settler` moves them out of the collector's
sight (``gc.freeze``) once an operation has left enough new ones: after a create, an import, a
new param group, an overwrite, a step that made optimizer state, a restart's restore.

What freezing costs, and how it is bounded:

- objects freed by reference counting are freed frozen or not: a deleted session's parameters
  and state go at once (a deleted session leaves no cyclic garbage: no reference cycle holds
  any of its objects, checked for the optimizer and scheduler kinds of
  ``tests/unit/test_gc_settle.py``). One exception: the first optimizer a process makes
  imports parts of torch lazily, and that import leaves a cycle of frames that holds the first
  session built (the server's warm-up makes that optimizer before any session);
- but ``gc.freeze`` freezes every tracked object alive at that moment, also another request's
  in flight, and cyclic garbage among frozen objects is never collected while they stay
  frozen. So once the host has been idle for a minute (``EmbeddedHost``'s idle loop,
  ``SWEEP_IDLE_POLLS``) and it froze since the last sweep, :meth:`Settler.sweep` unfreezes
  everything, runs one full collection and freezes again: one full collection of everything
  per idle stretch that follows a freeze (a training loop whose sessions stop growing
  freezes nothing, and so sweeps nothing). Swept after two idle seconds instead, it ran
  between the steps of a client whose 100,000 tensors took seconds to encode (0.31 s of CPU),
  and the next step waited for it;
- a host that is never idle for a minute (clients stepping all the time while sessions come
  and go) sweeps anyway once :data:`SWEEP_AFTER_S` have passed since the first freeze that no
  sweep followed (:meth:`Settler.overdue`): what a freeze trapped is held ten minutes at most,
  at the cost of one full collection per ten minutes in which something froze.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger("optserve")

#: new long-lived tensors (parameters and optimizer state entries) that make a freeze: a
#: session of fewer leaves them to the collector until others join them
SETTLE_TENSORS = 10_000
#: seconds after the first freeze since the last sweep at which the host sweeps even when it
#: is never idle (what that freeze trapped is then freed)
SWEEP_AFTER_S = 600.0


class Settler:
    """Counts the long-lived tensors operations leave (:meth:`grew`) and freezes the process's
    tracked objects once :data:`SETTLE_TENSORS` have gathered; :meth:`sweep` frees what a
    freeze trapped. Off (every call a no-op) until :meth:`enable`."""

    def __init__(self, settle_tensors: int = SETTLE_TENSORS) -> None:
        self.enabled = False
        self.settle_tensors = settle_tensors
        #: long-lived tensors left since the last freeze
        self.pending = 0
        #: freezes since the last sweep
        self.freezes = 0
        #: sweeps done (how many full collections this policy ran)
        self.sweeps = 0
        #: when (``time.monotonic()``) the first freeze since the last sweep happened
        self.frozen_since: float | None = None
        self._lock = threading.Lock()  # (operations end on the event loop and the worker)

    def enable(self, on: bool = True) -> None:
        self.enabled = on

    def grew(self, tensors: int) -> bool:
        """An operation left ``tensors`` new long-lived tensors; freeze once enough have
        gathered. True when it froze."""
        if not self.enabled or tensors <= 0:
            return False
        with self._lock:
            self.pending += tensors
            if self.pending < self.settle_tensors:
                return False
            self.pending = 0
            self.freezes += 1
            if self.frozen_since is None:
                self.frozen_since = time.monotonic()
            gc.freeze()
        return True

    def overdue(self, after_s: float = SWEEP_AFTER_S) -> bool:
        """True when something froze at least ``after_s`` seconds ago and no sweep followed:
        time to sweep whether or not the host rests."""
        since = self.frozen_since
        return bool(self.freezes) and since is not None and time.monotonic() - since >= after_s

    def sweep(self) -> bool:
        """If anything was frozen since the last sweep: everything back in the collector's
        sight, one full collection (frees cyclic garbage a freeze trapped), frozen again. True
        when it swept."""
        if not self.enabled:
            return False
        with self._lock:
            if not self.freezes:
                return False
            self.freezes = 0
            self.frozen_since = None
            started = time.perf_counter()
            gc.unfreeze()
            freed = gc.collect()
            gc.freeze()
            self.sweeps += 1  # (counted once frozen again: another thread may look meanwhile)
        log.debug("garbage collector swept: %d objects freed in %.3f s", freed,
                  time.perf_counter() - started)
        return True


#: the process's settler (the server's :func:`app.runtime.settle_gc` enables it)
settler = Settler()

