"""The 412 a conditional import would get, made here when a ``GET`` just before it already
shows that its ``If-Match`` cannot hold (``RemoteOptimizer``'s write-back of an ``opt.state``
edit read at a version the session has left): the same :class:`PreconditionFailedError`, with
the problem the server answers (``precondition_failed``, naming ``If-Match``, the current
version, step and revision; its words are the server's own, ``optserve._precondition``),
without uploading the whole state only to be refused."""

from __future__ import annotations

import httpx

from . import _precondition
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
        "type": f"urn:optserve:problem:{_precondition.CODE}",
        "title": _precondition.TITLE,
        "status": 412,
        "detail": _precondition.version_left(info.version, f"not {base_version}"),
        "code": _precondition.CODE,
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
