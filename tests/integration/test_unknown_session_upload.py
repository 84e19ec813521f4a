"""A request that carries a body to a session nothing holds is answered 404 before its body is
read: the look-up of the session comes before the body (``Front.refuse_unknown``), so a client
uploading a large step, push, parameters or state to a mistyped id reads its 404 as its upload
begins, and the answer closes the connection with the lingering close of any early answer
(``app.api.lingering_close``: ``Connection: close``, the rest of the upload dropped until the
client closes its side, or nothing arrives for ``connection_cap.UPLOAD_QUIET_S``). It was read
whole first (hundreds of MiB, at the client's pace), then answered. The problem is the one a
read of the unknown session gets (same status, code, title, detail, field). A session that
exists is stepped as ever (torch's step, for a large body sent slowly); one deleted while its
step's body arrives is still a 404 after the body (the step looks the session up again, and
nothing is applied); one created after the head arrived was not there for the request: its 404
came first, and the body sent after it changes nothing. Sessions restored by a restart (plain
and sharded) are found by the early look-up, and so is a deleted LBFGS session's finished step,
whose last evaluation posted again is still answered from it. A small rest sent slowly after
its answer, and a body sent after an answer that came before ``100 Continue``, are not reset by
the next head's clock: its close lingers as an upload's. A ``Content-Type`` a route does not
take is refused (415) from the head too, before the body. Over raw sockets against real uvicorn
servers on 127.0.0.1, with each HTTP protocol ``python -m app`` may use; the upload's linger is
shortened to :data:`TOTAL_S` and :data:`QUIET_S`, the head clock to :data:`HEAD_TIMEOUT_S`."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load, save

from app.api import connection_cap
from tests.conftest import HTTP_PROTOCOLS, LiveServer, _test_settings, problem_protocol
from tests.integration import test_early_answer_upload_linger as early
from tests.integration import test_lbfgs as lbfgs
from tests.integration import test_refused_upload_linger as upload
from tests.torch_reference import json_tensor

# waits on real clocks most of its time: run beside the Ray suite (scripts/test)
pytestmark = [pytest.mark.integration, pytest.mark.clock]

#: the upload's linger in all, and without bytes (shortened from 30 s and 5 s)
TOTAL_S = 6.0
QUIET_S = 1.0
#: the next head's clock (shortened from 10 s)
HEAD_TIMEOUT_S = 1.0
#: how long a slow rest takes: past the head clock plus the short linger it met
SLOW_S = 2.6
#: how long a test waits for an answer the server should give at once
PROMPT_S = 3.0
BINARY = "application/octet-stream"
#: a body well past ``lingering_close.KEEP_ALIVE_REST`` (the answer then closes)
BODY = 400_000
PIECE = 4000
#: body-carrying requests on a session: method, path after the session's, Content-Type
ROUTES = [
    ("POST", "/step", BINARY),
    ("POST", "/step", "application/json"),
    ("POST", "/grads", BINARY),
    ("POST", "/zero_grad", "application/json"),
    ("PUT", "/params", BINARY),
    ("POST", "/params/rows", "application/json"),
    ("PATCH", "", "application/json"),
    ("POST", "/param_groups", "application/json"),
    ("PATCH", "/param_groups/0", "application/json"),
    ("POST", "/scheduler/step", "application/json"),
    ("PUT", "/state_dict", BINARY),
    ("POST", "/step/s1.1", "application/json"),
]


@pytest.fixture(scope="module", params=HTTP_PROTOCOLS)
def live(request: pytest.FixtureRequest) -> Iterator[tuple[LiveServer, str]]:
    settings = _test_settings(head_timeout_s=HEAD_TIMEOUT_S)
    with upload.lingering_server(settings, request.param, TOTAL_S, QUIET_S) as served:
        yield served


def head(method: str, path: str, ctype: str, framing: str, extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Type: {ctype}\r\n{extra}"
            f"{framing}\r\n\r\n").encode()


def framing_of(chunked: bool, size: int = BODY) -> str:
    return "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"


def pieces(body: bytes, chunked: bool) -> list[bytes]:
    """``body`` in pieces of :data:`PIECE` bytes (chunks of a chunked body, its end last)."""
    parts = [body[i:i + PIECE] for i in range(0, len(body), PIECE)]
    if not chunked:
        return parts
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts[:-1]] + [
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(parts[-1]), parts[-1])]


def prompt_answer(sock: socket.socket) -> bytes:
    """The whole answer, which must come within :data:`PROMPT_S` (a timeout fails)."""
    sock.settimeout(PROMPT_S)
    try:
        return early.read_answer(sock)
    finally:
        sock.settimeout(30)


def no_answer_yet(sock: socket.socket) -> None:
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(100)
    sock.settimeout(30)


def the_404(answer: bytes, closes: bool) -> dict[str, object]:
    """The answer's problem: a 404 ``session_not_found`` as problem+json, closing or not."""
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 404 "), answer[:300]
    lowered = head_part.lower() + b"\r\n"
    assert b"\r\ncontent-type: application/problem+json\r\n" in lowered, head_part
    assert (b"\r\nconnection: close\r\n" in lowered) is closes, head_part
    problem = json.loads(body)
    assert problem["code"] == "session_not_found", problem
    return dict(problem)


def same_problem(got: dict[str, object], url: str, sid: str) -> None:
    """``got`` is the problem a read of the unknown session gets (its request id aside)."""
    want = httpx.get(f"{url}/v1/sessions/{sid}", timeout=30)
    assert want.status_code == 404, want.text
    fields = ("type", "status", "title", "detail", "code", "field")
    assert {k: got.get(k) for k in fields} == {k: want.json().get(k) for k in fields}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("method", "path", "ctype"), ROUTES,
                         ids=[f"{m} {p or '/'} {c.split('/')[1]}" for m, p, c in ROUTES])
def test_an_upload_to_an_unknown_session_is_answered_before_its_body(
        live: tuple[LiveServer, str], method: str, path: str, ctype: str,
        chunked: bool) -> None:
    """The 404 comes after the first piece of a 400 KB body (the rest unsent), says
    ``Connection: close``, and the rest sent after it is dropped (no reset); the client's
    close ends the linger."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    body = pieces(b"a" * BODY, chunked)
    with upload.connect(url) as sock:
        sock.sendall(head(method, f"/v1/sessions/nope{path}", ctype, framing_of(chunked))
                     + body[0])
        problem = the_404(prompt_answer(sock), closes=True)
        same_problem(problem, url, "nope")
        assert upload.lingering(server) == 1
        for piece in body[1:20]:
            sock.sendall(piece)  # (a reset here fails the test)
        sock.shutdown(socket.SHUT_WR)
        assert upload.read_to_end(sock) == b""  # (a reset here fails the test)
    upload.wait_no_lingering(server, 10)


#: body-carrying requests whose Content-Type is refused (415) from the head alone
TYPED_ROUTES = [("POST", "/v1/sessions"), ("POST", "/v1/sessions/typed/step"),
                ("POST", "/v1/sessions/typed/grads"), ("PUT", "/v1/sessions/typed/params"),
                ("POST", "/v1/sessions/typed/params/rows"), ("PATCH", "/v1/sessions/typed"),
                ("POST", "/v1/sessions/typed/param_groups"),
                ("PATCH", "/v1/sessions/typed/param_groups/0"),
                ("POST", "/v1/sessions/typed/step/s1.1")]


@pytest.mark.parametrize(("method", "path"), TYPED_ROUTES,
                         ids=[f"{m} {p.removeprefix('/v1/sessions')}" for m, p in TYPED_ROUTES])
def test_a_body_of_a_refused_content_type_is_answered_before_it_is_read(
        live: tuple[LiveServer, str], method: str, path: str) -> None:
    """A 400 KB upload to a session that exists (or a create) whose ``Content-Type`` the route
    does not take (``curl -d``'s form type) reads its 415 after its first piece, ``Connection:
    close``, the rest dropped without a reset."""
    server, url = live
    r = httpx.post(f"{url}/v1/sessions", timeout=30, json={
        "id": "typed", "optimizer": "SGD", "options": {"lr": 0.1},
        "params": {"w": json_tensor(torch.zeros(2))}})
    assert r.status_code in (201, 409), r.text
    upload.wait_no_lingering(server, TOTAL_S + 10)
    with upload.connect(url) as sock:
        sock.sendall(head(method, path, "application/x-www-form-urlencoded",
                          framing_of(False)) + b"a" * PIECE)
        answer = prompt_answer(sock)
        head_part, _, body = answer.partition(b"\r\n\r\n")
        assert head_part.startswith(b"HTTP/1.1 415 "), answer[:300]
        assert b"\r\nconnection: close\r\n" in head_part.lower() + b"\r\n", head_part
        assert json.loads(body)["field"] == "content-type", body
        for _ in range(10):
            sock.sendall(b"a" * PIECE)  # (a reset here fails the test)
        sock.shutdown(socket.SHUT_WR)
        assert upload.read_to_end(sock) == b""
    upload.wait_no_lingering(server, 10)


def test_a_client_that_stops_after_its_early_404_is_closed_after_the_quiet_bound(
        live: tuple[LiveServer, str]) -> None:
    """A client that reads its early 404 and sends nothing more (nor closes) is closed about
    :data:`QUIET_S` after its last bytes, well before :data:`TOTAL_S`."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    with upload.connect(url) as sock:
        sock.sendall(head("POST", "/v1/sessions/nope/step", BINARY, framing_of(False))
                     + b"a" * PIECE)
        sent = time.monotonic()
        the_404(prompt_answer(sock), closes=True)
        assert upload.read_to_end(sock) == b""  # (the answer's end of the stream)
        assert upload.lingering(server) == 1
        closed = upload.wait_no_lingering(server, TOTAL_S + 10) - sent
    # (the server's quiet clock runs from the last bytes it read, after they were sent)
    assert QUIET_S - 0.1 <= closed < TOTAL_S - 1, closed


def test_an_unknown_session_is_answered_before_100_continue(
        live: tuple[LiveServer, str]) -> None:
    """A client that waits for ``100 Continue`` before its 400 KB step gets the 404 at once,
    no ``100``: it need not send its body (it waited for the body to be read first, then
    read its 404 after the ``100`` its reading sent), and the connection is kept."""
    server, url = live
    with upload.connect(url) as sock:
        sock.sendall(head("POST", "/v1/sessions/nope/step", BINARY, framing_of(False),
                          "Expect: 100-continue\r\n"))
        answer = prompt_answer(sock)
        assert not answer.startswith(b"HTTP/1.1 100"), answer[:300]
        the_404(answer, closes=False)
        assert upload.lingering(server) == 0
        # (a body sent anyway is read and dropped: the next request is answered as ever)
        sock.sendall(b"a" * BODY + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert early.read_answer(sock).startswith(b"HTTP/1.1 200 ")
    assert upload.lingering(server) == 0


def _create(url: str, sid: str, params: dict[str, torch.Tensor], shards: int = 1) -> None:
    r = httpx.post(f"{url}/v1/sessions", timeout=30, json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.01}, "shards": shards,
        "params": {n: json_tensor(t) for n, t in params.items()}})
    assert r.status_code == 201, r.text


def _slow_step(url: str, sid: str, grads: dict[str, torch.Tensor], chunked: bool
               ) -> dict[str, torch.Tensor]:
    """A safetensors step sent in :data:`PIECE` pieces, not answered before its end: the
    parameters its answer gives."""
    body = save(grads)
    with upload.connect(url) as sock:
        parts = pieces(body, chunked)
        sock.sendall(head("POST", f"/v1/sessions/{sid}/step", BINARY,
                          framing_of(chunked, len(body)), f"Accept: {BINARY}\r\n") + parts[0])
        no_answer_yet(sock)
        for piece in parts[1:]:
            sock.sendall(piece)
        return load(_answer_body(early.read_answer(sock)))


def _torch_adam(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """torch's Adam (lr 0.01) one step from ``params`` with ``grads``."""
    local = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    opt = torch.optim.Adam(list(local.values()), lr=0.01)
    for n, p in local.items():
        p.grad = grads[n].clone()
    opt.step()
    return {n: p.detach() for n, p in local.items()}


def _answer_body(answer: bytes) -> bytes:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200 "), answer[:300]
    return body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_slow_upload_to_a_session_steps_as_torch(
        live: tuple[LiveServer, str], chunked: bool) -> None:
    """A 400 KB safetensors step sent in pieces to a session that exists is not answered
    before its end, and steps as torch's Adam does, the parameters exactly torch's."""
    _, url = live
    sid = f"held-{int(chunked)}"
    gen = torch.Generator().manual_seed(7)
    params = {"w": torch.randn(100_000, generator=gen)}
    grads = {"w": torch.randn(100_000, generator=gen)}
    _create(url, sid, params)
    got = _slow_step(url, sid, grads, chunked)
    assert torch.equal(got["w"], _torch_adam(params, grads)["w"])


@pytest.mark.parametrize("protocol", HTTP_PROTOCOLS)
def test_sessions_restored_at_a_restart_are_not_refused_early(protocol: str) -> None:
    """A plain and a sharded session, stored and restored by a restart of the server on the
    same data directory, are found by the look-up before the body (no false 404): a slow
    400 KB step to each is torch's Adam step."""
    settings = _test_settings()
    gen = torch.Generator().manual_seed(11)
    params = {"a": torch.randn(50_000, generator=gen), "b": torch.randn(50_000, generator=gen)}
    grads = {"a": torch.randn(50_000, generator=gen), "b": torch.randn(50_000, generator=gen)}
    with LiveServer(settings, http=problem_protocol(protocol)).serving() as url:
        _create(url, "plain", params)
        _create(url, "sharded", params, shards=2)
    with LiveServer(settings, http=problem_protocol(protocol)).serving() as url:
        want = _torch_adam(params, grads)
        for sid in ("plain", "sharded"):
            got = _slow_step(url, sid, grads, chunked=sid == "sharded")
            for name in params:
                assert torch.equal(got[name], want[name]), (sid, name)


def test_a_deleted_lbfgs_sessions_answered_evaluation_is_still_replayed(
        live: tuple[LiveServer, str]) -> None:
    """The last evaluation of an LBFGS step, posted again after the session's delete, is
    answered from the finished step as before (the look-up before the body finds the step:
    no early 404), with the step's answer, torch's LBFGS step."""
    _, url = live
    options = {"lr": 1, "max_iter": 3, "history_size": 3}
    local = lbfgs.Local(options)
    local.step()
    with httpx.Client(base_url=url, timeout=30) as http:
        sid = lbfgs.create(http, options)
        answer = lbfgs._decode(http.post(f"/v1/sessions/{sid}/step"))
        while answer.get("needs") == "evaluation":
            loss, grads = lbfgs.evaluate(answer["params"])
            last = (f"/v1/sessions/{sid}/step/{answer['evaluation']}",
                    {"loss": loss, "grads": {n: json_tensor(g) for n, g in grads.items()}})
            first = http.post(last[0], json=last[1])
            answer = lbfgs._decode(first)
        for n, p in local.params.items():
            assert lbfgs.bitwise(answer["params"][n], p.detach()), n
        assert http.delete(f"/v1/sessions/{sid}").status_code == 204
        again = http.post(last[0], json=last[1])
        assert again.status_code == 200, again.text
        assert again.json() == first.json()


def test_a_session_deleted_mid_upload_is_404_after_its_body(
        live: tuple[LiveServer, str]) -> None:
    """A step whose session is deleted while its body arrives is answered 404 once the body
    is whole (the step looks the session up again), and nothing is made or applied."""
    _, url = live
    params = {"w": torch.ones(100_000)}
    _create(url, "deleted", params)
    body = save({"w": torch.full((100_000,), 0.5)})
    with upload.connect(url) as sock:
        parts = pieces(body, False)
        sock.sendall(head("POST", "/v1/sessions/deleted/step", BINARY,
                          framing_of(False, len(body))) + parts[0])
        no_answer_yet(sock)
        assert httpx.delete(f"{url}/v1/sessions/deleted", timeout=30).status_code == 204
        for piece in parts[1:]:
            sock.sendall(piece)
        the_404(early.read_answer(sock), closes=False)
    assert httpx.get(f"{url}/v1/sessions/deleted", timeout=30).status_code == 404


def test_a_session_created_after_the_head_was_not_there_for_it(
        live: tuple[LiveServer, str]) -> None:
    """A step to an id no session holds when its head arrives is answered 404 then; a session
    created under the id right after is left as made by the rest of the body sent after it."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    params = {"w": torch.ones(100_000)}
    body = save({"w": torch.full((100_000,), 0.5)})
    with upload.connect(url) as sock:
        parts = pieces(body, False)
        sock.sendall(head("POST", "/v1/sessions/later/step", BINARY,
                          framing_of(False, len(body))) + parts[0])
        the_404(prompt_answer(sock), closes=True)
        _create(url, "later", params)
        for piece in parts[1:]:
            sock.sendall(piece)
        sock.shutdown(socket.SHUT_WR)
        assert upload.read_to_end(sock) == b""
    info = httpx.get(f"{url}/v1/sessions/later", timeout=30).json()
    assert info["step"] == 0, info
    held = httpx.get(f"{url}/v1/sessions/later/params", timeout=30,
                     headers={"Accept": BINARY})
    assert torch.equal(load(held.content)["w"], params["w"])
    upload.wait_no_lingering(server, 10)


def _slowly(sock: socket.socket, parts: list[bytes]) -> None:
    """``parts`` sent over :data:`SLOW_S` (a reset fails the test)."""
    started = time.monotonic()
    for piece in parts:
        sock.sendall(piece)
        time.sleep(SLOW_S / len(parts))
    assert time.monotonic() - started > HEAD_TIMEOUT_S + connection_cap.LINGER_S + 0.3


def test_a_small_rest_sent_slowly_after_its_answer_is_not_reset(
        live: tuple[LiveServer, str]) -> None:
    """A 404 whose body's rest is within ``KEEP_ALIVE_REST`` keeps the connection and reads
    the rest on; sent slower than the next head's clock allows (here 48 KB over 2.6 s), the
    close that clock makes lingers while the client sends, so the client sends its last byte
    and reads the end of the stream, no reset (the close lingered a second, and the rest's
    next bytes met a reset)."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    size = early.SMALL_BODY
    with upload.connect(url) as sock:
        sock.sendall(head("POST", "/v1/sessions/nope/step", BINARY, framing_of(False, size))
                     + b"a" * 2000)
        the_404(prompt_answer(sock), closes=False)
        _slowly(sock, pieces(b"a" * (size - 2000), False))
        assert upload.read_to_end(sock) == b""  # (a reset here fails the test)
        sock.shutdown(socket.SHUT_WR)
    upload.wait_no_lingering(server, 10)


def test_a_body_sent_after_an_answer_before_100_continue_is_not_reset(
        live: tuple[LiveServer, str]) -> None:
    """A client that waited for ``100 Continue``, got its 404 instead and sends its 400 KB
    body anyway, slower than the next head's clock allows, sends it whole and reads the end of
    the stream, no reset."""
    server, url = live
    upload.wait_no_lingering(server, TOTAL_S + 10)
    with upload.connect(url) as sock:
        sock.sendall(head("POST", "/v1/sessions/nope/step", BINARY, framing_of(False),
                          "Expect: 100-continue\r\n"))
        the_404(prompt_answer(sock), closes=False)
        _slowly(sock, pieces(b"a" * BODY, False))
        assert upload.read_to_end(sock) == b""  # (a reset here fails the test)
        sock.shutdown(socket.SHUT_WR)
    upload.wait_no_lingering(server, 10)
