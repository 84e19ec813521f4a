"""A conditional state import (``PUT .../state_dict`` with ``If-Match: "<version>"``,
``?base_version=`` or ``?base_revision=``), against a real uvicorn server: named a version or
revision the session has left, it is a 412 ``precondition_failed`` that changes nothing (the
exported state, the description and the next step are those of an in-process ``torch.optim``
that never loaded it); named the current ones, it loads bit for bit as torch's
``load_state_dict``; a keyed retry of one that succeeded is answered as it was, not refused."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest
import torch

from app.wire.tree import tree_from_json, tree_to_json

pytestmark = pytest.mark.integration

NAMES, SIZES = ("w", "b"), (6, 3)


@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server, timeout=60) as client:
        yield client


def wire(obj: Any) -> Any:
    out = tree_to_json(obj, b64=True)
    if isinstance(out, dict) and isinstance(out.get("state"), dict):
        out["state"] = {str(k): v for k, v in out["state"].items()}
    return out


class Pair:
    """A session and an in-process Adam that take the same steps."""

    #: Adam's options, on both sides
    options: ClassVar[dict[str, float]] = {"lr": 0.05, "weight_decay": 0.01}
    #: the create body's fields beyond the optimizer, its options and the parameters
    extra: ClassVar[dict[str, Any]] = {}
    #: the parameters' seed, and the session id's prefix
    params_seed, id_prefix = 3, "cond"

    def __init__(self, http: httpx.Client, shards: int = 1) -> None:
        g = torch.Generator().manual_seed(self.params_seed)
        params = [torch.randn(n, generator=g) for n in SIZES]
        self.http, self.sid = http, f"{self.id_prefix}-{uuid.uuid4().hex[:10]}"
        self.local = [p.clone() for p in params]
        self.opt = torch.optim.Adam(self.local, **self.options)
        body: dict[str, Any] = {
            "id": self.sid, "optimizer": "Adam", "options": self.options, **self.extra,
            "params": {n: wire(p) for n, p in zip(NAMES, params, strict=True)}}
        if shards > 1:
            body["shards"] = shards
        r = http.post("/v1/sessions", json=body)
        assert r.status_code == 201, r.text
        self.steps = 0

    #: the step gradients' seeds start here
    seed_base = 40

    @property
    def url(self) -> str:
        return f"/v1/sessions/{self.sid}"

    def named(self) -> dict[str, torch.Tensor]:
        """The twin's parameters by name, in the session's order."""
        return dict(zip(NAMES, self.local, strict=True))

    def step(self) -> None:
        g = torch.Generator().manual_seed(self.seed_base + self.steps)
        self.steps += 1
        grads = {n: torch.randn(p.shape, generator=g) for n, p in self.named().items()}
        for n, p in self.named().items():
            p.grad = grads[n].clone()
        self.opt.step()
        r = self.http.post(f"{self.url}/step", json={
            "grads": {n: wire(grad) for n, grad in grads.items()}})
        assert r.status_code == 200, r.text
        self.same_params(r.json()["params"])

    def same_params(self, got: dict[str, Any]) -> None:
        """Parameters a session answered (JSON tensors) equal the twin's, bit for bit."""
        mine = self.named()
        assert sorted(got) == sorted(mine)
        for n, p in mine.items():
            assert torch.equal(tree_from_json(got[n], n), p), n

    def patch_lr(self, lr: float) -> None:
        self.opt.param_groups[0]["lr"] = lr
        r = self.http.patch(f"{self.url}/param_groups/0", json={"lr": lr})
        assert r.status_code == 200, r.text

    def export(self) -> httpx.Response:
        r = self.http.get(f"{self.url}/state_dict", params={"encoding": "b64"})
        assert r.status_code == 200, r.text
        return r

    def same_as_torch(self) -> None:
        """The exported state dict equals torch's, bit for bit (state and group options)."""
        sd = tree_from_json(self.export().json(), "sd")
        mine = self.opt.state_dict()
        assert [int(k) for k in sd["state"]] == list(mine["state"])
        for pid, entry in mine["state"].items():
            for key, value in entry.items():
                assert torch.equal(sd["state"][str(pid)][key], value), (pid, key)
        for theirs, ours in zip(sd["param_groups"], mine["param_groups"], strict=True):
            assert theirs["lr"] == ours["lr"] and theirs["params"] == ours["params"]


def donor_state(pair: Pair) -> dict[str, Any]:
    """Another run's Adam state for the same parameters (what the imports load)."""
    params = [torch.zeros(n) for n in SIZES]
    donor = torch.optim.Adam(params, lr=0.05, weight_decay=0.01)
    g = torch.Generator().manual_seed(99)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        donor.step()
    sd = copy.deepcopy(donor.state_dict())
    for ours, theirs in zip(pair.opt.state_dict()["param_groups"], sd["param_groups"],
                            strict=True):
        theirs.update({k: v for k, v in ours.items() if k != "params"})
    return sd


@pytest.mark.parametrize(("how", "shards"), [
    ("If-Match", 1), ("base_version", 1), ("base_revision", 1), ("If-Match", 2),
    ("base_revision", 2)])
def test_a_stale_conditional_import_changes_nothing_and_a_current_one_loads_as_torch(
        http: httpx.Client, how: str, shards: int) -> None:
    """Read the state (its ``ETag`` and ``X-Optserve-Revision``); another client steps (for a
    version) or PATCHes the lr (for a revision: the version stays); the import naming what was
    read is a 412 naming ``how``, and the session (full export, description) is as before, its
    next step torch's without the import. Read again and import naming that: it loads as
    torch's ``load_state_dict`` (exported bits, next steps), answered with the new version and
    revision. Sharded sessions (every shard checks under the session's order) alike."""
    pair = Pair(http, shards)
    pair.step()
    pair.step()
    read = pair.export()
    version, revision = int(read.headers["X-Optserve-Version"]), \
        int(read.headers["X-Optserve-Revision"])
    assert read.headers["ETag"] == f'"{version}"'
    if how == "base_revision":
        pair.patch_lr(0.02)  # (not a new version: only the revision tells)
        assert int(pair.export().headers["X-Optserve-Version"]) == version
    else:
        pair.step()
    incoming = donor_state(pair)

    def conditional(version: int, revision: int) -> httpx.Response:
        if how == "If-Match":
            return http.put(f"{pair.url}/state_dict", json=wire(incoming),
                            headers={"If-Match": f'"{version}"'})
        if how == "base_version":
            return http.put(f"{pair.url}/state_dict", json=wire(incoming),
                            params={"base_version": version})
        return http.put(f"{pair.url}/state_dict", json=wire(incoming),
                        params={"base_revision": revision})

    before = (pair.export().json(), http.get(pair.url).json())
    r = conditional(version, revision)
    assert r.status_code == 412, r.text
    problem = r.json()
    assert problem["code"] == "precondition_failed" and problem["field"] == how
    now = http.get(pair.url).json()
    assert problem["current_version"] == now["version"]
    assert problem["current_revision"] == now["revision"]
    assert (pair.export().json(), http.get(pair.url).json()) == before
    pair.same_as_torch()
    pair.step()  # (the in-process twin never loaded it)

    read = pair.export()
    version, revision = int(read.headers["X-Optserve-Version"]), \
        int(read.headers["X-Optserve-Revision"])
    r = conditional(version, revision)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == version + 1 and r.json()["revision"] == revision + 1
    assert r.headers["X-Optserve-Revision"] == str(revision + 1)
    pair.opt.load_state_dict(copy.deepcopy(incoming))
    pair.same_as_torch()
    for _ in range(2):
        pair.step()
    pair.same_as_torch()
    assert http.delete(pair.url).status_code == 204


def test_a_keyed_retry_of_a_conditional_import_is_answered_as_the_first_time(
        http: httpx.Client) -> None:
    """A conditional import with an ``Idempotency-Key`` succeeds; a step moves the session on;
    the same request again (its ``If-Match`` now stale) is answered from the key (200,
    ``Idempotent-Replayed``), not refused with 412 nor imported again: the state is the
    import's stepped once, as torch's."""
    pair = Pair(http)
    pair.step()
    read = pair.export()
    incoming = donor_state(pair)
    headers = {"If-Match": read.headers["ETag"], "Idempotency-Key": uuid.uuid4().hex}
    first = http.put(f"{pair.url}/state_dict", json=wire(incoming), headers=headers)
    assert first.status_code == 200, first.text
    pair.opt.load_state_dict(copy.deepcopy(incoming))
    pair.step()
    again = http.put(f"{pair.url}/state_dict", json=wire(incoming), headers=headers)
    assert again.status_code == 200, again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json()["version"] == first.json()["version"] + 1  # (the session as it is)
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()
    assert http.delete(pair.url).status_code == 204


def test_a_malformed_precondition_is_a_422_and_changes_nothing(http: httpx.Client) -> None:
    """An ``If-Match`` that is no version, a ``base_revision`` that is no number, and
    ``?base_version=`` disagreeing with ``If-Match``: 422 naming each, nothing imported."""
    pair = Pair(http)
    pair.step()
    before = pair.export().json()
    incoming = wire(donor_state(pair))
    for kwargs, field in (({"headers": {"If-Match": '"abc"'}}, "If-Match"),
                          ({"params": {"base_revision": "-1"}}, "base_revision"),
                          ({"params": {"base_version": "1"}, "headers": {"If-Match": '"2"'}},
                           "base_version")):
        r = http.put(f"{pair.url}/state_dict", json=incoming, **kwargs)
        assert r.status_code == 422 and r.json()["field"] == field, r.text
    assert pair.export().json() == before
    assert http.delete(pair.url).status_code == 204
