"""A file operation outside the store that fails (EMFILE: the process is out of file
descriptors, as a client holding many idle connections makes it) is a problem+json answer, never
a 500, and leaves every session as it was: the directory's reads and writes around a create and
a delete, any OSError a route lets through (the last resort of ``app.api.problems``), the
same-host transport's segment and its accept loop. The connection bound
(``OPTSERVE_MAX_CONNECTIONS``, :mod:`app.api.connection_cap`) is counted here for the same-host
transport; its HTTP side is tests/integration/test_connection_cap.py."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import app.engine.directory as directory_module
from app.api.connection_cap import ConnectionSlots, default_limit, reserve_warning
from app.engine import Front, embedded_engine
from app.engine.directory import Directory
from app.engine.interface import CreateSpec, GroupSpec, IdemKey, SessionInfo
from app.engine.store import Files
from app.errors import StorageFull, Unavailable
from app.main import create_app
from app.transport import local as local_module
from app.transport.local import Binding, LocalTransport
from tests.conftest import _test_settings
from tests.stored_files import stored_files as files
from tests.torch_reference import Reference, assert_tensors_equal

PARAMS = {"a": torch.tensor([0.5, -1.0, 2.0]), "b": torch.tensor([1.0, 2.0])}
GRAD = {"a": torch.tensor([0.25, 1.0, -0.5]), "b": torch.tensor([-1.0, 0.5])}


def emfile(*_: object, **__: object) -> Any:
    raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


async def emfile_async(*args: object, **kwargs: object) -> Any:
    emfile()


def spec(sid: str | None, shards: int = 1) -> CreateSpec:
    return CreateSpec("SGD", [GroupSpec({n: t.clone() for n, t in PARAMS.items()})],
                      {"lr": 0.1, "momentum": 0.9}, id=sid, shards=shards)


def stepped(steps: int) -> dict[str, torch.Tensor]:
    ref = Reference(torch.optim.SGD, [(PARAMS, {})], {"lr": 0.1, "momentum": 0.9})
    for _ in range(steps):
        ref.step(GRAD)
    return ref.params


def engine(tmp_path: Path) -> Front:
    return embedded_engine("cpu", data_dir=tmp_path, durability="step", warm_up=False)


def assert_out_of_descriptors(exc: Unavailable) -> None:
    assert (exc.status, exc.code, exc.retry_after) == (503, "out_of_file_descriptors", 2.0)
    assert "out of file descriptors" in exc.detail, exc.detail


async def step_once_equals_torch(eng: Front, sid: str, first: int = 0) -> None:
    """One step of the session made at version ``first`` (a create undone before counts as a
    session deleted at 0: app.engine.last_versions)."""
    out = await eng.step(sid, GRAD, return_params=True)
    assert out.version == first + 1
    assert_tensors_equal(dict(out.params), stepped(1), f"after the step of {sid}")


# ----------------------------------------------------------------------------- the directory
@pytest.mark.parametrize("shards", [1, 2])
@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
def test_a_create_whose_directory_read_fails_changes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shards: int, keyed: bool) -> None:
    """Every create reads the id's directory entry first (``directory.entry_at``); out of
    descriptors, that read raised OSError through the route: a 500 ``internal_error``. It is
    a 503 ``out_of_file_descriptors`` with a ``Retry-After``; no file changed and no session
    is listed; the retry is created and steps as torch does."""
    idem = IdemKey("k-create", "create s") if keyed else None

    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            before = files(tmp_path)
            with monkeypatch.context() as m:
                m.setattr(directory_module, "entry_at", emfile)
                with pytest.raises(Unavailable) as err:
                    await eng.create(spec("s", shards), idem=idem)
            assert_out_of_descriptors(err.value)
            assert files(tmp_path) == before
            assert await eng.list_sessions() == []
            info = await eng.create(spec("s", shards), idem=idem)
            assert (info.id, info.version, info.replayed) == ("s", 0, False)
            await step_once_equals_torch(eng, "s")
        finally:
            await eng.stop()

    asyncio.run(run())


def fsync_creates_fails(real: Any) -> Any:
    """``Files.fsync_dir`` failing (EMFILE: it opens the folder) for ``.creates`` only: the
    index is in place, not known to be on disk."""
    def fsync_dir(files: Files, path: Path) -> None:
        if path.name == ".creates":
            emfile()
        real(files, path)
    return fsync_dir


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_sharded_create_whose_index_write_fails_leaves_no_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A keyed sharded create made its shards, then its ``.creates`` index could not be
    written, or its folder not fsynced (EMFILE): the OSError went out as a 500 and left the
    session made and its entry claimed; its retry (same key) was a 409 ``session_exists``.
    Its shards are deleted, its entry and its index dropped: a 503, no session; the retry
    makes it and it steps as torch does; a later retry is answered with it."""
    idem = IdemKey("k-sharded", "create sharded s")

    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            with monkeypatch.context() as m:
                if where == "write":
                    m.setattr(Directory, "note_created", emfile)
                else:
                    m.setattr(Files, "fsync_dir", fsync_creates_fails(Files.fsync_dir))
                with pytest.raises(Unavailable) as err:
                    await eng.create(spec("s", 2), idem=idem)
            assert_out_of_descriptors(err.value)
            assert await eng.list_sessions() == []
            assert Directory(tmp_path / "directory").keys() == []
            assert list((tmp_path / "directory" / ".creates").iterdir()) == []
            info = await eng.create(spec("s", 2), idem=idem)
            # (its shards, undone, were deleted at version 0: app.engine.last_versions)
            assert (info.id, info.replayed, info.version) == ("s", False, 1)
            await step_once_equals_torch(eng, "s", 1)
            again = await eng.create(spec("s", 2), idem=idem)
            assert (again.id, again.version, again.replayed) == ("s", 2, True)
        finally:
            await eng.stop()

    asyncio.run(run())


def test_a_sharded_create_whose_undo_fails_too_is_finished_by_its_retry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index write fails and so does the delete of the shards made (a second fault):
    they stay, as a crash there leaves them, and the answer says to retry with the same key,
    which completes the create (answered with the session, which steps as torch does)."""
    idem = IdemKey("k-kept", "create kept s")

    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            host = eng.router.local  # type: ignore[attr-defined]
            with monkeypatch.context() as m:
                m.setattr(Directory, "note_created", emfile)
                m.setattr(type(host), "delete", emfile_async)
                with pytest.raises(Unavailable) as err:
                    await eng.create(spec("s", 2), idem=idem)
            assert_out_of_descriptors(err.value)
            assert "retry it with the same Idempotency-Key" in err.value.detail
            info = await eng.create(spec("s", 2), idem=idem)
            assert (info.id, info.version) == ("s", 0)
            await step_once_equals_torch(eng, "s")
            assert [s.id for s in await eng.list_sessions()] == ["s"]
        finally:
            await eng.stop()

    asyncio.run(run())


def test_a_sharded_delete_whose_directory_write_fails_keeps_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded keyed session's delete first marks its create deleted in the directory:
    out of descriptors, that is a 503 before any shard is touched, the session whole (it
    steps as torch does); the retried delete deletes it, and a create of the id makes a
    new one."""
    async def run() -> None:
        eng = engine(tmp_path)
        await eng.start()
        try:
            await eng.create(spec("s", 2), idem=IdemKey("k-del", "create s"))
            with monkeypatch.context() as m:
                m.setattr(Directory, "forget_created", emfile)
                with pytest.raises(Unavailable) as err:
                    await eng.delete("s")
            assert_out_of_descriptors(err.value)
            await step_once_equals_torch(eng, "s")
            await eng.delete("s")
            assert await eng.list_sessions() == []
            info = await eng.create(spec("s", 2))
            assert info.version == 2  # (deleted at 1: app.engine.last_versions)
        finally:
            await eng.stop()

    asyncio.run(run())


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_directory_write_that_fails_leaves_no_temporary_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """An entry, index or mark whose temporary file could not be fsynced or renamed into
    place was left as a ``.tmp-*`` file in the directory, one more per failure (nothing
    removes them). The write fails and leaves none; once the disk works it succeeds."""
    d = Directory(tmp_path / "directory")
    writes = {
        "claim": lambda: d.claim("default~a", {"made": "m"}),
        "put": lambda: d.put("default~a", {"made": "m"}),
        "note_created": lambda: d.note_created("default", "k", "f", "default~a"),
        "claim_created": lambda: d.claim_created("default", "k2", "f", "default~a"),
        "note_deleted": lambda: d.note_deleted("default", "k", "f", "default~a"),
    }
    # (replace: only the writes that rename; the others link, then remove their temporary)
    names = ["note_created", "note_deleted", "put"] if failing == "replace" else list(writes)

    def eio(*_: object) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    for name in names:
        with monkeypatch.context() as m:
            m.setattr(directory_module.os, failing, eio)
            with pytest.raises(OSError):
                writes[name]()
        left = [p.name for p in (tmp_path / "directory").rglob(".tmp-*")]
        assert left == [], (name, left)
    for name in names:
        writes[name]()
    assert d.get("default~a") == {"made": "m"}
    assert d.created("default", "k") is not None and d.deleted("default", "k") is not None


# ----------------------------------------------------------------------------- over HTTP
def body(sid: str) -> dict[str, Any]:
    return {"id": sid, "optimizer": "SGD", "options": {"lr": 0.1, "momentum": 0.9},
            "params": {n: {"dtype": "float32", "shape": list(t.shape), "data": t.tolist()}
                       for n, t in PARAMS.items()}}


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(_test_settings(durability="step"))) as c:
        yield c


def test_the_lead_create_path_over_http_is_a_503_problem(client: TestClient,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported case: ``POST /v1/sessions`` while the process is out of descriptors was a
    500 ``internal_error``; it is a 503 ``out_of_file_descriptors`` problem+json with
    ``Retry-After: 2``, and the retry is created (201) and steps as torch does."""
    with monkeypatch.context() as m:
        m.setattr(directory_module, "entry_at", emfile)
        r = client.post("/v1/sessions", json=body("b"))
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["retry-after"] == "2"
    assert r.json()["code"] == "out_of_file_descriptors"
    assert client.get("/v1/sessions").json()["sessions"] == []
    assert client.post("/v1/sessions", json=body("b")).status_code == 201
    r = client.post("/v1/sessions/b/step", json={"grads": {
        n: {"dtype": "float32", "shape": list(t.shape), "data": t.tolist()}
        for n, t in GRAD.items()}})
    assert r.status_code == 200, r.text
    got = {n: torch.tensor(v["data"]) for n, v in r.json()["params"].items()}
    assert_tensors_equal(got, stepped(1))


@pytest.mark.parametrize(("err", "status", "code"), [
    (errno.EMFILE, 503, "out_of_file_descriptors"), (errno.ENFILE, 503, "out_of_file_descriptors"),
    (errno.ENOSPC, 507, "storage_full"), (errno.EIO, 503, "storage_error")])
def test_an_os_error_no_layer_caught_is_a_problem_not_a_500(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, err: int, status: int,
        code: str) -> None:
    """The last resort: an OSError that a route lets through (here the session list's) is
    answered as a storage failure, never a 500 ``internal_error``."""
    def failing(*_: object, **__: object) -> list[SessionInfo]:
        raise OSError(err, os.strerror(err))
    monkeypatch.setattr(Front, "list_sessions", failing)
    r = client.get("/v1/sessions")
    assert (r.status_code, r.json()["code"]) == (status, code), r.text
    assert r.json()["detail"].startswith("the request could not be completed: "), r.text
    assert ("retry-after" in r.headers) == (status == 503)


# ----------------------------------------------------------------------------- same host
def test_a_segment_that_cannot_be_mapped_leaves_no_descriptor(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A binding's segment whose ``mmap`` fails (ENOMEM) closed nothing: each such failure
    left its memfd open, one descriptor more toward EMFILE. It is closed."""
    info: Any = SimpleNamespace(params={"w": {"dtype": "float32", "shape": [4]}},
                                durability="step")  # (what a binding reads of a session)

    def no_memory(*_: object) -> Any:
        raise OSError(errno.ENOMEM, "no memory")
    monkeypatch.setattr(local_module, "_map_segment", no_memory)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(OSError):
            Binding("s", info)
    assert len(os.listdir("/proc/self/fd")) == before


class _Listener:
    """A listening socket whose first ``fail`` accepts fail with EMFILE."""

    def __init__(self, sock: socket.socket, fail: int) -> None:
        self.sock, self.fail = sock, fail

    def accept(self) -> tuple[socket.socket, Any]:
        if self.fail:
            self.fail -= 1
            emfile()
        return self.sock.accept()

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def unix_listener() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="osd-", dir="/tmp")  # (a short path: <= 108 bytes)
    path = os.path.join(folder, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(8)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + 5
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_same_host_accept_loop_survives_emfile(
        unix_listener: tuple[socket.socket, str]) -> None:
    """An accept that failed with EMFILE ended the same-host transport's accept thread:
    from then on no training process could connect until a restart. It is tried again."""
    sock, path = unix_listener
    transport = LocalTransport(engine=None, keys={}, default_tenant="default")  # type: ignore[arg-type]
    transport._listener = _Listener(sock, fail=3)  # type: ignore[assignment]
    thread = threading.Thread(target=transport._accept, daemon=True)
    thread.start()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        wait_for(lambda: len(transport._conns) == 1, "the connection after EMFILE is served")
    finally:
        client.close()
        transport.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_same_host_connections_count_against_the_bound(
        unix_listener: tuple[socket.socket, str]) -> None:
    """With the bound at one connection (shared with HTTP's), a second same-host connection
    is closed at once; once the first closes, a new one is served."""
    sock, path = unix_listener
    slots = ConnectionSlots(1)
    transport = LocalTransport(engine=None, keys={}, default_tenant="default",  # type: ignore[arg-type]
                               slots=slots)
    transport._listener = sock
    thread = threading.Thread(target=transport._accept, daemon=True)
    thread.start()
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        clients[0].connect(path)
        wait_for(lambda: slots.open == 1, "the first connection is counted")
        clients[1].connect(path)
        clients[1].settimeout(5)
        assert clients[1].recv(1) == b"", "the second is closed"
        assert slots.open == 1 and len(transport._conns) == 1
        clients[0].close()
        wait_for(lambda: slots.open == 0, "the first connection's slot is given back")
        clients[2].connect(path)
        wait_for(lambda: slots.open == 1, "a new connection is served")
        clients[2].settimeout(0.2)
        with pytest.raises(TimeoutError):
            clients[2].recv(1)
    finally:
        for c in clients:
            c.close()
        transport.stop()
        thread.join(timeout=5)


@pytest.mark.parametrize(("soft", "limit"), [
    (120, 56), (1024, 768), (65536, 49152), (40, 8), (2 ** 40, 786432)])
def test_the_default_bound_keeps_a_reserve_of_descriptors(soft: int, limit: int) -> None:
    assert default_limit(soft) == limit


def test_a_bound_that_eats_the_reserve_is_warned_about() -> None:
    assert reserve_warning(0, 1024) is None and reserve_warning(768, 1024) is None
    warning = reserve_warning(1000, 1024)
    assert warning is not None and warning.startswith(
        "OPTSERVE_MAX_CONNECTIONS=1000 leaves 24 of this process's 1024 file descriptors")


def test_storage_full_is_unchanged() -> None:
    """(The ENOSPC answer is the store's, as before.)"""
    from app.engine.store import storage_failure
    exc = storage_failure(OSError(errno.ENOSPC, "full"), "writing")
    assert isinstance(exc, StorageFull) and exc.code == "storage_full"
