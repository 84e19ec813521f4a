"""A change whose precondition can no longer hold is answered 412 before its body is read: the
session is already past every version its ``If-Match`` names (or past its
``?base_revision=``), and versions and revisions only move forward, so the operation's check
after the body could only refuse it (``Front.refuse_stale``). It was read whole first (a 400 MB
``PUT .../params`` at the client's pace), then refused. The answer is the operation's own 412
(code, field, current version, revision and step), closing the connection with the lingering
close of any early answer; nothing is changed. A version the session has not reached yet may
still be reached: it is checked after the body, as before. A retry under an idempotency key
the session holds is answered from its record after its body, whatever the version now. An
LBFGS evaluation posted to a sharded session (which has none) gets its 422
``not_supported_here`` from the head too. Raw sockets against real uvicorn servers on
127.0.0.1, both HTTP protocols."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load, save

from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings
from tests.integration import test_early_answer_upload_linger as early
from tests.integration import test_refused_upload_linger as upload
from tests.integration import test_unknown_session_upload as unknown
from tests.torch_reference import json_tensor

pytestmark = [pytest.mark.integration, pytest.mark.clock]

BINARY = "application/octet-stream"
#: conditional changes that carry a body: method, path after the session's, Content-Type
ROUTES = [
    ("PATCH", "", "application/json"),
    ("PUT", "/params", BINARY),
    ("POST", "/param_groups", "application/json"),
    ("PATCH", "/param_groups/0", "application/json"),
    ("POST", "/scheduler/step", "application/json"),
    ("PUT", "/state_dict", BINARY),
]
#: the SGD options every session here is made with
LR, MOMENTUM = 0.1, 0.9


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def live(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    settings = _test_settings(head_timeout_s=unknown.HEAD_TIMEOUT_S)
    with upload.lingering_server(settings, request.param, unknown.TOTAL_S,
                                 unknown.QUIET_S) as served:
        yield served


def _params() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {"w": torch.randn(6, generator=gen), "b": torch.randn(3, generator=gen)}


def _grads() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(4)
    return {"w": torch.randn(6, generator=gen), "b": torch.randn(3, generator=gen)}


def _torch_once() -> dict[str, torch.Tensor]:
    """torch's SGD (momentum) one step from :func:`_params` with :func:`_grads`."""
    local = {n: torch.nn.Parameter(t.clone()) for n, t in _params().items()}
    opt = torch.optim.SGD(list(local.values()), lr=LR, momentum=MOMENTUM)
    grads = _grads()
    for n, p in local.items():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach() for n, p in local.items()}


def _stepped_session(url: str, sid: str, shards: int | None = None) -> None:
    """A session at version 1 (of ``shards`` shards): made, then stepped once (as torch,
    checked)."""
    httpx.delete(f"{url}/v1/sessions/{sid}", timeout=30)
    sharded = {} if shards is None else {"shards": shards}
    r = httpx.post(f"{url}/v1/sessions", timeout=30, json={
        "id": sid, "optimizer": "SGD", "options": {"lr": LR, "momentum": MOMENTUM}, **sharded,
        "params": {n: json_tensor(t) for n, t in _params().items()}})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{url}/v1/sessions/{sid}/step", timeout=30, content=save(_grads()),
                   headers={"Content-Type": BINARY, "Accept": BINARY})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"1"'
    _assert_torch_once(url, sid)


def _assert_torch_once(url: str, sid: str) -> None:
    """The session holds torch's one step, at version 1: nothing else was applied."""
    r = httpx.get(f"{url}/v1/sessions/{sid}/params", timeout=30, headers={"Accept": BINARY})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == '"1"'
    got, want = load(r.content), _torch_once()
    assert got.keys() == want.keys()
    for n in want:
        assert torch.equal(got[n], want[n]), n


def _early(url: str, method: str, path: str, ctype: str, extra: str
           ) -> tuple[bytes, socket.socket]:
    """Sends a 400 KB upload's head and first piece; the answer that comes before the rest,
    within ``unknown.PROMPT_S`` (a timeout fails), and the socket (the rest unsent)."""
    sock = upload.connect(url)
    body = unknown.pieces(b"a" * unknown.BODY, False)
    try:
        sock.sendall(unknown.head(method, path, ctype, unknown.framing_of(False), extra)
                     + body[0])
        return unknown.prompt_answer(sock), sock
    except BaseException:
        sock.close()
        raise


def _finish(server: LiveServer, sock: socket.socket) -> None:
    """The rest of a refused upload is dropped (no reset), the client's close ends it."""
    with sock:
        for _ in range(20):
            sock.sendall(b"a" * unknown.PIECE)  # (a reset here fails the test)
        sock.shutdown(socket.SHUT_WR)
        assert upload.read_to_end(sock) == b""
    upload.wait_no_lingering(server, 10)


def _problem(answer: bytes, status: int, closes: bool) -> dict[str, object]:
    """The answer's problem+json, checked: its status, ``Connection: close`` or not, the
    whole body (by its ``Content-Length``)."""
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 %d " % status), answer[:300]
    lowered = head_part.lower() + b"\r\n"
    assert b"\r\ncontent-type: application/problem+json\r\n" in lowered, head_part
    assert (b"\r\nconnection: close\r\n" in lowered) is closes, head_part
    problem = json.loads(body)
    assert problem["status"] == status, problem
    return dict(problem)


def _the_412(answer: bytes) -> dict[str, object]:
    problem = _problem(answer, 412, closes=True)
    assert problem["code"] == "precondition_failed", problem
    head_part = answer.partition(b"\r\n\r\n")[0].lower()
    assert b'\r\netag: "1"' in head_part, head_part  # (the version headers of a late 412)
    return problem


@pytest.mark.parametrize(("method", "path", "ctype"), ROUTES,
                         ids=[f"{m} {p or '/'}" for m, p, _ in ROUTES])
def test_a_version_the_session_is_past_is_refused_before_the_body(
        live: tuple[LiveServer, str], method: str, path: str, ctype: str) -> None:
    """``If-Match: "0"`` on a session at version 1: the 412 comes after the first piece of a
    400 KB body, the operation's own problem (the version it is at, its step and revision,
    the version named), ``Connection: close``, the rest dropped; the session is unchanged."""
    server, url = live
    sid = "past" + path.replace("/", "-")
    _stepped_session(url, sid)
    upload.wait_no_lingering(server, unknown.TOTAL_S + 10)
    answer, sock = _early(url, method, f"/v1/sessions/{sid}{path}", ctype, 'If-Match: "0"\r\n')
    problem = _the_412(answer)
    _finish(server, sock)
    info = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
    assert {k: problem.get(k) for k in ("field", "current_version", "base_version",
                                         "current_step", "current_revision")} == {
        "field": "If-Match", "current_version": 1, "base_version": 0, "current_step": 1,
        "current_revision": int(info.headers["x-optserve-revision"])}
    assert problem["detail"] == ("the session is at version 1, not 0: it changed since it "
                                 "was read (nothing was done); read it again")
    _assert_torch_once(url, sid)


SHARDED_ROUTES = [r for r in ROUTES if r[:2] != ("POST", "/param_groups")]


@pytest.mark.parametrize(("method", "path", "ctype"), SHARDED_ROUTES,
                         ids=[f"{m} {p or '/'}" for m, p, _ in SHARDED_ROUTES])
def test_a_sharded_session_past_the_version_is_refused_before_the_body(
        live: tuple[LiveServer, str], method: str, path: str, ctype: str) -> None:
    """As a plain session's: ``If-Match: "0"`` on a sharded session (two shards, all in this
    process) at version 1 is the operation's own 412 after the first piece of a 400 KB body
    (it was read whole first), the rest dropped; the session is unchanged, torch's one step.
    So is a ``?base_revision=`` it is past."""
    server, url = live
    sid = "sharded-past" + path.replace("/", "-")
    _stepped_session(url, sid, shards=2)
    upload.wait_no_lingering(server, unknown.TOTAL_S + 10)
    answer, sock = _early(url, method, f"/v1/sessions/{sid}{path}", ctype, 'If-Match: "0"\r\n')
    problem = _the_412(answer)
    _finish(server, sock)
    info = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
    revision = int(info.headers["x-optserve-revision"])
    assert {k: problem.get(k) for k in ("field", "current_version", "base_version",
                                         "current_step", "current_revision")} == {
        "field": "If-Match", "current_version": 1, "base_version": 0, "current_step": 1,
        "current_revision": revision}
    assert problem["detail"] == ("the session is at version 1, not 0: it changed since it "
                                 "was read (nothing was done); read it again")
    answer, sock = _early(url, method, f"/v1/sessions/{sid}{path}?base_revision="
                          f"{revision - 1}", ctype, "")
    problem = _the_412(answer)
    assert (problem["field"], problem["base_revision"]) == ("base_revision", revision - 1)
    _finish(server, sock)
    _assert_torch_once(url, sid)


def test_add_param_group_to_a_sharded_session_keeps_its_422(
        live: tuple[LiveServer, str]) -> None:
    """A sharded session refuses add_param_group whatever its body (422 ``not_supported``,
    after the body): a stale ``If-Match`` does not turn that into a 412 from the head."""
    _, url = live
    sid = "sharded-group"
    _stepped_session(url, sid, shards=2)
    body = json.dumps({"params": {"extra": json_tensor(torch.ones(2))}}).encode() + (
        b" " * 200_000)
    answer = _slow(url, "POST", f"/v1/sessions/{sid}/param_groups", body, "application/json",
                   'If-Match: "0"\r\n')
    problem = _problem(answer, 422, closes=False)
    assert (problem["code"], problem["field"]) == ("not_supported", "param_groups"), problem
    _assert_torch_once(url, sid)


def test_weak_tags_and_a_past_revision_are_refused_before_the_body(
        live: tuple[LiveServer, str]) -> None:
    """``If-Match: W/"1"`` matches no version (strong comparison), ever: 412 from the head;
    so is a ``?base_revision=`` the session is past (it names that field)."""
    server, url = live
    sid = "weak"
    _stepped_session(url, sid)
    revision = int(httpx.get(f"{url}/v1/sessions/{sid}", timeout=30
                             ).headers["x-optserve-revision"])
    assert revision > 0
    upload.wait_no_lingering(server, unknown.TOTAL_S + 10)
    answer, sock = _early(url, "PUT", f"/v1/sessions/{sid}/params", BINARY, 'If-Match: W/"1"\r\n')
    problem = _the_412(answer)
    assert problem["field"] == "If-Match" and "weak" in str(problem["detail"]), problem
    _finish(server, sock)
    answer, sock = _early(url, "PATCH", f"/v1/sessions/{sid}?base_revision={revision - 1}",
                          "application/json", "")
    problem = _the_412(answer)
    assert (problem["field"], problem["base_revision"]) == ("base_revision", revision - 1)
    _finish(server, sock)
    _assert_torch_once(url, sid)


def _slow(url: str, method: str, path: str, body: bytes, ctype: str, extra: str) -> bytes:
    """``body`` sent in pieces: no answer before its last one; the answer after it."""
    with upload.connect(url) as sock:
        parts = unknown.pieces(body, False)
        sock.sendall(unknown.head(method, path, ctype, unknown.framing_of(False, len(body)),
                                  extra) + parts[0])
        unknown.no_answer_yet(sock)
        for piece in parts[1:]:
            sock.sendall(piece)
        return early.read_answer(sock)


def test_a_version_not_reached_yet_is_checked_after_the_body(
        live: tuple[LiveServer, str]) -> None:
    """``If-Match: "7"`` on a session at version 1 may still hold when the body has arrived:
    no answer before it, then the operation's 412 (nothing changed)."""
    _, url = live
    sid = "future"
    _stepped_session(url, sid)
    body = b'{"lr": 0.5}' + b" " * 200_000
    answer = _slow(url, "PATCH", f"/v1/sessions/{sid}", body, "application/json",
                   'If-Match: "7"\r\n')
    problem = _problem(answer, 412, closes=False)
    assert (problem["field"], problem["current_version"], problem["base_version"]) == (
        "If-Match", 1, 7)
    assert httpx.get(f"{url}/v1/sessions/{sid}", timeout=30).json()["param_groups"][0][
        "lr"] == LR
    _assert_torch_once(url, sid)


def test_a_retry_under_a_held_idempotency_key_is_answered_from_its_record(
        live: tuple[LiveServer, str]) -> None:
    """A ``PUT .../params`` with ``If-Match: "1"`` and a key moves the session to version 2;
    its retry (same key, same ``If-Match``, now a version the session is past) is not refused
    from its head: after its body it is answered from the record (``Idempotent-Replayed``),
    the parameters it put, nothing applied twice. A fresh key is refused from the head."""
    server, url = live
    sid = "retried"
    _stepped_session(url, sid)
    gen = torch.Generator().manual_seed(9)
    new = {"w": torch.randn(6, generator=gen), "b": torch.randn(3, generator=gen)}
    # (a JSON body padded to 200 KB, sent the same both times: a retry's)
    body = json.dumps({"params": {n: json_tensor(t) for n, t in new.items()}}).encode() + (
        b" " * 200_000)
    headers = {"Content-Type": "application/json", "If-Match": '"1"',
               "Idempotency-Key": "put-once-1"}
    first = httpx.put(f"{url}/v1/sessions/{sid}/params", content=body, headers=headers,
                      timeout=30)
    assert first.status_code == 200, first.text
    assert first.headers["etag"] == '"2"'
    answer = _slow(url, "PUT", f"/v1/sessions/{sid}/params", body, "application/json",
                   'If-Match: "1"\r\nIdempotency-Key: put-once-1\r\n')
    head_part = answer.partition(b"\r\n\r\n")[0].lower()
    assert head_part.startswith(b"http/1.1 200 "), answer[:300]
    assert b"\r\nidempotent-replayed: true" in head_part, head_part
    assert b'\r\netag: "2"' in head_part, head_part
    r = httpx.get(f"{url}/v1/sessions/{sid}/params", timeout=30, headers={"Accept": BINARY})
    assert r.headers["etag"] == '"2"'
    got = load(r.content)
    for n in new:
        assert torch.equal(got[n], new[n]), n
    upload.wait_no_lingering(server, unknown.TOTAL_S + 10)
    answer, sock = _early(url, "PUT", f"/v1/sessions/{sid}/params", BINARY,
                          'If-Match: "1"\r\nIdempotency-Key: put-once-2\r\n')
    assert _problem(answer, 412, closes=True)["current_version"] == 2
    _finish(server, sock)


def test_an_evaluation_to_a_sharded_session_is_refused_before_the_body(
        live: tuple[LiveServer, str]) -> None:
    """``POST .../step/{eval_id}`` to a sharded session (no LBFGS there, so no evaluation):
    its 422 ``not_supported_here`` comes from the head, the problem the evaluation's own
    look-up gives (as ``DELETE .../step/{id}``, which has no body, gets it)."""
    server, url = live
    sid = "sharded-eval"
    httpx.delete(f"{url}/v1/sessions/{sid}", timeout=30)
    r = httpx.post(f"{url}/v1/sessions", timeout=30, json={
        "id": sid, "optimizer": "SGD", "options": {"lr": LR}, "shards": 2,
        "params": {n: json_tensor(t) for n, t in _params().items()}})
    assert r.status_code == 201, r.text
    upload.wait_no_lingering(server, unknown.TOTAL_S + 10)
    answer, sock = _early(url, "POST", f"/v1/sessions/{sid}/step/s1.1", "application/json", "")
    problem = _problem(answer, 422, closes=True)
    _finish(server, sock)
    want = httpx.delete(f"{url}/v1/sessions/{sid}/step/s1.1", timeout=30)
    assert want.status_code == 422, want.text
    fields = ("type", "status", "title", "detail", "code", "field")
    assert {k: problem.get(k) for k in fields} == {k: want.json().get(k) for k in fields}
    assert problem["code"] == "not_supported_here"
    assert json.loads(httpx.get(f"{url}/v1/sessions/{sid}", timeout=30).text)["version"] == 0
