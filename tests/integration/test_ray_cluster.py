"""The Ray engine on a real local Ray cluster (started by tests/conftest.py, shared by the run):
host actors killed with SIGKILL mid-training, a simulated node removed while it holds a
session, two HTTP fronts serving the same sessions (a sync round with workers on different
fronts), and sharded sessions (S = 2 and 3) equal bitwise to unsharded ones and to in-process
torch, also while a shard's host is killed between the two phases of its steps.

Every value is compared with in-process torch computed here; every server is a real uvicorn on
127.0.0.1 (in this process, or ``python -m app`` subprocesses for the two fronts).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

import optserve
from app.engine.ray_host import RayHost
from app.errors import Unavailable
from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.integration.test_durability import PortTaken, free_port

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[2]
BINARY = "application/octet-stream"
SHAPES = {"w": [6, 5], "b": [6], "e": [9, 3], "s": [4]}


def init_params(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


def grad_for(key: tuple[int, ...]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(hash(key) % (2**31))
    return {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}


class Local:
    """In-process Adam + StepLR over the same parameters, stepped as a session steps."""

    def __init__(self, seed: int = 0) -> None:
        self.params = {n: t.clone() for n, t in init_params(seed).items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=0.01, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, 3, 0.5)

    def step(self, g: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = g[n].clone() if n in g else None
        self.opt.step()
        self.sched.step()
        for p in self.params.values():
            p.grad = None


def create(client: optserve.Client, sid: str, seed: int = 0, **extra: Any) -> Any:
    return client.create_session("Adam", init_params(seed), options={"lr": 0.01,
                                                                       "weight_decay": 0.1},
                                 scheduler={"name": "StepLR",
                                            "options": {"step_size": 3, "gamma": 0.5}},
                                 id=sid, **extra)


def create_http(url: str, sid: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    """Create over plain HTTP (fields the SDK does not name: shards, resources, placement)."""
    from tests.torch_reference import json_tensor
    body = {"id": sid, "optimizer": "Adam", "options": {"lr": 0.01, "weight_decay": 0.1},
            "params": {n: json_tensor(t) for n, t in init_params(seed).items()},
            "scheduler": {"name": "StepLR", "options": {"step_size": 3, "gamma": 0.5}},
            **extra}
    r = httpx.post(f"{url}/v1/sessions", json=body, timeout=600)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(
        got[n].dtype == want[n].dtype and torch.equal(got[n].view(torch.uint8),
                                                      want[n].view(torch.uint8))
        for n in want)


def host_of(client: httpx.Client, sid: str, shard: int | None = None) -> dict[str, Any]:
    """The host actor's own account (name, pid, node) of the session (or one shard)."""
    placement = client.get(f"/v1/sessions/{sid}").json()["placement"]
    name = placement["host"] if shard is None else placement["shards"][shard]["host"]
    info: dict[str, Any] = ray.get(ray.get_actor(name, namespace="optserve").ping.remote())
    return info


def pull(client: httpx.Client, sid: str) -> tuple[int, dict[str, torch.Tensor]]:
    r = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    return int(r.headers["X-Optserve-Version"]), safetensors.torch.load(r.content)


@dataclass
class Acked:
    by_version: dict[int, tuple[int, ...]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def stepper(url: str, sid: str, thread: int, n: int, acked: Acked) -> None:
    """``n`` steps through the SDK (which retries 503s and dropped answers with the same
    Idempotency-Key); each acknowledged version is recorded with its gradients' key."""
    with optserve.Client(url, max_retries=30, timeout=300) as c:
        for i in range(n):
            key = (thread, i)
            try:
                out = c.step(sid, grad_for(key), return_params=False)
            except optserve.OptserveError as exc:
                with acked.lock:
                    acked.errors.append(f"{key}: {exc!r}")
                return
            with acked.lock:
                assert out.version not in acked.by_version, "two steps at one version"
                acked.by_version[out.version] = key


def replay(acked: Acked, seed: int = 0) -> Local:
    local = Local(seed)
    for v in sorted(acked.by_version):
        local.step(grad_for(acked.by_version[v]))
    return local


def check_session(client: httpx.Client, sid: str, acked: Acked, local: Local) -> None:
    """Every acknowledged step is there, once, in order: the session equals the replay."""
    versions = sorted(acked.by_version)
    assert versions == list(range(1, len(versions) + 1)), "a gap: an acknowledged step lost"
    version, got = pull(client, sid)
    assert version == len(versions)
    assert bitwise(got, local.params), "the restored session differs from the local replay"
    desc = client.get(f"/v1/sessions/{sid}").json()
    assert desc["lr"] == local.sched.get_last_lr()


# ----------------------------------------------------------------------------- kill -9
def test_kill9_of_a_host_mid_training_loses_and_doubles_nothing(ray_server: str) -> None:
    """4 SDK threads step one session; its host's process is killed with SIGKILL after 12
    acknowledged steps. Ray restarts the host, which restores the session from its snapshot
    and log; in-flight requests get 503 host_restarting and the SDK retries them with their
    keys. Every acknowledged step is in the restored session exactly once, bitwise equal to a
    local replay in version order."""
    with optserve.Client(ray_server) as c:
        create(c, "k9")
    with httpx.Client(base_url=ray_server, timeout=300) as h:
        before = host_of(h, "k9")
        acked = Acked()
        threads = [threading.Thread(target=stepper, args=(ray_server, "k9", t, 10, acked))
                   for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 300
        while len(acked.by_version) < 12 and time.monotonic() < deadline and not acked.errors:
            time.sleep(0.01)
        os.kill(before["pid"], signal.SIGKILL)
        for th in threads:
            th.join(600)
        assert not acked.errors, acked.errors
        assert len(acked.by_version) == 40
        after = host_of(h, "k9")
        assert after["name"] == before["name"] and after["pid"] != before["pid"]
        check_session(h, "k9", acked, replay(acked))
        assert h.delete("/v1/sessions/k9").status_code == 204


def test_host_killed_for_good_is_started_again_from_storage(ray_server: str) -> None:
    """A host actor killed without restart (an operator's ray.kill, a cluster that lost it):
    the front that meets its dead handle starts it again from host.json, and it restores its
    sessions from storage."""
    with optserve.Client(ray_server, max_retries=10, timeout=300) as c, \
            httpx.Client(base_url=ray_server, timeout=300) as h:
        create(c, "gone")
        acked = Acked()
        stepper(ray_server, "gone", 0, 3, acked)
        before = host_of(h, "gone")
        ray.kill(ray.get_actor(before["name"], namespace="optserve"), no_restart=True)
        stepper(ray_server, "gone", 1, 3, acked)
        assert not acked.errors, acked.errors
        after = host_of(h, "gone")
        assert after["name"] == before["name"] and after["pid"] != before["pid"]
        check_session(h, "gone", acked, replay(acked))
        c.delete_session("gone")


# ----------------------------------------------------------------------------- a node goes away
def test_removed_node_session_resumes_on_the_other(ray_cluster: Any, tmp_path: Path) -> None:
    """A second (simulated) node joins; sessions spread over both; the node holding one of them
    is removed. Ray restarts that host on the head node, it restores the session from the
    shared data directory, and training goes on where it stood."""
    node = ray_cluster.add_node(num_cpus=2)
    ray_cluster.wait_for_nodes()
    settings = ray_settings(ray_cluster, data_dir=tmp_path / "data", ray_placement="spread")
    server = LiveServer(settings)
    url = server.start()
    try:
        with optserve.Client(url, max_retries=30, timeout=300) as c, \
                httpx.Client(base_url=url, timeout=300) as h:
            on_node: str | None = None
            for i in range(4):
                sid = f"n{i}"
                create(c, sid, seed=i)
                if host_of(h, sid)["node"] == node.node_id:
                    on_node = sid
                    break
            assert on_node is not None, "no host landed on the second node"
            seed = int(on_node[1:])
            acked = Acked()
            stepper(url, on_node, 0, 4, acked)
            ray_cluster.remove_node(node)
            stepper(url, on_node, 1, 4, acked)  # the SDK retries until the host is back
            assert not acked.errors, acked.errors
            moved = host_of(h, on_node)
            assert moved["node"] != node.node_id
            check_session(h, on_node, acked, replay(acked, seed))
    finally:
        server.stop()
        kill_hosts(tmp_path / "data")


def _two_hosts_one_killed(c: optserve.Client, h: httpx.Client, url: str
                          ) -> tuple[set[str], Acked, str]:
    """Sessions ``slot0`` and ``slot1`` made on a host each (spread), ``slot0`` stepped
    twice, then its host killed for good and its room seen free: the two hosts' names, the
    steps acknowledged, the killed host's name."""
    for i in range(2):
        create(c, f"slot{i}", seed=i)
    hosts = {host_of(h, f"slot{i}")["name"] for i in range(2)}
    assert len(hosts) == 2, "spread: a host each"
    acked = Acked()
    stepper(url, "slot0", 0, 2, acked)
    gone = host_of(h, "slot0")["name"]
    ray.kill(ray.get_actor(gone, namespace="optserve"), no_restart=True)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("slot", 0) < 1:  # (its room freed)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return hosts, acked, gone


def _unplaced(gone: str) -> Callable[..., Awaitable[Any]]:
    """``RayHost.call`` with host ``gone`` not answering its ping (as a host whose restart Ray
    has not placed yet)."""
    call = RayHost.call

    async def unplaced(self: RayHost, method: str, *args: Any, **kw: Any) -> Any:
        if self.name == gone and method == "ping":
            raise Unavailable(f"{gone} is restarting", code="host_restarting")
        return await call(self, method, *args, **kw)
    return unplaced


def test_spread_leaves_room_for_a_host_killed_for_good(
        ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with room for two hosts of a shape (a custom resource ``slot: 2``) holds two,
    spread; one is killed for good (started again from its host.json by the next request for
    its session) and does not answer the placement's ping (as a host whose restart Ray has not
    placed yet). A create meanwhile went to a new host, the room looking free: the killed
    host could never be placed again, its session a 503 ``host_restarting`` for good (seen by
    h71's kill -9 chaos probe: 9 hosts of one CPU on a cluster of 8). Now the room of every
    host of the data directory is kept: the create goes to the live host, and the killed host
    comes back with its session, equal to torch."""
    node = ray_cluster.add_node(num_cpus=0, resources={"slot": 2})
    ray_cluster.wait_for_nodes()
    settings = ray_settings(ray_cluster, data_dir=tmp_path / "data", ray_placement="spread",
                            ray_resources='{"num_cpus": 0, "resources": {"slot": 1}}')
    server = LiveServer(settings)
    url = server.start()
    try:
        with optserve.Client(url, max_retries=30, timeout=300) as c, \
                httpx.Client(base_url=url, timeout=300) as h:
            hosts, acked, gone = _two_hosts_one_killed(c, h, url)
            with monkeypatch.context() as m:
                m.setattr(RayHost, "call", _unplaced(gone))
                create(c, "slot2", seed=2)
            assert h.get("/v1/sessions/slot2").json()["placement"]["host"] in hosts - {gone}
            stepper(url, "slot0", 1, 2, acked)  # (its host started again, placed)
            assert not acked.errors, acked.errors
            check_session(h, "slot0", acked, replay(acked, 0))
            assert len(list((tmp_path / "data" / "hosts").glob("*/host.json"))) == 2
    finally:
        server.stop()
        kill_hosts(tmp_path / "data")
        ray_cluster.remove_node(node)


def test_a_create_of_a_new_shape_leaves_the_room_of_a_host_that_is_down(
        ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node with room for two hosts (custom ``slot: 2``) holds two of shape ``slot: 1``, one
    session each; one host is killed for good and, as a host whose restart Ray has not placed
    yet, does not answer. A create of another shape on the same room (``slot: 1, tag: 1``), no
    host of which exists: a 503 ``no_capacity`` naming the down host, nothing started (was: a
    new host took the room, the down host could never be placed again, its session a 503 for
    good). The down host then comes back with its session, equal to torch, and the same create
    starts its new host, which waits for room (an autoscaler's cue; here none comes: a 503
    ``no_capacity`` once ``OPTSERVE_RAY_HOST_START_TIMEOUT_S`` passed)."""
    node = ray_cluster.add_node(num_cpus=0, resources={"slot": 2, "tag": 1})
    ray_cluster.wait_for_nodes()
    settings = ray_settings(ray_cluster, data_dir=tmp_path / "data", ray_placement="spread",
                            ray_resources='{"num_cpus": 0, "resources": {"slot": 1}}',
                            ray_host_start_timeout_s=5.0)
    server = LiveServer(settings)
    url = server.start()
    other_shape = {"resources": {"num_cpus": 0, "resources": {"slot": 1, "tag": 1}}}
    try:
        with optserve.Client(url, max_retries=30, timeout=300) as c, \
                httpx.Client(base_url=url, timeout=300) as h:
            hosts, acked, gone = _two_hosts_one_killed(c, h, url)
            with monkeypatch.context() as m:
                m.setattr(RayHost, "call", _unplaced(gone))
                r = h.post("/v1/sessions", json={
                    "id": "other", "optimizer": "SGD", "options": {"lr": 0.1},
                    "params": {"w": {"dtype": "float32", "shape": [1], "data": [1.0]}},
                    **other_shape})
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "no_capacity" and gone in r.json()["detail"], r.json()
            assert r.headers["retry-after"] == "10"
            assert len(list((tmp_path / "data" / "hosts").glob("*/host.json"))) == 2
            stepper(url, "slot0", 1, 2, acked)  # (its host started again, placed)
            assert not acked.errors, acked.errors
            check_session(h, "slot0", acked, replay(acked, 0))
            r = h.post("/v1/sessions", json={
                "id": "other", "optimizer": "SGD", "options": {"lr": 0.1},
                "params": {"w": {"dtype": "float32", "shape": [1], "data": [1.0]}},
                **other_shape})
            assert r.status_code == 503 and r.json()["code"] == "no_capacity", r.text
            assert "none started in 5 s" in r.json()["detail"], r.json()
            # (the host given up went with its folder: every one left is a host's)
            folders = list((tmp_path / "data" / "hosts").iterdir())
            assert len(folders) == 2 and all((f / "host.json").exists() for f in folders)
            check_session(h, "slot0", acked, replay(acked, 0))
    finally:
        server.stop()
        kill_hosts(tmp_path / "data")
        ray_cluster.remove_node(node)


# ----------------------------------------------------------------------------- two fronts
@dataclass
class Front:
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_front(cluster: Any, data: Path, log_dir: Path) -> Front:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
    env.update(OPTSERVE_ENGINE="ray", OPTSERVE_RAY_ADDRESS=cluster.address,
               OPTSERVE_DATA_DIR=str(data), OPTSERVE_PORT=str(port), OPTSERVE_DEVICE="cpu",
               OPTSERVE_WARM_UP="0", OPTSERVE_RAY_PLACEMENT="pack",
               OPTSERVE_RAY_RESOURCES='{"num_cpus": 1}', OPTSERVE_LOG_FORMAT="text",
               RAY_AUTH_MODE="disabled")
    log = log_dir / f"front-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    return Front(port, proc, log)


def wait_ready(front: Front) -> None:
    deadline = time.monotonic() + 300
    with httpx.Client(timeout=5) as poll:  # one client: no new TLS context per try
        while True:
            try:
                if poll.get(f"{front.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if front.proc.poll() is not None and \
                    "address already in use" in front.log.read_text():
                raise PortTaken(front.port)
            if front.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"front did not start:\n{front.log.read_text()}")
            time.sleep(0.2)


def ready_front(cluster: Any, data: Path, log_dir: Path, front: Front) -> Front:
    """``front`` once it is ready; when another process took its port between picking and
    binding it, a new front on a fresh port (up to three times)."""
    for _ in range(3):
        try:
            wait_ready(front)
            return front
        except PortTaken:
            front = start_front(cluster, data, log_dir)
    wait_ready(front)
    return front


@pytest.fixture
def two_fronts(ray_cluster: Any, tmp_path: Path) -> Iterator[tuple[Front, Front]]:
    data = tmp_path / "data"
    fronts = [start_front(ray_cluster, data, tmp_path) for _ in range(2)]
    try:
        for i, f in enumerate(fronts):
            fronts[i] = ready_front(ray_cluster, data, tmp_path, f)
        yield fronts[0], fronts[1]
    finally:
        for f in fronts:
            f.proc.send_signal(signal.SIGTERM)
        codes = []
        for f in fronts:
            try:
                codes.append(f.proc.wait(60))
            except subprocess.TimeoutExpired:
                f.proc.kill()
                codes.append(None)
        kill_hosts(data)
        # a drained SIGTERM is a clean exit on this engine too (ray.init's handler is undone)
        assert codes == [0, 0], [f.log.read_text()[-2000:] for f in fronts]


def test_two_fronts_serve_the_same_sessions(two_fronts: tuple[Front, Front]) -> None:
    """Steps through both fronts interleave on one session (ordered by its host); a sync round
    gathers workers that talk to different fronts; a long poll on one front wakes on a step
    through the other; a session created through one is deleted through the other."""
    a, b = two_fronts
    with optserve.Client(a.url, max_retries=5, timeout=300) as ca, \
            optserve.Client(b.url, max_retries=5, timeout=300) as cb:
        create(ca, "both")
        local = Local()
        for k in range(6):
            g = grad_for((7, k))
            out = (ca if k % 2 == 0 else cb).step("both", g)
            local.step(g)
            assert out.version == k + 1
            assert bitwise({n: torch.as_tensor(t) for n, t in out.params.items()},
                           local.params)
        assert cb.get_session("both").version == 6

        # one sync round, worker a on front A and worker b on front B
        params = init_params(3)
        ca.create_session("SGD", params, options={"lr": 0.5}, id="round",
                          sync={"workers": 2, "reduce": "mean", "timeout_s": 120})
        ga, gb = grad_for((8, 0)), grad_for((8, 1))
        with ThreadPoolExecutor(2) as pool:
            fa = pool.submit(ca.step, "round", ga, worker="a")
            fb = pool.submit(cb.step, "round", gb, worker="b")
            ra, rb = fa.result(300), fb.result(300)
        assert ra.version == rb.version == 1
        assert ra.sync is not None and ra.sync["workers"] == ["a", "b"]
        want = {n: p - 0.5 * (ga[n] + gb[n]) / 2 for n, p in params.items()}
        got = {n: torch.as_tensor(t) for n, t in rb.params.items()}
        assert bitwise(got, want)

        # a long poll on front B, woken by a step through front A
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(cb.get_params, "both", min_version=7, wait_s=60)
            time.sleep(1.0)
            assert not waiting.done()
            g = grad_for((7, 6))
            ca.step("both", g, return_params=False)
            local.step(g)
            pulled = waiting.result(120)
        assert pulled.version == 7
        assert bitwise({n: torch.as_tensor(t) for n, t in pulled.params.items()}, local.params)
        ca.delete_session("both")
        with pytest.raises(optserve.NotFoundError):
            cb.get_session("both")

    # a keyed create made through one front, its session deleted through the other (with a
    # key of its own): the create's retry, through either, is a 409 session_deleted (the key
    # is marked in the directory); the delete's retry through the front that did not answer
    # it is a 204 (its key is kept in the directory too), another request under it a 422
    key = {"Idempotency-Key": f"ray-create-{time.time_ns()}"}
    dkey = {"Idempotency-Key": f"ray-delete-{time.time_ns()}"}
    body = {"optimizer": "SGD", "options": {"lr": 0.1},
            "params": {"w": {"dtype": "float32", "shape": [1], "data": [1.0]}}}
    with httpx.Client(base_url=a.url, timeout=300) as ha, \
            httpx.Client(base_url=b.url, timeout=300) as hb:
        made = ha.post("/v1/sessions", json=body, headers=key)
        assert made.status_code == 201, made.text
        sid = made.json()["id"]
        assert hb.post("/v1/sessions", json=body, headers=key).json()["id"] == sid
        assert hb.delete(f"/v1/sessions/{sid}", headers=dkey).status_code == 204
        for h in (ha, hb):
            r = h.post("/v1/sessions", json=body, headers=key)
            assert r.status_code == 409 and r.json()["code"] == "session_deleted", r.text
            assert r.json()["session_id"] == sid
        r = ha.delete(f"/v1/sessions/{sid}", headers=dkey)
        assert r.status_code == 204, r.text
        assert r.headers.get("Idempotent-Replayed") == "true"
        r = ha.delete("/v1/sessions/other", headers=dkey)
        assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
        assert sid not in [s["id"] for s in ha.get("/v1/sessions").json()["sessions"]]


# ----------------------------------------------------------------------------- sharded
def test_sharded_sessions_equal_unsharded_and_torch(ray_server: str) -> None:
    """S = 1, 2, 3 over the cluster's hosts (shards on distinct hosts): every step's
    parameters, the exported state and a state imported back are bitwise torch's."""
    with httpx.Client(base_url=ray_server, timeout=600) as h:
        for s in (1, 2, 3):
            desc = create_http(ray_server, f"sh{s}", shards=s)
            if s > 1:
                hosts = [x["host"] for x in desc["placement"]["shards"]]
                assert len(set(hosts)) == s, "shards share a host"
        local = Local()
        for k in range(5):
            g = grad_for((9, k))
            if k == 2:
                g.pop("e")  # a partial push: torch skips the parameter
            body = safetensors.torch.save(g)
            local.step(g)
            for s in (1, 2, 3):
                r = h.post(f"/v1/sessions/sh{s}/step", content=body,
                           headers={"Content-Type": BINARY, "Accept": BINARY})
                assert r.status_code == 200, r.text
                assert int(r.headers["X-Optserve-Version"]) == k + 1
                assert bitwise(safetensors.torch.load(r.content), local.params), (s, k)
        exports = [h.get(f"/v1/sessions/sh{s}/state_dict", params={"format": "torch"})
                   for s in (1, 2, 3)]
        assert all(r.status_code == 200 for r in exports)
        sds = [torch.load(io.BytesIO(r.content), weights_only=True)
               for r in exports]
        for sd in sds[1:]:
            assert sd["param_groups"] == sds[0]["param_groups"]
            assert sd["scheduler"] == sds[0]["scheduler"]
            for pid, entry in sds[0]["state"].items():
                assert all(torch.equal(v, sd["state"][pid][k]) for k, v in entry.items())
        # torch's own state dict into a new sharded session, then the same steps
        sd = local.opt.state_dict()
        sd["scheduler"] = local.sched.state_dict()
        create_http(ray_server, "imp", shards=3)
        buf = io.BytesIO()
        torch.save(sd, buf)
        r = h.put("/v1/sessions/imp/params", content=safetensors.torch.save(local.params),
                  headers={"Content-Type": BINARY})
        assert r.status_code == 200, r.text
        r = h.put("/v1/sessions/imp/state_dict", params={"format": "torch"},
                  content=buf.getvalue(), headers={"Content-Type": BINARY})
        assert r.status_code == 200, r.text
        for k in range(3):
            g = grad_for((10, k))
            local.step(g)
            for sid in ("sh3", "imp"):
                r = h.post(f"/v1/sessions/{sid}/step", content=safetensors.torch.save(g),
                           headers={"Content-Type": BINARY, "Accept": BINARY})
                assert r.status_code == 200, r.text
                assert bitwise(safetensors.torch.load(r.content), local.params), (sid, k)
        # a refused option changes no shard
        r = h.patch("/v1/sessions/sh3/param_groups/0", json={"lr": -1})
        assert r.status_code == 422
        assert h.get("/v1/sessions/sh3").json()["lr"] == local.sched.get_last_lr()


def test_shard_hosts_killed_between_phases_lose_and_double_nothing(ray_server: str) -> None:
    """A sharded session is stepped by 2 SDK threads while a shard's host (not its
    coordinator's) and then the coordinator's host are killed with SIGKILL. Commits that did
    not reach the killed host are rolled forward (same key) when it is back; requests in
    flight get 503 and the SDK retries them: every acknowledged step is applied once, on every
    shard."""
    create_http(ray_server, "shk", shards=2)
    with httpx.Client(base_url=ray_server, timeout=300) as h:
        acked = Acked()
        threads = [threading.Thread(target=stepper, args=(ray_server, "shk", t, 8, acked))
                   for t in range(2)]
        for th in threads:
            th.start()
        for shard, after in ((1, 4), (0, 10)):
            deadline = time.monotonic() + 300
            while len(acked.by_version) < after and time.monotonic() < deadline \
                    and not acked.errors:
                time.sleep(0.005)
            os.kill(host_of(h, "shk", shard)["pid"], signal.SIGKILL)
        for th in threads:
            th.join(600)
        assert not acked.errors, acked.errors
        assert len(acked.by_version) == 16
        check_session(h, "shk", acked, replay(acked))
