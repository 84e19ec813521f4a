"""A read of the state dict refused 412 (``GET .../state_dict`` with an ``If-Match`` the session
has left) carries the state tag a 200 or a 304 would give, ``X-Optserve-State-Tag:
"r<revision>.<token>"`` and ``current_state_tag`` in its problem, beside the version headers:
a client resyncs from the refusal without another read (sent back as ``If-None-Match``, the tag
is a 304). Against a real uvicorn server, on both engines, sessions sharded and not; the state
answered after it is an in-process ``torch.optim`` twin's, bit for bit."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.conftest import ENGINES
from tests.integration.test_conditional_import import Pair
from tests.integration.test_conditional_reads import answered_as_torch

pytestmark = [pytest.mark.integration,
              pytest.mark.parametrize("engine_url", ENGINES, indirect=True)]


def refused_with_tag(r: httpx.Response, etag: str) -> str:
    """``r`` is the 412 of a stale ``If-Match`` on the state dict, at ``etag``: its state tag,
    the same in the header and the problem."""
    assert r.status_code == 412, r.text
    problem: dict[str, Any] = r.json()
    assert (problem["code"], problem["field"]) == ("precondition_failed", "If-Match")
    assert r.headers["etag"] == etag == f'"{problem["current_version"]}"'
    assert r.headers["x-optserve-revision"] == str(problem["current_revision"])
    tag = r.headers["x-optserve-state-tag"]
    assert problem["current_state_tag"] == tag
    assert tag.startswith(f'"r{problem["current_revision"]}.'), tag
    return tag


@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "safetensors"])
def test_a_412_on_the_state_dict_carries_the_tag_a_200_gives(
        http: httpx.Client, shards: int, binary: bool) -> None:
    """A stale ``If-Match`` alone (the state read, then refused), and with a state tag in
    ``If-None-Match`` (the current one or an old one: ``If-Match`` is evaluated first, RFC
    9110 13.2.2, so the 412 comes from the description): the 412's tag equals the one the
    following 200 gives; sent back, it is a 304. After an lr change (the version, so the
    ETag, unchanged; the revision moved), the 412's tag is the new one."""
    pair = Pair(http, shards)
    pair.step()
    pair.step()
    url = f"{pair.url}/state_dict"
    accept = {"Accept": "application/octet-stream"} if binary else {}
    old = pair.export().headers["x-optserve-state-tag"]
    pair.patch_lr(0.01)  # (the revision moves, the version does not)
    stale = {**accept, "If-Match": '"1"'}
    tags = [refused_with_tag(http.get(url, headers=stale), '"2"')]
    for held in (old, f"W/{old}"):
        tags.append(refused_with_tag(
            http.get(url, headers={**stale, "If-None-Match": held}), '"2"'))
    whole = pair.export()
    answered_as_torch(pair, "state_dict", whole)
    current = whole.headers["x-optserve-state-tag"]
    assert current != old
    tags.append(refused_with_tag(http.get(url, headers={**stale, "If-None-Match": current}),
                                 '"2"'))
    assert tags == [current] * len(tags)
    again = http.get(url, headers={**accept, "If-None-Match": tags[0]})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["x-optserve-state-tag"] == current
    pair.step()
    r = http.get(url, headers={**accept, "If-Match": '"2"', "If-None-Match": current})
    after_step = refused_with_tag(r, '"3"')
    whole = pair.export()
    answered_as_torch(pair, "state_dict", whole)
    assert after_step == whole.headers["x-optserve-state-tag"] != current
