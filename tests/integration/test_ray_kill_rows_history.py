"""Ray-hosted sessions (hosts on the test cluster, a front of their own data directory) whose
host actors are killed between and during row pulls, narrow steps, ``?return=touched`` steps
and their keyed retries: every answer, the parameters and the history are compared with the
same operations on an unsharded session of the embedded engine (never killed) and with an
in-process ``torch.optim`` run computed here. Also: history rows kept whole (``time``
included) through kills with and without Ray's restart, a front of another commit refused the
new calls (503 ``host_version_mismatch``), and another tenant's front answered 404 for them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.torch_reference import json_tensor, tensor_from_json

pytestmark = [pytest.mark.integration, pytest.mark.ray]
BINARY = "application/octet-stream"
SHAPES = {"emb": ((24, 4), torch.float32), "bias": ((4,), torch.float32),
          "h": ((6,), torch.float16), "bf": ((5,), torch.bfloat16)}


@pytest.fixture
def data(ray_cluster: Any, tmp_path: Path) -> Iterator[Path]:
    data = tmp_path / "data"
    try:
        yield data
    finally:
        kill_hosts(data)


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return {n: torch.randn(shape, generator=g).to(dtype) for n, (shape, dtype) in SHAPES.items()}


def sparse_grad(rows: list[int], seed: int) -> torch.Tensor:
    values = torch.randn(len(rows), 4, generator=torch.Generator().manual_seed(seed))
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, (24, 4), check_invariants=True)


def dense(seed: int, narrow: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, (shape, dtype) in SHAPES.items():
        t = torch.randn(shape, generator=g).to(dtype)
        out[n] = t.to(narrow) if narrow is not None and t.element_size() > 2 else t
    return out


class Twin:
    def __init__(self) -> None:
        self.params = {n: t.clone().requires_grad_(True) for n, t in initial().items()}
        self.opt = torch.optim.SGD(list(self.params.values()), lr=0.1)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)

    def step(self, *grads: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            total = None
            for g in grads:
                if n in g:
                    w = g[n].to(p.dtype)
                    total = w if total is None else total + w
            p.grad = total
        self.opt.step()
        self.sched.step()


def create(http: httpx.Client, sid: str) -> dict[str, Any]:
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "SGD", "options": {"lr": 0.1},
        "scheduler": {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}},
        "params": {n: json_tensor(t) for n, t in initial().items()}})
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def sparse_json(t: torch.Tensor) -> dict[str, Any]:
    return {"indices": t._indices()[0].tolist(), "values": json_tensor(t._values())}


#: how long a call is retried while it is answered 503 (hosts restarting: a Ray worker
#: importing torch, its sessions restored; seconds, or a minute on a loaded 2-core machine)
RETRY_FOR_S = 240.0


def retried(send: Callable[..., httpx.Response], *args: Any, **kw: Any) -> httpx.Response:
    """``send(*args, **kw)`` until it is not a 503 (a host restarting), after the
    ``Retry-After`` each 503 names, for at most :data:`RETRY_FOR_S` (a count of tries ran out
    at once where 503s came fast)."""
    if getattr(send, "__name__", "") in ("post", "put", "patch", "delete"):
        # a change retried after a 503 host_restarting ("may or may not have been applied")
        # is retried under one Idempotency-Key, as the problem says to: unkeyed, a change
        # the restarting host had applied was applied again (a sixth history row of five)
        headers = dict(kw.get("headers") or {})
        headers.setdefault("Idempotency-Key", uuid.uuid4().hex)
        kw["headers"] = headers
    deadline = time.monotonic() + RETRY_FOR_S
    last: httpx.Response | httpx.TransportError | None = None
    while time.monotonic() < deadline:
        try:
            r = send(*args, **kw)
        except httpx.TransportError as exc:
            last = exc
            continue
        if r.status_code != 503:
            return r
        last = r
        time.sleep(min(float(r.headers.get("Retry-After", "0")), 2.0))
    raise AssertionError(f"never answered: {last!r} "
                         f"{last.text if isinstance(last, httpx.Response) else ''}")


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for n in want:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), (what, n)


def test_kills_during_rows_narrow_and_touched_steps_match_embedded_and_torch(
        ray_cluster: Any, data: Path, live_server: str) -> None:
    """The host killed after a push with scalars, while a keyed ``?return=touched`` narrowed
    step is answered (its retry, once the host is back, answers the same rows), while a
    long-polled narrowed row pull waits, while a keyed ``?upcast=true`` narrowed step is
    answered: each answer is the embedded session's and torch's SGD, the step applied once;
    the history (scalars, pushed ones too) is the embedded session's but its wall times."""
    front = LiveServer(ray_settings(ray_cluster, data_dir=data,
                                    ray_resources='{"num_cpus": 0}'))
    url = front.start()
    sid = f"kill-{uuid.uuid4().hex[:8]}"
    twin = Twin()
    try:
        with httpx.Client(base_url=url, timeout=300) as rh, \
                httpx.Client(base_url=live_server, timeout=300) as eh:
            clients = (rh, eh)
            for http in clients:
                create(http, sid)

            def both(method: str, path: str, kill: str = "none", **kw: Any
                     ) -> list[httpx.Response]:
                out = []
                for http in clients:
                    if http is rh and kill == "during":
                        # the call sent, the host killed while it is answered
                        box: list[httpx.Response | BaseException] = []
                        t = threading.Thread(target=_into, args=(box, http, method, path),
                                             kwargs=kw)
                        t.start()
                        kill_hosts(data)
                        t.join()
                        r = box[0] if box and isinstance(box[0], httpx.Response) else None
                        if r is None or r.status_code == 503:
                            r = retried(_send, http, method, path, **kw)
                    else:
                        r = retried(_send, http, method, path, **kw)
                    if http is rh and kill == "after":
                        kill_hosts(data)
                    out.append(r)
                return out

            # a plain step with scalars, then a push with its own, the host killed after it
            g0 = dense(1)
            for r in both("POST", f"/v1/sessions/{sid}/step?return=none", json={
                    "grads": {n: json_tensor(t) for n, t in g0.items()},
                    "scalars": {"loss": 1.5}}):
                assert r.status_code == 200, r.text
            twin.step(g0)
            pushed = {"emb": sparse_grad([3, 7, 3], 2)}
            for r in both("POST", f"/v1/sessions/{sid}/grads", kill="after", json={
                    "grads": {"emb": sparse_json(pushed["emb"])}, "scalars": {"tok": 7}}):
                assert r.status_code == 200, r.text

            # a keyed ?return=touched narrowed step, the host killed while it is answered,
            # its retry (the host started again) answered the same
            stepped = {"emb": sparse_grad([7, 20], 3), "h": dense(4)["h"]}
            key = uuid.uuid4().hex
            body = safetensors.torch.save({"emb.indices": stepped["emb"]._indices()[0].clone(),
                                           "emb.values": stepped["emb"]._values().clone(),
                                           "h": stepped["h"]})
            headers = {"Content-Type": BINARY, "Accept": BINARY, "Idempotency-Key": key}
            path = f"/v1/sessions/{sid}/step?return=touched&params_dtype=float16"
            first = both("POST", path, kill="during", content=body, headers=headers)
            twin.step(pushed, stepped)
            again = both("POST", path, kill="none", content=body, headers=headers)
            answers = [safetensors.torch.load(r.content) for r in (*first, *again)]
            for a in answers[1:]:
                same(a, answers[0], "touched answers")
            p = {n: t.detach() for n, t in twin.params.items()}
            assert answers[0]["emb.indices"].tolist() == [3, 7, 20]
            assert torch.equal(answers[0]["emb.values"], p["emb"][[3, 7, 20]].half())
            assert torch.equal(answers[0]["h"], p["h"])

            # a long-polled row pull, the host killed while it waits, answered by the next step
            asked = {"emb": [20, 0, 20], "h": [5, 1], "bf": [4]}
            box: list[Any] = []
            poll = threading.Thread(target=lambda: box.append(rh.post(
                f"/v1/sessions/{sid}/params/rows?min_version=3&wait_s=60&params_dtype=float16",
                json={"rows": asked})))
            poll.start()
            kill_hosts(data)
            g2 = dense(5, torch.bfloat16)
            key2 = uuid.uuid4().hex
            narrow_path = f"/v1/sessions/{sid}/step?upcast=true&params_dtype=bfloat16"
            narrow_body = safetensors.torch.save(g2)
            nh = {"Content-Type": BINARY, "Accept": BINARY, "Idempotency-Key": key2}
            stepped2 = both("POST", narrow_path, kill="during", content=narrow_body,
                            headers=nh)
            twin.step(g2)
            poll.join(120)
            assert box and box[0].status_code == 200, box and box[0].text
            ray_rows = box[0].json()
            assert ray_rows["version"] == 3, ray_rows
            again2 = both("POST", narrow_path, content=narrow_body, headers=nh)
            narrowed = [safetensors.torch.load(r.content) for r in (*stepped2, *again2)]
            for a in narrowed[1:]:
                same(a, narrowed[0], "narrow answers")
            p = {n: t.detach() for n, t in twin.params.items()}
            for n, t in p.items():
                want = t.to(torch.bfloat16) if t.element_size() > 2 else t
                assert torch.equal(narrowed[0][n], want), n
            rows_answers = [r.json() for r in both(
                "POST", f"/v1/sessions/{sid}/params/rows?params_dtype=float16",
                json={"rows": asked})]
            for a in (ray_rows, *rows_answers):
                for n, rows in asked.items():
                    got = tensor_from_json(a["params"][n]["values"])
                    want = p[n][rows]
                    want = want.half() if want.element_size() > 2 else want
                    assert torch.equal(got, want), n

            # the history, the parameters: the embedded session's, torch's
            hist = [r.json() for r in both("GET", f"/v1/sessions/{sid}/history")]
            assert hist[0]["rows"] == hist[1]["rows"] == 3, hist
            assert hist[0]["fields"] == hist[1]["fields"]
            for f in hist[0]["fields"]:
                if f != "time":
                    assert hist[0]["columns"][f] == hist[1]["columns"][f], f
            for r in both("GET", f"/v1/sessions/{sid}/params", headers={"Accept": BINARY}):
                same(safetensors.torch.load(r.content), p, "params")
            eh.delete(f"/v1/sessions/{sid}")
    finally:
        front.stop()


def _send(http: httpx.Client, method: str, path: str, **kw: Any) -> httpx.Response:
    return http.request(method, path, **kw)


def _into(box: list[httpx.Response | BaseException], http: httpx.Client, method: str,
          path: str, **kw: Any) -> None:
    try:
        box.append(_send(http, method, path, **kw))
    except httpx.TransportError as exc:
        box.append(exc)


def kill_named(name: str) -> None:
    import ray

    ray.kill(ray.get_actor(name, namespace="optserve"), no_restart=True)


#: a long-polled row pull's wait for the next version (a pull at least this often)
PULL_WAIT_S = 1.0


def test_a_sharded_sessions_shard_hosts_killed_during_narrow_and_touched_steps(
        ray_cluster: Any, data: Path, live_server: str) -> None:
    """A session of two shards on two hosts; the second shard's host killed while a keyed
    narrow step is answered, then the first shard's (its coordinator's) while a keyed
    ``?return=touched`` step is answered, long-polled row pulls of both shards going on all
    along: every retry answers as the embedded session and torch, each pull's rows are
    torch's at the version it names (the shards at one version), the last pull's at the
    last step, the parameters at the end torch's. Its hosts ask no logical CPU, as the other
    tests' here: hosts of one each waited for room on the test cluster, whose CPUs the run's
    shared Ray server's hosts hold (a host started again after its kill too)."""
    front = LiveServer(ray_settings(ray_cluster, data_dir=data,
                                    ray_resources='{"num_cpus": 0}'))
    url = front.start()
    sid = f"kill-sh-{uuid.uuid4().hex[:8]}"
    twin = Twin()
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    try:
        with httpx.Client(base_url=url, timeout=300) as rh, \
                httpx.Client(base_url=live_server, timeout=300) as eh:
            r = rh.post("/v1/sessions", json={
                "id": sid, "optimizer": "SGD", "options": {"lr": 0.1}, "shards": 2,
                "scheduler": {"name": "StepLR", "options": {"step_size": 2, "gamma": 0.5}},
                "params": {n: json_tensor(t) for n, t in initial().items()}})
            assert r.status_code == 201, r.text
            placed = r.json()["placement"]["shards"]
            hosts = [p["host"] for p in placed]
            assert len(set(hosts)) == 2, placed
            create(eh, sid)
            snapshots[0] = {n: t.detach().clone() for n, t in twin.params.items()}

            def kill_during(victim: int, path: str, **kw: Any) -> httpx.Response:
                box: list[Any] = []
                t = threading.Thread(target=_into, args=(box, rh, "POST", path), kwargs=kw)
                t.start()
                kill_named(hosts[victim])
                t.join()
                r = box[0] if box and isinstance(box[0], httpx.Response) else None
                if r is None or r.status_code == 503:
                    r = retried(_send, rh, "POST", path, **kw)
                return r

            stop = threading.Event()
            pulled: list[dict[str, Any]] = []
            odd: list[str] = []  # answers a pull should not get (asserted below)
            asked = {"emb": [23, 0, 5], "bias": [3, 0], "h": [2], "bf": [4, 4]}

            def puller() -> None:
                # long polls for the version after the last one pulled, until the steps are
                # done and the last step's version was pulled (or the retries' time is up)
                deadline = time.monotonic() + RETRY_FOR_S
                with httpx.Client(base_url=url, timeout=300) as c:
                    while time.monotonic() < deadline and not (
                            stop.is_set() and pulled and pulled[-1]["version"] == 2):
                        after = pulled[-1]["version"] + 1 if pulled else 0
                        try:
                            r = c.post(f"/v1/sessions/{sid}/params/rows?min_version={after}"
                                       f"&wait_s={PULL_WAIT_S}", json={"rows": asked})
                        except httpx.TransportError:
                            continue
                        if r.status_code == 200:
                            pulled.append(r.json())
                        elif r.status_code != 503:
                            odd.append(f"{r.status_code} {r.text}")
                            return

            pull_thread = threading.Thread(target=puller)
            pull_thread.start()
            try:
                # a keyed narrow step, the second shard's host killed while it is answered
                g2 = dense(5, torch.bfloat16)
                body = safetensors.torch.save(g2)
                headers = {"Content-Type": BINARY, "Accept": BINARY,
                           "Idempotency-Key": uuid.uuid4().hex}
                path = f"/v1/sessions/{sid}/step?upcast=true&params_dtype=bfloat16"
                answers = [kill_during(1, path, content=body, headers=headers),
                           retried(_send, rh, "POST", path, content=body, headers=headers),
                           retried(_send, eh, "POST", path, content=body, headers=headers)]
                twin.step(g2)
                snapshots[1] = {n: t.detach().clone() for n, t in twin.params.items()}
                for answer in answers:
                    assert answer.status_code == 200, answer.text
                loaded = [safetensors.torch.load(a.content) for a in answers]
                for n, t in snapshots[1].items():
                    want = t.to(torch.bfloat16) if t.element_size() > 2 else t
                    for i, a in enumerate(loaded):
                        assert torch.equal(a[n], want), (i, n)

                # a push, then a keyed ?return=touched step, the first shard's host (its
                # coordinator's) killed while it is answered
                pushed = {"emb": sparse_grad([3, 7, 3], 2)}
                for http in (rh, eh):
                    r = retried(http.post, f"/v1/sessions/{sid}/grads", json={
                        "grads": {"emb": sparse_json(pushed["emb"])}})
                    assert r.status_code == 200, r.text
                stepped = {"emb": sparse_grad([7, 20], 3), "h": dense(4)["h"]}
                body = safetensors.torch.save(
                    {"emb.indices": stepped["emb"]._indices()[0].clone(),
                     "emb.values": stepped["emb"]._values().clone(), "h": stepped["h"]})
                headers = {"Content-Type": BINARY, "Accept": BINARY,
                           "Idempotency-Key": uuid.uuid4().hex}
                path = f"/v1/sessions/{sid}/step?return=touched&params_dtype=float16"
                answers = [kill_during(0, path, content=body, headers=headers),
                           retried(_send, rh, "POST", path, content=body, headers=headers),
                           retried(_send, eh, "POST", path, content=body, headers=headers)]
                twin.step(pushed, stepped)
                snapshots[2] = {n: t.detach().clone() for n, t in twin.params.items()}
                for answer in answers:
                    assert answer.status_code == 200, answer.text
                loaded = [safetensors.torch.load(a.content) for a in answers]
                for a in loaded[1:]:
                    same(a, loaded[0], "touched answers")
                p = snapshots[2]
                assert loaded[0]["emb.indices"].tolist() == [3, 7, 20]
                assert torch.equal(loaded[0]["emb.values"], p["emb"][[3, 7, 20]].half())
                assert torch.equal(loaded[0]["h"], p["h"])
            finally:
                stop.set()
                pull_thread.join(RETRY_FOR_S + 60)
            assert not pull_thread.is_alive()
            assert not odd, odd
            assert pulled and pulled[-1]["version"] == 2, [p["version"] for p in pulled]
            for pull in pulled:
                v = pull["version"]
                assert v in snapshots, v
                for n, rows in asked.items():
                    got = tensor_from_json(pull["params"][n]["values"])
                    assert torch.equal(got, snapshots[v][n][rows]), (v, n)
            for http in (rh, eh):
                r = retried(http.get, f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
                same(safetensors.torch.load(r.content), snapshots[2], "params")
            eh.delete(f"/v1/sessions/{sid}")
    finally:
        front.stop()


def test_a_ray_sessions_history_is_kept_whole_through_host_kills(
        ray_cluster: Any, data: Path, live_server: str) -> None:
    """Hosts killed with a push's scalars pending (restarted by Ray) and between
    ``?metrics=history`` steps (for good: the front starts them from storage; then by Ray
    again): every history row answered before a kill is answered the same after it, wall
    time included (none lost, none twice), and the history is the embedded session's but its
    wall times."""
    settings = ray_settings(ray_cluster, data_dir=data, ray_resources='{"num_cpus": 0}')
    front = LiveServer(settings)
    url = front.start()
    sid = f"kill-h-{uuid.uuid4().hex[:8]}"
    try:
        with httpx.Client(base_url=url, timeout=300) as rh, \
                httpx.Client(base_url=live_server, timeout=300) as eh:
            for http in (rh, eh):
                create(http, sid)
            seen: list[dict[str, Any]] = []
            for k in range(5):
                g = dense(10 + k)
                for http in (rh, eh):
                    if k == 1:
                        r = retried(http.post, f"/v1/sessions/{sid}/grads", json={
                            "grads": {"bias": json_tensor(g["bias"])},
                            "scalars": {"tok": 3, "loss": 9}})
                        assert r.status_code == 200, r.text
                    if http is rh and k == 1:
                        assert kill_hosts(data, restart=True)
                    q = "?return=none&metrics=history" if k % 2 else "?return=none"
                    r = retried(http.post, f"/v1/sessions/{sid}/step{q}", json={
                        "grads": {n: json_tensor(t) for n, t in g.items() if n != "bias"},
                        "scalars": {"loss": float(k)}})
                    assert r.status_code == 200, r.text
                r = retried(rh.get, f"/v1/sessions/{sid}/history")
                assert r.status_code == 200, r.text
                seen.append(r.json())
                if k in (2, 3):
                    assert kill_hosts(data, restart=k == 3)
            final = retried(rh.get, f"/v1/sessions/{sid}/history").json()
            for before in seen:  # (every row as it was first answered, time included)
                for f, col in before["columns"].items():
                    assert final["columns"][f][:len(col)] == col, (f, before["rows"])
            emb = retried(eh.get, f"/v1/sessions/{sid}/history").json()
            assert final["fields"] == emb["fields"] and final["rows"] == emb["rows"] == 5
            for f in final["fields"]:
                if f != "time":
                    assert final["columns"][f] == emb["columns"][f], f
            eh.delete(f"/v1/sessions/{sid}")
    finally:
        front.stop()


def test_a_front_of_another_commit_is_refused_rows_history_and_narrow_steps(
        ray_cluster: Any, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A front whose code version is not the hosts': 503 ``host_version_mismatch`` for row
    pulls, narrowed pulls, history (unsharded; a sharded session's front refuses it itself)
    and touched upcast steps, sharded or not; nothing applied."""
    from app.engine import ray_host

    settings = ray_settings(ray_cluster, data_dir=data, ray_resources='{"num_cpus": 0}')
    same_front = LiveServer(settings)
    url = same_front.start()
    other = None
    try:
        sids = [f"ver-{uuid.uuid4().hex[:8]}", f"ver-{uuid.uuid4().hex[:8]}"]
        with httpx.Client(base_url=url, timeout=300) as h:
            create(h, sids[0])
            r = h.post("/v1/sessions", json={
                "id": sids[1], "optimizer": "SGD", "options": {"lr": 0.1}, "shards": 2,
                "params": {n: json_tensor(t) for n, t in initial().items()}})
            assert r.status_code == 201, r.text
        monkeypatch.setattr(ray_host, "code_version", lambda: "0123456789abcdef")
        other = LiveServer(ray_settings(ray_cluster, data_dir=data,
                                        ray_resources='{"num_cpus": 0}'))
        other_url = other.start()
        g = dense(3, torch.bfloat16)
        with httpx.Client(base_url=other_url, timeout=300) as o:
            for sid in sids:
                for r in (o.post(f"/v1/sessions/{sid}/params/rows", json={"rows": {"emb": [1]}}),
                          o.get(f"/v1/sessions/{sid}/params?params_dtype=float16"),
                          *([o.get(f"/v1/sessions/{sid}/history")] if sid == sids[0] else []),
                          o.post(f"/v1/sessions/{sid}/step?upcast=true&return=touched",
                                 content=safetensors.torch.save(g),
                                 headers={"Content-Type": BINARY})):
                    assert r.status_code == 503, (sid, r.text)
                    assert r.json()["code"] == "host_version_mismatch", r.text
        monkeypatch.undo()
        with httpx.Client(base_url=url, timeout=300) as h:
            for sid in sids:
                assert h.get(f"/v1/sessions/{sid}").json()["version"] == 0
    finally:
        if other is not None:
            other.stop()
        same_front.stop()


@pytest.fixture(scope="module")
def tenants_data(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One data directory for both cases below (a session of its own each, no host killed):
    the second finds the first's host actors up instead of starting its own (a Ray worker
    process importing torch and the app)."""
    data = tmp_path_factory.mktemp("tenants") / "data"
    try:
        yield data
    finally:
        kill_hosts(data)


@pytest.mark.parametrize("shards", [1, 2])
def test_row_pulls_history_and_touched_steps_of_another_tenant_are_404_across_fronts(
        ray_cluster: Any, tenants_data: Path, shards: int) -> None:
    """Another tenant's key on another front: 404 for the session's row pulls, narrowed pull,
    history and a touched upcast step; the owner's rows unchanged."""
    keys = "key-of-alice-0123456:alice,key-of-bob-012345678:bob"
    fronts = [LiveServer(ray_settings(ray_cluster, data_dir=tenants_data, api_keys=keys,
                                      ray_resources='{"num_cpus": 0}')) for _ in range(2)]
    urls = [f.start() for f in fronts]
    sid = f"ten-{uuid.uuid4().hex[:8]}"
    try:
        with httpx.Client(base_url=urls[0], timeout=300,
                          headers={"Authorization": "Bearer key-of-alice-0123456"}) as alice, \
                httpx.Client(base_url=urls[1], timeout=300,
                             headers={"Authorization": "Bearer key-of-bob-012345678"}) as bob:
            r = alice.post("/v1/sessions", json={
                "id": sid, "optimizer": "SGD", "options": {"lr": 0.1}, "shards": shards,
                "params": {n: json_tensor(t) for n, t in initial().items()}})
            assert r.status_code == 201, r.text
            for r in (bob.post(f"/v1/sessions/{sid}/params/rows", json={"rows": {"emb": [1]}}),
                      bob.get(f"/v1/sessions/{sid}/params?name=emb&rows=1"),
                      bob.get(f"/v1/sessions/{sid}/params?params_dtype=float16"),
                      bob.get(f"/v1/sessions/{sid}/history"),
                      bob.post(f"/v1/sessions/{sid}/step?return=touched&upcast=true",
                               json={"grads": {"emb": {"indices": [1], "values": json_tensor(
                                   torch.ones(1, 4, dtype=torch.bfloat16))}}})):
                assert r.status_code == 404, r.text
            r = alice.get(f"/v1/sessions/{sid}/params?name=emb&rows=1")
            assert r.status_code == 200 and r.json()["version"] == 0, r.text
            assert torch.equal(tensor_from_json(r.json()["params"]["emb"]["values"]),
                               initial()["emb"][[1]])
    finally:
        for f in fronts:
            f.stop()
