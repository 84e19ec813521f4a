"""Races between several Ray-engine fronts over one data directory and one cluster (two
uvicorn fronts in this process, hosts on the shared test cluster asking for no CPU): requests
for one session id fired at once through different fronts.

Every value is compared with in-process torch computed here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.engine.directory import Directory
from app.engine.ray_host import RayHost, RayRouter, RemoteSharded
from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.torch_reference import adam_after as reference_adam_after
from tests.torch_reference import assert_tensors_equal as assert_equal
from tests.torch_reference import json_tensor, make_params, tensor_from_json

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]
LR = 0.01


SHAPES = {"w": (3, 2), "b": (4,), "e": (5,)}
tensors = partial(make_params, SHAPES)
adam_after = partial(reference_adam_after, lr=LR)


def at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Each call in a thread of its own, released together."""
    barrier = threading.Barrier(len(calls))
    out: list[httpx.Response | BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # noqa: BLE001 - reported below
            out[i] = exc
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    answers = [o for o in out if isinstance(o, httpx.Response)]
    assert len(answers) == len(calls), out
    return answers


def pulled(url: str, sid: str) -> dict[str, torch.Tensor]:
    r = httpx.get(f"{url}/v1/sessions/{sid}/params", timeout=120)
    assert r.status_code == 200, r.text
    return {n: tensor_from_json(t) for n, t in r.json()["params"].items()}


def adam_create(sid: str, params: dict[str, torch.Tensor], shards: int = 1) -> dict[str, Any]:
    """The body of a create of ``sid``: Adam at :data:`LR` over ``params``, in ``shards``."""
    body: dict[str, Any] = {"id": sid, "optimizer": "Adam", "options": {"lr": LR},
                            "params": {n: json_tensor(t) for n, t in params.items()}}
    if shards > 1:
        body["shards"] = shards
    return body


def stepped_as_torch(step_at: str, pull_at: str, sid: str, params: dict[str, torch.Tensor],
                     seed: int, what: str) -> None:
    """A step of ``sid`` through the front at ``step_at`` with the gradients of ``seed``: its
    answer, and the parameters pulled through the front at ``pull_at``, are torch's Adam step
    from ``params``."""
    g = tensors(seed)
    r = httpx.post(f"{step_at}/v1/sessions/{sid}/step", timeout=300,
                   json={"grads": {n: json_tensor(t) for n, t in g.items()}})
    assert r.status_code == 200, r.text
    want = adam_after(params, g)
    assert_equal({n: tensor_from_json(t) for n, t in r.json()["params"].items()}, want, what)
    assert_equal(pulled(pull_at, sid), want, "pulled through the other front")


@dataclass
class InProcessFront:
    live: LiveServer
    url: str


@pytest.fixture(scope="module")
def deployment(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module's data directory: its host actors outlive each test's fronts (every test's
    session has an id of its own), and are killed after the last test. A deployment per test
    started new host actors for every test (a Ray worker process importing torch and the app:
    seconds of CPU each)."""
    data = tmp_path_factory.mktemp("races") / "data"
    try:
        yield data
    finally:
        kill_hosts(data)


@pytest.fixture
def fronts(ray_cluster: Any, deployment: Path) -> Iterator[list[InProcessFront]]:
    """Two fresh fronts in this process on the module's data directory (hosts asking for no
    CPU)."""
    started: list[InProcessFront] = []
    try:
        for _ in range(2):
            live = LiveServer(ray_settings(ray_cluster, data_dir=deployment,
                                           ray_resources='{"num_cpus": 0}'))
            started.append(InProcessFront(live, live.start()))
        yield started
    finally:
        for f in started:
            f.live.stop()


@pytest.mark.parametrize("shards", [1, 2])
def test_one_keyed_create_sent_through_two_fronts_at_once_makes_one_session(
        fronts: list[InProcessFront], monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """The same keyed create (one ``Idempotency-Key``, one id) sent through two fronts at
    once: the try that claimed the id's entry indexes the key right after the claim, and a try
    reaching the directory between the two found the entry and answered 409
    ``session_exists`` for its own create (seen through three ``python -m app`` fronts for a
    sharded session; the index's write is held 0.5 s here to make it every time). Now it
    waits for the index and is answered with the session made (201, replayed): both tries
    answer the same session, which every front serves and which steps as torch does; the
    same key with another body is a 422 ``idempotency_key_reused``, not a 409."""
    claim_created = Directory.claim_created

    def slow_index(self: Directory, *args: Any, **kwargs: Any) -> str | None:
        time.sleep(0.5)
        return claim_created(self, *args, **kwargs)
    monkeypatch.setattr(Directory, "claim_created", slow_index)
    a, b = (f.url for f in fronts)
    for rep in range(3):
        sid, p0 = f"raced-{shards}-{rep}", tensors(rep)
        body = adam_create(sid, p0, shards)
        key = {"Idempotency-Key": f"raced-{shards}-{rep}-{time.time_ns()}"}
        answers = at_once([partial(httpx.post, f"{u}/v1/sessions", json=body, headers=key,
                                   timeout=300) for u in (a, b)])
        assert [r.status_code for r in answers] == [201, 201], [r.text for r in answers]
        assert sorted(r.headers.get("Idempotent-Replayed") == "true" for r in answers) == \
            [False, True], [dict(r.headers) for r in answers]
        assert {r.json()["id"] for r in answers} == {sid}
        for url in (a, b):
            listed = httpx.get(f"{url}/v1/sessions", timeout=120).json()["sessions"]
            assert [s["id"] for s in listed].count(sid) == 1
            assert_equal(pulled(url, sid), p0, "created")
        other = {**body, "options": {"lr": LR * 2}}
        for url in (a, b):
            r = httpx.post(f"{url}/v1/sessions", json=other, headers=key, timeout=300)
            assert r.status_code == 422, r.text
            assert r.json()["code"] == "idempotency_key_reused"
        stepped_as_torch(b, a, sid, p0, 100 + rep, "stepped")


def test_a_draining_front_withdraws_no_other_fronts_keyless_push_of_its_worker(
        fronts: list[InProcessFront], monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync round (two workers) holds worker w1's keyless push through front B. A keyless
    push of the same worker name through front A is on its way to the host (held 2 s here
    before its actor call) when A drains: A asks the host, again and again until its push is
    answered, to withdraw ``w1``'s keyless push, and the host matched it by worker name and
    key alone, so it took B's push out of the round (409 ``round_aborted`` for B's worker,
    which A's drain had nothing to do with). Now each push carries the identity of the front
    it came through and a drain withdraws only its own: B's push stays in the round, A's gets
    the 409 ``duplicate_push`` it would get from any front, and once w2 pushes through B the
    round steps as torch's Adam on the mean of B's two pushes."""
    a, b = fronts
    sid, p0 = "drain-keyless", tensors(1)
    body = {**adam_create(sid, p0),
            "sync": {"workers": 2, "reduce": "mean", "timeout_s": 600}}
    r = httpx.post(f"{a.url}/v1/sessions", json=body, timeout=300)
    assert r.status_code == 201, r.text
    g1, g2, g_a = tensors(11), tensors(12), tensors(13)

    def push(url: str, worker: str, grads: dict[str, torch.Tensor]) -> httpx.Response:
        return httpx.post(f"{url}/v1/sessions/{sid}/step", timeout=300,
                          headers={"X-Optserve-Worker": worker},
                          json={"grads": {n: json_tensor(t) for n, t in grads.items()}})

    def pending() -> list[str]:
        out: list[str] = httpx.get(f"{b.url}/v1/sessions/{sid}",
                                   timeout=60).json()["sync"]["pending"]
        return out

    with ThreadPoolExecutor(3) as pool:
        w1_b = pool.submit(push, b.url, "w1", g1)
        wait_until(lambda: pending() == ["w1"], "w1's push through B in the round")

        on_its_way = threading.Event()
        loops: list[asyncio.AbstractEventLoop] = []
        step = RayHost.step

        async def held_step(self: RayHost, key: str, grads: Any, **kwargs: Any) -> Any:
            if kwargs.get("worker") == "w1" and not on_its_way.is_set():
                loops.append(asyncio.get_running_loop())
                on_its_way.set()
                await asyncio.sleep(2.0)
            return await step(self, key, grads, **kwargs)
        monkeypatch.setattr(RayHost, "step", held_step)
        w1_a = pool.submit(push, a.url, "w1", g_a)
        assert on_its_way.wait(60)
        loops[0].call_soon_threadsafe(a.live.app.state.engine.drain)
        answer_a = w1_a.result(300)
        assert not w1_b.done(), w1_b.result().text  # (B's push still waits in the round)
        assert pending() == ["w1"]
        assert answer_a.status_code == 409, answer_a.text
        assert answer_a.json()["code"] == "duplicate_push", answer_a.text

        w2 = pool.submit(push, b.url, "w2", g2)
        want = adam_after(p0, {n: (g1[n] + g2[n]) / 2 for n in p0})
        for done in (w1_b, w2):
            r = done.result(300)
            assert r.status_code == 200, r.text
            assert r.json()["version"] == 1
            assert_equal({n: tensor_from_json(t) for n, t in r.json()["params"].items()}, want,
                         "the round's step")
    assert_equal(pulled(b.url, sid), want, "pulled")


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 120
    while not check():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("shards", [1, 2])
def test_one_keyed_delete_sent_through_two_fronts_at_once_answers_both_204(
        fronts: list[InProcessFront], monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """The same keyed delete sent through front A and, while A's is on its way to the session
    (held here until B's is answered), through front B: B's deletes the session and removes its
    entry; A's then reached a sharded session's coordinator, which found no entry and answered
    404 ``session_not_found``, for a delete that was done under its key (a plain session's host
    answers from its tombstone: 204). Now a keyed delete that meets a 404 asks the directory
    whether another try of its key deleted the session meanwhile: both answer 204 (one
    replayed), the session is gone from both fronts, and a session made again with the id steps
    as torch does."""
    held = {"once": True}
    # A's delete held from when it reaches the session's host until B's is answered (was: 2 s
    # from there, B sent 0.5 s after A: a loaded machine lost that race once, A's delete not
    # at its host yet, so B's was the one held and A's made the delete)
    at_its_host, b_answered = threading.Event(), threading.Event()
    deletes = {RayHost: RayHost.delete, RemoteSharded: RemoteSharded.delete}

    def holding(cls: type) -> Callable[..., Any]:
        async def delete(self: Any, key: str, **kwargs: Any) -> Any:
            if held.pop("once", False):
                at_its_host.set()
                deadline = time.monotonic() + 120
                while not b_answered.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
            return await deletes[cls](self, key, **kwargs)
        return delete
    for cls in deletes:
        monkeypatch.setattr(cls, "delete", holding(cls))
    a, b = (f.url for f in fronts)
    sid, p0 = f"deleted-twice-{shards}", tensors(3)
    body = adam_create(sid, p0, shards)
    r = httpx.post(f"{a}/v1/sessions", json=body, timeout=300)
    assert r.status_code == 201, r.text
    key = {"Idempotency-Key": f"deleted-twice-{shards}-{time.time_ns()}"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.delete, f"{a}/v1/sessions/{sid}", headers=key, timeout=300)
        assert at_its_host.wait(300)
        second = httpx.delete(f"{b}/v1/sessions/{sid}", headers=key, timeout=300)
        b_answered.set()
        answers = [first.result(300), second]
    assert [r.status_code for r in answers] == [204, 204], [r.text for r in answers]
    assert answers[0].headers.get("Idempotent-Replayed") == "true"
    for url in (a, b):
        assert httpx.get(f"{url}/v1/sessions/{sid}", timeout=60).status_code == 404
        r = httpx.delete(f"{url}/v1/sessions/{sid}", headers=key, timeout=300)
        assert r.status_code == 204, r.text
    p1 = tensors(4)
    again = {**body, "params": {n: json_tensor(t) for n, t in p1.items()}}
    r = httpx.post(f"{b}/v1/sessions", json=again, timeout=300)
    assert r.status_code == 201, r.text
    stepped_as_torch(a, b, sid, p1, 5, "made again and stepped")


@pytest.mark.parametrize("shard", [0, 1])
def test_a_delete_while_a_sharded_create_is_at_its_hosts_leaves_the_create_whole(
        fronts: list[InProcessFront], monkeypatch: pytest.MonkeyPatch, shard: int) -> None:
    """A sharded create through front A, one shard's create (the first's, whose host holds
    the coordinator, or the second's) held 2 s on its way to its host,
    and an unkeyed delete of its id through front B meanwhile: the delete went to the
    session's coordinator, deleted the shard made already, answered 204 and removed the
    entry, and the create answered 503 ``create_dropped`` (a delete of a session no client
    had been answered for, and a create cut by it). Now a delete that finds the create in
    flight and some shards not made yet is a 404 that changes nothing, as a plain session's
    host answers for one it has not made: the create answers 201, every front serves the
    session whole, and it steps as torch does."""
    held = {"once": True}
    at_its_host = threading.Event()
    create = RayHost.create

    async def holding(self: RayHost, key: str, spec: Any, **kwargs: Any) -> Any:
        if key.endswith(f"~shard{shard}of2") and held.pop("once", False):
            at_its_host.set()
            await asyncio.sleep(2.0)
        return await create(self, key, spec, **kwargs)
    monkeypatch.setattr(RayHost, "create", holding)
    a, b = (f.url for f in fronts)
    sid, p0 = f"deleted-while-made-{shard}", tensors(6)
    body = adam_create(sid, p0, 2)
    with ThreadPoolExecutor(1) as pool:
        made = pool.submit(httpx.post, f"{a}/v1/sessions", json=body, timeout=300)
        assert at_its_host.wait(300)  # (its entry claimed, the other shard's create sent)
        time.sleep(0.5)
        deleted = httpx.delete(f"{b}/v1/sessions/{sid}", timeout=300)
        created = made.result(300)
    assert created.status_code == 201, created.text
    assert deleted.status_code == 404, deleted.text
    assert not held
    for url in (a, b):
        assert_equal(pulled(url, sid), p0, "created")
    stepped_as_torch(b, a, sid, p0, 7, "stepped")


@pytest.mark.parametrize("shards", [1, 2])
def test_a_keyed_create_retried_while_its_session_is_deleted_is_never_a_404(
        fronts: list[InProcessFront], monkeypatch: pytest.MonkeyPatch, shards: int) -> None:
    """A keyed create made through front A; its retry (same key and body) through A and a
    delete of the session through front B at once. The retry found the session under its key
    and then described it, and a delete between the two (held 2 s here; seen without a hold
    through three ``python -m app`` fronts in 7 of 15 rounds, sharded) made the retry of a
    create a 404 ``session_not_found``. Now the retry looks at the key again and is answered
    409 ``session_deleted`` (the delete marked the key before any host deleted the session),
    as every later retry is; the id is free, and a session made again with it steps as torch
    does."""
    found = RayRouter.find_create
    held = {"once": True}
    looked = threading.Event()

    async def holding(self: RayRouter, tenant: str, idem: Any) -> Any:
        out = await found(self, tenant, idem)
        if out is not None and held.pop("once", False):
            looked.set()
            await asyncio.sleep(2.0)
        return out
    monkeypatch.setattr(RayRouter, "find_create", holding)
    a, b = (f.url for f in fronts)
    sid, p0 = f"retried-while-deleted-{shards}", tensors(8)
    body = adam_create(sid, p0, shards)
    key = {"Idempotency-Key": f"retried-while-deleted-{shards}-{time.time_ns()}"}
    r = httpx.post(f"{a}/v1/sessions", json=body, headers=key, timeout=300)
    assert r.status_code == 201, r.text
    with ThreadPoolExecutor(1) as pool:
        retry = pool.submit(httpx.post, f"{a}/v1/sessions", json=body, headers=key,
                            timeout=300)
        assert looked.wait(300)
        deleted = httpx.delete(f"{b}/v1/sessions/{sid}", timeout=300)
        retried = retry.result(300)
    assert deleted.status_code == 204, deleted.text
    assert retried.status_code == 409, retried.text
    assert retried.json()["code"] == "session_deleted", retried.text
    for url in (a, b):
        assert httpx.get(f"{url}/v1/sessions/{sid}", timeout=60).status_code == 404
        r = httpx.post(f"{url}/v1/sessions", json=body, headers=key, timeout=300)
        assert r.status_code == 409 and r.json()["code"] == "session_deleted", r.text
    r = httpx.post(f"{b}/v1/sessions", json=body, timeout=300)
    assert r.status_code == 201, r.text
    stepped_as_torch(a, b, sid, p0, 9, "made again and stepped")


def test_a_keyed_sharded_create_sent_through_two_fronts_at_once_is_replayed_once(
        fronts: list[InProcessFront], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same keyed create of a sharded session (two shards) through front A and, while A's
    create of shard 1 is on its way to its host (held 2 s here), through front B: B found
    A's index and finished the create on its hosts under the key, where shard 0 was A's
    already (replayed) and shard 1 was made by B, and then A's shard 1 was B's (replayed).
    One session, consistent, but neither try found every shard made before: both answered
    201 without ``Idempotent-Replayed`` (seen without a hold in 1 of 59 rounds). Now a retry
    waits while an earlier try of its creation is in flight through another front: A answers
    as the original, B as its replay (``Idempotent-Replayed: true``), as for a plain session;
    every front serves the one session, which steps as torch does."""
    held = {"once": True}
    at_its_host = threading.Event()
    create = RayHost.create

    async def holding(self: RayHost, key: str, spec: Any, **kwargs: Any) -> Any:
        if key.endswith("~shard1of2") and held.pop("once", False):
            at_its_host.set()
            await asyncio.sleep(2.0)
        return await create(self, key, spec, **kwargs)
    monkeypatch.setattr(RayHost, "create", holding)
    a, b = (f.url for f in fronts)
    sid, p0 = "keyed-sharded-twice", tensors(10)
    body = adam_create(sid, p0, 2)
    key = {"Idempotency-Key": f"keyed-sharded-twice-{time.time_ns()}"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, f"{a}/v1/sessions", json=body, headers=key,
                            timeout=300)
        assert at_its_host.wait(300)  # (A's entry and index written, shard 0's create sent)
        time.sleep(0.5)
        second = httpx.post(f"{b}/v1/sessions", json=body, headers=key, timeout=300)
        original = first.result(300)
    assert not held
    assert [original.status_code, second.status_code] == [201, 201], \
        [original.text, second.text]
    assert original.headers.get("Idempotent-Replayed") is None, dict(original.headers)
    assert second.headers.get("Idempotent-Replayed") == "true", dict(second.headers)
    assert original.json()["id"] == second.json()["id"] == sid
    for url in (a, b):
        listed = httpx.get(f"{url}/v1/sessions", timeout=120).json()["sessions"]
        assert [s["id"] for s in listed].count(sid) == 1
        assert_equal(pulled(url, sid), p0, "created")
        r = httpx.post(f"{url}/v1/sessions", json=body, headers=key, timeout=300)
        assert r.status_code == 201 and r.headers.get("Idempotent-Replayed") == "true", r.text
    stepped_as_torch(b, a, sid, p0, 11, "stepped")


@pytest.mark.parametrize("what", ["add_group", "configure"])
def test_a_front_with_a_stale_entry_makes_both_calls_of_a_request_to_the_new_host(
        fronts: list[InProcessFront], what: str) -> None:
    """Front B read a sharded session's entry; front A deleted it and made a plain session of
    the same id. B's next request that calls the host twice (an add_param_group: a describe
    for the session's limits, then the operation; a configure: the operation, then a
    describe) found the entry stale on its first call and went to the new host, but sent its
    second call to the deleted creation's hosts: a 404 for a session that is there (seen by
    h71's kill -9 chaos probe, a PATCH of PS options applied and answered 404). Now both go to
    the new host: the group is added, the options set, and the session steps as torch."""
    a, b = (f.url for f in fronts)
    sid, p0, extra = f"stale-{what}", tensors(20), {"x": torch.ones(3)}
    r = httpx.post(f"{a}/v1/sessions", json=adam_create(sid, tensors(21), 2), timeout=300)
    assert r.status_code == 201, r.text
    assert httpx.get(f"{b}/v1/sessions/{sid}", timeout=120).status_code == 200  # B's entry
    assert httpx.delete(f"{a}/v1/sessions/{sid}", timeout=300).status_code == 204
    r = httpx.post(f"{a}/v1/sessions", json=adam_create(sid, p0), timeout=300)
    assert r.status_code == 201, r.text
    if what == "add_group":
        r = httpx.post(f"{b}/v1/sessions/{sid}/param_groups", timeout=300, json={
            "params": {n: json_tensor(t) for n, t in extra.items()}, "lr": LR / 2})
        assert r.status_code == 201, r.text
        local = {n: t.clone() for n, t in {**p0, **extra}.items()}
        opt = torch.optim.Adam([{"params": [local[n] for n in p0]},
                                {"params": [local["x"]], "lr": LR / 2}], lr=LR)
        g = {**tensors(22), "x": torch.full((3,), 0.5)}
        for n, t in local.items():
            t.grad = g[n]
        opt.step()
        r = httpx.post(f"{b}/v1/sessions/{sid}/step", timeout=300,
                       json={"grads": {n: json_tensor(t) for n, t in g.items()}})
        assert r.status_code == 200, r.text
        assert_equal({n: tensor_from_json(t) for n, t in r.json()["params"].items()},
                     local, "stepped with the added group")
    else:
        r = httpx.patch(f"{b}/v1/sessions/{sid}", json={"max_staleness": 3}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["max_staleness"] == 3
        assert httpx.get(f"{a}/v1/sessions/{sid}", timeout=120).json()["max_staleness"] == 3
        stepped_as_torch(b, a, sid, p0, 23, "stepped")


@pytest.mark.parametrize(("before", "after", "kill"),
                         [(1, 1, False), (2, 2, False), (1, 2, False), (2, 1, True)],
                         ids=["plain", "sharded", "plain-then-sharded", "sharded-then-plain"])
def test_a_session_made_again_through_another_front_continues_its_versions(
        fronts: list[InProcessFront], deployment: Path, before: int, after: int,
        kill: bool) -> None:
    """Front A makes a session (``before`` shards), steps it to v1 and reads it (ETag "1");
    front B deletes it (``kill``: then the hosts are killed, for good: a front starts them
    again from their files; a restart of them all costs seconds, so once); B makes the id
    again (``after`` shards, other values): at v2, on any hosts, each shard at it; a step v3.
    Through front A, which read the old session: its ``If-None-Match: "1"`` gets the new
    values whole (not a 304), a long poll for ``min_version=2`` answers at once, its
    ``If-Match: "1"`` PUT is a 412 and its stale pushes 409 ``stale_gradient``, nothing
    changed. Before, the Ray engine's hosts counted from 0 at every create: the new
    session answered v0, then v1 again with other values, and each of those was taken."""
    from tests.integration.test_version_recreated import JSON, Twin, create, jt, step, values
    a, b = (httpx.Client(base_url=f.url, timeout=300) for f in fronts)
    sid = f"again-{before}-{after}"
    with a, b:
        old = Twin(values(1))
        create(a, sid, values(1), before)
        assert step(a, sid, old, 11) == 1
        r = a.get(f"/v1/sessions/{sid}/params")
        assert (r.status_code, r.headers["ETag"]) == (200, '"1"')
        assert b.delete(f"/v1/sessions/{sid}").status_code == 204
        if kill:
            kill_hosts(deployment)
        twin = Twin(values(2, 3.0))
        assert create(b, sid, values(2, 3.0), after)["version"] == 2
        assert step(b, sid, twin, 12) == 3

        r = a.get(f"/v1/sessions/{sid}/params", headers={"If-None-Match": '"1"'})
        assert (r.status_code, r.headers["ETag"]) == (200, '"3"'), r.text
        twin.assert_params(r.json())
        t0 = time.monotonic()
        r = a.get(f"/v1/sessions/{sid}/params", params={"min_version": 2, "wait_s": 30})
        assert (r.status_code, r.json()["version"]) == (200, 3), r.text
        assert time.monotonic() - t0 < 20  # (not held until the wait's end)
        r = a.put(f"/v1/sessions/{sid}/params", headers={"If-Match": '"1"', **JSON},
                  json={"params": {"w": jt(torch.full((3, 4), 7.0))}})
        assert (r.status_code, r.json()["current_version"]) == (412, 3), r.text
        grads = {n: jt(g) for n, g in values(13, 0.5).items()}
        for how in ({"headers": {"If-Match": '"1"'}}, {"params": {"base_version": 1}}):
            r = a.post(f"/v1/sessions/{sid}/step", json={"grads": grads}, **how)
            assert r.status_code == 409, (how, r.text)
            assert (r.json()["code"], r.json()["discarded_by"]) == ("stale_gradient", "create")
        r = b.get(f"/v1/sessions/{sid}/params")
        assert r.json()["version"] == 3
        twin.assert_params(r.json())
        assert a.delete(f"/v1/sessions/{sid}").status_code == 204
