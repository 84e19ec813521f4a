"""Conditional requests on the Ray engine beyond what tests/integration/test_conditional_rfc9110.py
runs on both engines: a no-op ``PATCH`` keeps the revision through its hosts' restarts
(``kill -9`` of a host's process, which Ray restarts, and ``ray.kill`` for good, which the
front starts again from storage), as the embedded engine's keeps it through a crash; and
``If-None-Match: *`` on long polls with ``?min_version=`` answers as the embedded engine does
(304 once the wait ends, or at once when a step reaches the version). Sharded sessions too;
every value compared with an in-process ``torch.optim`` twin."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import ENGINES
from tests.integration.test_conditional_changes import CHANGES, Pair

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration]


def host_pids(http: httpx.Client, pair: Pair) -> list[tuple[str, int]]:
    """The (name, pid) of each host actor holding the session (each shard's)."""
    placement = http.get(pair.url).json()["placement"]
    names = ([s["host"] for s in placement["shards"]] if "shards" in placement
             else [placement["host"]])
    return [(n, ray.get(ray.get_actor(n, namespace="optserve").ping.remote())["pid"])
            for n in names]


def patched(http: httpx.Client, url: str, body: dict[str, Any],
            headers: dict[str, str] | None = None) -> httpx.Response:
    """A PATCH, sent again while its host restarts (503 ``host_restarting``)."""
    deadline = time.monotonic() + 120
    while True:
        r = http.patch(url, json=body, headers=headers or {})
        if r.status_code != 503 or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.parametrize("engine_url", [ENGINES[1]], indirect=True)
@pytest.mark.parametrize(("shards", "killed"), [(1, "all"), (2, "all"), (2, "second")])
def test_a_noop_patch_keeps_the_revision_through_host_restarts(http: httpx.Client,
                                                               shards: int, killed: str) -> None:
    """No-op PATCHes (the session's ``{}``, a group's ``{}`` and its own lr, one keyed), then
    the session's hosts killed: ``all``: the first with ``kill -9`` (Ray restarts it; a
    sharded session's coordinator is made anew there), any other with ``ray.kill`` for good;
    ``second``: only the second shard's host, for good (the coordinator holds its dead
    handle). A host killed for good is started again (by the front, or for a shard by the
    coordinator). The session comes back at the same version and revision, the keyed no-op is
    answered from its key, a change naming the revision applies, and the values are
    torch's."""
    pair = Pair(http, shards)
    pair.step()
    etag, revision = pair.read()
    described = http.get(pair.url).json()
    key = uuid.uuid4().hex
    for url, body in ((pair.url, {}), (f"{pair.url}/param_groups/0", {}),
                      (f"{pair.url}/param_groups/0", {"lr": described["lr"][0]})):
        r = http.patch(url, json=body)
        assert r.status_code == 200 and r.json() == described, (url, r.text)
    first = http.patch(pair.url, json={}, headers={"Idempotency-Key": key})
    assert first.status_code == 200 and first.json() == described
    assert pair.read() == (etag, revision)
    before = host_pids(http, pair)
    for i, (name, pid) in enumerate(before):
        if i == 0 and killed == "all":
            os.kill(pid, signal.SIGKILL)
        elif i == 0:
            continue
        else:
            ray.kill(ray.get_actor(name, namespace="optserve"), no_restart=True)
    again = patched(http, pair.url, {}, {"Idempotency-Key": key})
    assert again.status_code == 200, again.text
    assert again.json() == {**described, "replayed": True}
    after = host_pids(http, pair)
    assert [n for n, _ in after] == [n for n, _ in before]
    assert [p != q for (_, p), (_, q) in zip(after, before, strict=True)] == [
        killed == "all", *[True] * (shards - 1)]
    assert pair.read() == (etag, revision)
    pair.same_as_torch()
    r = patched(http, f"{pair.url}/param_groups/0", {"lr": 0.02})  # (a change: one revision)
    assert r.status_code == 200 and r.json()["revision"] == revision + 1, r.text
    CHANGES["patch_group"][1](pair)
    r = http.patch(pair.url, json={}, params={"base_revision": revision + 1})
    assert r.status_code == 200 and r.json()["revision"] == revision + 1, r.text
    pair.same_as_torch()
    pair.step()
    pair.same_as_torch()


@pytest.mark.parametrize("engine_url", ENGINES, indirect=True)
@pytest.mark.parametrize("shards", [1, 2])
def test_if_none_match_star_on_a_long_poll_past_the_version(http: httpx.Client,
                                                            shards: int) -> None:
    """``If-None-Match: *`` with ``?min_version=`` past the session's version: a 304 at the
    current version once the wait ends; with a step reaching the version meanwhile, a 304 at
    the new version when it lands (``*`` holds at every version). A ``W/`` If-Match on the
    same poll is a 412 after the wait. The same on both engines, sharded or not."""
    pair = Pair(http, shards)
    pair.step()
    etag, _ = pair.read()
    version = int(etag.strip('"'))
    star = {"If-None-Match": "*"}
    began = time.monotonic()
    r = http.get(f"{pair.url}/params", params={"min_version": version + 1, "wait_s": 1.0},
                 headers=star)
    assert r.status_code == 304 and r.headers["etag"] == etag, r.text
    assert r.content == b"" and time.monotonic() - began >= 0.9
    r = http.get(f"{pair.url}/params", params={"min_version": version + 1, "wait_s": 1.0},
                 headers={**star, "If-Match": f"W/{etag}"})
    assert r.status_code == 412 and r.json()["field"] == "If-Match", r.text
    stepper = threading.Timer(1.0, pair.step)
    stepper.start()
    began = time.monotonic()
    try:
        r = http.get(f"{pair.url}/params", params={"min_version": version + 1, "wait_s": 60},
                     headers=star)
    finally:
        stepper.join()
    assert r.status_code == 304, r.text
    assert r.headers["etag"] == f'"{version + 1}"' and time.monotonic() - began < 30
    pair.same_as_torch()
