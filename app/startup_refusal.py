"""A start the app refuses for a reason it can say in one line (the data directory held by
another process: :class:`~app.engine.data_dir_lock.DataDirInUse`), said in that one line.

The lifespan notes the reason in ``app.state.startup_problem`` before its exception goes on
to uvicorn, which logs that exception's traceback and "Application startup failed. Exiting."
on ``uvicorn.error``: :class:`StartupRefusal` leaves those out. ``python -m app`` prints the
line itself once uvicorn gave up (and exits 2, as for a configuration that cannot work: this
one cannot while the other process runs); under ``uvicorn --factory app.main:create_app`` the
lifespan prints it (:func:`say`), and the process exits with uvicorn's own code for a failed
startup, 3 (the lifespan cannot choose it: uvicorn catches whatever it raises, ``SystemExit``
included). Any other startup failure is logged as ever.
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any

#: the logger uvicorn logs a failed lifespan on
UVICORN_LOG = "uvicorn.error"


def line(problem: str) -> str:
    """The one line a refused start says, on stderr."""
    return f"optserve: cannot start: {problem}"


def say(problem: str) -> None:
    print(line(problem), file=sys.stderr, flush=True)


class StartupRefusal(logging.Filter):
    """uvicorn's log of a lifespan that refused to start for a reason the app noted
    (``app.state.startup_problem``): left out, the traceback and "Application startup
    failed" with it, since the reason is said in one line. Any other record passes. (The
    app is held weakly: the factory's filter stays on uvicorn's logger, and keeps no app
    alive.)"""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self._app = weakref.ref(app)

    def filter(self, record: logging.LogRecord) -> bool:
        app = self._app()
        return app is None or getattr(app.state, "startup_problem", None) is None
