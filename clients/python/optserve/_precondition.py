"""The words of the 412 ``precondition_failed`` a conditional change gets when the session has
left the version it names, in one place for the server, which answers it
(``app.errors.PreconditionFailed``, ``app.engine.ops.base.Expected.check_at``), and the SDK,
which makes that same answer itself where a read already shows it (``optserve._stale``). They
live here, in the SDK's package, because the SDK installs without the server; the server
ships the SDK's package and takes them from here, as it takes ``optserve._gc``. Plain text
only: nothing here may import anything of either side."""

from __future__ import annotations

__all__ = ["CODE", "NOTHING_DONE", "TITLE", "version_left"]

#: the problem's machine-readable ``code`` (its ``type`` is ``urn:optserve:problem:<code>``)
CODE = "precondition_failed"
#: the problem's ``title``
TITLE = "Precondition failed"
#: what a refused change did
NOTHING_DONE = "nothing was done"


def version_left(version: int, named: str, outcome: str = NOTHING_DONE) -> str:
    """The problem's ``detail``: the session is at ``version``, which is not what the request
    ``named`` (``"not 5"``, ``"at none of 4, 5"``), and ``outcome`` says what came of it."""
    return (f"the session is at version {version}, {named}: it changed since it was read "
            f"({outcome}); read it again")
