"""Conditional reads against a real uvicorn server: ``GET`` of the session, of its parameters
(whole, and rows: also ``POST .../params/rows``) and of its state dict evaluate ``If-Match:
"<version>"`` (RFC 9110 has an origin server evaluate it on any method). At the session's
version they answer as without it, bit for bit as an in-process ``torch.optim``; at another, a
412 ``precondition_failed`` naming ``If-Match`` with the current version, and nothing else. So
a client reads the state dict only at the version of the parameters it read."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import torch

from app.wire.tree import tree_from_json
from tests.integration.test_conditional_import import Pair, http  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

READS = ["session", "params", "params binary", "rows", "rows posted", "state_dict",
         "state_dict binary"]


def read(pair: Pair, what: str, headers: dict[str, str]) -> httpx.Response:
    if what == "rows posted":  # (POST .../params/rows: a read, for long row lists)
        return pair.http.post(f"{pair.url}/params/rows", params={"encoding": "b64"},
                              json={"rows": {"w": [1, 4]}}, headers=headers)
    url = {"session": pair.url, "rows": f"{pair.url}/params",
           "state_dict": f"{pair.url}/state_dict", "state_dict binary": f"{pair.url}/state_dict",
           "params": f"{pair.url}/params", "params binary": f"{pair.url}/params"}[what]
    params: dict[str, Any] = {"encoding": "b64"} if what in ("params", "state_dict") else {}
    if what == "rows":
        params = {"name": "w", "rows": "1,4", "encoding": "b64"}
    if what.endswith("binary"):
        headers = {**headers, "Accept": "application/octet-stream"}
    return pair.http.get(url, params=params, headers=headers)


def answered_as_torch(pair: Pair, what: str, r: httpx.Response) -> None:
    """The answer is the twin's: its parameters (rows), state or description."""
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == f'"{pair.steps}"'
    if what == "session":
        assert r.json()["version"] == pair.steps
        assert r.json()["lr"] == [g["lr"] for g in pair.opt.param_groups]
    elif what == "params":
        pair.same_params(r.json()["params"])
    elif what in ("rows", "rows posted"):
        rows = r.json()["params"]["w"]  # (row-sparse: the rows asked, app.wire.sparse)
        assert rows["indices"] == [1, 4]
        assert torch.equal(tree_from_json(rows["values"], "w"), pair.local[0][[1, 4]])
    elif what == "state_dict":
        sd, mine = tree_from_json(r.json(), "sd"), pair.opt.state_dict()
        for pid, entry in mine["state"].items():
            for key, value in entry.items():
                assert torch.equal(sd["state"][str(pid)][key], value), (pid, key)
    else:  # (safetensors: the bytes are there, their values checked by the JSON reads)
        assert r.headers["content-type"] == "application/octet-stream" and r.content


@pytest.mark.parametrize("what", READS)
def test_a_read_at_another_version_is_a_412_and_at_its_own_answers_as_torch(
        http: httpx.Client, what: str) -> None:  # noqa: F811 - the fixture
    pair = Pair(http)
    pair.step()
    pair.step()
    for tag in ('"2"', "2"):  # (W/"2": never, RFC 9110's strong comparison)
        answered_as_torch(pair, what, read(pair, what, {"If-Match": tag}))
    for stale in ('"1"', '"3"'):
        r = read(pair, what, {"If-Match": stale})
        assert r.status_code == 412, r.text
        problem = r.json()
        assert r.headers["content-type"].startswith("application/problem+json")
        assert problem["code"] == "precondition_failed" and problem["field"] == "If-Match"
        assert problem["current_version"] == 2 and problem["base_version"] == int(stale[1])
        assert (r.headers["etag"], r.headers["x-optserve-version"]) == ('"2"', "2")
    pair.patch_lr(0.01)  # (the version is the parameters': an option change keeps it)
    answered_as_torch(pair, what, read(pair, what, {"If-Match": '"2"'}))
    pair.step()
    assert read(pair, what, {"If-Match": '"2"'}).status_code == 412
    answered_as_torch(pair, what, read(pair, what, {"If-Match": '"3"'}))
    answered_as_torch(pair, what, read(pair, what, {}))


def test_if_match_is_evaluated_before_if_none_match_and_on_the_long_polls_answer(
        http: httpx.Client) -> None:  # noqa: F811 - the fixture
    """``If-Match`` false: 412, whatever ``If-None-Match`` says (RFC 9110 13.2.2); true: the
    304 as before. On a long poll it is evaluated on the version answered."""
    pair = Pair(http)
    pair.step()
    url = f"{pair.url}/params"
    assert http.get(url, headers={"If-Match": '"1"', "If-None-Match": '"1"'}).status_code == 304
    r = http.get(url, headers={"If-Match": '"0"', "If-None-Match": '"1"'})
    assert r.status_code == 412 and r.json()["current_version"] == 1
    r = http.get(url, params={"min_version": 1, "wait_s": 5}, headers={"If-Match": '"1"'})
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    r = http.get(url, params={"min_version": 1, "wait_s": 5}, headers={"If-Match": '"0"'})
    assert r.status_code == 412 and r.json()["current_version"] == 1


@pytest.mark.parametrize("tag", ['"a"', '"1", "a"', '*, "1"', '""', 'W/"x"', '"1" "2"',
                                 '"01"', '"1", "00"'])
def test_a_read_with_a_malformed_if_match_is_a_422(
        http: httpx.Client, tag: str) -> None:  # noqa: F811 - the fixture
    pair = Pair(http)
    for what in ("session", "params", "state_dict"):
        r = read(pair, what, {"If-Match": tag})
        assert r.status_code == 422, (what, r.text)
        assert r.json()["field"] == "If-Match"
