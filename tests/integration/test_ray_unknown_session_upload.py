"""The 404 before the body (``RayRouter.refuse_unknown``: the directory's entries, no host
asked) end to end on the Ray engine, against a real server whose hosts run on the test
cluster, with API keys (two tenants). A slow upload to an id no session holds, on each
body-carrying route (``Content-Length`` or chunked), reads its 404 after its first piece, the
problem a read of that id gets, and the connection closes with the rest dropped (no reset).
No false 404: a plain and a sharded session stepped by a slow upload right after the
create's 201, sessions restored by a restart of the server on the same data directory,
sessions made through a second front on that directory (whose entries this front reads from
the directory's files), and a session deleted and made again under its id step as torch's
Adam does, bitwise. Another tenant's session is refused early as a missing one is, and is
left as it was. An LBFGS evaluation's upload to a session on a Ray host reads its 422
``not_supported_here`` from the head too. tests/integration/test_unknown_session_upload.py
(and test_stale_precondition_upload.py) run the same on the embedded engine."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load, save

from app.config import Settings
from tests.conftest import LiveServer, kill_hosts, ray_settings
from tests.integration import test_early_answer_upload_linger as early
from tests.integration import test_refused_upload_linger as upload
from tests.integration import test_stale_precondition_upload as stale
from tests.integration import test_unknown_session_upload as unknown
from tests.torch_reference import json_tensor

pytest.importorskip("ray")
pytestmark = [pytest.mark.integration, pytest.mark.ray]

KEY_A, KEY_B = "keyA-0123456789abcdef", "keyB-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
BINARY = unknown.BINARY
#: elements of each parameter: a body of 400 KB, some 100 pieces
SIZE = 100_000


class Front:
    """A Ray-engine server on its own data directory (hosts on the shared test cluster), which
    a test may restart on the same directory."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.live = LiveServer(settings)
        self.url = self.live.start()

    def restart(self) -> None:
        self.live.stop()
        self.live = LiveServer(self.settings)
        self.url = self.live.start()


@pytest.fixture(scope="module")
def front(ray_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    data = tmp_path_factory.mktemp("ray-unknown") / "data"
    settings = ray_settings(ray_cluster, data_dir=data, ray_resources='{"num_cpus": 0}',
                            api_keys=f"{KEY_A}:alice,{KEY_B}:bob")
    served = Front(settings)
    try:
        yield served
    finally:
        served.live.stop()
        kill_hosts(Path(data))


def auth(headers: dict[str, str]) -> str:
    return "".join(f"{k}: {v}\r\n" for k, v in headers.items())


def create(url: str, sid: str, params: dict[str, torch.Tensor], shards: int = 1) -> None:
    r = httpx.post(f"{url}/v1/sessions", timeout=300, headers=A, json={
        "id": sid, "optimizer": "Adam", "options": {"lr": 0.01}, "shards": shards,
        "params": {n: json_tensor(t) for n, t in params.items()}})
    assert r.status_code == 201, r.text


def tensors(seed: int, names: tuple[str, ...] = ("a", "b")) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(SIZE // len(names), generator=gen) for n in names}


def slow_step(url: str, sid: str, grads: dict[str, torch.Tensor], chunked: bool
              ) -> dict[str, torch.Tensor]:
    """A safetensors step of tenant A sent in pieces, not answered before its end (no early
    404): the parameters its answer gives."""
    body = save(grads)
    parts = unknown.pieces(body, chunked)
    with upload.connect(url) as sock:
        sock.sendall(unknown.head("POST", f"/v1/sessions/{sid}/step", BINARY,
                                  unknown.framing_of(chunked, len(body)),
                                  f"Accept: {BINARY}\r\n{auth(A)}") + parts[0])
        unknown.no_answer_yet(sock)
        for piece in parts[1:]:
            sock.sendall(piece)
        return load(unknown._answer_body(early.read_answer(sock)))


def steps_as_torch(url: str, sid: str, params: dict[str, torch.Tensor], seed: int,
                   chunked: bool) -> None:
    grads = tensors(seed, tuple(params))
    got = slow_step(url, sid, grads, chunked)
    want = unknown._torch_adam(params, grads)
    for name in params:
        assert torch.equal(got[name], want[name]), (sid, name)


#: a push of gradients: the look-up before its body is ``refuse_unknown`` alone (a step's
#: is followed by its LBFGS check, ``Front.uses_evaluations``, which routes the key too)
PUSH = ("POST", "/grads", BINARY)


def refused_early(front: Front, sid: str, headers: dict[str, str], chunked: bool,
                  route: tuple[str, str, str] = PUSH) -> dict[str, object]:
    """A 400 KB upload to ``sid``'s ``route`` as the tenant of ``headers``: its 404 read after
    the first piece (``Connection: close``), the problem a read of ``sid`` by that tenant
    gets; the rest sent after it is dropped and the client's close ends the stream (no
    reset)."""
    method, path, ctype = route
    body = unknown.pieces(b"a" * unknown.BODY, chunked)
    with upload.connect(front.url) as sock:
        sock.sendall(unknown.head(method, f"/v1/sessions/{sid}{path}", ctype,
                                  unknown.framing_of(chunked), auth(headers)) + body[0])
        problem = unknown.the_404(unknown.prompt_answer(sock), closes=True)
        assert upload.lingering(front.live) == 1
        for piece in body[1:20]:
            sock.sendall(piece)  # (a reset here fails the test)
        sock.shutdown(socket.SHUT_WR)
        assert upload.read_to_end(sock) == b""  # (a reset here fails the test)
    want = httpx.get(f"{front.url}/v1/sessions/{sid}", headers=headers, timeout=300)
    assert want.status_code == 404, want.text
    fields = ("type", "status", "title", "detail", "code", "field")
    assert {k: problem.get(k) for k in fields} == {k: want.json().get(k) for k in fields}
    upload.wait_no_lingering(front.live, 40)
    return problem


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("route", unknown.ROUTES,
                         ids=[f"{m} {p or '/'} {c.split('/')[1]}" for m, p, c in unknown.ROUTES])
def test_an_upload_to_an_unknown_session_is_refused_before_its_body(
        front: Front, route: tuple[str, str, str], chunked: bool) -> None:
    """Every body-carrying route of a session (``test_unknown_session_upload.ROUTES``)."""
    refused_early(front, "nope", A, chunked, route)


@pytest.mark.parametrize("shards", [1, 2])
def test_a_session_is_stepped_right_after_its_create(front: Front, shards: int) -> None:
    """Its slow step (sent as the 201 came) is not refused early, and is torch's."""
    params = tensors(shards)
    create(front.url, f"fresh-{shards}", params, shards)
    steps_as_torch(front.url, f"fresh-{shards}", params, 100 + shards, chunked=shards == 2)


@pytest.mark.parametrize("shards", [1, 2])
def test_a_session_deleted_and_made_again_is_stepped(front: Front, shards: int) -> None:
    """Deleted, the id is refused early; made again (other values), its slow step is the new
    session's torch step."""
    sid = f"again-{shards}"
    create(front.url, sid, tensors(10 + shards), shards)
    assert httpx.delete(f"{front.url}/v1/sessions/{sid}", headers=A,
                        timeout=300).status_code == 204
    refused_early(front, sid, A, chunked=False)
    params = tensors(20 + shards)
    create(front.url, sid, params, shards)
    steps_as_torch(front.url, sid, params, 30 + shards, chunked=shards == 1)


def test_another_tenants_session_is_refused_early_as_a_missing_one(front: Front) -> None:
    """Tenant B's slow step to tenant A's session reads the 404 B reads for an id nothing
    holds (its id aside), and A's session is left as it was."""
    params = tensors(40)
    create(front.url, "alices", params)
    theirs = refused_early(front, "alices", B, chunked=True)
    missing = refused_early(front, "nobody", B, chunked=True)
    assert theirs["detail"] == str(missing["detail"]).replace("nobody", "alices")
    assert ({k: v for k, v in theirs.items() if k not in ("detail", "request_id", "instance")}
            == {k: v for k, v in missing.items()
                if k not in ("detail", "request_id", "instance")})
    info = httpx.get(f"{front.url}/v1/sessions/alices", headers=A, timeout=300).json()
    assert info["step"] == 0, info
    steps_as_torch(front.url, "alices", params, 41, chunked=False)


def test_sessions_restored_by_a_restart_are_not_refused_early(front: Front) -> None:
    """A plain and a sharded session made before the server restarts on its data directory
    are stepped by slow uploads after it as torch steps them; an unknown id is still refused
    early."""
    made = {sid: tensors(50 + shards) for shards, sid in ((1, "kept-1"), (2, "kept-2"))}
    for sid, params in made.items():
        create(front.url, sid, params, shards=int(sid[-1]))
    front.restart()
    for sid, params in made.items():
        steps_as_torch(front.url, sid, params, 60 + int(sid[-1]), chunked=sid == "kept-2")
    refused_early(front, "nope", A, chunked=False)


def test_sessions_made_through_another_front_are_not_refused_early(front: Front) -> None:
    """A plain and a sharded session made through a second front on the same data directory
    (this front holds no copy of their directory entries: it reads the directory's files) are
    stepped through this front by slow uploads as torch steps them."""
    made = {sid: tensors(70 + shards) for shards, sid in ((1, "other-1"), (2, "other-2"))}
    with LiveServer(front.settings).serving() as other:
        for sid, params in made.items():
            create(other, sid, params, shards=int(sid[-1]))
        for sid, params in made.items():
            steps_as_torch(front.url, sid, params, 80 + int(sid[-1]),
                           chunked=sid == "other-1")


@pytest.mark.parametrize("shards", [1, 2])
def test_an_evaluation_to_a_ray_session_is_refused_before_its_body(front: Front,
                                                                  shards: int) -> None:
    """``POST .../step/{eval_id}`` to a session on a Ray host (LBFGS evaluations are the
    embedded engine's alone): its 422 ``not_supported_here`` read after the upload's first
    piece (``Connection: close``, the rest dropped without a reset), the problem the
    evaluation's own look-up gives (``DELETE .../step/{id}``, which has no body); the session
    then steps as torch's Adam does."""
    sid, params = f"ray-eval-{shards}", tensors(40 + shards)
    create(front.url, sid, params, shards)
    path = f"/v1/sessions/{sid}/step/s1.1"
    answer, sock = stale._early(front.url, "POST", path, "application/json", auth(A))
    problem = stale._problem(answer, 422, closes=True)
    stale._finish(front.live, sock)
    want = httpx.delete(f"{front.url}{path}", headers=A, timeout=300)
    assert want.status_code == 422, want.text
    fields = ("type", "status", "title", "detail", "code", "field")
    assert {k: problem.get(k) for k in fields} == {k: want.json().get(k) for k in fields}
    assert problem["code"] == "not_supported_here"
    steps_as_torch(front.url, sid, params, 50 + shards, False)
