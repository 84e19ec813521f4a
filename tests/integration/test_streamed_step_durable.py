"""A binary step answer streamed while its chunks step, under durability ``step`` (the
server's default): the record is written from the very request body the answer is written
over, beside the step (``EmbeddedHost._apply_while_syncing``), so no value goes into the
answer before the record's write has returned, and its last byte not before the fsync has.

The session and gradients are ``test_streamed_step``'s (one large parameter stepped in
chunks, one small one stepped whole); the store's file calls are the fault tests' gated ones
(``GatedFiles``: a log's next write or fsync held until the test opens it, with an error or
without). Checked over real HTTP: answers bitwise torch's (a small record, written before the
step, streaming too); the client holding the head and
every chunk but the last byte while the fsync is held; no value in the answer while the write
is held, and the log record then holding the gradients (a server started on the data
directory as a ``kill -9`` right after the complete answer leaves it restores the session
bitwise); a failed fsync cutting the answer, the session as it was, its keyed retry applied
once."""

from __future__ import annotations

import errno
import shutil
import struct
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch

from app.engine import answer_stream, chunked
from tests.conftest import LiveServer, _test_settings
from tests.integration.test_streamed_step import (  # noqa: F401 - the fixture
    BINARY,
    CHUNK,
    Local,
    answer,
    as_before_then_retried,
    assert_bitwise,
    b64,
    begun,
    create,
    grads,
    metadata,
    post_step,
    seeded,
    step_path,
)
from tests.unit.test_store_faults import GatedFiles

pytestmark = pytest.mark.integration


class Served:
    """The live server, its data directory and its gated file calls."""

    def __init__(self, live: LiveServer, url: str, data_dir: Path, files: GatedFiles) -> None:
        self.live, self.url, self.data_dir, self.files = live, url, data_dir, files


def small_chunks() -> None:
    chunked.configure(CHUNK, smallest=2 * CHUNK)  # (after a host set the server's)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    data_dir = Path(tempfile.mkdtemp(prefix="optserve-test-"))
    live = LiveServer(_test_settings(data_dir=data_dir, durability="step"))
    url = live.start()
    files = GatedFiles()
    live.app.state.engine.host._store.files = files  # (before any session's log is opened)
    small_chunks()
    try:
        yield Served(live, url, data_dir, files)
    finally:
        files.open_gate()
        live.stop()
        chunked.configure(chunked.DEFAULT_CHUNK)
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def http(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=httpx.Timeout(30, read=15)) as client:
        yield client


def started(http: httpx.Client) -> tuple[str, Local]:
    """A durability ``step`` session whose first step (made its state: answered whole) is
    done."""
    sid, local = create(http, "step"), Local()
    assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))
    return sid, local


def started_and_read(http: httpx.Client
                     ) -> tuple[str, Local, httpx.Response, httpx.Response]:
    """:func:`started`, then its state dict and parameters read (binary): what a step that
    fails must leave the session as."""
    sid, local = started(http)
    before = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": BINARY})
    params = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert before.status_code == params.status_code == 200
    return sid, local, before, params


def test_streamed_answers_under_step_equal_torch(
        http: httpx.Client, begun: list[dict[str, Any]]) -> None:  # noqa: F811 - the fixture
    """Four steps: the first makes the state (whole), the next three stream; each answer
    torch's bit for bit, with torch's version, step and lr."""
    sid, local = create(http, "step"), Local()
    for k in range(4):
        r = post_step(http, sid, grads(k))
        assert_bitwise(answer(r), local.step(grads(k)))
        meta = metadata(r)
        assert (meta["version"], meta["step"], meta["lr"]) == (str(k + 1), str(k + 1), "[0.01]")
    assert [s["version"] for s in begun] == [2, 3, 4]


def test_a_small_record_written_first_streams(
        http: httpx.Client, begun: list[dict[str, Any]]) -> None:  # noqa: F811 - the fixture
    """A session of 400 KB (4 chunks of "w"): its record, under a MB, is written before the step
    and only its fsync runs beside it, and the step may run on the event loop's thread: its
    answers still stream, torch's bit for bit."""
    n = 3 * CHUNK + 7
    sid = f"s-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.01}, "durability": "step",
        "params": {"w": b64(seeded(n, 0))}})
    assert r.status_code == 201, r.text
    w = seeded(n, 0)
    opt = torch.optim.Adam([w], lr=0.01)
    for k in range(3):
        g = seeded(n, 300 + k)
        w.grad = g.clone()
        opt.step()
        assert_bitwise(answer(post_step(http, sid, {"w": g})), {"w": w.detach()})
    assert [s["version"] for s in begun] == [2, 3]


def test_the_client_holds_the_chunks_while_the_fsync_runs(http: httpx.Client,
                                                          served: Served) -> None:
    """The record's fsync held: the client already has the head, the safetensors header and
    every value but the answer's last byte, each torch's; the last byte comes once the fsync
    returns."""
    sid, local = started(http)
    want = local.step(grads(1))
    size = 4 * sum(t.numel() for t in want.values())
    served.files.close_gate("fsync")
    try:
        with http.stream("POST", step_path(sid), content=safetensors.torch.save(grads(1)),
                         headers={"Content-Type": BINARY, "Accept": BINARY}) as r:
            assert r.status_code == 200
            got, head = bytearray(), None
            stream = r.iter_raw()
            while head is None or len(got) < head + size - 1:
                got += next(stream)
                if head is None and len(got) >= 8:
                    head = 8 + struct.unpack("<Q", bytes(got[:8]))[0]
            # (the fsync is held: the test has not opened its gate)
            assert served.files.held.wait(10) and served.files.gate is None
            early = torch.frombuffer(bytes(got[head:head + size - 4]), dtype=torch.float32)
            assert torch.equal(early[:5], want["b"])
            assert torch.equal(early[5:], want["w"][:-1])
            served.files.open_gate()
            for piece in stream:
                got += piece
    finally:
        served.files.open_gate()
    assert int(r.headers["X-Optserve-Version"]) == 2
    assert_bitwise(safetensors.torch.load(bytes(got)), want)


def test_nothing_is_copied_before_the_write_and_the_log_keeps_the_gradients(
        http: httpx.Client, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record's write held while every chunk steps: when the step ends, the answer's
    buffer (the request body) still holds the gradients and no byte of it is ready; once the
    write returns the answer is torch's. The data directory as a ``kill -9`` right after the
    complete answer leaves it (copied while the server runs: no snapshot, the log replayed)
    restores the session bitwise, and its next step is torch's."""
    sid, local = started(http)
    body = safetensors.torch.save(grads(1))
    seen: list[tuple[bytes, int]] = []
    at_end = threading.Event()
    real = answer_stream.AnswerStream.release

    def release(self: answer_stream.AnswerStream) -> None:
        buffer = self.tensors.buffer
        assert buffer is not None
        seen.append((bytes(buffer), self._ready))
        at_end.set()
        real(self)
    monkeypatch.setattr(answer_stream.AnswerStream, "release", release)
    served.files.close_gate("pwritev")
    result: list[httpx.Response] = []
    poster = threading.Thread(target=lambda: result.append(post_step(http, sid, grads(1))))
    poster.start()
    try:
        assert at_end.wait(15)  # (every chunk stepped, the write still held)
        assert served.files.held.wait(10) and served.files.gate is None
    finally:
        served.files.open_gate()
        poster.join(30)
    header = 8 + struct.unpack("<Q", body[:8])[0]
    assert seen == [(body[header:], 0)]
    want = local.step(grads(1))
    assert_bitwise(answer(result[0]), want)
    crashed = Path(tempfile.mkdtemp(prefix="optserve-test-")) / "data"
    shutil.copytree(served.data_dir, crashed)
    again = LiveServer(_test_settings(data_dir=crashed, durability="step"))
    try:
        with again.serving() as url, httpx.Client(base_url=url, timeout=30) as restored:
            small_chunks()
            info = restored.get(f"/v1/sessions/{sid}").json()
            assert (info["version"], info["step"]) == (2, 2)
            params = restored.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
            assert params.status_code == 200
            assert_bitwise(safetensors.torch.load(params.content), want)
            assert_bitwise(answer(post_step(restored, sid, grads(2))), local.step(grads(2)))
    finally:
        small_chunks()
        shutil.rmtree(crashed.parent, ignore_errors=True)


def test_a_failed_write_is_answered_whole(
        http: httpx.Client, served: Served,
        begun: list[dict[str, Any]]) -> None:  # noqa: F811 - the fixture
    """The record's write failing (a full disk: ``ENOSPC``) while the chunks step: the head
    waited for the write, so the client gets the whole 507 ``storage_full`` a step answered
    whole gets, not an answer cut short; the session is as it was, and the same request sent
    again with its Idempotency-Key is applied once, as torch steps it."""
    sid, local, before, params = started_and_read(http)
    key = uuid.uuid4().hex
    served.files.close_gate("pwritev")
    answered: list[httpx.Response] = []
    sending = threading.Thread(target=lambda: answered.append(
        post_step(http, sid, grads(1), key=key)))
    sending.start()
    try:
        assert served.files.held.wait(10)
        served.files.open_gate(errno.ENOSPC)
        sending.join(30)
    finally:
        served.files.open_gate()
    (r,) = answered
    assert r.status_code == 507, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert r.json()["code"] == "storage_full"
    as_before_then_retried(http, sid, key, params, before, local)
    assert [s["version"] for s in begun] == [2, 2, 3]


def test_a_failed_fsync_cuts_the_answer(
        http: httpx.Client, served: Served,
        begun: list[dict[str, Any]]) -> None:  # noqa: F811 - the fixture
    """The record's fsync failing after the answer's values went out: the client gets no
    complete answer, the session is as it was (version, parameters, optimizer state), the
    same request sent again with its Idempotency-Key is applied once, as torch steps it
    (streamed: the store failing, the record written first), and so is the next step."""
    sid, local, before, params = started_and_read(http)
    key = uuid.uuid4().hex
    served.files.close_gate("fsync")
    try:
        with pytest.raises(httpx.RemoteProtocolError), http.stream(
                "POST", step_path(sid), content=safetensors.torch.save(grads(1)),
                headers={"Content-Type": BINARY, "Accept": BINARY,
                         "Idempotency-Key": key}) as r:
            assert r.status_code == 200
            stream = r.iter_raw()
            got = bytearray(next(stream))
            assert served.files.held.wait(10)
            served.files.open_gate(errno.EIO)
            for piece in stream:
                got += piece
    finally:
        served.files.open_gate()
    assert len(begun) == 1
    as_before_then_retried(http, sid, key, params, before, local)
    assert [s["version"] for s in begun] == [2, 2, 3]
