"""The 412 a conditional import would get, made here when a ``GET`` just before it already
shows that its ``If-Match`` cannot hold (``RemoteOptimizer``'s write-back of an ``opt.state``
edit read at a version the session has left): the same :class:`PreconditionFailedError`, with
the problem the server answers (``precondition_failed``, naming ``If-Match``, the current
version, step and revision), without uploading the whole state only to be refused."""

from __future__ import annotations

import httpx

from ._api import _sid
from ._client import Client
from ._constants import REVISION_HEADER, STEP_HEADER, VERSION_HEADER
from ._exceptions import PreconditionFailedError, make_status_error
from ._types import SessionInfo

__all__ = ["stale_import"]


def stale_import(client: Client, session_id: str, info: SessionInfo,
                 base_version: int) -> PreconditionFailedError:
    """The server's 412 to ``PUT .../state_dict`` with ``If-Match: "<base_version>"`` on the
    session ``info`` describes (at another version)."""
    problem: dict[str, object] = {
        "type": "urn:optserve:problem:precondition_failed",
        "title": "Precondition failed",
        "status": 412,
        "detail": f"the session is at version {info.version}, not {base_version}: it changed "
                  "since it was read (nothing was done); read it again",
        "code": "precondition_failed",
        "field": "If-Match",
        "current_version": info.version,
        "base_version": base_version,
        "current_step": info.step,
    }
    headers = {"ETag": f'"{info.version}"', VERSION_HEADER: str(info.version),
               STEP_HEADER: str(info.step), "Content-Type": "application/problem+json"}
    if info.revision is not None:
        problem["current_revision"] = info.revision
        headers[REVISION_HEADER] = str(info.revision)
    request = httpx.Request("PUT", client.base_url + _sid(session_id) + "/state_dict",
                            headers={"If-Match": f'"{base_version}"'})
    error = make_status_error(httpx.Response(412, headers=headers, json=problem,
                                             request=request))
    assert isinstance(error, PreconditionFailedError)
    return error
