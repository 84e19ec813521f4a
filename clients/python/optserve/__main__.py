"""``python -m optserve ARGS``: the ``optserve`` command line (an environment without the
console script on its ``PATH``, or the SDK used from a checkout with ``PYTHONPATH``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
