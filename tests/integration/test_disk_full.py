"""A data directory on a real, small file system that fills up (a tmpfs mounted for the test:
as root, in this mount namespace; as another user, in a user and mount namespace of its own,
reached through ``/proc/PID/root``): the operation that needed the write fails with 507
``storage_full`` and is not applied, the log stays valid, readiness answers 503 while the disk
is full, and once space returns the same server carries on; restarts (SIGTERM and ``kill -9``)
restore exactly the acknowledged operations.

tmpfs takes the place of a disk here: like ext4 it refuses a write that finds no free block
with ENOSPC after writing what fits (a short write), and frees a truncated file's blocks at
once; unlike a disk its fsync cannot fail, so the failing fsync paths (and the background
flusher's) are covered by injected faults in ``tests/unit/test_store_faults.py``.

Every value is checked against an in-process ``torch.optim`` replay of exactly the operations
the server acknowledged.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from app.engine import persist
from app.engine.delete_reserve import RESERVE, RESERVE_BYTES
from app.engine.free_space import FREE_SPACE_TTL_S
from app.engine.store import read_log, read_snapshot
from app.wire.safetensors_body import read_safetensors
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_durability import (
    BINARY,
    Proc,
    Reference,
    bitwise,
    create_body,
    grad_for,
    pull,
    session_dir,
    step_n,
)

pytestmark = pytest.mark.integration

MB = 1_000_000
MiB = 1 << 20
PROBLEM = "application/problem+json"
Mount = Callable[[int], Path]
#: readiness from failed writes alone (no OPTSERVE_READY_MIN_FREE_BYTES): a disk of 8 or 16 MiB
#: is under the default 16 MiB from the start (that check: test_ready_on_a_nearly_full_disk)
WRITES_ONLY: dict[str, Any] = {"ready_min_free_bytes": 0}


# --------------------------------------------------------------------------- the small disk

def _mount_here(where: Path, mib: int) -> Callable[[], None]:
    """A tmpfs of ``mib`` MiB on ``where`` in this mount namespace (root only); the unmount."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m,mode=0700", "tmpfs",
                    str(where)], check=True)

    def unmount() -> None:
        if subprocess.run(["umount", str(where)]).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)
    return unmount


def _mount_in_a_namespace(where: Path, mib: int) -> tuple[Path, Callable[[], object]]:
    """A tmpfs of ``mib`` MiB on ``where`` in a user and mount namespace of its own, for a user
    who is not root (``unshare -rm``: unprivileged user namespaces). A process holds the
    namespace open (``cat``, until its stdin closes); every process of this user reaches the
    mount through that process's root (``/proc/PID/root/...``), the servers this test starts
    too. The path to use and the release (the file system goes with the namespace). Skips,
    saying why, where the kernel allows no such namespace."""
    script = 'mount -t tmpfs -o "size=$1m,mode=0700" tmpfs "$2" && echo mounted && exec cat'
    try:
        holder = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private",
             "sh", "-c", script, "sh", str(mib), str(where)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        pytest.skip("test_disk_full mounts a small tmpfs: not root, and no unshare(1) to "
                    "mount one in a user namespace")
    assert holder.stdout is not None
    mounted = holder.stdout.readline().strip() == "mounted"

    def release() -> str:
        """End the namespace; what its process said on stderr."""
        _, error = holder.communicate(timeout=30)
        return error.strip()
    if not mounted:
        pytest.skip("test_disk_full mounts a small tmpfs: not root, and no user namespace "
                    f"to mount one in (unshare --user --map-root-user --mount: {release()})")
    return Path(f"/proc/{holder.pid}/root") / where.relative_to(where.anchor), release


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """``mount(mib)``: a fresh tmpfs of that size under ``tmp_path`` (gone afterwards). As
    root it is mounted here, and a mount that fails fails the test (CI runs as root: it cannot
    lose these tests silently); as another user, in a user namespace (it skips, saying why,
    where there is none)."""
    releases: list[Callable[[], object]] = []

    def mount(mib: int) -> Path:
        where = tmp_path / f"disk{len(releases)}"
        where.mkdir()
        if os.geteuid() == 0:
            releases.append(_mount_here(where, mib))
            return where
        disk, release = _mount_in_a_namespace(where, mib)
        releases.append(release)
        return disk
    try:
        yield mount
    finally:
        for release in releases:
            release()


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int = 0) -> Path:
    """A filler file that leaves about ``leave`` bytes free (0: until the disk refuses)."""
    filler = disk / "filler.bin"
    chunk = b"\xa5" * MiB
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while (room := free_bytes(disk) - leave) > 0:
            try:
                os.write(fd, chunk[:room])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    assert free_bytes(disk) <= leave + 4096
    return filler


def assert_storage_full(r: httpx.Response) -> None:
    assert r.status_code == 507, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["code"] == "storage_full" and body["status"] == 507
    assert "nothing was applied" in body["detail"], body


def assert_not_ready(c: httpx.Client, *words: str) -> str:
    r = c.get("/readyz")
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    detail: str = r.json()["detail"]
    assert r.json()["code"] == "not_ready"
    for w in words:
        assert w in detail, detail
    return detail


#: how long a measure of the free space stands, and a little more
MEASURE_STANDS_S = FREE_SPACE_TTL_S + 0.05


def assert_short_of_space(c: httpx.Client, disk: Path) -> None:
    """Once the last measure stands no more: ``/readyz`` is a 503 naming the bytes free on
    ``disk`` under a bound of 4 MiB, with ``Retry-After``."""
    time.sleep(MEASURE_STANDS_S)
    assert c.get("/readyz").headers["retry-after"] == "5"
    detail = assert_not_ready(c, "OPTSERVE_READY_MIN_FREE_BYTES (4194304)")
    assert detail == (f"the data directory is (nearly) full: {free_bytes(disk)} bytes free, "
                      "under OPTSERVE_READY_MIN_FREE_BYTES (4194304); a write could fail")


def steps_while_short(c: httpx.Client, big: Big) -> None:
    """Not ready is ahead of a failure: two steps still succeed, the session torch's, and
    the server is still not ready afterwards."""
    for k in range(2):
        r = big.post_step(c, k)
        assert r.status_code == 200, r.text
        big.acknowledged(k)
    big.assert_same(c, state=True)
    assert_not_ready(c, "OPTSERVE_READY_MIN_FREE_BYTES")


def assert_ready(c: httpx.Client) -> None:
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text


def assert_valid_log(wal: Path) -> list[bytes]:
    """A whole log: no torn or damaged record, nothing past the last one."""
    records, valid, torn = read_log(wal)
    assert not torn and valid == wal.stat().st_size, (valid, wal.stat().st_size)
    assert not list(wal.parent.glob("*.tmp"))
    return records


# --------------------------------------------------------------------------- large sessions

class Big:
    """A session of ``n`` float32 parameters with Adam, created and stepped with safetensors
    bodies, and its in-process torch twin."""

    def __init__(self, sid: str, n: int, lr: float = 1e-3) -> None:
        self.sid, self.n, self.lr = sid, n, lr
        self.p = torch.randn(n, generator=torch.Generator().manual_seed(n))
        self.p0 = self.p.clone()
        self.opt = torch.optim.Adam([self.p], lr=lr)
        self.version = 0

    def create(self, c: httpx.Client) -> httpx.Response:
        meta = {"id": self.sid, "optimizer": "Adam", "options": f'{{"lr": {self.lr}}}'}
        return c.post("/v1/sessions", content=safetensors.torch.save({"p": self.p0}, meta),
                      headers={"Content-Type": BINARY})

    def grad(self, k: int) -> torch.Tensor:
        return torch.randn(self.n, generator=torch.Generator().manual_seed(10_000 + k))

    def post_step(self, c: httpx.Client, k: int) -> httpx.Response:
        return c.post(f"/v1/sessions/{self.sid}/step?return=none",
                      content=safetensors.torch.save({"p": self.grad(k)}),
                      headers={"Content-Type": BINARY})

    def acknowledged(self, k: int) -> None:
        self.p.grad = self.grad(k)
        self.opt.step()
        self.p.grad = None
        self.version += 1

    def set_lr(self, c: httpx.Client, lr: float) -> httpx.Response:
        return c.patch(f"/v1/sessions/{self.sid}/param_groups/0", json={"lr": lr})

    def lr_acknowledged(self, lr: float) -> None:
        self.opt.param_groups[0]["lr"] = lr

    def assert_same(self, c: httpx.Client, state: bool = False) -> None:
        version, got = pull(c, self.sid)
        assert version == self.version and bitwise(got["p"], self.p.detach()), version
        desc = c.get(f"/v1/sessions/{self.sid}").json()
        assert desc["lr"] == [self.opt.param_groups[0]["lr"]]
        if state:  # the optimizer state too
            r = c.get(f"/v1/sessions/{self.sid}/state_dict", headers={"Accept": BINARY})
            assert r.status_code == 200, r.text
            sd = persist.decode_tree(r.content, "optserve_state")
            want = self.opt.state_dict()["state"][0]
            assert set(sd["state"]["0"]) == set(want)
            for k, v in want.items():
                assert bitwise(sd["state"]["0"][k], v), k


def step_until_full(c: httpx.Client, big: Big, k: int, limit: int = 20) -> int:
    """Step with gradients ``k, k+1, ...`` until the disk refuses one; the refused k."""
    for _ in range(limit):
        r = big.post_step(c, k)
        if r.status_code != 200:
            assert_storage_full(r)
            return k
        big.acknowledged(k)
        k += 1
    pytest.fail(f"{limit} steps of {big.n * 4} bytes never filled the disk")


def test_large_records_fill_the_disk(tmpfs: Mount) -> None:
    """1 M float32 parameters (4 MB records, durability ``step``) on a 48 MiB disk: step until
    a record does not fit. That step answers 507 and is not applied; the log is whole;
    readiness answers 503 (a small probe would still fit, the failed record does not). With
    the filler removed the same server takes the step. Then a graceful restart and a
    ``kill -9`` of a server process each restore every acknowledged step, bitwise, optimizer
    state too."""
    disk = tmpfs(48)
    big = Big("big", MB)
    wal = session_dir(disk, big.sid) / "wal.bin"
    live = LiveServer(_test_settings(data_dir=disk, snapshot_every_steps=100_000))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert big.create(c).status_code == 201
            filler = fill(disk, leave=10 * MB)  # room for two more 4 MB records, not three
            refused = step_until_full(c, big, 0)
            assert refused >= 2
            big.assert_same(c)
            records = assert_valid_log(wal)
            assert persist.decode_record(records[-1]).version == big.version
            assert_not_ready(c, "full", "No space left on device")
            assert_storage_full(big.post_step(c, refused))  # still full: still refused
            big.assert_same(c)

            filler.unlink()  # space returns: the same server carries on
            assert_ready(c)
            r = c.post(f"/v1/sessions/{big.sid}/step",
                       content=safetensors.torch.save({"p": big.grad(refused)}),
                       headers={"Content-Type": BINARY, "Accept": BINARY})
            assert r.status_code == 200, r.text
            big.acknowledged(refused)
            assert bitwise(safetensors.torch.load(r.content)["p"], big.p.detach())
            k = refused + 1
            assert_valid_log(wal)
    finally:
        live.stop()  # graceful: a snapshot on the way out
    assert read_log(wal)[0] == []

    proc = Proc(disk)  # a server process to kill; its log goes next to the mount, not on it
    try:
        proc.start(OPTSERVE_SNAPSHOT_EVERY_STEPS="100000")
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            big.assert_same(c, state=True)
            for _ in range(2):
                assert big.post_step(c, k).status_code == 200
                big.acknowledged(k)
                k += 1
        proc.kill9()  # the two steps are only in the log
    finally:
        proc.stop()
    assert len(assert_valid_log(wal)) == 2
    live = LiveServer(_test_settings(data_dir=disk))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/readyz").json().get("refused") is None
            big.assert_same(c, state=True)
    finally:
        live.stop()


def test_create_that_does_not_fit(tmpfs: Mount) -> None:
    """A 4 MB create on a disk with 1 MB free: 507, no session and no directory left, the id
    free; after space returns the same create succeeds and steps like torch."""
    disk = tmpfs(8)
    live = LiveServer(_test_settings(data_dir=disk, **WRITES_ONLY))
    url = live.start()
    big = Big("big", MB)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            filler = fill(disk, leave=MB)
            assert_storage_full(big.create(c))
            assert not session_dir(disk, big.sid).exists()
            assert [p.name for p in (disk / "sessions").iterdir()] == []
            assert c.get(f"/v1/sessions/{big.sid}").status_code == 404
            assert c.get("/v1/sessions").json()["sessions"] == []
            assert_not_ready(c, "full", "No space left on device")
            filler.unlink()
            assert_ready(c)
            r = big.create(c)
            assert r.status_code == 201, r.text
            big.assert_same(c)
            assert big.post_step(c, 0).status_code == 200
            big.acknowledged(0)
            big.assert_same(c, state=True)
            assert len(assert_valid_log(session_dir(disk, big.sid) / "wal.bin")) == 2
    finally:
        live.stop()


# --------------------------------------------------------------------------- small records

def test_small_records_on_a_full_disk(tmpfs: Mount) -> None:
    """Small sessions, durability ``step`` and ``interval`` (background fsync): the disk is
    filled to the last block. Steps answer 507 promptly (a client timeout catches a hang);
    readiness names the full disk; the fsync thread lives on; with space back the same server
    steps both sessions again, and a restart holds every acknowledged step."""
    disk = tmpfs(8)
    settings = _test_settings(data_dir=disk, fsync_interval_ms=20.0, **WRITES_ONLY,
                              snapshot_every_steps=100_000)
    live = LiveServer(settings)
    url = live.start()
    store = live.app.state.engine.host._store
    refs = {"st": Reference(seed=1), "iv": Reference(seed=2)}
    try:
        with httpx.Client(base_url=url, timeout=10) as c:  # the timeout only detects a hang
            for i, (sid, level) in enumerate((("st", "step"), ("iv", "interval"))):
                r = c.post("/v1/sessions", json=create_body(sid, seed=i + 1, durability=level))
                assert r.status_code == 201 and r.json()["durability"] == level
                step_n(c, sid, refs[sid], 3, tag=i)
            filler = fill(disk)
            assert free_bytes(disk) == 0
            for i, sid in enumerate(refs):
                # a record may still fit in the slack of its log's last block: step until not
                for k in range(40):
                    g = grad_for((i, 100 + k))
                    r = c.post(f"/v1/sessions/{sid}/step?return=none",
                               content=safetensors.torch.save(g),
                               headers={"Content-Type": BINARY})
                    if r.status_code != 200:
                        break
                    refs[sid].step(g)
                assert_storage_full(r)
                for _ in range(2):  # and again: refused, not hung
                    assert_storage_full(c.post(f"/v1/sessions/{sid}/step?return=none",
                                               content=safetensors.torch.save(g),
                                               headers={"Content-Type": BINARY}))
                assert_valid_log(session_dir(disk, sid) / "wal.bin")
            assert_not_ready(c, "No space left on device")
            assert store._flusher.is_alive()
            for sid, ref in refs.items():
                version, got = pull(c, sid)
                assert version == ref.version and ref.same_params(got), sid

            filler.unlink()
            assert_ready(c)
            for i, (sid, ref) in enumerate(refs.items()):
                step_n(c, sid, ref, 3, tag=10 + i)
                version, got = pull(c, sid)
                assert version == ref.version and ref.same_params(got), sid
            assert store._flusher.is_alive()
            assert_ready(c)
    finally:
        live.stop()
    live = LiveServer(_test_settings(data_dir=disk))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/readyz").json().get("refused") is None
            for sid, ref in refs.items():
                version, got = pull(c, sid)
                assert version == ref.version and ref.same_params(got), sid
    finally:
        live.stop()


# --------------------------------------------------------------------------- snapshots

def test_snapshots_without_space(tmpfs: Mount) -> None:
    """Adam with 250 k parameters (1 MB records, 3 MB snapshots), a snapshot due every 2
    records, 2.5 MB free: the snapshots fail, the operations go on being acknowledged while
    their records fit (then 507), the old snapshot and the log keep everything; with space
    back the next operation's snapshot is written and holds it all."""
    disk = tmpfs(16)
    live = LiveServer(_test_settings(data_dir=disk, snapshot_every_steps=2, **WRITES_ONLY))
    url = live.start()
    big = Big("snap", 250_000)
    d = session_dir(disk, big.sid)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert big.create(c).status_code == 201
            assert big.post_step(c, 0).status_code == 200  # record 2: the first snapshot
            big.acknowledged(0)
            old = (d / "snapshot.bin").read_bytes()
            assert assert_valid_log(d / "wal.bin") == []
            filler = fill(disk, leave=2_500_000)

            # records 3-6 fit (two 1 MB steps, two small option changes); each snapshot due
            # after them needs 3 MB and fails
            for k, lr in ((1, 5e-4), (2, 2.5e-4)):
                assert big.post_step(c, k).status_code == 200
                big.acknowledged(k)
                r = big.set_lr(c, lr)
                assert r.status_code == 200, r.text
                big.lr_acknowledged(lr)
            assert_storage_full(big.post_step(c, 3))  # the next 1 MB record does not fit
            big.assert_same(c)
            assert (d / "snapshot.bin").read_bytes() == old
            records = assert_valid_log(d / "wal.bin")
            assert [persist.decode_record(r).seq for r in records] == [3, 4, 5, 6]
            assert_not_ready(c, "full", "No space left on device")

            filler.unlink()
            assert_ready(c)
            assert big.post_step(c, 3).status_code == 200  # record 7, and the snapshot
            big.acknowledged(3)
            tree = persist.decode_tree(read_snapshot(d / "snapshot.bin"), persist.SNAPSHOT_KEY)
            assert tree["meta"]["seq"] == 7 and tree["meta"]["version"] == big.version == 4
            assert bitwise(tree["params"]["p"], big.p.detach())
            assert assert_valid_log(d / "wal.bin") == []
            big.assert_same(c, state=True)
    finally:
        live.stop()
    live = LiveServer(_test_settings(data_dir=disk))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            big.assert_same(c, state=True)
    finally:
        live.stop()


# --------------------------------------------------------------------------- LBFGS

def _lbfgs_answer(r: httpx.Response) -> tuple[str | None, dict[str, torch.Tensor]]:
    """An LBFGS step's safetensors answer: (the evaluation it asks for, or None at its end;
    the parameters it carries)."""
    assert r.status_code == 200, r.text
    tensors, meta = read_safetensors(bytearray(r.content))
    asked = meta.get("evaluation") if meta.get("needs") == "evaluation" else None
    return asked, {n: t.clone() for n, t in tensors.items()}


def test_an_lbfgs_step_whose_commit_finds_the_disk_full(tmpfs: Mount) -> None:
    """An LBFGS step (the closure as a round trip) whose commit finds no room: the evaluation
    that ended it answers 507 and nothing is applied; its repeat gets the same answer, which
    says the step has ended with it (a repeat cannot succeed once there is room: it once
    said only that nothing was applied); with space back a new step commits, bitwise
    torch's ``LBFGS.step`` over the same closure."""
    disk = tmpfs(16)
    # 32 KB of gradients per evaluation: the commit's record needs more than the slack the
    # filler leaves (a block), and at so few values torch's reductions and BLAS's dot
    # products (LBFGS's) run on one thread whatever the thread count of the thread that runs
    # them (the server's device worker sets its own), so that the step is bitwise this one
    n = 8_000
    gen = torch.Generator().manual_seed(11)
    p0, target = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    options = {"lr": 1, "max_iter": 3, "history_size": 3}

    def closure_at(params: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        leaf = params["p"].clone().requires_grad_()
        loss = 0.5 * ((leaf - target) ** 2).sum()
        loss.backward()
        assert leaf.grad is not None
        return float(loss.detach()), {"p": leaf.grad}

    def evaluation(params: dict[str, torch.Tensor]) -> dict[str, Any]:
        loss, grads = closure_at(params)
        return {"content": safetensors.torch.save(grads, {"loss": json.dumps(loss)}),
                "headers": {"Content-Type": BINARY, "Accept": BINARY}}

    live = LiveServer(_test_settings(data_dir=disk))
    url = live.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            meta = {"id": "lb", "optimizer": "LBFGS", "options": json.dumps(options)}
            r = c.post("/v1/sessions", content=safetensors.torch.save({"p": p0}, meta),
                       headers={"Content-Type": BINARY})
            assert r.status_code == 201, r.text
            asked, at = _lbfgs_answer(c.post("/v1/sessions/lb/step",
                                             headers={"Accept": BINARY}))
            filler = fill(disk)
            while True:  # evaluations are held in memory; the commit writes
                assert asked is not None
                body = evaluation(at)
                r = c.post(f"/v1/sessions/lb/step/{asked}", **body)
                if r.status_code != 200:
                    break
                asked, at = _lbfgs_answer(r)
            assert_storage_full(r)
            first = r.json()
            assert "has ended with it" in first["detail"], first
            assert "open a new step" in first["detail"] and first["outcome"] == "failed", first
            again = c.post(f"/v1/sessions/lb/step/{asked}", **body)
            assert again.status_code == 507
            assert {**again.json(), "request_id": None} == {**first, "request_id": None}
            version, got = pull(c, "lb")
            assert version == 0 and bitwise(got["p"], p0)

            filler.unlink()
            answer = c.post("/v1/sessions/lb/step", headers={"Accept": BINARY})
            asked, at = _lbfgs_answer(answer)
            while asked is not None:
                asked, at = _lbfgs_answer(c.post(f"/v1/sessions/lb/step/{asked}",
                                                 **evaluation(at)))
            assert answer.headers  # (the step's end carried the new parameters)
            version, got = pull(c, "lb")

            local = p0.clone().requires_grad_()
            opt = torch.optim.LBFGS([local], **options)  # type: ignore[arg-type]

            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = 0.5 * ((local - target) ** 2).sum()
                loss.backward()
                return loss
            opt.step(closure)
            assert version == 1 and bitwise(got["p"], local.detach())
            assert bitwise(at["p"], local.detach())
    finally:
        live.stop()


def test_an_sdk_lbfgs_step_refused_by_a_full_disk_leaves_the_model_as_it_was(
        tmpfs: Mount) -> None:
    """``RemoteOptimizer`` (LBFGS) copies each point the server's line search tries into the
    model's parameters to run the closure there. A step whose commit finds the disk full (507,
    nothing applied) must leave them as the session holds them: they were left at the last
    point tried, so the next step's first evaluation (the closure at the local parameters,
    sent as the loss and gradients at the session's) was taken elsewhere and that step went
    astray. With space back the next step is torch's ``LBFGS.step``, bitwise."""
    import optserve  # (the SDK: clients/python)

    disk = tmpfs(16)
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(200, 30), torch.nn.Linear(200, 30)
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(64, 200), torch.randn(64, 30)
    options = {"lr": 0.5, "max_iter": 3, "history_size": 4}

    def closure_of(m: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss
        return closure

    def assert_model_is_torchs(what: str) -> None:
        for (name, got), want in zip(model.named_parameters(), twin.parameters(), strict=True):
            assert bitwise(got.detach(), want.detach()), f"{what}: {name}"

    live = LiveServer(_test_settings(data_dir=disk))
    url = live.start()
    try:
        with optserve.Client(url, transport="http", max_retries=0) as client:
            remote = optserve.RemoteOptimizer(model.parameters(), "LBFGS", client=client,
                                              session_id="lb", **options)
            local = torch.optim.LBFGS(twin.parameters(), **options)  # type: ignore[arg-type]
            for _ in range(2):
                remote.step(closure_of(model, remote))
                local.step(closure_of(twin, local))
            assert_model_is_torchs("before the disk filled")
            filler = fill(disk)
            with pytest.raises(optserve.APIStatusError) as refused:
                remote.step(closure_of(model, remote))
            assert refused.value.status_code == 507, refused.value
            assert_model_is_torchs("after the refused step")
            filler.unlink()
            remote.step(closure_of(model, remote))
            local.step(closure_of(twin, local))
            assert_model_is_torchs("after the next step")
            held = client.get_params("lb")
            assert held.step == 3
            for name, p in zip(remote._by_name, twin.parameters(), strict=True):
                assert bitwise(held.params[name], p.detach()), name
    finally:
        live.stop()


# --------------------------------------------------------------------------- readiness ahead

def reserve_held(disk: Path) -> bool:
    """Whether the data directory on ``disk`` holds its whole delete reserve."""
    path = disk / RESERVE
    return path.exists() and path.stat().st_size == RESERVE_BYTES


#: a keyed create's body: its session is deleted on a full disk, its create then retried
KEYED_BODY = {"id": "keyed", "optimizer": "SGD", "options": {"lr": 0.1},
              "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]}}}


def retried_create_is_deleted(c: httpx.Client, key: dict[str, str]) -> None:
    """KEYED_BODY's create retried with ``key`` after its session was deleted: the 409
    ``session_deleted`` problem naming the session and the key, and no session."""
    r = c.post("/v1/sessions", json=KEYED_BODY, headers=key)
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    problem = r.json()
    assert (problem["code"], problem["session_id"], problem["idempotency_key"]) == (
        "session_deleted", "keyed", key["Idempotency-Key"]), problem
    assert c.get("/v1/sessions/keyed").status_code == 404


def test_a_keyed_session_is_deleted_on_a_full_disk(tmpfs: Mount) -> None:
    """A session made by a keyed create (the Python SDK always sends a key) on a disk that
    then fills to the last block: its DELETE is a 204 (its tombstone, the create's key, is
    written into the delete reserve's room) and frees its files; a retried create is the 409
    ``session_deleted`` it is on a disk with room, and so it stays after a ``kill -9`` and a
    restart on the still nearly full disk. Another session is left as torch.optim has it. The
    reserve is whole again after the delete (topped up from the space it freed), and so it is
    once space returns."""
    disk = tmpfs(8)
    key = {"Idempotency-Key": "made-on-a-disk-that-filled"}
    body = KEYED_BODY
    other = Big("other", 1000)
    proc = Proc(disk, env={"OPTSERVE_READY_MIN_FREE_BYTES": "0"},
                started=lambda r: r.status_code in (200, 503))

    def retried(c: httpx.Client) -> None:
        retried_create_is_deleted(c, key)

    try:
        proc.start()
        assert reserve_held(disk)
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            assert c.post("/v1/sessions", json=body, headers=key).status_code == 201
            assert other.create(c).status_code == 201
            assert other.post_step(c, 0).status_code == 200
            other.acknowledged(0)
            filler = fill(disk)
            assert_storage_full(other.post_step(c, 1))  # the disk is full
            r = c.delete("/v1/sessions/keyed")
            assert r.status_code == 204, r.text
            assert not session_dir(disk, "keyed").exists()
            assert sorted(p.name for p in (disk / "sessions").iterdir()) == [
                session_dir(disk, other.sid).name]  # no .deleted-* left: its files are freed
            # (its tombstone written into the reserve's blocks, the reserve topped up again
            # from the space the delete freed: the session's files, the reserve's cut tail)
            assert reserve_held(disk)
            retried(c)
            other.assert_same(c, state=True)
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            retried(c)
            other.assert_same(c, state=True)
            filler.unlink()
            assert_ready(c)
            assert reserve_held(disk)  # space returned: made again
            assert other.post_step(c, 1).status_code == 200
            other.acknowledged(1)
            other.assert_same(c, state=True)
    finally:
        proc.stop()


def test_several_keyed_deletes_each_on_a_disk_full_to_the_last_block(tmpfs: Mount) -> None:
    """A user deleting sessions one after the other to free a disk that something else fills
    to the last block again after each delete: every DELETE is a 204, two plain sessions' and
    a sharded session's (two shards, each shard's tombstone written on the full disk), each
    keyed create's retry the 409 ``session_deleted``, also after a ``kill -9`` and a restart
    on the still full disk. Only the first delete found the reserve the start made: each
    later one finds the reserve its predecessor topped up from the space it freed before it
    answered (was: the reserve was made again only with room for it twice over, so the second
    delete was a 507; a sharded session's delete, its shards' tombstones written at once, was
    a 507 that had deleted its first shard). Another session is left as torch.optim has it."""
    disk = tmpfs(8)
    other = Big("other", 1000)
    bodies = {sid: {"id": sid, "optimizer": "SGD", "options": {"lr": 0.1}, **extra,
                    "params": {"w": {"dtype": "float32", "shape": [2], "data": [1.0, 2.0]},
                               "v": {"dtype": "float32", "shape": [1], "data": [3.0]}}}
              for sid, extra in (("first", {}), ("second", {}), ("sharded", {"shards": 2}))}
    proc = Proc(disk, env={"OPTSERVE_READY_MIN_FREE_BYTES": "0"},
                started=lambda r: r.status_code in (200, 503))

    def key(sid: str) -> dict[str, str]:
        return {"Idempotency-Key": f"made-{sid}-on-a-disk-that-filled"}

    def retried(c: httpx.Client, sid: str) -> None:
        r = c.post("/v1/sessions", json=bodies[sid], headers=key(sid))
        assert r.status_code == 409, r.text
        problem = r.json()
        assert (problem["code"], problem["session_id"], problem["idempotency_key"]) == (
            "session_deleted", sid, key(sid)["Idempotency-Key"]), problem
        assert c.get(f"/v1/sessions/{sid}").status_code == 404

    try:
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            for sid, body in bodies.items():
                r = c.post("/v1/sessions", json=body, headers=key(sid))
                assert r.status_code == 201, r.text
            assert other.create(c).status_code == 201
            assert other.post_step(c, 0).status_code == 200
            other.acknowledged(0)
            for sid in bodies:
                filler = fill(disk)  # (again: to the last block)
                assert_storage_full(other.post_step(c, 1))
                r = c.delete(f"/v1/sessions/{sid}", headers={"Idempotency-Key": f"del-{sid}"})
                assert r.status_code == 204, (sid, r.text)
                retried(c, sid)
                assert not list((disk / "sessions").glob(".deleted-*")), sid
            assert sorted(p.name for p in (disk / "sessions").iterdir()) == [
                session_dir(disk, other.sid).name]  # every shard's files are gone too
            assert c.get("/v1/sessions").json()["sessions"][0]["id"] == other.sid
            other.assert_same(c, state=True)
        proc.kill9()
        proc.start()
        with httpx.Client(base_url=proc.url, timeout=60) as c:
            for sid in bodies:
                retried(c, sid)
            other.assert_same(c, state=True)
            filler.unlink()
            assert_ready(c)
            assert reserve_held(disk)
            assert other.post_step(c, 1).status_code == 200
            other.acknowledged(1)
            other.assert_same(c, state=True)
    finally:
        proc.stop()


def test_a_bound_past_the_disks_size_is_a_warning_at_the_start(tmp_path: Path) -> None:
    """``OPTSERVE_READY_MIN_FREE_BYTES`` more than the data directory's file system holds in
    all: the server can never be ready, and its start now says so in a warning (it said
    nothing: only ``/readyz``'s 503, for as long as it ran). A real ``python -m app``."""
    data = tmp_path / "data"
    st = os.statvfs(tmp_path)
    total = st.f_blocks * st.f_frsize
    proc = Proc(data, env={"OPTSERVE_READY_MIN_FREE_BYTES": str(total + 1)},
                started=lambda r: r.status_code == 503 and "MIN_FREE_BYTES" in r.text)
    proc.start()
    try:
        said = [line for line in proc.log().splitlines() if "holds in all" in line]
        assert len(said) == 1, proc.log()
        assert "WARNING" in said[0], said
        assert (f"OPTSERVE_READY_MIN_FREE_BYTES ({total + 1}) is more than the data "
                f"directory's file system holds in all ({total} bytes, ") in said[0]
        assert "/readyz will answer 503 not_ready for as long as this server runs" in said[0]
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            assert_not_ready(c, f"under OPTSERVE_READY_MIN_FREE_BYTES ({total + 1})")
    finally:
        proc.stop()


def test_ready_on_a_nearly_full_disk(tmpfs: Mount) -> None:
    """``OPTSERVE_READY_MIN_FREE_BYTES``: a server whose data directory has less free space
    than that says not ready (503 ``not_ready`` naming the bytes free and the setting) before
    any write fails: steps still succeed meanwhile, the values torch.optim's. Once space
    returns it is ready again. A ``memory`` durability server, which writes no log, stays
    ready on a full disk."""
    disk, memory_disk = tmpfs(8), tmpfs(8)
    live = LiveServer(_test_settings(data_dir=disk, ready_min_free_bytes=4 * MiB))
    memory = LiveServer(_test_settings(data_dir=memory_disk, durability="memory",
                                       ready_min_free_bytes=4 * MiB))
    url, memory_url = live.start(), memory.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c, \
                httpx.Client(base_url=memory_url, timeout=60) as m:
            assert_ready(c)
            assert_ready(m)
            big = Big("nearly-full", 1000)
            assert big.create(c).status_code == 201
            filler = fill(disk, leave=3 * MiB)
            fill(memory_disk)
            assert_short_of_space(c, disk)
            assert_ready(m)
            steps_while_short(c, big)
            filler.unlink()
            time.sleep(MEASURE_STANDS_S)
            assert_ready(c)
            assert_ready(m)
    finally:
        live.stop()
        memory.stop()
