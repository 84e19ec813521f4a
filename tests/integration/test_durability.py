"""Durability against real servers: ``kill -9`` mid-run loses no acknowledged step, damaged files
are refused (and the rest served), SIGTERM drains, durability levels behave as documented.

The crash test runs ``python -m app`` as a process of its own (forked from one that has
imported it: tests/forked_server.py) with ``OPTSERVE_DURABILITY=step``. Four
client threads push deterministic gradients (Adam + StepLR) and record the version each
response acknowledged; the server is killed with SIGKILL mid-run and restarted on the same
data directory. The applied order is rebuilt from the acknowledged versions: every version up
to the restored one is either acknowledged (its gradient is known) or was a request in flight
when the server died (its response lost; at most one per client). The params must equal,
bitwise, a local ``torch.optim`` replay of exactly that order for exactly one assignment of
the in-flight gradients to the unacknowledged versions; then the exported optimizer state and
the scheduler must match and 3 more steps must continue identically. Each restart is the next
run's server, so one chain covers kills at random points, with a snapshot every step, with a
log torn by hand, and finally with a damaged snapshot (refused, the other session served).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import random
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from app.engine import persist
from app.engine.ops import Step
from app.engine.store import frame_record, read_log, read_snapshot
from app.wire.tree import tree_from_json
from tests import forked_server
from tests.conftest import LiveServer, _test_settings, kill_hosts, ray_settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BINARY = "application/octet-stream"
SHAPES = {"w": (48,), "b": (8,)}
LR, STEP_SIZE, GAMMA = 0.01, 40, 0.9  # lr must not vanish over ~1,500 steps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def grad_for(key: tuple[int, ...]) -> dict[str, torch.Tensor]:
    seed = 0
    for k in key:
        seed = seed * 1_000_003 + k + 7
    g = torch.Generator().manual_seed(seed % (2**62))
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def params0(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}


def jt(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape), "data": t.double().reshape(-1).tolist()}


def create_body(sid: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"id": sid, "optimizer": "Adam", "options": {"lr": LR},
            "params": {n: jt(t) for n, t in params0(seed).items()},
            "scheduler": {"name": "StepLR", "options": {"step_size": STEP_SIZE,
                                                        "gamma": GAMMA}}, **extra}


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class Reference:
    """Local torch Adam + StepLR; cloned through state dicts (never deepcopy: the scheduler's
    wrapper around ``optimizer.step`` would keep stepping the original)."""

    def __init__(self, seed: int = 0) -> None:
        self.params = params0(seed)
        self.opt = torch.optim.Adam(list(self.params.values()), lr=LR)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, STEP_SIZE, GAMMA)
        self.version = 0

    def clone(self) -> Reference:
        new = Reference()
        for n, p in self.params.items():
            new.params[n].data.copy_(p.data)
        # load_state_dict keeps tensors that already have the right dtype and device: copy
        new.opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        new.sched.load_state_dict(copy.deepcopy(self.sched.state_dict()))
        new.version = self.version
        return new

    def step(self, g: dict[str, torch.Tensor]) -> None:
        for n, p in self.params.items():
            p.grad = g[n].clone()
        self.opt.step()
        self.sched.step()
        for p in self.params.values():
            p.grad = None
        self.version += 1

    def same_params(self, got: dict[str, torch.Tensor]) -> bool:
        return set(got) == set(self.params) and all(
            bitwise(got[n], p.detach()) for n, p in self.params.items())


# --------------------------------------------------------------------------- the subprocess

class PortTaken(Exception):
    """The server could not bind its port: another process took it after it was picked."""


@dataclass
class Proc:
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    #: ``python -m app``, forked from a process that has imported it (tests/forked_server.py)
    proc: forked_server.ServerProcess | None = None
    log_path: Path | None = None
    #: importing torch and warming up takes a few seconds, a minute on a loaded machine
    ready_timeout_s: float = 180.0
    #: the server's descriptor limit (``RLIMIT_NOFILE``, soft and hard); None: this process's
    nofile: int | None = None
    #: the ``/readyz`` answer :meth:`start` waits for (a 200; a server that can never be
    #: ready: its 503)
    started: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, **env: str) -> Proc:
        """Start the server and wait until it is ready. The port was free when it was picked,
        but another process may take it before the server binds (``free_port`` cannot hold
        it): then the next start takes a fresh port."""
        for _ in range(3):
            try:
                return self._start(**env)
            except PortTaken:
                self.port = free_port()
        return self._start(**env)

    def _start(self, **env: str) -> Proc:
        base = {k: v for k, v in os.environ.items() if not k.startswith("OPTSERVE_")}
        # no warm-up (loading every optimizer's kernels before readiness: 1.5 s of CPU a
        # start, and these servers start some 40 times); what they check does not depend on it,
        # and the servers of test_cli's `serve`, test_sdk_gc_pause, scripts/test-clients and
        # every in-process LiveServer still warm up
        full = {**base, "OPTSERVE_HOST": "127.0.0.1", "OPTSERVE_PORT": str(self.port),
                "OPTSERVE_DATA_DIR": str(self.data_dir), "OPTSERVE_DEVICE": "cpu",
                "OPTSERVE_DURABILITY": "step", "OPTSERVE_TORCH_THREADS": "1",
                "OPTSERVE_LOG_FORMAT": "text", "OPTSERVE_LOG_LEVEL": "info",
                "OPTSERVE_WARM_UP": "0", **self.env, **env}
        self.log_path = self.data_dir.parent / f"server-{self.port}-{time.monotonic_ns()}.log"
        self.proc = forked_server.start(full, REPO, self.log_path, self.nofile)
        deadline = time.monotonic() + self.ready_timeout_s
        # one client for the whole wait: httpx.get would build a new TLS context (about 45 ms
        # of CPU) every 50 ms, taking the CPU the starting server needs
        with httpx.Client(timeout=2) as poll:
            while True:
                try:
                    if self.started(poll.get(f"{self.url}/readyz")):
                        return self
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None and "address already in use" in self.log():
                    raise PortTaken(self.port)
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[Proc]:
    p = Proc(tmp_path / "data")
    try:
        yield p
    finally:
        p.stop()


# --------------------------------------------------------------------------- the crash chain

@dataclass
class Run:
    acked: dict[int, tuple[int, ...]] = field(default_factory=dict)
    inflight: list[tuple[int, ...]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def push_until_dead(url: str, run_no: int, t: int, run: Run, stop: threading.Event) -> None:
    headers = {"Content-Type": BINARY}
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in itertools.count():
            if stop.is_set():
                return
            key = (run_no, t, i)
            body = safetensors.torch.save(grad_for(key))
            try:
                r = client.post("/v1/sessions/crash/step?return=none", content=body,
                                headers=headers)
            except httpx.ConnectError:  # never sent
                return
            except httpx.TransportError:  # sent; applied or not, nobody heard back
                with run.lock:
                    run.inflight.append(key)
                return
            if r.status_code != 200:
                with run.lock:
                    run.errors.append(f"{r.status_code} {r.text}")
                return
            version = r.json()["version"]
            with run.lock:
                assert version not in run.acked, "two steps acknowledged at one version"
                run.acked[version] = key


def pull(client: httpx.Client, sid: str) -> tuple[int, dict[str, torch.Tensor]]:
    r = client.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    return int(r.headers["X-Optserve-Version"]), safetensors.torch.load(r.content)


def reconcile(client: httpx.Client, ref: Reference, run: Run) -> Reference:
    """The reference advanced by exactly what the restarted server holds (see module doc)."""
    desc = client.get("/v1/sessions/crash")
    assert desc.status_code == 200, desc.text
    restored = desc.json()["version"]
    assert desc.json()["step"] == restored
    max_ack = max(run.acked, default=ref.version)
    assert restored >= max_ack, f"acknowledged steps lost: restored {restored} < {max_ack}"
    versions = range(ref.version + 1, restored + 1)
    assert set(run.acked) <= set(versions)
    missing = [v for v in versions if v not in run.acked]
    assert len(missing) <= len(run.inflight), (missing, run.inflight)
    version, got = pull(client, "crash")
    assert version == restored
    # replay the acknowledged prefix once, then each candidate assignment for the rest
    first_gap = missing[0] if missing else restored + 1
    prefix = ref.clone()
    for v in range(ref.version + 1, first_gap):
        prefix.step(grad_for(run.acked[v]))
    matches = []
    for chosen in itertools.permutations(run.inflight, len(missing)):
        cand = prefix.clone()
        fill = dict(zip(missing, chosen, strict=True))
        for v in range(first_gap, restored + 1):
            cand.step(grad_for(run.acked[v] if v in run.acked else fill[v]))
        if cand.same_params(got):
            matches.append(cand)
    assert len(matches) == 1, (f"{len(matches)} replays match the restored params (acked up "
                               f"to {max_ack}, restored {restored}, missing {missing}, "
                               f"in flight {run.inflight})")
    return matches[0]


def check_state_and_continue(client: httpx.Client, ref: Reference, tag: int) -> None:
    """Exported optimizer + scheduler state equal the reference's, then 3 identical steps."""
    r = client.get("/v1/sessions/crash/state_dict", params={"encoding": "b64"})
    assert r.status_code == 200, r.text
    sd = tree_from_json(r.json())
    want = ref.opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == list(SHAPES)
    for pid, name in enumerate(SHAPES):
        for k, v in want["state"][pid].items():
            assert bitwise(sd["state"][str(pid)][k], v), (name, k)
    for k in ("lr", "initial_lr", "betas", "eps", "weight_decay", "amsgrad"):
        expected = want["param_groups"][0][k]
        assert sd["param_groups"][0][k] == (list(expected) if isinstance(expected, tuple)
                                            else expected), k
    sched = ref.sched.state_dict()
    for k in ("last_epoch", "_step_count", "_last_lr", "base_lrs", "step_size", "gamma"):
        assert sd["scheduler"][k] == sched[k], k
    for j in range(3):
        g = grad_for((tag, 99, j))
        r = client.post("/v1/sessions/crash/step", content=safetensors.torch.save(g),
                        headers={"Content-Type": BINARY, "Accept": BINARY})
        assert r.status_code == 200, r.text
        ref.step(g)
        assert int(r.headers["X-Optserve-Version"]) == ref.version
        assert ref.same_params(safetensors.torch.load(r.content)), f"continued step {j}"
    desc = client.get("/v1/sessions/crash").json()
    assert desc["lr"] == ref.sched.get_last_lr() and desc["version"] == ref.version


def session_dir(data: Path, sid: str) -> Path:
    return data / "sessions" / f"default~{sid}"


def test_kill9_loses_no_acknowledged_step(proc: Proc) -> None:
    rng = random.Random(20260501)
    # kill after a random number of acknowledged steps plus a random few milliseconds (so the
    # kill lands in a different phase of a step each time, on a fast machine or a slow one)
    runs: list[dict[str, Any]] = [
        {"every": "5", "after": rng.randint(40, 160), "jitter": rng.uniform(0, 0.02)},
        {"every": "5", "after": rng.randint(10, 60), "jitter": rng.uniform(0, 0.02)},
        {"every": "1", "after": rng.randint(20, 80), "jitter": rng.uniform(0, 0.02)},  # a
        # snapshot after every step: the kill most likely lands in one
        {"every": "5", "after": rng.randint(20, 100), "jitter": rng.uniform(0, 0.02),
         "damage": "tear"},
        {"every": "5", "after": rng.randint(20, 100), "jitter": rng.uniform(0, 0.02),
         "damage": "snapshot"},
    ]
    proc.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="5")
    ref, bystander = Reference(), Reference(seed=5)
    with httpx.Client(base_url=proc.url, timeout=30) as c:
        assert c.post("/v1/sessions", json=create_body("crash")).status_code == 201
        assert c.post("/v1/sessions", json=create_body("bystander", seed=5)).status_code == 201
        for k in range(4):
            g = grad_for((1000, k))
            assert c.post("/v1/sessions/bystander/step", content=safetensors.torch.save(g),
                          headers={"Content-Type": BINARY}).status_code == 200
            bystander.step(g)
    crash_dir = session_dir(proc.data_dir, "crash")
    for run_no, plan in enumerate(runs):
        run, stop = Run(), threading.Event()
        threads = [threading.Thread(target=push_until_dead, args=(proc.url, run_no, t, run, stop))
                   for t in range(4)]
        for th in threads:
            th.start()
        deadline = time.monotonic() + 60
        while len(run.acked) < plan["after"] and time.monotonic() < deadline and not run.errors:
            time.sleep(0.001)
        time.sleep(plan["jitter"])
        proc.kill9()
        stop.set()
        for th in threads:
            th.join(30)
        assert not run.errors, run.errors
        assert len(run.acked) >= plan["after"], f"run {run_no}: {len(run.acked)} steps"
        records, _, torn = read_log(crash_dir / "wal.bin")
        every = int(plan["every"])
        assert len(records) <= every, "no snapshot was taken during the run"
        if plan.get("damage") == "tear":
            # half of the next record: as if the server died in the middle of writing it
            g = grad_for((run_no, 77))
            half = frame_record(persist.encode_record(persist.Record(Step(g), 10**6, 10**6, [])))
            with open(crash_dir / "wal.bin", "ab") as f:
                f.write(half[: len(half) // 2])
        if plan.get("damage") == "snapshot":
            snap = crash_dir / "snapshot.bin"
            data = bytearray(snap.read_bytes())
            data[len(data) * 2 // 3] ^= 0x04
            snap.write_bytes(data)
        next_every = runs[run_no + 1]["every"] if run_no + 1 < len(runs) else "5"
        proc.start(OPTSERVE_SNAPSHOT_EVERY_STEPS=next_every)
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            if plan.get("damage") == "snapshot":
                # refused, reported, not served; the other session is
                assert c.get("/v1/sessions/crash").status_code == 404
                assert [d["id"] for d in c.get("/v1/sessions").json()["sessions"]] == \
                    ["bystander"]
                ready = c.get("/readyz").json()
                assert [r["id"] for r in ready["refused"]] == ["crash"]
                assert "checksum" in ready["refused"][0]["reason"]
                assert "refusing stored session default~crash" in proc.log()
                r = c.post("/v1/sessions", json=create_body("crash"))
                assert r.status_code == 409  # the id stays taken until an operator acts
                version, got = pull(c, "bystander")
                assert version == bystander.version and bystander.same_params(got)
                assert snap.read_bytes() == data  # the evidence is left in place
                break
            if plan.get("damage") == "tear":
                assert "torn last record dropped" in proc.log()
            ref = reconcile(c, ref, run)
            check_state_and_continue(c, ref, tag=run_no)
    else:
        pytest.fail("the chain must end with the damaged snapshot")


# --------------------------------------------------------------------------- damage at start

def test_empty_param_groups_survive_kill9_from_the_log_and_from_snapshots(proc: Proc) -> None:
    """Groups without parameters (torch takes them: a weight-decay split with nothing to
    exempt, ``add_param_group({"params": []})``) are in the create's record, in an
    add_param_group's and in snapshots: a session restored from each after ``kill -9`` keeps
    them, and steps on as torch does."""
    p0 = params0()
    local = {n: t.clone() for n, t in p0.items()}
    opt = torch.optim.AdamW([{"params": [local["w"]], "weight_decay": 0.1},
                             {"params": [], "weight_decay": 0.0}], lr=LR)
    body = {"id": "split", "optimizer": "AdamW", "options": {"lr": LR},
            "param_groups": [{"params": {"w": jt(p0["w"])}, "weight_decay": 0.1},
                             {"params": {}, "weight_decay": 0.0}]}
    steps = iter(itertools.count())

    def step_both(c: httpx.Client, n: int) -> None:
        for _ in range(n):
            g = grad_for((next(steps),))
            for name, p in local.items():
                p.grad = g[name].clone() if any(p is q for grp in opt.param_groups
                                                for q in grp["params"]) else None
            opt.step()
            grads = {name: jt(g[name]) for name in local
                     if any(local[name] is q for grp in opt.param_groups
                            for q in grp["params"])}
            r = c.post("/v1/sessions/split/step", json={"grads": grads})
            assert r.status_code == 200, r.text

    def check(c: httpx.Client) -> None:
        _, got = pull(c, "split")
        assert set(got) == {n for n, p in local.items()
                            if any(p is q for grp in opt.param_groups for q in grp["params"])}
        for name, t in got.items():
            assert bitwise(t, local[name].detach()), name
        sd = c.get("/v1/sessions/split/state_dict").json()
        mine = opt.state_dict()
        assert len(sd["param_groups"]) == len(mine["param_groups"])
        for theirs, ours in zip(sd["param_groups"], mine["param_groups"], strict=True):
            assert theirs["params"] == ours["params"]
            assert theirs["weight_decay"] == ours["weight_decay"] and theirs["lr"] == ours["lr"]
        for pid, entry in mine["state"].items():
            for key, value in entry.items():
                assert bitwise(tree_from_json(sd["state"][str(pid)][key], "s"), value), key

    proc.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="1000")  # restored from the log: create, steps
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert c.post("/v1/sessions", json=body).status_code == 201
        step_both(c, 2)
        r = c.post("/v1/sessions/split/param_groups", json={"params": {}, "lr": 0.5})
        assert r.status_code == 201, r.text
        opt.add_param_group({"params": [], "lr": 0.5})
        r = c.post("/v1/sessions/split/param_groups",
                   json={"params": {"b": jt(p0["b"])}, "amsgrad": True})
        assert r.status_code == 201, r.text
        opt.add_param_group({"params": [local["b"]], "amsgrad": True})
        step_both(c, 2)
    proc.kill9()
    proc.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="2")  # then from snapshots taken after restart
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert c.get("/readyz").json().get("refused") is None
        check(c)
        step_both(c, 5)
    proc.kill9()
    proc.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        check(c)
        step_both(c, 1)
        check(c)


def crash_image(server: LiveServer, data: Path, dest: Path) -> None:
    """Copy the data directory of a running server between requests: what ``kill -9`` would
    leave (with ``durability: step`` everything acknowledged is on disk)."""
    del server
    shutil.copytree(data, dest)


def test_damaged_files_are_refused_and_the_rest_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, image = tmp_path / "data", tmp_path / "image"
    # the create and 7 steps: a snapshot after record 5, records 6-8 in the log
    live = LiveServer(_test_settings(data_dir=data, snapshot_every_steps=5))
    url = live.start()
    names = ["good", "torn", "zeros", "mid-payload", "mid-length", "bad-snap", "short-snap",
             "no-snap"]
    refs: dict[str, Reference] = {}
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i, sid in enumerate(names):
                assert c.post("/v1/sessions", json=create_body(sid, seed=i)).status_code == 201
                refs[sid] = Reference(seed=i)
                for k in range(7):
                    g = grad_for((i, k))
                    r = c.post(f"/v1/sessions/{sid}/step?return=none",
                               content=safetensors.torch.save(g), headers={"Content-Type": BINARY})
                    assert r.status_code == 200
                    refs[sid].step(g)
            crash_image(live, data, image)
    finally:
        live.stop()

    def sdir(sid: str) -> Path:
        return session_dir(image, sid)

    for sid in names:
        assert len(read_log(sdir(sid) / "wal.bin")[0]) == 3  # the steps after the snapshot
    with open(sdir("torn") / "wal.bin", "ab") as f:
        f.write(frame_record(b"x" * 1000)[:500])
    with open(sdir("zeros") / "wal.bin", "ab") as f:
        f.write(b"\0" * 4096)  # blocks a crash left allocated but unwritten
    for sid, offset in (("mid-payload", 200), ("mid-length", 5)):
        wal = sdir(sid) / "wal.bin"
        raw = bytearray(wal.read_bytes())
        second = len(frame_record(read_log(wal)[0][0]))  # the second record starts here
        raw[second + offset] ^= 0x20
        wal.write_bytes(raw)
    raw = bytearray((sdir("bad-snap") / "snapshot.bin").read_bytes())
    raw[-100] ^= 0x01
    (sdir("bad-snap") / "snapshot.bin").write_bytes(raw)
    snap = sdir("short-snap") / "snapshot.bin"
    snap.write_bytes(snap.read_bytes()[:-1000])
    (sdir("no-snap") / "snapshot.bin").unlink()  # a log without its start: not a torn create
    before = {p: p.read_bytes() for p in image.rglob("*.bin")}

    caplog.set_level(logging.INFO, logger="optserve")
    live = LiveServer(_test_settings(data_dir=image))
    url = live.start()
    try:
        # the start says what it restored, and from where
        assert any(r.getMessage().endswith(
            f": 3 stored session(s) restored from {image.resolve()}, 5 refused (GET /readyz "
            "lists them) (durability step)") for r in caplog.records if r.name == "optserve")
        with httpx.Client(base_url=url, timeout=30) as c:
            listed = sorted(d["id"] for d in c.get("/v1/sessions").json()["sessions"])
            assert listed == ["good", "torn", "zeros"]
            for sid in listed:
                version, got = pull(c, sid)
                assert version == 7 and refs[sid].same_params(got), sid
            refused = {r["id"]: r["reason"] for r in c.get("/readyz").json()["refused"]}
            assert set(refused) == {"mid-payload", "mid-length", "bad-snap", "short-snap",
                                    "no-snap"}
            assert "valid record follows" in refused["mid-payload"]
            assert "valid record follows" in refused["mid-length"]
            assert "checksum" in refused["bad-snap"]
            assert "header says" in refused["short-snap"]
            assert "not the session's create" in refused["no-snap"]
            for sid in refused:
                r = c.get(f"/v1/sessions/{sid}")
                assert r.status_code == 404 and r.json()["code"] == "session_not_found"
                assert c.post(f"/v1/sessions/{sid}/step", json={"grads": {}}).status_code \
                    == 404
    finally:
        live.stop()
    for p, content in before.items():
        if p.parent.name.split("~")[1] in refused:
            assert p.read_bytes() == content, f"{p} was changed"


# --------------------------------------------------------------------------- SIGTERM

def test_sigterm_drains_in_flight_then_snapshots_and_exits_0(proc: Proc, tmp_path: Path) -> None:
    """Also: OPTSERVE_ALLOW_OPEN=1 lets a keyless server bind 0.0.0.0 (with a warning)."""
    proc.env = {"OPTSERVE_HOST": "0.0.0.0", "OPTSERVE_ALLOW_OPEN": "1",
                "OPTSERVE_SNAPSHOT_EVERY_STEPS": "100000"}
    proc.start()
    assert "WITHOUT authentication" in proc.log()
    n = 1_000_000
    g0 = torch.Generator().manual_seed(3)
    p0 = torch.randn(n, generator=g0)
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        meta = {"optimizer": "SGD", "options": '{"lr": 0.1, "momentum": 0.9}'}
        r = c.post("/v1/sessions", content=safetensors.torch.save({"p": p0}, metadata=meta),
                   headers={"Content-Type": BINARY})
        assert r.status_code == 201, r.text
        sid = r.json()["id"]
        grads = [torch.randn(n, generator=g0) for _ in range(3)]
        assert c.patch(f"/v1/sessions/{sid}/param_groups/0", json={"lr": 0.05}).status_code \
            == 200
        for g in grads[:2]:
            assert c.post(f"/v1/sessions/{sid}/step?return=none",
                          content=safetensors.torch.save({"p": g}),
                          headers={"Content-Type": BINARY}).status_code == 200
    wal = session_dir(proc.data_dir, sid) / "wal.bin"
    assert len(read_log(wal)[0]) == 4  # the create, the option change, two steps

    # a slow upload is in flight when SIGTERM arrives
    payload = safetensors.torch.save({"p": grads[2]})
    sent = threading.Event()

    def slow_body() -> Iterator[bytes]:
        step = len(payload) // 10
        for i in range(0, len(payload), step):
            yield payload[i:i + step]
            sent.set()
            time.sleep(0.15)
    result: dict[str, Any] = {}

    def request() -> None:
        try:
            with httpx.Client(base_url=proc.url, timeout=60) as c:
                result["r"] = c.post(f"/v1/sessions/{sid}/step", content=slow_body(),
                                     headers={"Content-Type": BINARY, "Accept": BINARY,
                                              "Content-Length": str(len(payload))})
        except httpx.HTTPError as exc:
            result["error"] = exc
    th = threading.Thread(target=request)
    th.start()
    assert sent.wait(30)
    # Let the server parse the request line and headers: uvicorn drops a connection whose
    # request it has not begun to read, and finishes every request it has.
    time.sleep(0.3)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    th.join(60)
    assert proc.proc.wait(60) == 0, proc.log()
    assert "error" not in result, result
    r = result["r"]
    assert r.status_code == 200 and r.headers["X-Optserve-Version"] == "3"

    p = p0.clone()
    ref = torch.optim.SGD([p], lr=0.05, momentum=0.9)
    for g in grads:
        p.grad = g
        ref.step()
    assert bitwise(safetensors.torch.load(r.content)["p"], p)
    # on disk: a snapshot holding everything, an empty log
    assert wal.stat().st_size == 0
    tree = persist.decode_tree(read_snapshot(wal.parent / "snapshot.bin"), persist.SNAPSHOT_KEY)
    assert tree["meta"]["version"] == 3 and bitwise(tree["params"]["p"], p)
    log = proc.log()
    assert "Shutting down" in log and "Traceback" not in log

    # and a restart serves it (nothing to replay)
    proc.env = {}
    proc.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        r = c.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
        assert r.headers["X-Optserve-Version"] == "3"
        assert bitwise(safetensors.torch.load(r.content)["p"], p)
    assert "0 logged operations replayed" in proc.log()


def test_readyz_is_false_while_draining() -> None:
    live = LiveServer(_test_settings())
    url = live.start()
    try:
        with httpx.Client(base_url=url) as c:
            assert c.get("/readyz").status_code == 200
            live.app.state.draining = True
            r = c.get("/readyz")
            assert r.status_code == 503 and r.json()["code"] == "draining"
    finally:
        live.stop()


# --------------------------------------------------------------------------- levels

def step_n(c: httpx.Client, sid: str, ref: Reference, n: int, tag: int) -> None:
    for k in range(n):
        g = grad_for((tag, k))
        r = c.post(f"/v1/sessions/{sid}/step?return=none", content=safetensors.torch.save(g),
                   headers={"Content-Type": BINARY})
        assert r.status_code == 200, r.text
        ref.step(g)


class Deployment:
    """Servers of one engine over one data directory. On the Ray engine a restart is a new
    front and new host actors (the old ones killed for good): the hosts restore from storage,
    as after a cluster restart."""

    def __init__(self, engine: str, request: pytest.FixtureRequest) -> None:
        self.engine = engine
        self.cluster = request.getfixturevalue("ray_cluster") if engine == "ray" else None

    def server(self, **settings: Any) -> LiveServer:
        if self.cluster is not None:
            return LiveServer(ray_settings(self.cluster, **settings))
        return LiveServer(_test_settings(**settings))

    def stopped(self, live: LiveServer, data: Path) -> None:
        live.stop()
        if self.cluster is not None:
            kill_hosts(data)

    def session_dirs(self, data: Path, sid: str) -> list[Path]:
        if self.cluster is not None:
            return list(data.glob(f"hosts/*/sessions/default~{sid}"))
        return [p for p in [session_dir(data, sid)] if p.exists()]


ENGINES = ["embedded", pytest.param("ray", marks=pytest.mark.ray)]


@pytest.mark.parametrize("engine", ENGINES)
def test_durability_levels_per_session_and_server_default(
        tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> None:
    dep = Deployment(engine, request)
    data, image = tmp_path / "data", tmp_path / "image"
    live = dep.server(data_dir=data, fsync_interval_ms=20.0)  # default: step
    url = live.start()
    refs: dict[str, Reference] = {}
    levels = {"default": None, "step": "step", "interval": "interval", "memory": "memory"}
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for i, (sid, level) in enumerate(levels.items()):
                extra = {"durability": level} if level else {}
                r = c.post("/v1/sessions", json=create_body(sid, seed=i, **extra))
                assert r.status_code == 201 and r.json()["durability"] == (level or "step")
                refs[sid] = Reference(seed=i)
                step_n(c, sid, refs[sid], 3, i)
            assert not dep.session_dirs(data, "memory")  # no disk at all
            assert len(dep.session_dirs(data, "step")) == 1
            time.sleep(0.2)  # past the interval window
            crash_image(live, data, image)
    finally:
        dep.stopped(live, data)  # embedded: clean, snapshots every persisted session

    for where in (data, image):  # a clean restart, and what kill -9 would have left
        live = dep.server(data_dir=where)
        url = live.start()
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                listed = sorted(d["id"] for d in c.get("/v1/sessions").json()["sessions"])
                assert listed == ["default", "interval", "step"], where
                for sid in listed:
                    version, got = pull(c, sid)
                    assert version == 3 and refs[sid].same_params(got), (where, sid)
                    assert c.get(f"/v1/sessions/{sid}").json()["durability"] == \
                        (levels[sid] or "step")
                assert c.get("/v1/sessions/memory").status_code == 404
        finally:
            dep.stopped(live, where)

    # server default memory; a session asking for step is persisted, the others are not
    data2 = tmp_path / "data2"
    for _ in range(2):
        live = dep.server(data_dir=data2, durability="memory")
        url = live.start()
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                listed = [d["id"] for d in c.get("/v1/sessions").json()["sessions"]]
                if not listed:  # first run
                    r = c.post("/v1/sessions", json=create_body("d"))
                    assert r.json()["durability"] == "memory"
                    r = c.post("/v1/sessions", json=create_body("p", durability="step"))
                    assert r.json()["durability"] == "step"
                    step_n(c, "p", Reference(), 2, 9)
                    step_n(c, "d", Reference(), 2, 9)
                else:
                    assert listed == ["p"]
                    ref = Reference()
                    for k in range(2):
                        ref.step(grad_for((9, k)))
                    version, got = pull(c, "p")
                    assert version == 2 and ref.same_params(got)
        finally:
            dep.stopped(live, data2)


@pytest.mark.parametrize("engine", ENGINES)
def test_scheduler_driven_to_zero_lr_survives_restart(
        tmp_path: Path, engine: str, request: pytest.FixtureRequest) -> None:
    """LinearLR to end_factor 0 leaves lr a hair below zero in floating point; the session
    serves fine and must restore after a restart too (not be refused as invalid)."""
    dep = Deployment(engine, request)
    data = tmp_path / "data"
    body = {"id": "decay", "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9},
            "params": {"w": jt(params0()["w"])},
            "scheduler": {"name": "LinearLR", "options": {"start_factor": 1.0,
                                                          "end_factor": 0.0,
                                                          "total_iters": 5}}}
    for restart in range(2):
        live = dep.server(data_dir=data)
        url = live.start()
        try:
            with httpx.Client(base_url=url, timeout=120) as c:
                if restart == 0:
                    assert c.post("/v1/sessions", json=body).status_code == 201
                    for k in range(6):
                        r = c.post("/v1/sessions/decay/step",
                                   json={"grads": {"w": jt(grad_for((k,))["w"])}})
                        assert r.status_code == 200, r.text
                    lr = r.json()["lr"]
                else:
                    assert c.get("/readyz").json().get("refused") is None
                    assert c.get("/v1/sessions/decay").json()["lr"] == lr
        finally:
            dep.stopped(live, data)


def test_non_finite_plateau_metrics_replay_after_kill9_and_a_graceful_restart(
        proc: Proc) -> None:
    """ReduceLROnPlateau takes NaN and infinite metrics as torch does; their records (the
    metric kept as a ``$float`` tag) replay after ``kill -9``, and a snapshot keeps ``best`` at
    ``-inf`` through a graceful restart: the lr, the scheduler's state and the next steps
    equal an in-process twin's."""
    floats = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
    body = {"id": "plateau", "optimizer": "SGD", "options": {"lr": LR, "momentum": 0.9},
            "params": {n: jt(t) for n, t in params0().items()},
            "scheduler": {"name": "ReduceLROnPlateau",
                          "options": {"patience": 0, "factor": 0.5}}}
    params = params0()
    opt = torch.optim.SGD(list(params.values()), lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)

    def step_both(c: httpx.Client, k: int, metric: float | str) -> None:
        g = grad_for((k,))
        r = c.post("/v1/sessions/plateau/step", json={"grads": {n: jt(t) for n, t in g.items()}})
        assert r.status_code == 200, r.text
        for n, p in params.items():
            p.grad = g[n].clone()
        opt.step()
        wire = {"$float": metric} if isinstance(metric, str) else metric
        r = c.post("/v1/sessions/plateau/scheduler/step", json={"metric": wire})
        assert r.status_code == 200, r.text
        sched.step(floats[metric] if isinstance(metric, str) else metric)
        assert r.json()["lr"] == sched.get_last_lr()

    def same(c: httpx.Client) -> None:
        r = c.get("/v1/sessions/plateau/params", headers={"Accept": BINARY})
        got = safetensors.torch.load(r.content)
        assert all(bitwise(got[n], p.detach()) for n, p in params.items())
        exported = c.get("/v1/sessions/plateau/state_dict").json()["scheduler"]
        for key, want in sched.state_dict().items():
            if key in ("best", "num_bad_epochs", "last_epoch", "cooldown_counter", "_last_lr"):
                got_v = exported[key]
                if isinstance(got_v, dict):
                    got_v = floats[got_v["$float"]]
                assert got_v == want, key

    proc.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert c.post("/v1/sessions", json=body).status_code == 201
        for k, metric in enumerate([1.0, "nan", 0.9, "inf", "-inf", "nan"]):
            step_both(c, k, metric)
        same(c)
    proc.kill9()
    proc.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        assert c.get("/readyz").json().get("refused") is None
        same(c)
        step_both(c, 10, "nan")
        same(c)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(60) == 0
    proc.start()
    with httpx.Client(base_url=proc.url, timeout=60) as c:
        same(c)
        step_both(c, 11, 0.1)
        same(c)
