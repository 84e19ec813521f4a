"""A binary step answer streamed while its chunks step (``app/api/streamed_step.py``,
``app/engine/answer_stream.py``), over real HTTP on both of the server's HTTP protocols.

A session of one large parameter "w" (stepped in chunks of 30,011 elements here: 10 chunks,
the last one shorter) and a small one "b" (stepped whole), durability ``memory`` or
``interval``, stepped with safetensors both ways and ``?metrics=history``: the client holds
the answer's first chunks while a later chunk has yet to step, every answer is bitwise the
one a local ``torch.optim`` gives, a step that fails in a later chunk leaves the client with
an answer cut short of its ``Content-Length`` and the session as it was (its next step, and
its retry under the same ``Idempotency-Key``, torch's), a retried key gets the first answer's
scalars with the current parameters, and a narrowed answer (``params_dtype=bfloat16``) is the
step's values narrowed."""

from __future__ import annotations

import base64
import json
import logging
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families

import optserve
from app.engine import answer_stream, chunked, optimizer_step
from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol

pytestmark = pytest.mark.integration
BINARY = "application/octet-stream"
N = 300_007  # (1.2 MB: stepped on the worker thread, not inline)
CHUNK = 30_011
CHUNKS = -(-N // CHUNK)
OPTIONS = {"lr": 0.01, "weight_decay": 0.01}
HISTORY = "?metrics=history"


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    settings = _test_settings()
    with LiveServer(settings, http=problem_protocol(request.param)).serving() as base:
        chunked.configure(CHUNK, smallest=2 * CHUNK)  # (after the host set the server's)
        try:
            yield base
        finally:
            chunked.configure(chunked.DEFAULT_CHUNK)


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=15)) as client:
        yield client


def seeded(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def initial() -> dict[str, torch.Tensor]:
    return {"w": seeded(N, 0), "b": seeded(5, 1)}


def grads(k: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return {"w": seeded(N, 100 + k).to(dtype), "b": seeded(5, 200 + k).to(dtype)}


def b64(t: torch.Tensor) -> dict[str, Any]:
    return {"dtype": "float32", "shape": list(t.shape),
            "b64": base64.b64encode(t.numpy().tobytes()).decode()}


def create(http: httpx.Client, durability: str) -> str:
    sid = f"s-{uuid.uuid4().hex[:10]}"
    r = http.post("/v1/sessions", json={
        "id": sid, "optimizer": "Adam", "options": OPTIONS, "durability": durability,
        "params": {n: b64(t) for n, t in initial().items()}})
    assert r.status_code == 201, r.text
    return sid


class Local:
    """The same optimizer in this process: the reference every answer is compared with."""

    def __init__(self) -> None:
        self.params = initial()
        self.opt = torch.optim.Adam(list(self.params.values()), **OPTIONS)  # type: ignore[arg-type]

    def step(self, g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for n, p in self.params.items():
            p.grad = g[n].to(p.dtype)
        self.opt.step()
        return {n: p.detach().clone() for n, p in self.params.items()}


def step_path(sid: str, query: str = HISTORY) -> str:
    return f"/v1/sessions/{sid}/step{query}"


def post_step(http: httpx.Client, sid: str, g: dict[str, torch.Tensor], query: str = HISTORY,
              key: str | None = None) -> httpx.Response:
    headers = {"Content-Type": BINARY, "Accept": BINARY}
    if key is not None:
        headers["Idempotency-Key"] = key
    return http.post(step_path(sid, query), content=safetensors.torch.save(g),
                     headers=headers)


def answer(r: httpx.Response) -> dict[str, torch.Tensor]:
    assert r.status_code == 200, r.text
    return safetensors.torch.load(r.content)


def metadata(r: httpx.Response) -> dict[str, str]:
    size = struct.unpack("<Q", r.content[:8])[0]
    meta: dict[str, str] = json.loads(r.content[8:8 + size])["__metadata__"]
    return meta


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n, t in want.items():
        assert got[n].dtype == t.dtype, n
        assert torch.equal(got[n].view(torch.uint8), t.view(torch.uint8)), n


@pytest.fixture
def begun(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The scalars of every answer that began streaming."""
    seen: list[dict[str, Any]] = []
    real = answer_stream.AnswerStream.begin

    def spy(self: answer_stream.AnswerStream, scalars: dict[str, Any]) -> None:
        seen.append(scalars)
        real(self, scalars)
    monkeypatch.setattr(answer_stream.AnswerStream, "begin", spy)
    return seen


def on_call(monkeypatch: pytest.MonkeyPatch, n: int, act: Callable[[], None]) -> None:
    """``act()`` on the worker just before the ``n``-th ``optimizer.step()`` call from now
    (the streamed step's first call steps "b", each later one a chunk of "w")."""
    calls = 0
    real = optimizer_step.step

    def counted(opt: torch.optim.Optimizer) -> Any:
        nonlocal calls
        calls += 1
        if calls == n:
            act()
        return real(opt)
    monkeypatch.setattr(optimizer_step, "step", counted)


def test_the_answer_starts_before_the_step_ends(http: httpx.Client,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A later chunk held back: the client already has the head, the safetensors header, "b"
    and the first three chunks of "w", each torch's; the rest comes once it steps."""
    sid, local = create(http, "memory"), Local()
    assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))  # (state made)
    want = local.step(grads(1))
    go, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        go.wait(30)
    on_call(monkeypatch, 5, hold)  # (before the 4th chunk of "w" steps)
    body = safetensors.torch.save(grads(1))
    try:
        with http.stream("POST", step_path(sid), content=body,
                         headers={"Content-Type": BINARY, "Accept": BINARY}) as r:
            assert r.status_code == 200  # (the step cannot end before go is set)
            got = bytearray()
            head = None
            stream = r.iter_raw()
            while head is None or len(got) < head + 4 * (5 + 3 * CHUNK):
                got += next(stream)
                if head is None and len(got) >= 8:
                    head = 8 + struct.unpack("<Q", bytes(got[:8]))[0]
            assert holding.wait(10)
            early = torch.frombuffer(bytes(got[head:head + 4 * (5 + 3 * CHUNK)]),
                                     dtype=torch.float32)
            assert torch.equal(early[:5], want["b"])
            assert torch.equal(early[5:], want["w"][:3 * CHUNK])
            go.set()
            for piece in stream:
                got += piece
    finally:
        go.set()
    assert int(r.headers["X-Optserve-Version"]) == 2
    assert_bitwise(safetensors.torch.load(bytes(got)), want)


@pytest.mark.parametrize("durability", ["memory", "interval"])
def test_a_client_gone_mid_stream_leaves_the_step_whole(http: httpx.Client,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        durability: str) -> None:
    """The client closes the connection after the head and the first chunks, while a later
    chunk has yet to step: the step is applied whole, once (parameters and optimizer state
    torch's), and the same request sent again under its Idempotency-Key is the replay."""
    sid, local = create(http, durability), Local()
    assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))
    want = local.step(grads(1))
    go, holding = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        go.wait(30)
    on_call(monkeypatch, 5, hold)
    key = uuid.uuid4().hex
    try:
        with http.stream("POST", step_path(sid), content=safetensors.torch.save(grads(1)),
                         headers={"Content-Type": BINARY, "Accept": BINARY,
                                  "Idempotency-Key": key}) as r:
            assert r.status_code == 200
            got = 0
            for piece in r.iter_raw():
                got += len(piece)
                if got > 4 * 3 * CHUNK:
                    break
            assert holding.wait(10)
        # (closed with most of the answer unread: the connection is dropped)
    finally:
        go.set()
    monkeypatch.undo()
    info = http.get(f"/v1/sessions/{sid}").json()  # (after the step: it holds the session)
    assert (info["version"], info["step"]) == (2, 2)
    assert_bitwise(safetensors.torch.load(http.get(
        f"/v1/sessions/{sid}/params", headers={"Accept": BINARY}).content), want)
    state = safetensors.torch.load(http.get(f"/v1/sessions/{sid}/state_dict",
                                            headers={"Accept": BINARY}).content)
    for i, entries in local.opt.state_dict()["state"].items():
        for name, t in entries.items():
            assert torch.equal(state[f"state.{i}.{name}"].reshape(t.shape), t), (i, name)
    again = post_step(http, sid, grads(1), key=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_bitwise(answer(again), want)
    assert_bitwise(answer(post_step(http, sid, grads(2))), local.step(grads(2)))


@pytest.mark.parametrize("durability", ["memory", "interval"])
def test_streamed_answers_equal_torch(http: httpx.Client, begun: list[dict[str, Any]],
                                      durability: str) -> None:
    """Four steps: the first makes the state (whole, as ever), the next three stream; each
    answer torch's bit for bit, with torch's version, step and lr."""
    sid, local = create(http, durability), Local()
    for k in range(4):
        r = post_step(http, sid, grads(k))
        assert_bitwise(answer(r), local.step(grads(k)))
        meta = metadata(r)
        assert (meta["version"], meta["step"], meta["lr"]) == (str(k + 1), str(k + 1), "[0.01]")
        assert r.headers["ETag"] == f'"{k + 1}"'
    assert [s["version"] for s in begun] == [2, 3, 4]


def test_a_failure_in_a_later_chunk_cuts_the_answer(http: httpx.Client,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """torch raising in the 7th chunk, after the answer's head and first chunks went out:
    the client gets no complete answer (httpx: the body ends short of its Content-Length),
    the session is as it was (version, parameters, optimizer state), and the same request
    sent again with its Idempotency-Key is applied once, as torch steps it."""
    sid, local = create(http, "interval"), Local()
    assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))
    before = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": BINARY})
    params = http.get(f"/v1/sessions/{sid}/params", headers={"Accept": BINARY})
    assert before.status_code == params.status_code == 200

    def fail() -> None:
        raise RuntimeError("injected in a later chunk")
    on_call(monkeypatch, 8, fail)
    key = uuid.uuid4().hex
    with pytest.raises(httpx.RemoteProtocolError):
        post_step(http, sid, grads(1), key=key)
    monkeypatch.undo()
    as_before_then_retried(http, sid, key, params, before, local)


def as_before_then_retried(http: httpx.Client, sid: str, key: str, params: httpx.Response,
                           before: httpx.Response, local: Local) -> None:
    """After a cut streamed step (the session's first step done, its second cut): the
    session is at version 1, its parameters and state dict (``params``, ``before``: read
    before the cut step) byte for byte as they were; the cut step sent again with its
    ``key`` is applied once, as torch steps it (not a replay), and so is the next one."""
    info = http.get(f"/v1/sessions/{sid}").json()
    assert (info["version"], info["step"]) == (1, 1)
    assert http.get(f"/v1/sessions/{sid}/params",
                    headers={"Accept": BINARY}).content == params.content
    after = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": BINARY})
    assert after.content == before.content
    r = post_step(http, sid, grads(1), key=key)
    assert "Idempotent-Replayed" not in r.headers
    assert_bitwise(answer(r), local.step(grads(1)))
    assert_bitwise(answer(post_step(http, sid, grads(2))), local.step(grads(2)))


def test_torch_refusing_the_first_chunk_is_answered_whole(http: httpx.Client,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """torch refusing the step (a ``ValueError``) in the call that steps the first chunk,
    where it checks a step's parameters and options: no head went out yet, so the client gets
    the 422 ``step_failed`` a step answered whole gets, not a cut 200 it would retry as a lost
    answer; the session is as it was, and the same step sent again is torch's."""
    sid, local = create(http, "interval"), Local()
    assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))
    before = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": BINARY})
    assert before.status_code == 200

    def refuse() -> None:
        raise ValueError("injected: torch refuses this step")
    on_call(monkeypatch, 2, refuse)  # (the first call steps "b", the second the 1st chunk)
    r = post_step(http, sid, grads(1), key=uuid.uuid4().hex)
    monkeypatch.undo()
    assert r.status_code == 422, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert (r.json()["code"], r.json()["field"]) == ("step_failed", "param_groups")
    assert "injected: torch refuses this step" in r.json()["detail"]
    info = http.get(f"/v1/sessions/{sid}").json()
    assert (info["version"], info["step"]) == (1, 1)
    after = http.get(f"/v1/sessions/{sid}/state_dict", headers={"Accept": BINARY})
    assert after.content == before.content
    assert_bitwise(answer(post_step(http, sid, grads(1))), local.step(grads(1)))


def step_counts(http: httpx.Client, sid: str) -> dict[str, float]:
    """``optserve_steps_total`` of session ``sid`` per outcome, from ``GET /metrics``."""
    r = http.get("/metrics")
    assert r.status_code == 200
    return {sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(r.text)
            if family.name == "optserve_steps" for sample in family.samples
            if sample.name == "optserve_steps_total" and sample.labels.get("session") == sid}


def test_a_cut_answer_is_counted_and_logged_as_cut(http: httpx.Client,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The answer cut short by a failure in a later chunk: ``/metrics`` counts the step under
    the failure's code (``apply_failed``, as the same failure answered whole is), not ``ok``;
    its access line says it was cut and how many bytes went out (fewer than its
    Content-Length); a whole streamed answer is counted ``ok`` and logged without ``cut``."""
    sid, local = create(http, "interval"), Local()
    assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))
    assert_bitwise(answer(post_step(http, sid, grads(1))), local.step(grads(1)))  # (streamed)
    assert step_counts(http, sid) == {"ok": 2}

    def fail() -> None:
        raise RuntimeError("injected in a later chunk")
    on_call(monkeypatch, 8, fail)
    caplog.set_level(logging.INFO, logger="optserve.access")
    with http.stream("POST", step_path(sid), content=safetensors.torch.save(grads(2)),
                     headers={"Content-Type": BINARY, "Accept": BINARY}) as r:
        length = int(r.headers["Content-Length"])
        got = 0
        with pytest.raises(httpx.RemoteProtocolError):
            for piece in r.iter_raw():
                got += len(piece)
    monkeypatch.undo()
    assert 0 < got < length
    assert step_counts(http, sid) == {"ok": 2, "apply_failed": 1}
    lines = [rec for rec in caplog.records if rec.name == "optserve.access"
             and rec.fields["path"] == f"/v1/sessions/{sid}/step"]  # type: ignore[attr-defined]
    cut = lines[-1]
    assert cut.fields["status"] == 200 and cut.fields["cut"] is True  # type: ignore[attr-defined]
    assert cut.fields["bytes_out"] == got  # type: ignore[attr-defined]
    assert cut.getMessage() == f"POST /v1/sessions/{sid}/step 200 cut short after {got} bytes"
    assert_bitwise(answer(post_step(http, sid, grads(2))), local.step(grads(2)))
    assert step_counts(http, sid) == {"ok": 3, "apply_failed": 1}
    whole = [rec for rec in caplog.records if rec.name == "optserve.access"
             and rec.fields["path"] == f"/v1/sessions/{sid}/step"][-1]  # type: ignore[attr-defined]
    assert "cut" not in whole.fields  # type: ignore[attr-defined]
    assert whole.fields["bytes_out"] == length  # type: ignore[attr-defined]


def test_a_retried_key_gets_its_first_answer(http: httpx.Client,
                                             begun: list[dict[str, Any]]) -> None:
    """A streamed step's key sent again: its version, step and lr, the current parameters
    (also after a later step), nothing applied twice."""
    sid, local = create(http, "memory"), Local()
    local.step(grads(0))
    answer(post_step(http, sid, grads(0)))
    key = uuid.uuid4().hex
    first = post_step(http, sid, grads(1), key=key)
    want = local.step(grads(1))
    assert_bitwise(answer(first), want)
    assert len(begun) == 1
    again = post_step(http, sid, grads(1), key=key)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert_bitwise(answer(again), want)
    later = local.step(grads(2))
    assert_bitwise(answer(post_step(http, sid, grads(2))), later)
    third = post_step(http, sid, grads(1), key=key)
    assert (metadata(third)["version"], metadata(third)["step"]) == ("2", "2")
    assert third.headers["ETag"] == '"3"'
    assert_bitwise(answer(third), later)


def test_a_narrowed_answer_streams_narrowed(http: httpx.Client,
                                            begun: list[dict[str, Any]]) -> None:
    """bfloat16 gradients widened on the server, the answer narrowed to bfloat16 into the
    spent gradients chunk by chunk: torch's float32 step, narrowed."""
    sid, local = create(http, "memory"), Local()
    query = HISTORY + "&upcast=true&params_dtype=bfloat16"
    for k in range(3):
        g = grads(k, torch.bfloat16)
        want = {n: t.to(torch.bfloat16) for n, t in local.step(g).items()}
        assert_bitwise(answer(post_step(http, sid, g, query)), want)
    assert len(begun) == 2


def test_the_sdk_retries_a_cut_answer(url: str, begun: list[dict[str, Any]],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python SDK's step over HTTP meeting an answer cut after it began: no step is taken
    as done; it retries under the same Idempotency-Key and gets the step torch takes, once."""
    with httpx.Client(base_url=url, timeout=30) as http:
        sid, local = create(http, "interval"), Local()
        assert_bitwise(answer(post_step(http, sid, grads(0))), local.step(grads(0)))
    failed: list[int] = []

    def fail_once() -> None:
        if not failed:
            failed.append(1)
            raise RuntimeError("injected once")
    on_call(monkeypatch, 8, fail_once)
    with optserve.Client(url, transport="http") as client:
        out = client.step(sid, grads(1), metrics="history")
    assert failed and len(begun) == 2  # (cut once, then answered)
    assert (out.version, out.step) == (2, 2)
    assert out.params is not None
    assert_bitwise({n: torch.as_tensor(t) for n, t in out.params.items()}, local.step(grads(1)))


def test_remote_optimizer_over_http_gets_streamed_answers(url: str,
                                                          begun: list[dict[str, Any]]) -> None:
    """``RemoteOptimizer`` over HTTP asks for its norms in the history (it returns none), so
    a large session's answers stream (every step after the first, whose state is made then);
    its parameters are a local torch run's, bit for bit."""
    w, b = (torch.nn.Parameter(t) for t in initial().values())
    local = Local()
    with optserve.Client(url, transport="http") as client:
        opt = optserve.RemoteOptimizer([("w", w), ("b", b)], "Adam", client, **OPTIONS)
        try:
            for k in range(3):
                g = grads(k)
                w.grad, b.grad = g["w"].clone(), g["b"].clone()
                opt.step()
                assert_bitwise({"w": w.detach(), "b": b.detach()}, local.step(g))
        finally:
            opt.close(delete_session=True)
    assert [s["version"] for s in begun] == [2, 3]
