"""The cyclic garbage collector paused while the SDK handles many tensors at once.

A step of a many-tensor model makes and drops a few Python objects per tensor (its header's
entries, wire tensors, views): tens of thousands that live for the whole request, long enough
to be promoted, so the collector ran full collections in the middle of it, each walking every
object of the training process (torch's, the model's). At 16,000 tensors that was about half
of the SDK's CPU time in a step (two or three full collections). None of those objects forms
a cycle: they are freed by reference counting when the step is done, paused or not.

The pause covers that per-tensor work only, wherever 1,000 tensors or more travel: encoding a
request (``optserve._api.step``, ``create_session``, ``put_params``, an LBFGS step's
evaluations, ``pull_rows``; the gradients copied into their shared slots), decoding its answer
(:class:`~optserve._api.APICall`'s ``gc_tensors``, or the tensors the answer holds, counted in
it: a pull's answer has as many as the session, which its caller may not know), a
``RemoteOptimizer`` gathering its gradients and copying the new values in (its steps, its
LBFGS evaluations, ``pull_params``), ``optserve.pull_params``'s copies. Never the wait for the
answer (a long-polled pull, a sync round's push that waits long for the other workers' pushes,
an LBFGS evaluation's closure): the collector is the whole process's, and the process's other
threads go on meanwhile. Each pause's end may run one collection at once.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

#: the tensors from which a step or a create pauses the collector (as the server pauses it
#: for a header of 1,000 tensors)
PAUSE_GC_TENSORS = 1000

_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic cyclic collection while the block runs; counted, so that threads pausing
    at once resume it only when the last one is done, and left as it was (a process that
    disabled it keeps it so). The server's pause (``app.runtime.gc_paused``) is this one."""
    global _pauses, _was_enabled
    with _lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()


@contextlib.contextmanager
def gc_paused(tensors: int) -> Iterator[None]:
    """:func:`paused`, for ``tensors`` of at least :data:`PAUSE_GC_TENSORS`."""
    if tensors < PAUSE_GC_TENSORS:
        yield
        return
    with paused():
        yield
