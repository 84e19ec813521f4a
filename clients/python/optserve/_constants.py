"""Defaults shared by :class:`optserve.Client` and :class:`optserve.AsyncClient`."""

from __future__ import annotations

BASE_URL_ENV = "OPTSERVE_BASE_URL"
API_KEY_ENV = "OPTSERVE_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

DEFAULT_TIMEOUT = 60.0  # seconds, for connect, read, write and pool alike
# Retries: none counted by default (max_retries=None); a failed call is retried while less than
# DEFAULT_RETRY_BUDGET seconds have passed since its first failure (a server restart takes
# 5-15 s on a loaded machine). An int max_retries counts them instead, as before.
DEFAULT_MAX_RETRIES: int | None = None
DEFAULT_RETRY_BUDGET = 60.0

# Retry delay: INITIAL_RETRY_DELAY * 2**attempt, capped at MAX_RETRY_DELAY, then scaled by a
# random factor in [1 - RETRY_JITTER, 1] so that many workers do not retry in lockstep.
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 4.0
RETRY_JITTER = 0.25
# A 503's Retry-After is waited in full up to this (the client's max_retry_after); one past it
# is raised at once, as the server said an earlier retry would fail (session_damaged and
# no_capacity ask 30 s).
DEFAULT_MAX_RETRY_AFTER = 60.0

JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
OCTET_STREAM = "application/octet-stream"

REQUEST_ID_HEADER = "X-Request-Id"
VERSION_HEADER = "X-Optserve-Version"
STEP_HEADER = "X-Optserve-Step"
REVISION_HEADER = "X-Optserve-Revision"
#: a state dict's tag (``"r<revision>.<token>"``, quoted): sent back as is in ``If-None-Match``
STATE_TAG_HEADER = "X-Optserve-State-Tag"
WORKER_HEADER = "X-Optserve-Worker"
MAX_WAIT_S = 60.0  # the server caps long polls (GET .../params?wait_s=) at this

# How to install what an extra adds, as clients/python/README.md installs the SDK: from the
# optserve repository (the package is on no index: an ``optserve[torch]`` from one finds
# nothing), or the extra's own requirement by itself into an environment that has the SDK.
TORCH_HINT = ("pip install torch, or from the optserve repository's root: "
              "pip install './clients/python[torch]'")
WATCH_HINT = ("pip install plotext, or from the optserve repository's root: "
              "pip install './clients/python[watch]'")
