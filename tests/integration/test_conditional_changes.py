"""Conditional changes against a real uvicorn server: ``PUT .../params``, ``PATCH`` of the
session, ``POST .../param_groups``, ``PATCH .../param_groups/{i}``, ``POST
.../scheduler/step`` and ``DELETE`` take a precondition as ``PUT .../state_dict`` does (``If-Match:
"<version>"``, ``?base_version=`` or ``?base_revision=``). Naming a version or revision the
session has left is a 412 ``precondition_failed`` naming what the request sent, and changes
nothing: the parameters, the exported state, the description and the next step are those of
an in-process ``torch.optim`` that never saw the change. Naming the current ones applies it,
bit for bit as torch; a keyed retry of one that applied is answered as it was (not a 412), on a
plain and on a sharded session. ``DELETE`` of the session takes them too."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, ClassVar

import httpx
import pytest
import torch

from app.wire.tree import tree_from_json
from tests.conftest import ENGINES
from tests.integration.test_conditional_import import NAMES, SIZES, wire
from tests.integration.test_conditional_import import Pair as Twin

pytestmark = pytest.mark.integration


class Pair(Twin):
    """A session and an in-process Adam (with a StepLR stepped by hand) that take the same
    steps and changes (the import test's twin: its steps, with a group added here)."""

    options: ClassVar[dict[str, float]] = {"lr": 0.05}
    extra: ClassVar[dict[str, Any]] = {"scheduler": {
        "name": "StepLR", "options": {"step_size": 1, "gamma": 0.5}, "step_on": "manual"}}
    params_seed, id_prefix, seed_base = 11, "cc", 70

    def __init__(self, http: httpx.Client, shards: int) -> None:
        super().__init__(http, shards)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=1, gamma=0.5)
        self.max_staleness: int | None = None

    def named(self) -> dict[str, torch.Tensor]:
        names = [*NAMES, *(["c"] if len(self.opt.param_groups) > 1 else [])]
        flat = [p for g in self.opt.param_groups for p in g["params"]]
        return dict(zip(names, flat, strict=True))

    def read(self) -> tuple[str, int]:
        """The ETag and revision a client reads the session at."""
        r = self.http.get(self.url)
        assert r.status_code == 200, r.text
        return r.headers["etag"], int(r.headers["x-optserve-revision"])

    def same_as_torch(self) -> None:
        """Parameters, exported state (tensors and group options) and description equal
        torch's, bit for bit."""
        r = self.http.get(f"{self.url}/params", params={"encoding": "b64"})
        assert r.status_code == 200, r.text
        self.same_params(r.json()["params"])
        r = self.http.get(f"{self.url}/state_dict", params={"encoding": "b64"})
        assert r.status_code == 200, r.text
        sd, mine = tree_from_json(r.json(), "sd"), self.opt.state_dict()
        assert [int(k) for k in sd["state"]] == list(mine["state"])
        for pid, entry in mine["state"].items():
            for key, value in entry.items():
                assert torch.equal(sd["state"][str(pid)][key], value), (pid, key)
        assert len(sd["param_groups"]) == len(mine["param_groups"])
        for theirs, ours in zip(sd["param_groups"], mine["param_groups"], strict=True):
            assert (theirs["lr"], theirs["params"]) == (ours["lr"], ours["params"])
        assert sd["scheduler"]["last_epoch"] == self.sched.last_epoch
        info = self.http.get(self.url).json()
        assert info["lr"] == [g["lr"] for g in self.opt.param_groups]
        assert info["max_staleness"] == self.max_staleness


def new_w() -> torch.Tensor:
    return torch.arange(SIZES[0], dtype=torch.float32) / 7


#: each change: (its request as keyword arguments of httpx's ``request``, what it does to the
#: in-process twin once applied)
Change = tuple[Callable[[Pair], dict[str, Any]], Callable[[Pair], None]]


def _put_params(pair: Pair) -> None:
    with torch.no_grad():
        pair.local[0].copy_(new_w())


def _patch_session(pair: Pair) -> None:
    pair.max_staleness = 3


def _patch_group(pair: Pair) -> None:
    pair.opt.param_groups[0]["lr"] = 0.02


def _add_group(pair: Pair) -> None:
    pair.opt.add_param_group({"params": [torch.ones(2)], "lr": 0.01})


def _scheduler_step(pair: Pair) -> None:
    pair.sched.step()


CHANGES: dict[str, Change] = {
    "put_params": (lambda p: {"method": "PUT", "url": f"{p.url}/params",
                              "json": {"params": {"w": wire(new_w())}}}, _put_params),
    "patch_session": (lambda p: {"method": "PATCH", "url": p.url,
                                 "json": {"max_staleness": 3}}, _patch_session),
    "patch_group": (lambda p: {"method": "PATCH", "url": f"{p.url}/param_groups/0",
                               "json": {"lr": 0.02}}, _patch_group),
    "add_group": (lambda p: {"method": "POST", "url": f"{p.url}/param_groups",
                             "json": {"params": {"c": wire(torch.ones(2))}, "lr": 0.01}},
                  _add_group),
    "scheduler_step": (lambda p: {"method": "POST", "url": f"{p.url}/scheduler/step"},
                       _scheduler_step),
}
CASES = [(name, shards) for name in CHANGES for shards in (1, 2)
         if not (name == "add_group" and shards > 1)]  # (a sharded layout is fixed at create)


def conditional(request: dict[str, Any], how: str, etag: str, revision: int
                ) -> dict[str, Any]:
    out = dict(request)
    if how == "If-Match":
        out["headers"] = {**out.get("headers", {}), "If-Match": etag}
    elif how == "base_version":
        out["params"] = {"base_version": int(etag.strip('"'))}
    else:
        out["params"] = {"base_revision": revision}
    return out


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize(("name", "shards"), CASES)
@pytest.mark.parametrize("how", ["If-Match", "base_version", "base_revision"])
def test_a_change_applies_only_at_the_version_it_names(http: httpx.Client, name: str,
                                                       shards: int, how: str) -> None:
    request, mirror = CHANGES[name]
    pair = Pair(http, shards)
    pair.step()
    etag, revision = pair.read()
    # another client moves the session on: a step (version and revision), or, for a
    # revision, an lr change only (the version stays)
    if how == "base_revision":
        r = http.patch(f"{pair.url}/param_groups/0", json={"lr": 0.04})
        assert r.status_code == 200, r.text
        pair.opt.param_groups[0]["lr"] = 0.04
    else:
        pair.step()
    now_etag, now_revision = pair.read()
    refused = http.request(**conditional(request(pair), how, etag, revision))
    assert refused.status_code == 412, refused.text
    problem = refused.json()
    assert problem["code"] == "precondition_failed"
    assert problem["field"] == how
    assert f'"{problem["current_version"]}"' == now_etag
    assert problem["current_revision"] == now_revision
    # (the current version headers, as a 200's: a client refreshes without another read)
    assert (refused.headers["etag"], refused.headers["x-optserve-revision"]) == (
        now_etag, str(now_revision))
    assert refused.headers["x-optserve-version"] == now_etag.strip('"')
    assert pair.read() == (now_etag, now_revision)
    pair.same_as_torch()
    if how == "base_revision":  # (the version alone still holds: an lr change is no step)
        assert now_etag == etag
    key = uuid.uuid4().hex
    asked = conditional(request(pair), how, now_etag, now_revision)
    asked["headers"] = {**asked.get("headers", {}), "Idempotency-Key": key}
    done = http.request(**asked)
    assert done.status_code in (200, 201), done.text
    mirror(pair)
    pair.same_as_torch()
    again = http.request(**asked)  # (the session has moved on: answered, not refused)
    assert again.status_code == done.status_code, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("how", ["If-Match", "base_version", "base_revision"])
def test_a_delete_deletes_only_at_the_version_it_names(http: httpx.Client, shards: int,
                                                       how: str) -> None:
    pair = Pair(http, shards)
    pair.step()
    etag, revision = pair.read()
    r = http.patch(f"{pair.url}/param_groups/0", json={"lr": 0.04})  # (the revision moves)
    assert r.status_code == 200, r.text
    pair.opt.param_groups[0]["lr"] = 0.04
    if how != "base_revision":
        pair.step()
    now_etag, now_revision = pair.read()
    refused = http.request(**conditional({"method": "DELETE", "url": pair.url}, how, etag,
                                         revision))
    assert refused.status_code == 412, refused.text
    assert (refused.json()["code"], refused.json()["field"]) == ("precondition_failed", how)
    assert pair.read() == (now_etag, now_revision)
    pair.same_as_torch()
    pair.step()  # (still there, and stepping as torch)
    pair.same_as_torch()
    now_etag, now_revision = pair.read()
    asked = conditional({"method": "DELETE", "url": pair.url}, how, now_etag, now_revision)
    asked["headers"] = {**asked.get("headers", {}), "Idempotency-Key": uuid.uuid4().hex}
    done = http.request(**asked)
    assert done.status_code == 204, done.text
    assert http.get(pair.url).status_code == 404
    again = http.request(**asked)  # (a retry of a delete that was done: answered)
    assert again.status_code == 204, again.text
    assert again.headers.get("idempotent-replayed") == "true"


def test_a_precondition_that_is_not_a_version_is_refused(http: httpx.Client) -> None:
    """``If-Match`` tags that are no versions (``*`` in a list), a query that disagrees with
    the header (``*`` too), and queries that are no versions: 422, with nothing done."""
    pair = Pair(http, 1)
    pair.step()
    etag, revision = pair.read()
    url = f"{pair.url}/param_groups/0"
    for headers, params, field in (({"If-Match": '"a"'}, {}, "If-Match"),
                                   ({"If-Match": f"*, {etag}"}, {}, "If-Match"),
                                   ({"If-Match": "*"}, {"base_version": 1}, "base_version"),
                                   ({"If-Match": f'{etag}, "7"'}, {"base_version": 1},
                                    "base_version"),
                                   ({"If-Match": '"0"'}, {"base_version": 1}, "base_version"),
                                   ({}, {"base_revision": "x"}, "base_revision"),
                                   ({}, {"base_version": -1}, "base_version")):
        r = http.patch(url, json={"lr": 0.3}, headers=headers, params=params)
        assert r.status_code == 422, (headers, params, r.text)
        assert r.json()["field"] == field, (headers, params, r.text)
    assert pair.read() == (etag, revision)
    pair.same_as_torch()
